//! Logging: structured journald entries when stderr is connected to the
//! journal (systemd sets `JOURNAL_STREAM`), human-readable lines otherwise.
//!
//! Job lines carry the slot's span fields, so journald gets `SLOT`,
//! `DEVNAME`, `DISKSEQ`, `SERIAL` and `IMAGE` on every one, and `STAGE`
//! from the event itself: `journalctl -u flashbay SLOT=A1` works.

use std::os::unix::fs::MetadataExt;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// journald when stderr is the journal, else stderr.
    Auto,
    Journal,
    Stderr,
}

/// Installs the global subscriber. `default_level` applies unless the
/// `FLASHBAY_LOG` environment variable says otherwise (e.g. `debug`).
pub fn init(target: Target, default_level: &str) {
    let filter = EnvFilter::try_from_env("FLASHBAY_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let journal = match target {
        Target::Stderr => None,
        Target::Journal => Some(true),
        Target::Auto => stderr_is_journal().then_some(false),
    };
    if let Some(required) = journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_field_prefix(None).with_syslog_identifier("flashbay".into());
                tracing_subscriber::registry().with(filter).with(layer).init();
                return;
            }
            Err(e) if required => eprintln!("warning: cannot log to the journal ({e}); logging to stderr"),
            Err(_) => {}
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// systemd's way of saying "your stderr is the journal": `JOURNAL_STREAM`
/// holds the device and inode of the stream, which must match fd 2.
fn stderr_is_journal() -> bool {
    let Some(expected) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else { return false };
    expected.to_str() == Some(&format!("{}:{}", meta.dev(), meta.ino()))
}
