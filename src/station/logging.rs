//! The core's log lines on their way out: to the journal, as structured
//! entries with the slot's fields (SLOT, DEVNAME, DISKSEQ, SERIAL, IMAGE,
//! STAGE), and as [`LogLine`]s for followers.

use super::machine::{Level, NoteFields, SlotLog};
use super::slot::LogContext;
use super::status::LogLine;

/// A slot's line to the journal, with the slot's fields; returns it as
/// followers get it.
pub(super) fn slot_line(line: SlotLog) -> LogLine {
    // The journal's message must stand on its own (`journalctl -f`
    // shows nothing else): it starts with the slot's name.
    let (name, stage, message) = (&line.context.slot, line.stage.as_str(), &line.message);
    span(&line.context).in_scope(|| match line.level {
        Level::Error => tracing::error!(stage, "{name}: {message}"),
        Level::Warn => tracing::warn!(stage, "{name}: {message}"),
        Level::Info | Level::Debug => tracing::info!(stage, "{name}: {message}"),
    });
    let level = match line.level {
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info | Level::Debug => "info",
    };
    LogLine { time: line.time, slot: line.context.slot, level, stage: line.stage, message: line.message }
}

/// A station-level line, with the fields that are set.
pub(super) fn note(level: Level, message: &str, fields: &NoteFields) {
    let image = fields.image.as_ref().map(|p| tracing::field::display(p.display()));
    let (sha256, slot) = (fields.sha256.as_deref(), fields.slot.as_deref());
    match level {
        Level::Error => tracing::error!(image, sha256, slot, "{message}"),
        Level::Warn => tracing::warn!(image, sha256, slot, "{message}"),
        Level::Info => tracing::info!(image, sha256, slot, "{message}"),
        Level::Debug => tracing::debug!(image, sha256, slot, "{message}"),
    }
}

/// A slot's log context; journald gets SLOT, DEVNAME, DISKSEQ, SERIAL, IMAGE.
pub(super) fn span(c: &LogContext) -> tracing::Span {
    let span = tracing::info_span!(
        "slot",
        slot = %c.slot,
        devname = tracing::field::Empty,
        diskseq = tracing::field::Empty,
        serial = tracing::field::Empty,
        image = %c.image.display(),
    );
    if let Some(devname) = &c.devname {
        span.record("devname", tracing::field::display(devname.display()));
    }
    if let Some(seq) = c.diskseq {
        span.record("diskseq", seq);
    }
    if let Some(serial) = &c.serial {
        span.record("serial", serial.as_str());
    }
    span
}
