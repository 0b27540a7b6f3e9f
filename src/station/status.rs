//! The station's state as one document: what the status file holds, and
//! what every reporter (journal, HTTP, LEDs, systemd) reads.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Serialize, Serializer};

use crate::image::Format;
use crate::model::SlotState;

/// The whole station.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Increases on every state change (not on progress alone).
    pub version: u64,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: SystemTime,
    pub config: PathBuf,
    pub concurrency: usize,
    /// Where the HTTP endpoint listens, when it does.
    pub http: Option<String>,
    pub summary: Summary,
    /// Bytes and stage durations of finished cards, counted by the station
    /// with the cards themselves (never from a lossy event stream).
    #[serde(skip)]
    pub totals: Totals,
    pub images: Vec<ImageStatus>,
    pub slots: Vec<SlotStatus>,
}

/// Upper bounds of the duration buckets: a card takes seconds to an hour.
pub const BUCKETS: [f64; 11] = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0];

/// What finished cards add up to since the daemon started.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub written_bytes: u64,
    pub write: Histogram,
    pub verify: Histogram,
}

impl Totals {
    pub fn record(&mut self, report: &crate::pipeline::Report) {
        use crate::model::{Stage, StageResult};
        for stage in report.stages.iter().filter(|s| s.result == StageResult::Done) {
            match stage.stage {
                Stage::Write => {
                    self.written_bytes += report.raw_size;
                    self.write.observe(stage.seconds);
                }
                Stage::Verify => self.verify.observe(stage.seconds),
                _ => {}
            }
        }
    }
}

/// A Prometheus histogram over [`BUCKETS`] (cumulative buckets).
#[derive(Debug, Default, Clone)]
pub struct Histogram {
    pub buckets: [u64; BUCKETS.len()],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, value: f64) {
        for (bucket, bound) in self.buckets.iter_mut().zip(BUCKETS) {
            if value <= bound {
                *bucket += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }
}

/// Counts for one-line summaries (systemd `STATUS=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Slots with a job working on them now.
    pub writing: usize,
    pub queued: usize,
    /// Cards finished since the daemon started, by result.
    pub done: u64,
    pub failed: u64,
    pub refused: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} writing, {} queued, {} done, {} failed", self.writing, self.queued, self.done, self.failed)?;
        if self.refused > 0 {
            write!(f, ", {} refused", self.refused)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageStatus {
    pub path: PathBuf,
    /// `preparing`, `ready` or `failed`.
    pub state: &'static str,
    pub format: Option<Format>,
    pub raw_size: Option<u64>,
    pub sha256: Option<String>,
    /// Whether cards are written from a decompressed copy in the cache.
    pub cached: bool,
    pub error: Option<String>,
}

/// One slot: its card, its job, its result.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub port: String,
    pub image: PathBuf,
    pub state: SlotState,
    pub device: Option<PathBuf>,
    pub diskseq: Option<u64>,
    pub serial: Option<String>,
    pub vendor: Option<String>,
    pub model: Option<String>,
    /// Card size in bytes.
    pub size: Option<u64>,
    /// Fraction of the current stage, 0 to 1.
    pub progress: f64,
    pub bytes_written: u64,
    /// Bytes per second in the current stage.
    pub rate: f64,
    pub eta_seconds: Option<f64>,
    #[serde(serialize_with = "rfc3339_opt")]
    pub started_at: Option<SystemTime>,
    #[serde(serialize_with = "rfc3339_opt")]
    pub finished_at: Option<SystemTime>,
    pub error: Option<String>,
    /// Jobs started on this slot since the daemon started.
    pub jobs: u64,
    /// What each stage of the current (or last) job did.
    pub stages: Vec<crate::pipeline::StageOutcome>,
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

#[allow(clippy::ref_option)] // serde's serialize_with passes &Option<T>
fn rfc3339_opt<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// What the station tells its followers, in the order it happened.
#[derive(Debug, Clone)]
pub enum Event {
    /// A slot changed state, or (at most four times a second) progressed.
    Slot(Arc<SlotStatus>),
    /// A job log line, as the journal has it.
    Log(Arc<LogLine>),
    /// A card is finished: done, failed or refused.
    Finished(Arc<JobRecord>),
}

#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub slot: String,
    /// `info`, `warn` or `error`.
    pub level: &'static str,
    pub stage: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub slot: String,
    pub state: SlotState,
    /// Present when the job got as far as a report (always for `done`).
    pub report: Option<crate::pipeline::Report>,
}

/// One line of `state_dir/history.jsonl`: a finished card.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryRecord {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub slot: String,
    pub port: String,
    pub image: PathBuf,
    pub state: SlotState,
    pub error: Option<String>,
    pub image_sha256: Option<String>,
    /// Proof, per card: the card was read back and matched the image.
    pub verified: bool,
    pub report: Option<crate::pipeline::Report>,
}
