//! stub
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;

/// A spinner on stderr for a step that takes a while; hidden when stderr is not a terminal.
pub fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").unwrap());
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// `VERSION.PATCHLEVEL.SUBLEVEL` of a kernel tree, read from its Makefile.
pub fn kernel_version(source: &Path) -> Result<String> {
    let text = std::fs::read_to_string(source.join("Makefile"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.trim().strip_prefix('='))
            })
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    Ok(format!(
        "{}.{}.{}{}",
        field("VERSION"),
        field("PATCHLEVEL"),
        field("SUBLEVEL"),
        field("EXTRAVERSION")
    ))
}
