//! The status file: the whole station as JSON, replaced atomically (write
//! a temporary file, rename it over) on every state change, and at most
//! four times a second for progress alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::station::status::Snapshot;

const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Runs until the station stops publishing; then writes the last state.
pub async fn run(path: PathBuf, mut snapshots: watch::Receiver<Arc<Snapshot>>) -> anyhow::Result<()> {
    let mut written: Option<(u64, Instant)> = None;
    let mut warned = false;
    loop {
        let snapshot = Arc::clone(&snapshots.borrow_and_update());
        if let Some((version, at)) = written
            && version == snapshot.version
            && at.elapsed() < PROGRESS_INTERVAL
        {
            // Progress only, and too soon: wait, then take whatever is newest.
            tokio::time::sleep(PROGRESS_INTERVAL.saturating_sub(at.elapsed())).await;
            continue;
        }
        match write(&path, &snapshot).await {
            Ok(()) => warned = false,
            Err(e) if !warned => {
                tracing::warn!("cannot write status file {}: {e}", path.display());
                warned = true;
            }
            Err(_) => {}
        }
        written = Some((snapshot.version, Instant::now()));
        if snapshots.changed().await.is_err() {
            let last = Arc::clone(&snapshots.borrow());
            write(&path, &last).await?;
            return Ok(());
        }
    }
}

async fn write(path: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
    let mut json = serde_json::to_vec_pretty(snapshot).map_err(std::io::Error::other)?;
    json.push(b'\n');
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    tokio::fs::write(&tmp, json).await?;
    tokio::fs::rename(&tmp, path).await
}
