//! The one channel for what the tool tells the user while it works:
//! progress spinners, and notes (caveats of an update, one line each).
//!
//! Every stage records its notes here, as it finds them; the front end
//! takes them once: on success it shows them with the package's summary
//! (or in its JSON), on failure before the error, so that a note that
//! explains the failure (a misplaced hunk, a header no file includes) is
//! seen either way.

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;

static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Record a note for the user.
pub fn note(text: impl Into<String>) {
    if let Ok(mut notes) = NOTES.lock() {
        notes.push(text.into());
    }
}

/// The notes recorded so far, in order; the channel is empty afterwards.
pub fn take_notes() -> Vec<String> {
    NOTES
        .lock()
        .map(|mut notes| std::mem::take(&mut *notes))
        .unwrap_or_default()
}

/// A line of one of several builds running at once, shown with its target
/// in front (`[6.1.0-57-amd64] note: ...`): on stdout when the build
/// printed it there, else on stderr. One whole line per write, so the
/// builds' lines never mix.
pub fn relay(target: &str, line: &str, to_stdout: bool) {
    use std::io::Write;
    // One write of the whole line: `eprintln!` writes its pieces apart.
    let text = format!("[{target}] {line}\n");
    let _ = if to_stdout {
        std::io::stdout().lock().write_all(text.as_bytes())
    } else {
        std::io::stderr().lock().write_all(text.as_bytes())
    };
}

/// A spinner on stderr for a step that takes a while; hidden when stderr is not a terminal.
pub fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").unwrap());
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_come_out_once_in_the_order_recorded() {
        take_notes();
        note("first");
        note(String::from("second"));
        assert_eq!(take_notes(), ["first", "second"]);
        assert!(take_notes().is_empty());
    }
}
