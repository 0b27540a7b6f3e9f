//! The station's core: every slot's state machine, the queue and the
//! counters, as plain data and functions. No tokio, no files, no udev: an
//! [`Input`] goes in with the time, [`Effect`]s come out, and the shell
//! around it ([`super::Station`]) carries them out (start or cancel a job,
//! prepare an image, log, append to the history, publish). So every
//! transition is unit-tested in milliseconds, without root.
//!
//! Media identity is the kernel's DISKSEQ: a disk on a slot's port with a
//! DISKSEQ not seen on that slot is a new card, and gets one job.
//! Everything else with the same DISKSEQ (the partition re-read after our
//! own write, udev's change events) is the same card and starts nothing.
//! The job re-checks the DISKSEQ on the open device, so a card swapped in
//! the meantime is never written by a stale job.
//!
//! Every end of a card's job (done, failed, refused, cancelled while
//! queued, image unusable, interrupted) goes through `Core::finish`:
//! counters, history, events and the journal cannot disagree.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::catalog::{Catalog, ImageFacts, ImageState, Rebuild};
use super::scheduler::{self, Decision};
use super::slot::{Card, Job, LogContext, Sample, Slot, StopReason};
use super::status::{HistoryRecord, JobRecord, SlotStatus, Snapshot, Summary, Totals};
use crate::config::Config;
use crate::model::{EjectMode, SlotState, Stage, StageOutcome, StageResult};
use crate::pipeline::Report;

/// A job that failed on I/O and whose card disappears within this window
/// was a card pulled mid-job. (udev may take a while to report the removal
/// of a device that fails every I/O, while it probes it.)
pub const YANK_WINDOW: Duration = Duration::from_secs(15);

/// The time an input happened: monotonic for intervals, wall for records.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    pub wall: SystemTime,
}

impl Now {
    pub fn current() -> Self {
        Self { at: Instant::now(), wall: SystemTime::now() }
    }
}

/// Everything the core reacts to.
#[derive(Debug)]
pub enum Input {
    /// The station starts: prepare every image; fail, once, the slots whose
    /// job a previous run never saw end.
    Start {
        interrupted: Vec<Interrupted>,
    },
    /// A disk on `port` with media (udev add/change, or listed at start).
    CardSeen {
        port: String,
        card: Card,
        at_start: bool,
    },
    /// The disk on `port` lost its media or went away.
    CardGone {
        port: String,
        devnode: PathBuf,
    },
    Stage {
        job: u64,
        stage: Stage,
    },
    Outcome {
        job: u64,
        outcome: StageOutcome,
    },
    /// A job ended; `last` is its final byte count.
    Finished {
        job: u64,
        end: Result<Report, Failure>,
        last: Sample,
    },
    Prepared {
        image: PathBuf,
        result: Result<ImageFacts, String>,
    },
    /// Byte counts of running jobs.
    Progress(Vec<(u64, Sample)>),
    /// Operator: stop the slot's job.
    Cancel {
        slot: String,
    },
    /// Operator: write the slot's card again.
    Retry {
        slot: String,
    },
    /// A new, validated configuration.
    Reload(Arc<Config>),
    /// Stopping: nothing new starts, every job is stopped.
    Shutdown,
    /// Stopping, and the grace period is over: give up on running jobs.
    Abandon,
}

/// A job a previous run left behind (crash, `kill -9`).
#[derive(Debug, Clone)]
pub struct Interrupted {
    pub slot: String,
    pub port: String,
    pub diskseq: Option<u64>,
}

/// Why a job failed, as far as the state machine cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// The safety checks said no.
    Refused,
    /// It stopped because it was told to.
    Cancelled,
    /// The prepared copy of this (configured) image is damaged.
    ImageChanged(PathBuf),
    /// The card failed I/O (maybe pulled).
    Io,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// The one-line reason (for a refusal, without "refused:").
    pub message: String,
}

/// The configuration a job runs with, fixed when it starts: a reload does
/// not change the settings of jobs in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub verify: bool,
    pub expand: bool,
    pub resize: bool,
    pub eject: EjectMode,
}

/// A job to start.
#[derive(Debug, Clone)]
pub struct Start {
    pub job: u64,
    pub slot: String,
    pub port: String,
    pub card: Card,
    pub image: PathBuf,
    pub settings: Settings,
    pub context: LogContext,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// A slot's log line: to the journal with the slot's fields, and to followers.
#[derive(Debug, Clone)]
pub struct SlotLog {
    pub level: Level,
    pub stage: String,
    pub message: String,
    pub context: LogContext,
    pub time: SystemTime,
}

/// Journal fields of a station-level line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoteFields {
    pub image: Option<PathBuf>,
    pub sha256: Option<String>,
    pub slot: Option<String>,
}

/// What the shell must do, in order.
#[derive(Debug)]
pub enum Effect {
    Start(Box<Start>),
    Cancel(u64),
    Prepare {
        image: PathBuf,
        rebuild: Rebuild,
    },
    /// Delete cached copies of images not in `keep`.
    PruneCache {
        keep: Vec<PathBuf>,
    },
    /// List the slots' disks again (new slots may hold cards).
    Rescan,
    Log(SlotLog),
    /// A station-level journal line, with the fields that are set.
    Note {
        level: Level,
        message: String,
        fields: NoteFields,
    },
    History(Box<HistoryRecord>),
    /// To followers: a card is finished.
    Finished(Box<JobRecord>),
    /// To followers: a slot changed or progressed.
    Slot(Box<SlotStatus>),
    /// The state changed: publish this snapshot (its `http` is the shell's).
    Publish(Box<Snapshot>),
    /// A command's answer.
    Reply(Result<String, String>),
}

#[derive(Debug)]
pub struct Core {
    config: Arc<Config>,
    slots: Vec<Slot>,
    /// Job ids of cards waiting for a writer, in insertion order.
    queue: VecDeque<u64>,
    images: Catalog,
    /// Jobs whose card was replaced, by id: (slot name, device). They end
    /// on their own, still count against `concurrency`, and a new job on
    /// the same device waits for them.
    orphans: HashMap<u64, (String, PathBuf)>,
    next_job: u64,
    summary: Summary,
    totals: Totals,
    version: u64,
    /// Shutting down: nothing new starts.
    stopping: bool,
    now: Now,
    /// Prepared images whose file changed, as the shell found them.
    stale: Vec<PathBuf>,
    out: Vec<Effect>,
}

impl Core {
    pub fn new(config: Arc<Config>) -> Self {
        let slots = config.slots.iter().cloned().map(Slot::new).collect();
        Self {
            config,
            slots,
            queue: VecDeque::new(),
            images: Catalog::default(),
            orphans: HashMap::new(),
            next_job: 1,
            summary: Summary::default(),
            totals: Totals::default(),
            version: 0,
            stopping: false,
            now: Now::current(),
            stale: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Reacts to one input; returns what the shell must do, in order.
    /// `stale` names prepared images whose file has changed since (replaced
    /// or rewritten): a card about to be given a writer for one of them
    /// waits for a new preparation instead.
    pub fn handle(&mut self, input: Input, now: Now, stale: &[PathBuf]) -> Vec<Effect> {
        self.now = now;
        self.stale = stale.to_vec();
        match input {
            Input::Start { interrupted } => self.start(interrupted),
            Input::CardSeen { port, card, at_start } => self.card_seen(&port, card, at_start),
            Input::CardGone { port, devnode } => self.card_gone(&port, &devnode),
            Input::Stage { job, stage } => self.on_stage(job, stage),
            Input::Outcome { job, outcome } => self.on_outcome(job, outcome),
            Input::Finished { job, end, last } => self.on_finished(job, &end, last),
            Input::Prepared { image, result } => self.on_prepared(&image, result),
            Input::Progress(samples) => self.on_progress(&samples),
            Input::Cancel { slot } => {
                let reply = self.cancel(&slot);
                self.out.push(Effect::Reply(reply));
            }
            Input::Retry { slot } => {
                let reply = self.retry(&slot);
                self.out.push(Effect::Reply(reply));
            }
            Input::Reload(config) => self.reload(config),
            Input::Shutdown => self.shutdown(),
            Input::Abandon => self.abandon(),
        }
        std::mem::take(&mut self.out)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Jobs running, those of replaced cards included.
    pub fn running(&self) -> usize {
        self.orphans.len() + self.slots.iter().filter(|s| s.running()).count()
    }

    /// Whether a slot still waits for its job to stop.
    pub fn busy(&self) -> bool {
        self.slots.iter().any(Slot::running)
    }

    /// The whole station as the reporters see it.
    pub fn snapshot(&self, http: Option<String>) -> Snapshot {
        let summary = Summary {
            writing: self.slots.iter().filter(|s| s.state.is_active()).count(),
            queued: self.queue.len(),
            ..self.summary
        };
        Snapshot {
            version: self.version,
            updated_at: self.now.wall,
            config: self.config.file.clone(),
            concurrency: self.config.concurrency,
            http,
            summary,
            totals: self.totals.clone(),
            images: self.images.status(&self.config.images()),
            slots: self.slots.iter().filter(|s| !s.retired).map(Slot::status).collect(),
        }
    }

    fn start(&mut self, interrupted: Vec<Interrupted>) {
        for image in self.config.images().into_iter().map(Path::to_owned).collect::<Vec<_>>() {
            self.prepare(&image, Rebuild::IfNeeded);
        }
        self.changed();
        for job in interrupted {
            let Some(i) = self.slots.iter().position(|s| s.config.name == job.slot && s.config.port == job.port) else {
                self.note_plain(
                    Level::Warn,
                    format!("{}: interrupted by restart (slot no longer configured)", job.slot),
                );
                continue;
            };
            self.slots[i].media = job.diskseq;
            self.finish(i, SlotState::Failed, Some("interrupted by restart".into()), None);
        }
    }

    fn card_seen(&mut self, port: &str, card: Card, at_start: bool) {
        let Some(i) = self.slots.iter().position(|s| !s.retired && s.config.port == port) else {
            self.note_plain(Level::Debug, format!("ignoring {}: ID_PATH {port} is not a slot", card.devnode.display()));
            return;
        };
        let slot = &mut self.slots[i];
        // Without DISKSEQ (Linux < 5.15) a card is new only after an empty reader.
        let same = match card.diskseq {
            Some(seq) => slot.media == Some(seq),
            None => slot.card.is_some(),
        };
        if same {
            // udev may add properties later (serial, model); keep the freshest.
            let first_sight = slot.card.is_none();
            slot.card = Some(card);
            if first_sight {
                // The card of a job a restart interrupted, seen again.
                self.slot_changed(i);
            }
            return;
        }
        slot.media = card.diskseq;
        if let Some(old) = slot.job.take() {
            self.queue.retain(|&id| id != old.id);
            if old.running {
                self.out.push(Effect::Cancel(old.id));
                let devnode = slot.card.as_ref().map(|c| c.devnode.clone()).unwrap_or_default();
                self.orphans.insert(old.id, (slot.config.name.clone(), devnode));
            }
        }
        let what: Vec<String> =
            [card.vendor.clone(), card.model.clone(), Some(crate::units::Bytes(card.size).to_string())]
                .into_iter()
                .flatten()
                .collect();
        slot.card = Some(card);
        slot.clear_last_job();
        slot.started_at = None;
        slot.finished_at = None;
        slot.meter = super::slot::Meter::default();
        slot.image_sha256 = None;
        if at_start && !self.config.flash_present_at_start {
            slot.state = SlotState::Present;
            self.log(i, Level::Info, "present", "card present at start, left alone");
        } else {
            self.enqueue(i);
            self.log(i, Level::Info, "queued", &format!("card inserted: {}", what.join(" ")));
        }
        self.slot_changed(i);
        self.schedule();
    }

    /// Gives slot `i` a new job, at the back of the queue.
    fn enqueue(&mut self, i: usize) {
        let id = self.next_job;
        self.next_job += 1;
        self.slots[i].job = Some(Job { id, running: false, stop: None });
        self.slots[i].state = SlotState::Queued;
        self.queue.push_back(id);
    }

    fn card_gone(&mut self, port: &str, devnode: &Path) {
        let Some(i) = self.slots.iter().position(|s| !s.retired && s.config.port == port) else {
            self.note_plain(Level::Debug, format!("ignoring {}: ID_PATH {port} is not a slot", devnode.display()));
            return;
        };
        let slot = &mut self.slots[i];
        if slot.card.is_none() && slot.job.is_none() {
            return;
        }
        // Log with the card's fields, before they go.
        let context = slot.context();
        slot.card = None;
        let now = self.now.at;
        let (level, stage, message) = match slot.job.as_mut() {
            Some(job) if job.running => {
                job.stop = Some(StopReason::Removed);
                self.out.push(Effect::Cancel(job.id));
                (Level::Warn, slot.state.name(), format!("card removed during {}", slot.state))
            }
            Some(job) => {
                let id = job.id;
                self.queue.retain(|&q| q != id);
                slot.job = None;
                slot.state = SlotState::Empty;
                (Level::Info, "empty", "card removed before it was written".to_owned())
            }
            None if slot.state == SlotState::Done && slot.ejected => {
                (Level::Info, "done", "ejected card removed".to_owned())
            }
            None if slot.state == SlotState::Failed
                && slot.io_failure.is_some_and(|(t, _)| now.saturating_duration_since(t) < YANK_WINDOW) =>
            {
                // The job already failed on I/O errors: the card was pulled mid-job.
                let cause = slot.error.take().unwrap_or_default();
                let during = slot.io_failure.take().map_or(SlotState::Writing, |(_, s)| s);
                slot.error = Some(format!("card removed during {during} ({cause})"));
                (Level::Warn, "failed", format!("card was removed during {during}"))
            }
            None => {
                slot.state = SlotState::Empty;
                slot.error = None;
                (Level::Info, "empty", "card removed".to_owned())
            }
        };
        self.log_as(context, level, stage, &message);
        self.slot_changed(i);
    }

    fn on_stage(&mut self, job: u64, stage: Stage) {
        let Some(i) = self.slot_of_job(job) else { return };
        let slot = &mut self.slots[i];
        slot.state = match stage {
            Stage::Write => SlotState::Writing,
            Stage::Verify => SlotState::Verifying,
            Stage::Expand => SlotState::Expanding,
            Stage::Resize => SlotState::Resizing,
            Stage::Eject => SlotState::Ejecting,
        };
        slot.meter = slot.meter.next_stage();
        let name = slot.state.name();
        self.log(i, Level::Info, name, name);
        self.slot_changed(i);
    }

    fn on_outcome(&mut self, job: u64, outcome: StageOutcome) {
        let Some(i) = self.slot_of_job(job) else { return };
        let (stage, secs, detail) = (outcome.stage.name(), outcome.seconds, &outcome.detail);
        let (level, message) = match outcome.result {
            StageResult::Done => (Level::Info, format!("{stage} done in {secs:.1} s: {detail}")),
            StageResult::Skipped => (Level::Info, format!("{stage} skipped: {detail}")),
            StageResult::Failed => (Level::Error, format!("{stage} failed after {secs:.1} s: {detail}")),
        };
        self.log(i, level, stage, &message);
        self.slots[i].stages.push(outcome);
        self.slot_changed(i);
    }

    fn on_finished(&mut self, id: u64, end: &Result<Report, Failure>, last: Sample) {
        if let Err(Failure { kind: FailureKind::ImageChanged(image), .. }) = end {
            // The prepared copy rotted or the file changed: rebuild it before
            // the next card.
            self.images.forget(image);
            self.prepare(image, Rebuild::Always);
        }
        if let Some((slot, _)) = self.orphans.remove(&id) {
            let how = end.as_ref().map_or_else(|f| f.message.clone(), |_| "done".to_owned());
            let message = format!("{slot}: job for a replaced card ended: {how}");
            let fields = NoteFields { slot: Some(slot), ..NoteFields::default() };
            self.out.push(Effect::Note { level: Level::Info, message, fields });
            self.schedule();
            return;
        }
        let Some(i) = self.slot_of_job(id) else { return };
        let now = self.now.at;
        let slot = &mut self.slots[i];
        let Some(job) = slot.job.take() else { return };
        slot.meter.sample(last, now);
        let during = match slot.state {
            SlotState::Queued => SlotState::Writing,
            s => s,
        };
        let (state, error) = match (end, job.stop) {
            (Ok(_), _) => (SlotState::Done, None),
            (Err(Failure { kind: FailureKind::Refused, message }), _) => (SlotState::Refused, Some(message.clone())),
            (Err(_), Some(StopReason::Shutdown)) => (SlotState::Failed, Some("interrupted".to_owned())),
            (Err(_), Some(StopReason::Operator)) => (SlotState::Failed, Some("cancelled by the operator".to_owned())),
            (Err(Failure { kind: FailureKind::Cancelled, .. }), Some(StopReason::Removed)) => {
                (SlotState::Failed, Some(format!("card removed during {during}")))
            }
            (Err(f), Some(StopReason::Removed)) => {
                (SlotState::Failed, Some(format!("card removed during {during} ({})", f.message)))
            }
            (Err(f), None) => {
                if f.kind == FailureKind::Io {
                    slot.io_failure = Some((now, during));
                }
                (SlotState::Failed, Some(f.message.clone()))
            }
        };
        // Only a card the reader really ejected (not one merely synced).
        slot.ejected = matches!(end, Ok(r) if r.stages.iter().any(|s| {
            s.stage == Stage::Eject && s.result == StageResult::Done && s.detail.starts_with("ejected")
        }));
        self.finish(i, state, error, end.as_ref().ok());
        self.schedule();
    }

    /// The one end of every card's job: state, counters, journal, history,
    /// followers. `error` is the one-line reason of a failed or refused card.
    fn finish(&mut self, i: usize, state: SlotState, error: Option<String>, report: Option<&Report>) {
        let wall = self.now.wall;
        let slot = &mut self.slots[i];
        slot.job = None;
        slot.state = state;
        slot.error = error;
        slot.finished_at = Some(wall);
        match state {
            SlotState::Done => self.summary.done += 1,
            SlotState::Refused => self.summary.refused += 1,
            _ => self.summary.failed += 1,
        }
        if let Some(r) = report {
            self.totals.record(r);
        }
        match (report, self.slots[i].error.clone()) {
            (Some(r), _) if state == SlotState::Done => {
                let total: f64 = r.stages.iter().map(|s| s.seconds).sum();
                let size = crate::units::Bytes(r.raw_size);
                self.log(i, Level::Info, "done", &format!("done: {size} in {total:.1} s"));
            }
            (_, Some(e)) => self.log(i, Level::Error, state.name(), &format!("{state}: {e}")),
            _ => self.log(i, Level::Error, state.name(), state.name()),
        }
        let slot = &self.slots[i];
        let verified =
            report.is_some_and(|r| r.stages.iter().any(|s| s.stage == Stage::Verify && s.result == StageResult::Done));
        self.out.push(Effect::History(Box::new(HistoryRecord {
            time: wall,
            slot: slot.config.name.clone(),
            port: slot.config.port.clone(),
            image: slot.config.image.clone(),
            state,
            error: slot.error.clone(),
            image_sha256: slot.image_sha256.clone(),
            verified,
            report: report.cloned(),
        })));
        let record = JobRecord { slot: slot.config.name.clone(), state, report: report.cloned() };
        self.out.push(Effect::Finished(Box::new(record)));
        self.slot_changed(i);
    }

    fn on_prepared(&mut self, image: &Path, result: Result<ImageFacts, String>) {
        match &result {
            Ok(p) => {
                let how = if p.cached { ", decompressed into the cache" } else { "" };
                let size = crate::units::Bytes(p.raw_size);
                let fields = NoteFields { image: Some(image.to_owned()), sha256: Some(p.sha256.clone()), slot: None };
                let message = format!("image ready: {size} raw{how}");
                self.out.push(Effect::Note { level: Level::Info, message, fields });
            }
            Err(e) => self.note(Level::Error, image, format!("image unusable: {e}")),
        }
        self.images.finish(image, result);
        self.changed();
        self.schedule();
    }

    fn prepare(&mut self, image: &Path, rebuild: Rebuild) {
        if self.images.begin(image) {
            self.note(Level::Info, image, "preparing image".into());
            self.out.push(Effect::Prepare { image: image.to_owned(), rebuild });
        }
    }

    fn reload(&mut self, config: Arc<Config>) {
        let mut old = std::mem::take(&mut self.slots);
        let mut slots = Vec::with_capacity(config.slots.len());
        for sc in &config.slots {
            match old.iter().position(|s| !s.retired && s.config.name == sc.name && s.config.port == sc.port) {
                Some(pos) => {
                    let mut slot = old.remove(pos);
                    slot.config = sc.clone();
                    slots.push(slot);
                }
                None => slots.push(Slot::new(sc.clone())),
            }
        }
        for mut gone in old {
            match gone.job.as_ref() {
                Some(job) if job.running => {
                    gone.retired = true;
                    slots.push(gone);
                }
                Some(job) => self.queue.retain(|&id| id != job.id),
                None => {}
            }
        }
        self.slots = slots;
        self.config = config;
        let images: Vec<PathBuf> = self.config.images().into_iter().map(Path::to_owned).collect();
        self.images.forget_finished();
        self.images.retain(&images.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        self.out.push(Effect::PruneCache { keep: images.clone() });
        for image in &images {
            self.prepare(image, Rebuild::IfNeeded);
        }
        // New slots may already hold cards.
        self.out.push(Effect::Rescan);
        let (n, c) = (self.slots.len(), self.config.concurrency);
        self.note_plain(Level::Info, format!("configuration reloaded: {n} slots, concurrency {c}"));
        self.changed();
        self.schedule();
    }

    fn on_progress(&mut self, samples: &[(u64, Sample)]) {
        let now = self.now.at;
        let mut any = false;
        // In slot order, as the page lists them.
        for slot in self.slots.iter_mut().filter(|s| s.running()) {
            let Some(&(_, sample)) = samples.iter().find(|(id, _)| slot.job_id() == Some(*id)) else { continue };
            slot.meter.sample(sample, now);
            self.out.push(Effect::Slot(Box::new(slot.status())));
            any = true;
        }
        if any {
            self.publish();
        }
    }

    fn slot_of_job(&self, job: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.job_id() == Some(job))
    }

    fn slot_named(&self, name: &str) -> Result<usize, String> {
        self.slots
            .iter()
            .position(|s| !s.retired && s.config.name == name)
            .ok_or_else(|| format!("no slot named {name}"))
    }

    /// Operator: stop the job on a slot (running or queued).
    fn cancel(&mut self, name: &str) -> Result<String, String> {
        let i = self.slot_named(name)?;
        let slot = &mut self.slots[i];
        match slot.job.as_mut() {
            Some(job) if job.running => {
                job.stop = Some(StopReason::Operator);
                self.out.push(Effect::Cancel(job.id));
                self.log(i, Level::Warn, "cancel", "cancelled by the operator");
                Ok(format!("{name}: stopping"))
            }
            Some(job) => {
                let id = job.id;
                self.queue.retain(|&q| q != id);
                self.finish(i, SlotState::Failed, Some("cancelled by the operator before it started".into()), None);
                Ok(format!("{name}: cancelled"))
            }
            None => Err(format!("{name}: nothing to cancel ({})", slot.state)),
        }
    }

    /// Operator: write the card in a slot again (after done, failed, refused or present).
    fn retry(&mut self, name: &str) -> Result<String, String> {
        let i = self.slot_named(name)?;
        let slot = &mut self.slots[i];
        if slot.card.is_none() {
            return Err(format!("{name}: no card"));
        }
        if slot.job.is_some() {
            return Err(format!("{name}: busy ({})", slot.state));
        }
        slot.clear_last_job();
        self.enqueue(i);
        self.log(i, Level::Info, "queued", "queued again by the operator");
        self.slot_changed(i);
        self.schedule();
        Ok(format!("{name}: queued"))
    }

    fn shutdown(&mut self) {
        self.stopping = true;
        // Cards still waiting will not be written now.
        for id in std::mem::take(&mut self.queue) {
            if let Some(i) = self.slot_of_job(id) {
                self.slots[i].job = None;
                self.interrupted(i, "interrupted before it was written");
            }
        }
        for slot in &mut self.slots {
            if let Some(job) = slot.job.as_mut().filter(|j| j.running) {
                job.stop = Some(StopReason::Shutdown);
                self.out.push(Effect::Cancel(job.id));
            }
        }
    }

    /// Jobs stuck in the kernel past the grace period: given up on.
    fn abandon(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].job.take().is_some_and(|j| j.running) {
                self.interrupted(i, "interrupted (the job did not stop in time)");
            }
        }
        self.changed();
    }

    /// Ends a slot's card as `failed: interrupted`.
    fn interrupted(&mut self, i: usize, message: &str) {
        self.log(i, Level::Warn, "failed", message);
        self.finish(i, SlotState::Failed, Some("interrupted".into()), None);
    }

    fn log(&mut self, i: usize, level: Level, stage: &str, message: &str) {
        let context = self.slots[i].context();
        self.log_as(context, level, stage, message);
    }

    fn log_as(&mut self, context: LogContext, level: Level, stage: &str, message: &str) {
        let line =
            SlotLog { level, stage: stage.to_owned(), message: message.to_owned(), context, time: self.now.wall };
        self.out.push(Effect::Log(line));
    }

    fn note(&mut self, level: Level, image: &Path, message: String) {
        let fields = NoteFields { image: Some(image.to_owned()), ..NoteFields::default() };
        self.out.push(Effect::Note { level, message, fields });
    }

    fn note_plain(&mut self, level: Level, message: String) {
        self.out.push(Effect::Note { level, message, fields: NoteFields::default() });
    }

    /// A state change: a new snapshot version.
    fn changed(&mut self) {
        self.version += 1;
        self.publish();
    }

    /// The state as it is now: a later change in the same input publishes
    /// again.
    fn publish(&mut self) {
        let snapshot = self.snapshot(None);
        self.out.push(Effect::Publish(Box::new(snapshot)));
    }

    /// A slot changed: publish, and tell followers about the slot.
    fn slot_changed(&mut self, i: usize) {
        self.changed();
        self.out.push(Effect::Slot(Box::new(self.slots[i].status())));
    }

    /// Starts every queued job that can start, in insertion order; see
    /// [`scheduler`].
    fn schedule(&mut self) {
        if self.stopping {
            return;
        }
        let concurrency = self.config.concurrency;
        while let Some(decision) = scheduler::next(
            &self.queue,
            &self.slots,
            &self.images,
            &self.stale,
            &self.orphans,
            self.running(),
            concurrency,
        ) {
            match decision {
                Decision::Stale(image) => {
                    let message = "image changed since it was prepared: preparing it again".to_owned();
                    self.note(Level::Info, &image, message);
                    self.stale.retain(|s| *s != image);
                    self.images.forget(&image);
                    self.prepare(&image, Rebuild::IfNeeded);
                }
                Decision::Forget { job } => self.queue.retain(|&j| j != job),
                Decision::Prepare(image) => self.prepare(&image, Rebuild::IfNeeded),
                Decision::Fail { job, slot, error } => {
                    self.queue.retain(|&j| j != job);
                    // Let the next card retry, in case the image was fixed.
                    let image = self.slots[slot].config.image.clone();
                    self.images.forget_failed(&image);
                    self.finish(slot, SlotState::Failed, Some(error), None);
                }
                Decision::Start { job, slot } => {
                    self.queue.retain(|&j| j != job);
                    self.start_job(slot);
                }
            }
        }
    }

    fn start_job(&mut self, s: usize) {
        let settings = self.settings();
        let wall = self.now.wall;
        let sha256 = match self.images.get(&self.slots[s].config.image) {
            Some(ImageState::Ready(facts)) => Some(facts.sha256.clone()),
            _ => None,
        };
        let slot = &mut self.slots[s];
        let (Some(job), Some(card)) = (slot.job.as_mut(), slot.card.clone()) else { return };
        job.running = true;
        slot.jobs += 1;
        slot.image_sha256 = sha256;
        slot.started_at = Some(wall);
        let start = Start {
            job: job.id,
            slot: slot.config.name.clone(),
            port: slot.config.port.clone(),
            card,
            image: slot.config.image.clone(),
            settings,
            context: slot.context(),
        };
        self.out.push(Effect::Start(Box::new(start)));
    }

    fn settings(&self) -> Settings {
        Settings {
            verify: self.config.verify,
            expand: self.config.expand,
            resize: self.config.resize,
            eject: self.config.eject,
        }
    }
}
