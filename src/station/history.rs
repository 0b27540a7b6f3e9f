//! `state_dir/history.jsonl`: one line per finished card, appended by a
//! thread of its own, so that the station's loop never waits on the disk.
//! Lines are written in the order the cards finished; closing waits for
//! every line sent.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use super::status::HistoryRecord;

#[derive(Debug)]
pub(super) struct History {
    tx: Option<mpsc::Sender<(PathBuf, HistoryRecord)>>,
    thread: Option<JoinHandle<()>>,
}

impl History {
    pub(super) fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<(PathBuf, HistoryRecord)>();
        let thread = std::thread::Builder::new().name("history".into()).spawn(move || {
            for (dir, record) in rx {
                let path = dir.join("history.jsonl");
                if let Err(e) = append(&dir, &path, &record) {
                    tracing::warn!("cannot append to {}: {e}", path.display());
                }
            }
        })?;
        Ok(Self { tx: Some(tx), thread: Some(thread) })
    }

    /// Queues a line for `state_dir/history.jsonl`.
    pub(super) fn append(&self, state_dir: &Path, record: HistoryRecord) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((state_dir.to_owned(), record));
        }
    }
}

impl Drop for History {
    /// Every queued line is on disk before the daemon goes on to exit.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn append(dir: &Path, path: &Path, record: &HistoryRecord) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let line = serde_json::to_string(record).map_err(std::io::Error::other)?;
    writeln!(f, "{line}")
}
