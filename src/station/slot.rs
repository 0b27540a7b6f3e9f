//! One slot as the station core sees it: the port's configuration, its
//! card, its job (queued or running) and what the last job did. Plain data;
//! the core changes it, the status page shows it.

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use super::status::SlotStatus;
use crate::config::SlotConfig;
use crate::model::{SlotState, StageOutcome};

/// The card in a slot, as udev described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    pub devnode: PathBuf,
    pub diskseq: Option<u64>,
    pub size: u64,
    pub serial: Option<String>,
    pub vendor: Option<String>,
    pub model: Option<String>,
}

/// Why the station stopped a job itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopReason {
    Removed,
    Shutdown,
    Operator,
}

/// A slot's job: queued until the scheduler starts it.
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub id: u64,
    /// False while the card waits in the queue.
    pub running: bool,
    pub stop: Option<StopReason>,
}

/// Byte counts of a running job's current stage, as sampled.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub done: u64,
    pub total: u64,
    /// Bytes written to the card so far (the write stage's count).
    pub written: u64,
}

/// Rate and ETA of the running stage, from sampled byte counts.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Meter {
    done: u64,
    total: u64,
    written: u64,
    rate: f64,
    last: Option<(Instant, u64)>,
}

impl Meter {
    /// A new stage: its own rate and ETA, the card's written bytes kept.
    pub(super) fn next_stage(self) -> Self {
        Self { written: self.written, ..Self::default() }
    }

    pub(super) fn sample(&mut self, s: Sample, now: Instant) {
        self.total = s.total;
        self.written = s.written;
        if let Some((at, before)) = self.last {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            if dt > 0.0 && s.done >= before {
                let instant = (s.done - before) as f64 / dt;
                // Smooth over ~2 s so the ETA does not jump with every chunk.
                self.rate = if self.rate == 0.0 { instant } else { self.rate * 0.8 + instant * 0.2 };
            }
        }
        self.last = Some((now, s.done));
        self.done = s.done;
    }
}

/// What a slot's log lines carry, for journald fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogContext {
    pub slot: String,
    pub devname: Option<PathBuf>,
    pub diskseq: Option<u64>,
    pub serial: Option<String>,
    pub image: PathBuf,
}

#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub config: SlotConfig,
    pub state: SlotState,
    pub card: Option<Card>,
    /// DISKSEQ of the media last seen here: seeing it again is not a new card.
    pub media: Option<u64>,
    pub job: Option<Job>,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub error: Option<String>,
    pub jobs: u64,
    /// When the last job failed on an I/O error, and in which state: a
    /// removal right after means the card was pulled mid-job.
    pub io_failure: Option<(Instant, SlotState)>,
    pub meter: Meter,
    /// Dropped from the configuration; kept until its running job ends.
    pub retired: bool,
    /// Outcomes of the current (or last) job's stages.
    pub stages: Vec<StageOutcome>,
    /// The last job ejected the card: its removal is expected, and `done`
    /// stays on show until the next card.
    pub ejected: bool,
    /// SHA-256 of the image the current (or last) job wrote, for history.
    pub image_sha256: Option<String>,
}

impl Slot {
    pub(super) fn new(config: SlotConfig) -> Self {
        Self {
            config,
            state: SlotState::Empty,
            card: None,
            media: None,
            job: None,
            started_at: None,
            finished_at: None,
            error: None,
            jobs: 0,
            io_failure: None,
            meter: Meter::default(),
            retired: false,
            stages: Vec::new(),
            ejected: false,
            image_sha256: None,
        }
    }

    pub(super) fn job_id(&self) -> Option<u64> {
        self.job.as_ref().map(|j| j.id)
    }

    pub(super) fn running(&self) -> bool {
        self.job.as_ref().is_some_and(|j| j.running)
    }

    pub(super) fn status(&self) -> SlotStatus {
        let m = &self.meter;
        let active = self.state.is_active();
        let progress = if m.total > 0 && active {
            m.done as f64 / m.total as f64
        } else if self.state == SlotState::Done {
            1.0
        } else {
            0.0
        };
        SlotStatus {
            name: self.config.name.clone(),
            port: self.config.port.clone(),
            image: self.config.image.clone(),
            state: self.state,
            device: self.card.as_ref().map(|c| c.devnode.clone()),
            diskseq: self.card.as_ref().and_then(|c| c.diskseq),
            serial: self.card.as_ref().and_then(|c| c.serial.clone()),
            vendor: self.card.as_ref().and_then(|c| c.vendor.clone()),
            model: self.card.as_ref().and_then(|c| c.model.clone()),
            size: self.card.as_ref().map(|c| c.size),
            progress,
            bytes_written: m.written,
            rate: if active { m.rate } else { 0.0 },
            eta_seconds: (active && m.rate > 0.0).then(|| m.total.saturating_sub(m.done) as f64 / m.rate),
            started_at: self.started_at,
            finished_at: self.finished_at,
            error: self.error.clone(),
            jobs: self.jobs,
            stages: self.stages.clone(),
        }
    }

    pub(super) fn context(&self) -> LogContext {
        LogContext {
            slot: self.config.name.clone(),
            devname: self.card.as_ref().map(|c| c.devnode.clone()),
            diskseq: self.card.as_ref().and_then(|c| c.diskseq),
            serial: self.card.as_ref().and_then(|c| c.serial.clone()),
            image: self.config.image.clone(),
        }
    }

    /// A new card (or a retry): forget what the last job showed.
    pub(super) fn clear_last_job(&mut self) {
        self.error = None;
        self.stages.clear();
        self.ejected = false;
    }
}
