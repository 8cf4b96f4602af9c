//! Progress bars on stderr (indicatif), off when stderr is not a terminal or when quiet, and
//! the notices of library code (a missing adapter, an old index), which never prints itself:
//! it hands them to [`Progress::notice`], and the caller decides where they go.

use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

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
    /// Bars drawn on stderr (indicatif hides them itself when stderr is not a terminal), and
    /// notices printed on stderr above them.
    pub fn stderr() -> Progress {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
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
