//! `state_dir/history.jsonl`: one line per finished card, keys sorted, in
//! the order the cards finished. A line is on disk before the card is
//! shown finished anywhere (status, events, hooks), so whoever reacts to a
//! finished card finds its line, and a crash right after loses none.

use std::io::Write;
use std::path::Path;

use super::status::HistoryRecord;

/// Appends a line. The write is small but the station's own storage may be
/// slow (a worn SD card): it runs with the runtime told that this thread
/// blocks, so the other tasks (HTTP, LEDs, the watchdog) go on meanwhile.
pub(super) fn append(state_dir: &Path, record: &HistoryRecord) {
    let path = state_dir.join("history.jsonl");
    let write = || -> std::io::Result<()> {
        // Through a `Value`, whose maps are sorted: the keys' order stays
        // the same whatever the struct's field order.
        let line = serde_json::to_value(record).map_err(std::io::Error::other)?.to_string();
        std::fs::create_dir_all(state_dir)?;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        writeln!(f, "{line}")
    };
    if let Err(e) = tokio::task::block_in_place(write) {
        tracing::warn!("cannot append to {}: {e}", path.display());
    }
}
