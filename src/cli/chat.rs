//! `ragtune chat`: the offline chat. A line editor with history when stdin is a terminal, a
//! plain line reader when it is piped; answers streamed to stdout, everything else (sources
//! and timings after each answer, notices, errors) on stderr, so piped stdout carries only
//! the answers and what `/sources` and `/help` print.
//!
//! The conversation is kept as user/assistant messages and sent with each question; the
//! engine keeps as many of the most recent turns as fit the context window
//! (`ragtune::engine::prompt`). Ctrl-C during an answer stops that answer (its text so far
//! is kept in the conversation); at the prompt it clears the line.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use ragtune::engine::{Answer, Engine, IndexStatus, Mode};
use ragtune_generate::ChatMessage;
use rustyline::error::ReadlineError;

use super::ask::AnswerArgs;
use super::Context;

/// Arguments of `ragtune chat`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    answer: AnswerArgs,
    /// Do not read or write the line history file (`$HOME/.ragtune_history`).
    #[arg(long)]
    no_history_file: bool,
}

const HELP: &str = "\
Type a question, or a command:
  /mode hybrid|rag|finetune|base   how to answer (hybrid and finetune need an adapter)
  /k N                             sources to retrieve (rag, hybrid)
  /sources                         the last answer's sources, with their text
  /clear                           forget the conversation
  /help                            this text
  /quit                            leave (also Ctrl-D)
Ctrl-C stops the answer being written.";

/// One line of input.
enum Line {
    Text(String),
    /// A piped line that cannot be read (not UTF-8): the message names it.
    Bad(String),
    /// Ctrl-C at the prompt: the line was dropped.
    Interrupted,
    Eof,
}

/// Where lines come from.
enum Input {
    Editor {
        editor: Box<rustyline::DefaultEditor>,
        history_file: Option<PathBuf>,
    },
    Piped {
        stdin: std::io::StdinLock<'static>,
        number: usize,
    },
}

impl Input {
    fn new(history_file: Option<PathBuf>) -> anyhow::Result<Input> {
        if !std::io::stdin().is_terminal() {
            return Ok(Input::Piped {
                stdin: std::io::stdin().lock(),
                number: 0,
            });
        }
        let mut editor = rustyline::DefaultEditor::new().context("starting the line editor")?;
        if let Some(path) = &history_file {
            // A missing or unreadable history file is not a reason not to chat.
            let _ = editor.load_history(path);
        }
        Ok(Input::Editor {
            editor: Box::new(editor),
            history_file,
        })
    }

    fn interactive(&self) -> bool {
        matches!(self, Input::Editor { .. })
    }

    fn read(&mut self, prompt: &str) -> anyhow::Result<Line> {
        match self {
            Input::Editor { editor, .. } => match editor.readline(prompt) {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = editor.add_history_entry(line.as_str());
                    }
                    Ok(Line::Text(line))
                }
                Err(ReadlineError::Interrupted) => Ok(Line::Interrupted),
                Err(ReadlineError::Eof) => Ok(Line::Eof),
                Err(e) => Err(e).context("reading a line"),
            },
            Input::Piped { stdin, number } => {
                *number += 1;
                Ok(match super::read_input_line(stdin, *number)? {
                    None => Line::Eof,
                    Some(line) => match line.text {
                        Ok(t) => Line::Text(t),
                        Err(e) => Line::Bad(e),
                    },
                })
            }
        }
    }

    fn save_history(&mut self) {
        if let Input::Editor {
            editor,
            history_file: Some(path),
        } = self
        {
            let _ = editor.save_history(path);
        }
    }
}

/// The chat's state between lines.
struct Chat {
    engine: Engine,
    /// The answer options; `/mode` and `/k` change `mode` and `k`.
    args: AnswerArgs,
    /// Earlier turns, oldest first.
    history: Vec<ChatMessage>,
    last: Option<Answer>,
    /// Set by Ctrl-C while an answer is written; cleared before each answer.
    cancel: Arc<AtomicBool>,
    /// Whether an answer is being written (Ctrl-C then stops it instead of the program).
    busy: Arc<AtomicBool>,
    /// Questions asked, and how many of them (or of unreadable lines) failed.
    asked: usize,
    failed: usize,
}

/// What to do after a line.
enum Next {
    Continue,
    Quit,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    // A first run opens the prompt once the metadata records are indexed; the full texts
    // are embedded in the background and searched once they are in.
    let mut config = ctx.engine_config(args.answer.adapter.as_deref())?;
    config.index_in_background = true;
    let engine = Engine::open(config, &ctx.progress)?;
    let mut answer_args = args.answer;
    // Settle the mode now, so that a bad --mode fails at start and the prompt names it.
    let mode = answer_args.mode(&engine)?;
    answer_args.mode = Some(mode.to_string());

    let history_file = if args.no_history_file {
        None
    } else {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ragtune_history"))
    };
    let mut input = Input::new(history_file)?;

    let cancel = Arc::new(AtomicBool::new(false));
    let busy = Arc::new(AtomicBool::new(false));
    {
        let (cancel, busy) = (cancel.clone(), busy.clone());
        let interactive = input.interactive();
        ctrlc::set_handler(move || {
            if busy.load(Ordering::SeqCst) {
                cancel.store(true, Ordering::SeqCst);
            } else if !interactive {
                // Piped and waiting for input: nothing to stop but the program.
                std::process::exit(130);
            }
        })
        .context("installing the Ctrl-C handler")?;
    }

    let mut chat = Chat {
        engine,
        args: answer_args,
        history: Vec::new(),
        last: None,
        cancel,
        busy,
        asked: 0,
        failed: 0,
    };
    if input.interactive() {
        eprintln!("ragtune chat: mode {mode}. /help for commands, /quit or Ctrl-D to leave.");
    }
    let result = loop {
        let prompt = format!("{}> ", chat.mode_name());
        let line = match input.read(&prompt) {
            Ok(Line::Text(line)) => line,
            Ok(Line::Interrupted) => continue,
            Ok(Line::Bad(e)) => {
                eprintln!("error: {e}");
                chat.failed += 1;
                continue;
            }
            Ok(Line::Eof) => break Ok(()),
            Err(e) => break Err(e),
        };
        match chat.line(&line) {
            Ok(Next::Continue) => {}
            Ok(Next::Quit) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    input.save_history();
    if let IndexStatus::RecordsOnly {
        embedded, total, ..
    } = chat.engine.index_status()
    {
        eprintln!(
            "(the full index was not finished: {}; the next `ragtune chat` starts it again \
             in the background, `ragtune ingest` builds it in the foreground)",
            embedded_so_far(embedded, total)
        );
    }
    result?;
    // Piped, a session in which every question failed is a failure (for scripts); at a
    // terminal the user saw each error already.
    if !input.interactive() && chat.failed > 0 && chat.failed >= chat.asked {
        anyhow::bail!(
            "all {} question(s) of the session failed (see the errors above)",
            chat.failed
        );
    }
    Ok(())
}

impl Chat {
    fn mode_name(&self) -> &str {
        self.args.mode.as_deref().unwrap_or("")
    }

    /// Handles one line. Errors of a question or a command are printed and the chat goes
    /// on; only a failure to write the output ends it.
    fn line(&mut self, line: &str) -> anyhow::Result<Next> {
        let line = line.trim();
        if line.is_empty() {
            return Ok(Next::Continue);
        }
        let Some(command) = line.strip_prefix('/') else {
            self.ask(line)?;
            return Ok(Next::Continue);
        };
        let (name, arg) = match command.split_once(char::is_whitespace) {
            Some((n, a)) => (n, a.trim()),
            None => (command, ""),
        };
        match name {
            "quit" | "exit" | "q" => return Ok(Next::Quit),
            "help" | "?" => writeln!(std::io::stdout(), "{HELP}")?,
            "mode" => self.set_mode(arg),
            "k" => self.set_k(arg),
            "sources" => self.print_sources()?,
            "clear" => {
                self.history.clear();
                self.last = None;
                eprintln!("(conversation cleared)");
            }
            other => eprintln!("error: unknown command `/{other}`: /help lists the commands"),
        }
        Ok(Next::Continue)
    }

    fn set_mode(&mut self, arg: &str) {
        if arg.is_empty() {
            eprintln!(
                "mode: {} (use /mode hybrid|rag|finetune|base)",
                self.mode_name()
            );
            return;
        }
        match arg.parse::<Mode>() {
            Ok(mode) => {
                self.args.mode = Some(mode.to_string());
                let adapter =
                    self.args.adapter.is_some() || self.engine.config().default_adapter.is_some();
                if mode.uses_adapter() && !adapter {
                    eprintln!(
                        "mode {mode} (note: it needs a LoRA adapter and none is configured; \
                         questions will fail until you pass --adapter or switch mode)"
                    );
                } else {
                    eprintln!("mode {mode}");
                }
            }
            Err(e) => eprintln!("error: {e}"),
        }
    }

    fn set_k(&mut self, arg: &str) {
        if arg.is_empty() {
            let k = self.args.k.unwrap_or(self.engine.config().k);
            eprintln!("k: {k} (use /k N)");
            return;
        }
        match arg.parse::<usize>() {
            Ok(k) if k >= 1 => {
                self.args.k = Some(k);
                eprintln!("k {k}");
            }
            _ => eprintln!("error: /k takes a whole number of sources, at least 1 (got `{arg}`)"),
        }
    }

    fn print_sources(&self) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        match &self.last {
            None => eprintln!("no answer yet"),
            Some(a) if a.sources.is_empty() => {
                eprintln!("the last answer ({} mode) had no sources", a.mode)
            }
            Some(a) => {
                for (i, s) in a.sources.iter().enumerate() {
                    writeln!(out, "{}", super::source_label(a, i + 1, " chunk "))?;
                    for l in s.text.trim().lines() {
                        writeln!(out, "    {l}")?;
                    }
                }
                out.flush()?;
            }
        }
        Ok(())
    }

    /// Answers `question`, streaming to stdout; a failed question is reported on stderr.
    fn ask(&mut self, question: &str) -> anyhow::Result<()> {
        self.asked += 1;
        let mut request = match self.args.request(&self.engine, question) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e:#}");
                self.failed += 1;
                return Ok(());
            }
        };
        request.history = self.history.clone();
        request.cancel = Some(self.cancel.clone());
        // Read before answering: it also switches to the full index once that is written.
        let index = self.engine.index_status();
        self.cancel.store(false, Ordering::SeqCst);
        self.busy.store(true, Ordering::SeqCst);
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut write_error = None;
        let result = self.engine.answer_streaming(&request, |t| {
            if write_error.is_none() {
                if let Err(e) = out.write_all(t.as_bytes()).and_then(|()| out.flush()) {
                    write_error = Some(e);
                }
            }
        });
        self.busy.store(false, Ordering::SeqCst);
        if let Some(e) = write_error {
            return Err(e.into());
        }
        match result {
            Ok(answer) => {
                writeln!(out)?;
                out.flush()?;
                drop(out);
                if answer.cancelled {
                    eprintln!("(stopped)");
                }
                print_summary(&answer, self.history.len());
                if answer.mode.uses_retrieval() {
                    match index {
                        IndexStatus::RecordsOnly {
                            embedded, total, ..
                        } => eprintln!("{}", partial_index_note(embedded, total)),
                        IndexStatus::RecordsOnlyFailed => eprintln!(
                            "(sources from the metadata records only: the full index could \
                             not be built, see above; `ragtune ingest` builds it)"
                        ),
                        IndexStatus::Complete => {}
                    }
                }
                if !answer.text.trim().is_empty() {
                    self.history.push(ChatMessage::user(question.trim()));
                    self.history
                        .push(ChatMessage::assistant(answer.text.trim()));
                }
                self.last = Some(answer);
            }
            Err(e) => {
                drop(out);
                eprintln!("error: {e}");
                self.failed += 1;
            }
        }
        Ok(())
    }
}

/// How far a background ingest got: `starting` or `N% embedded (E of T chunks)`.
fn embedded_so_far(embedded: usize, total: usize) -> String {
    if total == 0 {
        return "starting".to_string();
    }
    format!(
        "{:.0}% embedded ({embedded} of {total} chunks)",
        100.0 * embedded as f64 / total as f64
    )
}

/// What a retrieval answer could draw on while a first run's full ingest runs.
fn partial_index_note(embedded: usize, total: usize) -> String {
    format!(
        "(sources from the metadata records only: the full texts are being indexed in the \
         background, {}; the chat switches to them when they are in)",
        embedded_so_far(embedded, total)
    )
}

/// One or two lines on stderr after an answer: the sources, then mode, tokens and timings
/// (the short form of `ask::print_details`).
fn print_summary(a: &Answer, history: usize) {
    let mut err = std::io::stderr().lock();
    if !a.sources.is_empty() {
        let list: Vec<String> = a
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let cited = a.citations.iter().any(|c| c.valid && c.number == i + 1);
                format!(
                    "[{}] {}#{}{}",
                    i + 1,
                    s.doc_id,
                    s.chunk,
                    if cited { "*" } else { "" }
                )
            })
            .collect();
        let _ = writeln!(err, "sources: {} (/sources for the text)", list.join(" "));
    }
    let t = &a.timings;
    let memory = if history > 0 {
        format!(", memory {} of {history} messages", a.history_messages)
    } else {
        String::new()
    };
    let _ = writeln!(
        err,
        "[{}{}; {} prompt tokens ({} cached){memory}; first token {:.0} ms, {} tokens at {:.1} tokens/s, total {:.0} ms]",
        a.mode,
        a.adapter
            .as_deref()
            .map(|n| format!(" + {n}"))
            .unwrap_or_default(),
        a.tokens.prompt,
        a.tokens.cached,
        t.first_token,
        a.tokens.generated,
        a.decode_tokens_per_s,
        t.total
    );
}
