//! The station: the async shell around the station core ([`machine`]).
//!
//! The core decides (slot states, the queue, every end of a job); the shell
//! feeds it inputs and carries out its effects: it turns udev events and
//! job messages into [`machine::Input`]s, runs jobs on the blocking pool,
//! prepares images, appends to the history, logs to the journal and
//! publishes the one state every reporter reads (a snapshot on a watch
//! channel, events on a broadcast channel). The shell is a single task that
//! owns all of this, so there are no locks around slot state.

mod catalog;
mod history;
mod images;
pub mod inflight;
mod job;
mod logging;
pub mod machine;
mod scheduler;
mod slot;
pub mod status;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use catalog::{ImageFacts, Rebuild};
pub use images::{Prepared, check_images, prepare, prune_cache};
use job::{JobProgress, JobSpec};
use machine::{Core, Effect, Failure, Input, Now};
pub use slot::Card;
use slot::Sample;
use status::{Event, Snapshot};

use crate::config::Config;
use crate::model::{Stage, StageOutcome};
use crate::pipeline::{Cancel, Report};
use crate::udev::{Action, DeviceEvent};

/// How often running jobs' progress is sampled and published.
const TICK: Duration = Duration::from_millis(250);
/// On shutdown, how long running jobs get to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// Everything the station hears from its jobs, preparations and operators.
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
        result: Box<Result<Report, Failure>>,
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
    core: Core,
    /// Jobs a previous run never saw end, for the core's start.
    interrupted: Vec<inflight::InFlight>,
    /// What jobs open, by configured image path.
    prepared: HashMap<PathBuf, Arc<Prepared>>,
    /// Running jobs' stop switches and byte counts.
    jobs: HashMap<u64, (Cancel, Arc<JobProgress>)>,
    tx: mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    rescan: mpsc::Sender<crate::udev::Request>,
    publish: watch::Sender<Arc<Snapshot>>,
    events: broadcast::Sender<Event>,
    heartbeat: Arc<AtomicU64>,
    http: Option<String>,
}

impl std::fmt::Debug for Station {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Station").field("core", &self.core).finish_non_exhaustive()
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
        let core = Core::new(config);
        let (publish, snapshots) = watch::channel(Arc::new(core.snapshot(http.clone())));
        let heartbeat = Arc::new(AtomicU64::new(0));
        let (events, follow) = broadcast::channel(1024);
        let station = Self {
            core,
            interrupted,
            prepared: HashMap::new(),
            jobs: HashMap::new(),
            tx: tx.clone(),
            rx,
            rescan,
            publish,
            events,
            heartbeat: Arc::clone(&heartbeat),
            http,
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
        let interrupted = std::mem::take(&mut self.interrupted)
            .into_iter()
            .map(|j| machine::Interrupted { slot: j.slot, port: j.port, diskseq: j.diskseq })
            .collect();
        self.apply(Input::Start { interrupted });
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.heartbeat.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(msg) = self.rx.recv() => self.handle(msg),
                Some(ev) = devices.recv() => self.on_device(ev),
                _ = tick.tick() => {
                    let samples = self.jobs.iter().map(|(&id, (_, p))| (id, p.sample())).collect();
                    self.apply(Input::Progress(samples));
                }
            }
        }
        self.stop_all().await;
        Ok(())
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Stage { job, stage } => self.apply(Input::Stage { job, stage }),
            Msg::Outcome { job, outcome } => self.apply(Input::Outcome { job, outcome }),
            Msg::Finished { job, result } => self.finished(job, *result),
            Msg::Prepared { image, result } => {
                let configured = self.core.config().images().contains(&image.as_path());
                let result = result.map(|p| {
                    let facts = ImageFacts {
                        format: p.format,
                        raw_size: p.raw_size,
                        sha256: p.sha256.clone(),
                        cached: p.cached(),
                    };
                    if configured {
                        self.prepared.insert(image.clone(), Arc::new(p));
                    }
                    facts
                });
                self.apply(Input::Prepared { image, result });
            }
            Msg::Cancel { slot, reply } => {
                let _ = reply.send(self.command(Input::Cancel { slot }));
            }
            Msg::Retry { slot, reply } => {
                let _ = reply.send(self.command(Input::Retry { slot }));
            }
            Msg::Reload { config, done } => {
                self.prepared.retain(|image, _| config.images().contains(&image.as_path()));
                self.apply(Input::Reload(config));
                let _ = done.send(());
            }
        }
    }

    fn on_device(&mut self, ev: DeviceEvent) {
        let Some(port) = ev.id_path.clone() else {
            tracing::debug!("ignoring {}: no ID_PATH", ev.devnode.display());
            return;
        };
        if ev.is_removal() {
            return self.apply(Input::CardGone { port, devnode: ev.devnode });
        }
        let at_start = ev.action == Action::Existing;
        let card = Card {
            devnode: ev.devnode,
            diskseq: ev.diskseq,
            size: ev.size,
            serial: ev.serial,
            vendor: ev.vendor,
            model: ev.model,
        };
        self.apply(Input::CardSeen { port, card, at_start });
    }

    fn finished(&mut self, job: u64, end: Result<Report, Failure>) {
        let last = self.jobs.remove(&job).map(|(_, p)| p.sample()).unwrap_or_default();
        self.apply(Input::Finished { job, end, last });
    }

    fn command(&mut self, input: Input) -> Result<String, String> {
        self.run_core(input).unwrap_or_else(|| Err("the station did not answer".into()))
    }

    fn apply(&mut self, input: Input) {
        let _ = self.run_core(input);
    }

    /// One input through the core and its effects through the shell; the
    /// reply, if the input was a command.
    fn run_core(&mut self, input: Input) -> Option<Result<String, String>> {
        // Prepared images replaced or rewritten since: a card about to be
        // given a writer for one waits for the new version instead.
        let may_start = matches!(
            input,
            Input::CardSeen { .. }
                | Input::Finished { .. }
                | Input::Prepared { .. }
                | Input::Retry { .. }
                | Input::Reload(_)
        );
        let stale: Vec<PathBuf> = if may_start {
            self.prepared.iter().filter(|(_, p)| p.changed()).map(|(image, _)| image.clone()).collect()
        } else {
            Vec::new()
        };
        let effects = self.core.handle(input, Now::current(), &stale);
        let mut reply = None;
        for effect in effects {
            if let Some(r) = self.execute(effect) {
                reply = Some(r);
            }
        }
        reply
    }

    fn execute(&mut self, effect: Effect) -> Option<Result<String, String>> {
        match effect {
            Effect::Start(start) => self.start_job(*start),
            Effect::Cancel(job) => {
                if let Some((cancel, _)) = self.jobs.get(&job) {
                    cancel.cancel();
                }
            }
            Effect::Prepare { image, rebuild } => {
                let (cache, tx) = (self.core.config().cache_dir.clone(), self.tx.clone());
                tokio::task::spawn_blocking(move || {
                    let result = images::prepare(&image, &cache, rebuild);
                    let _ = tx.blocking_send(Msg::Prepared { image, result });
                });
            }
            Effect::PruneCache { keep } => {
                let cache = self.core.config().cache_dir.clone();
                tokio::task::spawn_blocking(move || {
                    prune_cache(&cache, &keep.iter().map(PathBuf::as_path).collect::<Vec<_>>());
                });
            }
            Effect::Rescan => {
                let _ = self.rescan.try_send(crate::udev::Request::Rescan);
            }
            Effect::Log(line) => {
                let line = logging::slot_line(line);
                let _ = self.events.send(Event::Log(Arc::new(line)));
            }
            Effect::Note { level, message, fields } => logging::note(level, &message, &fields),
            Effect::History(record) => history::append(&self.core.config().state_dir, &record),
            Effect::Finished(record) => {
                let _ = self.events.send(Event::Finished(Arc::new(*record)));
            }
            Effect::Slot(status) => {
                let _ = self.events.send(Event::Slot(Arc::new(*status)));
            }
            Effect::Publish(mut snapshot) => {
                snapshot.http.clone_from(&self.http);
                self.publish.send_replace(Arc::new(*snapshot));
            }
            Effect::Reply(reply) => return Some(reply),
        }
        None
    }

    fn start_job(&mut self, start: machine::Start) {
        let Some(image) = self.prepared.get(&start.image).cloned() else {
            // Ready in the core means prepared here; never expected.
            let end = Err(Failure { kind: machine::FailureKind::Other, message: "image not prepared".into() });
            return self.apply(Input::Finished { job: start.job, end, last: Sample::default() });
        };
        let (cancel, progress) = (Cancel::default(), Arc::new(JobProgress::default()));
        self.jobs.insert(start.job, (cancel.clone(), Arc::clone(&progress)));
        let record = inflight::InFlight {
            slot: start.slot,
            port: start.port,
            devnode: start.card.devnode.clone(),
            diskseq: start.card.diskseq,
            serial: start.card.serial.clone(),
            image: start.image,
            boot_id: inflight::boot_id(),
        };
        let spec = JobSpec {
            id: start.job,
            card: start.card,
            image,
            settings: start.settings,
            cancel,
            progress,
            span: logging::span(&start.context),
            state_dir: self.core.config().state_dir.clone(),
            record,
        };
        tokio::spawn(job::run(spec, self.tx.clone()));
    }

    /// Cancels every job and waits (briefly) for them to stop.
    async fn stop_all(&mut self) {
        self.apply(Input::Shutdown);
        let deadline = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(deadline);
        while self.core.busy() {
            tokio::select! {
                () = &mut deadline => break,
                Some(msg) = self.rx.recv() => {
                    if let Msg::Finished { job, result } = msg {
                        self.finished(job, *result);
                    }
                }
            }
        }
        self.apply(Input::Abandon);
    }
}
