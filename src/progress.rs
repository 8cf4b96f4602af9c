//! Progress bars on stderr (indicatif), off when stderr is not a terminal or when quiet, and
//! the notices of library code (a missing adapter, an old index), which never prints itself:
//! it hands them to [`Progress::notice`], and the caller decides where they go.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// A receiver of notices (one line of text each).
pub type NoticeSink = Arc<dyn Fn(&str) + Send + Sync>;

/// Creates progress bars and spinners and passes on notices; a disabled one creates hidden
/// bars, so library code can report progress unconditionally.
#[derive(Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
    notices: Option<NoticeSink>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("bars", &self.multi.is_some())
            .field("notices", &self.notices.is_some())
            .finish()
    }
}

impl Progress {
    /// Bars drawn on stderr, and notices printed on stderr above them. When stderr is not a
    /// terminal (a log file, a pipe), the bars are written as plain lines every
    /// [`LOG_EVERY`] instead, so a log shows how far a long step got.
    pub fn stderr() -> Progress {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::term_like(Box::new(LogLines::default()))
        };
        let multi = MultiProgress::with_draw_target(target);
        let printer = multi.clone();
        Progress {
            multi: Some(multi),
            notices: Some(Arc::new(move |line: &str| {
                printer.suspend(|| eprintln!("{line}"));
            })),
        }
    }

    /// No bars and no notices at all.
    pub fn hidden() -> Progress {
        Progress {
            multi: None,
            notices: None,
        }
    }

    /// The same bars, with notices going to `sink` instead.
    pub fn with_notices(mut self, sink: impl Fn(&str) + Send + Sync + 'static) -> Progress {
        self.notices = Some(Arc::new(sink));
        self
    }

    /// Passes `message` (one line, no trailing newline) to the notice sink, if any.
    pub fn notice(&self, message: &str) {
        if let Some(sink) = &self.notices {
            sink(message);
        }
    }

    fn add(&self, bar: ProgressBar) -> ProgressBar {
        match &self.multi {
            Some(m) => m.add(bar),
            None => ProgressBar::hidden(),
        }
    }

    /// A bar of `len` items.
    pub fn bar(&self, len: u64, message: impl Into<String>) -> ProgressBar {
        let bar = self.add(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:<28} [{bar:30}] {human_pos}/{human_len} ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(message.into());
        bar
    }

    /// A bar of `len` units with a custom template (`{pos}`, `{len}`, `{msg}`, ...).
    pub fn bar_with(&self, len: u64, template: &str, message: impl Into<String>) -> ProgressBar {
        let bar = self.add(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(message.into());
        bar
    }

    /// A spinner for a step of unknown length.
    pub fn spinner(&self, message: impl Into<String>) -> ProgressBar {
        let bar = self.add(ProgressBar::new_spinner());
        bar.set_message(message.into());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }
}

/// How often the bars are written as lines when stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// An indicatif draw target for logs: of each redraw of the bars, the lines are written to
/// stderr as plain lines, at most once every [`LOG_EVERY`] (the first at once); the cursor
/// movements of a terminal redraw are ignored.
#[derive(Debug, Default)]
struct LogLines {
    state: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    /// The line being written.
    line: String,
    /// The lines of the redraw so far.
    lines: Vec<String>,
    /// When lines were last written.
    written: Option<Instant>,
}

impl LogLines {
    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl TermLike for LogLines {
    fn width(&self) -> u16 {
        120
    }

    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn write_line(&self, s: &str) -> std::io::Result<()> {
        let mut state = self.state();
        let line = std::mem::take(&mut state.line) + s;
        state.lines.push(line);
        Ok(())
    }

    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.state().line.push_str(s);
        Ok(())
    }

    fn clear_line(&self) -> std::io::Result<()> {
        self.state().line.clear();
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        let mut state = self.state();
        let line = std::mem::take(&mut state.line);
        state.lines.push(line);
        let lines = std::mem::take(&mut state.lines);
        let due = state.written.is_none_or(|t| t.elapsed() >= LOG_EVERY);
        let text: Vec<&str> = lines
            .iter()
            .map(|l| l.trim_end())
            .filter(|l| !l.is_empty())
            .collect();
        if due && !text.is_empty() {
            state.written = Some(Instant::now());
            let mut err = std::io::stderr().lock();
            for l in text {
                writeln!(err, "{l}")?;
            }
        }
        Ok(())
    }
}
