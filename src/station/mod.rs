//! The station: one state machine per slot, a queue of cards waiting for a
//! writer, the jobs, and the one published state every reporter reads.
//!
//! The station is a single task that owns all of this; everything reaches
//! it as a [`Msg`] (udev events, job stages and results, prepared images,
//! reloads), so there are no locks around slot state.
//!
//! Media identity is the kernel's DISKSEQ: a disk on a slot's port with a
//! size above zero and a DISKSEQ not seen on that slot is a new card, and
//! gets one job. Everything else with the same DISKSEQ (the partition
//! re-read after our own write, udev's change events, partitions coming
//! and going) is the same card and starts nothing. The job re-checks the
//! DISKSEQ on the open device, so a card swapped in the meantime is never
//! written by a stale job.
//!
//! Concurrency is counted here: a job runs from the moment it is spawned
//! until its `Finished` message arrives (which the job always sends), and a
//! card waits while `concurrency` jobs run, in insertion order. A reload
//! changes the limit and nothing else, so lowering and raising it in quick
//! succession cannot lose a writer.
//!
//! Every end of a card's job (done, failed, refused, cancelled while
//! queued, image unusable, interrupted) goes through [`Station::finish`]:
//! counters, history, events and the journal cannot disagree.

mod images;
pub mod inflight;
mod job;
pub mod status;

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use images::{Prepared, Rebuild, check_images, prepare, prune_cache};
pub use job::Card;
use job::{JobProgress, JobSpec};
use status::{Event, JobRecord, LogLine, SlotStatus, Snapshot, Summary};
use tracing::Level;

use crate::config::{Config, SlotConfig};
use crate::model::SlotState;
use crate::pipeline::{Cancel, JobError, Report, Stage, StageOutcome, StageResult};
use crate::udev::{Action, DeviceEvent};

/// How often running jobs' progress is sampled and published.
const TICK: Duration = Duration::from_millis(250);
/// A job that failed on I/O and whose card disappears within this window
/// was a card pulled mid-job.
/// (udev may take a while to report the removal of a device that fails
/// every I/O, while it probes it.)
const YANK_WINDOW: Duration = Duration::from_secs(15);
/// On shutdown, how long running jobs get to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// Everything the station reacts to.
#[derive(Debug)]
pub enum Msg {
    Stage {
        job: u64,
        stage: Stage,
    },
    Outcome {
        job: u64,
        outcome: StageOutcome,
    },
    Finished {
        job: u64,
        result: Box<Result<Report, JobError>>,
    },
    Prepared {
        image: PathBuf,
        result: Result<Prepared, String>,
    },
    /// An operator asks to stop the slot's job; the reply says what happened.
    Cancel {
        slot: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// An operator asks to write the slot's card again.
    Retry {
        slot: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Apply a new, already validated configuration; `done` fires after.
    Reload {
        config: Arc<Config>,
        done: oneshot::Sender<()>,
    },
}

/// Why the station stopped a job itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Removed,
    Shutdown,
    Operator,
}

#[derive(Debug)]
struct Job {
    id: u64,
    cancel: Cancel,
    progress: Arc<JobProgress>,
    /// False while the card waits in the queue.
    running: bool,
    stop: Option<StopReason>,
}

#[derive(Debug)]
struct Slot {
    config: SlotConfig,
    state: SlotState,
    card: Option<Card>,
    /// DISKSEQ of the media last seen here: seeing it again is not a new card.
    media: Option<u64>,
    job: Option<Job>,
    started_at: Option<SystemTime>,
    finished_at: Option<SystemTime>,
    error: Option<String>,
    jobs: u64,
    /// When the last job failed on an I/O error: a removal right after
    /// means the card was pulled mid-job.
    io_failure: Option<(Instant, SlotState)>,
    meter: Meter,
    /// Dropped from the configuration; kept until its running job ends.
    retired: bool,
    /// Outcomes of the current (or last) job's stages.
    stages: Vec<StageOutcome>,
    /// The last job ejected the card: its removal is expected, and `done`
    /// stays on show until the next card.
    ejected: bool,
    /// SHA-256 of the image the current (or last) job wrote, for history.
    image_sha256: Option<String>,
}

/// Rate and ETA of the running stage, from sampled byte counts.
#[derive(Debug, Default, Clone, Copy)]
struct Meter {
    done: u64,
    total: u64,
    written: u64,
    rate: f64,
    last: Option<(Instant, u64)>,
}

impl Meter {
    fn sample(&mut self, progress: &JobProgress, now: Instant) {
        let done = progress.done.load(Ordering::Relaxed);
        self.total = progress.total.load(Ordering::Relaxed);
        self.written = progress.written.load(Ordering::Relaxed);
        if let Some((at, before)) = self.last {
            let dt = (now - at).as_secs_f64();
            if dt > 0.0 && done >= before {
                let instant = (done - before) as f64 / dt;
                // Smooth over ~2 s so the ETA does not jump with every chunk.
                self.rate = if self.rate == 0.0 { instant } else { self.rate * 0.8 + instant * 0.2 };
            }
        }
        self.last = Some((now, done));
        self.done = done;
    }
}

impl Slot {
    fn new(config: SlotConfig) -> Self {
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

    fn status(&self) -> SlotStatus {
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

    /// The job's log context; journald gets SLOT, DEVNAME, DISKSEQ, SERIAL, IMAGE.
    fn span(&self) -> tracing::Span {
        let span = tracing::info_span!(
            "slot",
            slot = %self.config.name,
            devname = tracing::field::Empty,
            diskseq = tracing::field::Empty,
            serial = tracing::field::Empty,
            image = %self.config.image.display(),
        );
        if let Some(card) = &self.card {
            span.record("devname", tracing::field::display(card.devnode.display()));
            if let Some(seq) = card.diskseq {
                span.record("diskseq", seq);
            }
            if let Some(serial) = &card.serial {
                span.record("serial", serial.as_str());
            }
        }
        span
    }
}

/// Handles the rest of the daemon keeps on the station.
#[derive(Debug)]
pub struct Handles {
    pub tx: mpsc::Sender<Msg>,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Every slot change, log line and finished card, in order; a follower
    /// that falls behind loses events (and should resynchronise from a
    /// snapshot). The station holds the only sender, so the stream ends,
    /// for every follower, when the station does.
    pub events: broadcast::Receiver<Event>,
    /// Increases on every turn of the station's loop: the watchdog's proof of life.
    pub heartbeat: Arc<AtomicU64>,
}

pub struct Station {
    config: Arc<Config>,
    slots: Vec<Slot>,
    /// Job ids of cards waiting for a writer, in insertion order.
    queue: VecDeque<u64>,
    images: images::ImageStore,
    /// Jobs whose card was replaced, by id: (slot name, device). They end
    /// on their own, still count against `concurrency`, and a new job on
    /// the same device waits for them.
    orphans: HashMap<u64, (String, PathBuf)>,
    /// Jobs a previous run never saw end (crash, `kill -9`): their slots
    /// start `failed`, and their cards are not `present` but interrupted.
    interrupted: Vec<inflight::InFlight>,
    tx: mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    rescan: mpsc::Sender<crate::udev::Request>,
    next_job: u64,
    summary: Summary,
    totals: status::Totals,
    version: u64,
    publish: watch::Sender<Arc<Snapshot>>,
    events: broadcast::Sender<Event>,
    heartbeat: Arc<AtomicU64>,
    http: Option<String>,
    /// Shutting down: nothing new starts.
    stopping: bool,
}

impl std::fmt::Debug for Station {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Station").field("slots", &self.slots.len()).field("queue", &self.queue).finish_non_exhaustive()
    }
}

impl Station {
    pub fn new(
        config: Arc<Config>,
        rescan: mpsc::Sender<crate::udev::Request>,
        http: Option<String>,
        interrupted: Vec<inflight::InFlight>,
    ) -> (Self, Handles) {
        let (tx, rx) = mpsc::channel(256);
        let slots: Vec<Slot> = config.slots.iter().cloned().map(Slot::new).collect();
        let placeholder = Arc::new(Snapshot {
            version: 0,
            updated_at: SystemTime::now(),
            config: config.file.clone(),
            concurrency: config.concurrency,
            http: http.clone(),
            summary: Summary::default(),
            totals: status::Totals::default(),
            images: Vec::new(),
            slots: slots.iter().map(Slot::status).collect(),
        });
        let (publish, snapshots) = watch::channel(placeholder);
        let heartbeat = Arc::new(AtomicU64::new(0));
        let (events, follow) = broadcast::channel(1024);
        let station = Self {
            config,
            slots,
            queue: VecDeque::new(),
            images: images::ImageStore::default(),
            orphans: HashMap::new(),
            interrupted,
            tx: tx.clone(),
            rx,
            rescan,
            next_job: 1,
            summary: Summary::default(),
            totals: status::Totals::default(),
            version: 0,
            publish,
            events,
            heartbeat: Arc::clone(&heartbeat),
            http,
            stopping: false,
        };
        (station, Handles { tx, snapshots, events: follow, heartbeat })
    }

    /// Runs until `shutdown`, then stops every job (its slot becomes
    /// `failed: interrupted`) and publishes the final state.
    pub async fn run(
        mut self,
        mut devices: mpsc::Receiver<DeviceEvent>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        self.prepare_images();
        self.changed();
        self.restore_interrupted();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.heartbeat.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(msg) = self.rx.recv() => self.handle(msg),
                Some(ev) = devices.recv() => self.on_device(&ev),
                _ = tick.tick() => self.sample_progress(),
            }
        }
        self.stop_all().await;
        Ok(())
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Stage { job, stage } => self.on_stage(job, stage),
            Msg::Outcome { job, outcome } => self.on_outcome(job, outcome),
            Msg::Finished { job, result } => self.on_finished(job, &result),
            Msg::Prepared { image, result } => {
                match &result {
                    Ok(p) => {
                        let how = if p.cached() { ", decompressed into the cache" } else { "" };
                        let size = crate::units::Bytes(p.raw_size);
                        tracing::info!(image = %image.display(), sha256 = %p.sha256, "image ready: {size} raw{how}");
                    }
                    Err(e) => tracing::error!(image = %image.display(), "image unusable: {e}"),
                }
                self.images.finish(&image, result);
                self.changed();
                self.schedule();
            }
            Msg::Cancel { slot, reply } => {
                let _ = reply.send(self.cancel(&slot));
            }
            Msg::Retry { slot, reply } => {
                let _ = reply.send(self.retry(&slot));
            }
            Msg::Reload { config, done } => {
                self.reload(config);
                let _ = done.send(());
            }
        }
    }

    fn on_device(&mut self, ev: &DeviceEvent) {
        let Some(id_path) = ev.id_path.as_deref() else {
            tracing::debug!("ignoring {}: no ID_PATH", ev.devnode.display());
            return;
        };
        let Some(i) = self.slots.iter().position(|s| !s.retired && s.config.port == id_path) else {
            tracing::debug!("ignoring {}: ID_PATH {id_path} is not a slot", ev.devnode.display());
            return;
        };
        if ev.is_removal() { self.card_removed(i) } else { self.card_present(i, ev) }
    }

    fn card_present(&mut self, i: usize, ev: &DeviceEvent) {
        let card = Card {
            devnode: ev.devnode.clone(),
            diskseq: ev.diskseq,
            size: ev.size,
            serial: ev.serial.clone(),
            vendor: ev.vendor.clone(),
            model: ev.model.clone(),
        };
        let slot = &mut self.slots[i];
        // Without DISKSEQ (Linux < 5.15) a card is new only after an empty reader.
        let same = match ev.diskseq {
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
        slot.media = ev.diskseq;
        if let Some(old) = slot.job.take() {
            self.queue.retain(|&id| id != old.id);
            if old.running {
                old.cancel.cancel();
                let devnode = slot.card.as_ref().map(|c| c.devnode.clone()).unwrap_or_default();
                self.orphans.insert(old.id, (slot.config.name.clone(), devnode));
            }
        }
        slot.card = Some(card);
        slot.error = None;
        slot.started_at = None;
        slot.finished_at = None;
        slot.meter = Meter::default();
        slot.stages.clear();
        slot.ejected = false;
        slot.image_sha256 = None;
        if ev.action == Action::Existing && !self.config.flash_present_at_start {
            slot.state = SlotState::Present;
            self.log(i, Level::INFO, "present", "card present at start, left alone");
        } else {
            let id = self.next_job;
            self.next_job += 1;
            slot.job =
                Some(Job { id, cancel: Cancel::default(), progress: Arc::default(), running: false, stop: None });
            slot.state = SlotState::Queued;
            self.queue.push_back(id);
            let what: Vec<String> =
                [ev.vendor.clone(), ev.model.clone(), Some(crate::units::Bytes(ev.size).to_string())]
                    .into_iter()
                    .flatten()
                    .collect();
            self.log(i, Level::INFO, "queued", &format!("card inserted: {}", what.join(" ")));
        }
        self.slot_changed(i);
        self.schedule();
    }

    fn card_removed(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if slot.card.is_none() && slot.job.is_none() {
            return;
        }
        // Log with the card's fields, before they go.
        let span = slot.span();
        slot.card = None;
        let (level, stage, message) = match slot.job.as_mut() {
            Some(job) if job.running => {
                job.stop = Some(StopReason::Removed);
                job.cancel.cancel();
                (Level::WARN, slot.state.name(), format!("card removed during {}", slot.state))
            }
            Some(job) => {
                let id = job.id;
                self.queue.retain(|&q| q != id);
                slot.job = None;
                slot.state = SlotState::Empty;
                (Level::INFO, "empty", "card removed before it was written".to_owned())
            }
            None if slot.state == SlotState::Done && slot.ejected => {
                (Level::INFO, "done", "ejected card removed".to_owned())
            }
            None if slot.state == SlotState::Failed
                && slot.io_failure.is_some_and(|(t, _)| t.elapsed() < YANK_WINDOW) =>
            {
                // The job already failed on I/O errors: the card was pulled mid-job.
                let cause = slot.error.take().unwrap_or_default();
                let during = slot.io_failure.take().map_or(SlotState::Writing, |(_, s)| s);
                slot.error = Some(format!("card removed during {during} ({cause})"));
                (Level::WARN, "failed", format!("card was removed during {during}"))
            }
            None => {
                slot.state = SlotState::Empty;
                slot.error = None;
                (Level::INFO, "empty", "card removed".to_owned())
            }
        };
        self.log_in(&span, i, level, stage, &message);
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
        slot.meter = Meter { written: slot.meter.written, ..Meter::default() };
        let name = slot.state.name();
        self.log(i, Level::INFO, name, name);
        self.slot_changed(i);
    }

    fn on_outcome(&mut self, job: u64, outcome: StageOutcome) {
        let Some(i) = self.slot_of_job(job) else { return };
        let (stage, secs, detail) = (outcome.stage.name(), outcome.seconds, &outcome.detail);
        let (level, message) = match outcome.result {
            StageResult::Done => (Level::INFO, format!("{stage} done in {secs:.1} s: {detail}")),
            StageResult::Skipped => (Level::INFO, format!("{stage} skipped: {detail}")),
            StageResult::Failed => (Level::ERROR, format!("{stage} failed after {secs:.1} s: {detail}")),
        };
        self.log(i, level, stage, &message);
        self.slots[i].stages.push(outcome);
        self.slot_changed(i);
    }

    fn on_finished(&mut self, id: u64, result: &Result<Report, JobError>) {
        if let Err(JobError::ImageChanged { image, .. }) = result {
            // The prepared copy rotted or the file changed: rebuild it before
            // the next card.
            self.images.forget(image);
            self.start_preparing_with(&image.clone(), Rebuild::Always);
        }
        if let Some((slot, _)) = self.orphans.remove(&id) {
            tracing::info!(slot = %slot, "{slot}: job for a replaced card ended: {}", outcome(result));
            self.schedule();
            return;
        }
        let Some(i) = self.slot_of_job(id) else { return };
        let slot = &mut self.slots[i];
        let Some(job) = slot.job.take() else { return };
        slot.meter.sample(&job.progress, Instant::now());
        let during = match slot.state {
            SlotState::Queued => SlotState::Writing,
            s => s,
        };
        let (state, error) = match (result, job.stop) {
            (Ok(_), _) => (SlotState::Done, None),
            (Err(JobError::Refused(r)), _) => (SlotState::Refused, Some(r.to_string())),
            (Err(_), Some(StopReason::Shutdown)) => (SlotState::Failed, Some("interrupted".to_owned())),
            (Err(_), Some(StopReason::Operator)) => (SlotState::Failed, Some("cancelled by the operator".to_owned())),
            (Err(JobError::Cancelled { .. }), Some(StopReason::Removed)) => {
                (SlotState::Failed, Some(format!("card removed during {during}")))
            }
            (Err(e), Some(StopReason::Removed)) => {
                (SlotState::Failed, Some(format!("card removed during {during} ({e})")))
            }
            (Err(e), _) => {
                if e.is_io_failure() {
                    slot.io_failure = Some((Instant::now(), during));
                }
                (SlotState::Failed, Some(e.to_string()))
            }
        };
        // Only a card the reader really ejected (not one merely synced).
        slot.ejected = matches!(result, Ok(r) if r.stages.iter().any(|s| {
            s.stage == Stage::Eject && s.result == StageResult::Done && s.detail.starts_with("ejected")
        }));
        self.finish(i, state, error, result.as_ref().ok());
        self.schedule();
    }

    /// The one end of every card's job: state, counters, journal, history,
    /// followers. `error` is the one-line reason of a failed or refused card.
    fn finish(&mut self, i: usize, state: SlotState, error: Option<String>, report: Option<&Report>) {
        let slot = &mut self.slots[i];
        slot.job = None;
        slot.state = state;
        slot.error = error;
        slot.finished_at = Some(SystemTime::now());
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
                self.log(i, Level::INFO, "done", &format!("done: {} in {total:.1} s", crate::units::Bytes(r.raw_size)));
            }
            (_, Some(e)) => self.log(i, Level::ERROR, state.name(), &format!("{state}: {e}")),
            _ => self.log(i, Level::ERROR, state.name(), state.name()),
        }
        self.record_history(i, report);
        let record = JobRecord { slot: self.slots[i].config.name.clone(), state, report: report.cloned() };
        let _ = self.events.send(Event::Finished(Arc::new(record)));
        self.slot_changed(i);
    }

    /// Slots whose job a previous run never saw end: failed, counted and
    /// recorded once; their card, when udev lists it, is the same media.
    fn restore_interrupted(&mut self) {
        for job in std::mem::take(&mut self.interrupted) {
            let Some(i) = self.slots.iter().position(|s| s.config.name == job.slot && s.config.port == job.port) else {
                tracing::warn!("{}: interrupted by restart (slot no longer configured)", job.slot);
                continue;
            };
            self.slots[i].media = job.diskseq;
            self.finish(i, SlotState::Failed, Some("interrupted by restart".into()), None);
        }
    }

    fn running(&self) -> usize {
        self.orphans.len() + self.slots.iter().filter(|s| s.job.as_ref().is_some_and(|j| j.running)).count()
    }

    /// Starts every queued job that can start, in insertion order, while
    /// permits last. A card whose image is still being prepared keeps its
    /// place; one whose image failed fails with the image's error.
    fn schedule(&mut self) {
        if self.stopping {
            return;
        }
        let mut i = 0;
        while i < self.queue.len() {
            let id = self.queue[i];
            let Some(s) = self.slots.iter().position(|s| s.job.as_ref().is_some_and(|j| j.id == id)) else {
                self.queue.remove(i);
                continue;
            };
            let image = self.slots[s].config.image.clone();
            match self.images.get(&image) {
                None => {
                    self.start_preparing(&image);
                    i += 1;
                }
                Some(images::ImageState::Preparing) => i += 1,
                Some(images::ImageState::Failed(e)) => {
                    let e = e.clone();
                    self.queue.remove(i);
                    // Let the next card retry, in case the image was fixed.
                    self.images.forget_failed(&image);
                    self.finish(s, SlotState::Failed, Some(e), None);
                }
                // Replaced or rewritten since it was prepared: this card
                // waits for the new version.
                Some(images::ImageState::Ready(prepared)) if prepared.changed() => {
                    tracing::info!(image = %image.display(), "image changed since it was prepared: preparing it again");
                    self.images.forget(&image);
                    self.start_preparing(&image);
                    i += 1;
                }
                // The job for the card this one replaced still holds the device.
                Some(images::ImageState::Ready(_))
                    if self.slots[s]
                        .card
                        .as_ref()
                        .is_some_and(|c| self.orphans.values().any(|(_, d)| *d == c.devnode)) =>
                {
                    i += 1;
                }
                Some(images::ImageState::Ready(prepared)) => {
                    if self.running() >= self.config.concurrency {
                        break;
                    }
                    let prepared = Arc::clone(prepared);
                    self.queue.remove(i);
                    self.start_job(s, prepared);
                }
            }
        }
    }

    fn start_job(&mut self, s: usize, image: Arc<Prepared>) {
        let settings = job::Settings {
            verify: self.config.verify,
            expand: self.config.expand,
            resize: self.config.resize,
            eject: self.config.eject,
        };
        let state_dir = self.config.state_dir.clone();
        let slot = &mut self.slots[s];
        let (Some(job), Some(card)) = (slot.job.as_mut(), slot.card.clone()) else { return };
        let record = inflight::InFlight {
            slot: slot.config.name.clone(),
            port: slot.config.port.clone(),
            devnode: card.devnode.clone(),
            diskseq: card.diskseq,
            serial: card.serial.clone(),
            image: slot.config.image.clone(),
            boot_id: inflight::boot_id(),
        };
        job.running = true;
        slot.jobs += 1;
        slot.image_sha256 = Some(image.sha256.clone());
        slot.started_at = Some(SystemTime::now());
        let spec = JobSpec {
            id: job.id,
            card,
            image,
            settings,
            cancel: job.cancel.clone(),
            progress: Arc::clone(&job.progress),
            span: slot.span(),
            state_dir,
            record,
        };
        tokio::spawn(job::run(spec, self.tx.clone()));
    }

    fn prepare_images(&mut self) {
        for image in self.config.images().into_iter().map(Path::to_owned).collect::<Vec<_>>() {
            self.start_preparing(&image);
        }
    }

    fn start_preparing(&mut self, image: &Path) {
        self.start_preparing_with(image, Rebuild::IfNeeded);
    }

    fn start_preparing_with(&mut self, image: &Path, rebuild: Rebuild) {
        if !self.images.begin(image) {
            return;
        }
        let (image, cache, tx) = (image.to_owned(), self.config.cache_dir.clone(), self.tx.clone());
        tracing::info!(image = %image.display(), "preparing image");
        tokio::task::spawn_blocking(move || {
            let result = images::prepare(&image, &cache, rebuild);
            let _ = tx.blocking_send(Msg::Prepared { image, result });
        });
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
        let images = self.config.images();
        self.images.forget_finished();
        self.images.retain(&images);
        let cache = self.config.cache_dir.clone();
        let keep: Vec<PathBuf> = images.iter().map(|p| p.to_path_buf()).collect();
        tokio::task::spawn_blocking(move || {
            let keep: Vec<&Path> = keep.iter().map(PathBuf::as_path).collect();
            prune_cache(&cache, &keep);
        });
        self.prepare_images();
        // New slots may already hold cards.
        let _ = self.rescan.try_send(crate::udev::Request::Rescan);
        tracing::info!("configuration reloaded: {} slots, concurrency {}", self.slots.len(), self.config.concurrency);
        self.changed();
        self.schedule();
    }

    fn sample_progress(&mut self) {
        let now = Instant::now();
        let mut any = false;
        for slot in &mut self.slots {
            if let Some(job) = slot.job.as_ref().filter(|j| j.running) {
                slot.meter.sample(&job.progress, now);
                let _ = self.events.send(Event::Slot(Arc::new(slot.status())));
                any = true;
            }
        }
        if any {
            self.publish_snapshot();
        }
    }

    fn slot_of_job(&self, job: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.job.as_ref().is_some_and(|j| j.id == job))
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
                job.cancel.cancel();
                self.log(i, Level::WARN, "cancel", "cancelled by the operator");
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
        let id = self.next_job;
        self.next_job += 1;
        slot.job = Some(Job { id, cancel: Cancel::default(), progress: Arc::default(), running: false, stop: None });
        slot.state = SlotState::Queued;
        slot.error = None;
        slot.stages.clear();
        slot.ejected = false;
        self.queue.push_back(id);
        self.log(i, Level::INFO, "queued", "queued again by the operator");
        self.slot_changed(i);
        self.schedule();
        Ok(format!("{name}: queued"))
    }

    /// A job log line: to the journal (with the slot's fields) and to followers.
    fn log(&self, i: usize, level: Level, stage: &str, message: &str) {
        self.log_in(&self.slots[i].span(), i, level, stage, message);
    }

    fn log_in(&self, span: &tracing::Span, i: usize, level: Level, stage: &str, message: &str) {
        // The journal's message must stand on its own (`journalctl -f`
        // shows nothing else): it starts with the slot's name.
        let name = &self.slots[i].config.name;
        span.in_scope(|| match level {
            Level::ERROR => tracing::error!(stage, "{name}: {message}"),
            Level::WARN => tracing::warn!(stage, "{name}: {message}"),
            _ => tracing::info!(stage, "{name}: {message}"),
        });
        let level = match level {
            Level::ERROR => "error",
            Level::WARN => "warn",
            _ => "info",
        };
        let line = LogLine {
            time: SystemTime::now(),
            slot: self.slots[i].config.name.clone(),
            level,
            stage: stage.to_owned(),
            message: message.to_owned(),
        };
        let _ = self.events.send(Event::Log(Arc::new(line)));
    }

    /// A slot changed: publish the snapshot and tell followers about the slot.
    fn slot_changed(&mut self, i: usize) {
        self.changed();
        let _ = self.events.send(Event::Slot(Arc::new(self.slots[i].status())));
    }

    /// Cancels every job and waits (briefly) for them to stop.
    async fn stop_all(&mut self) {
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
                job.cancel.cancel();
            }
        }
        let deadline = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(deadline);
        while self.slots.iter().any(|s| s.job.as_ref().is_some_and(|j| j.running)) {
            tokio::select! {
                () = &mut deadline => break,
                Some(msg) = self.rx.recv() => {
                    if let Msg::Finished { job, result } = msg {
                        self.on_finished(job, &result);
                    }
                }
            }
        }
        // Jobs stuck in the kernel past the grace period: give up on them.
        for i in 0..self.slots.len() {
            if self.slots[i].job.take().is_some_and(|j| j.running) {
                self.interrupted(i, "interrupted (the job did not stop in time)");
            }
        }
        self.changed();
    }

    /// Ends a slot's card as `failed: interrupted`.
    fn interrupted(&mut self, i: usize, message: &str) {
        self.log(i, Level::WARN, "failed", message);
        self.finish(i, SlotState::Failed, Some("interrupted".into()), None);
    }

    fn record_history(&self, i: usize, report: Option<&Report>) {
        let slot = &self.slots[i];
        let record = serde_json::json!({
            "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "slot": slot.config.name,
            "port": slot.config.port,
            "image": slot.config.image,
            "state": slot.state,
            "error": slot.error,
            "image_sha256": slot.image_sha256,
            // Proof, per card: the card was read back and matched the image.
            "verified": report.is_some_and(|r| r.stages.iter().any(|s| s.stage == Stage::Verify && s.result == StageResult::Done)),
            "report": report,
        });
        let path = self.config.state_dir.join("history.jsonl");
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.config.state_dir)?;
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
            writeln!(f, "{record}")
        };
        if let Err(e) = write() {
            tracing::warn!("cannot append to {}: {e}", path.display());
        }
    }

    /// A state change: bump the version and publish.
    fn changed(&mut self) {
        self.version += 1;
        self.publish_snapshot();
    }

    fn publish_snapshot(&self) {
        let slots: Vec<SlotStatus> = self.slots.iter().filter(|s| !s.retired).map(Slot::status).collect();
        let summary = Summary {
            writing: self.slots.iter().filter(|s| s.state.is_active()).count(),
            queued: self.queue.len(),
            ..self.summary
        };
        self.publish.send_replace(Arc::new(Snapshot {
            version: self.version,
            updated_at: SystemTime::now(),
            config: self.config.file.clone(),
            concurrency: self.config.concurrency,
            http: self.http.clone(),
            summary,
            totals: self.totals.clone(),
            images: self.images.status(&self.config.images()),
            slots,
        }));
    }
}

fn outcome(result: &Result<Report, JobError>) -> String {
    match result {
        Ok(_) => "done".into(),
        Err(e) => e.to_string(),
    }
}
