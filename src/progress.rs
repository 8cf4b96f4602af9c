//! Progress bars on stderr (indicatif), off when stderr is not a terminal or when quiet.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Creates progress bars and spinners; a disabled one creates hidden bars, so library code
/// can report progress unconditionally.
#[derive(Debug, Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
}

impl Progress {
    /// Bars drawn on stderr (indicatif hides them itself when stderr is not a terminal).
    pub fn stderr() -> Progress {
        Progress {
            multi: Some(MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// No bars at all.
    pub fn hidden() -> Progress {
        Progress { multi: None }
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
