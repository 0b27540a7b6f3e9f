//! One job on one card, run for the station.
//!
//! The pipeline is blocking, so it runs on tokio's blocking pool; the async
//! wrapper holds the concurrency permit until the pipeline has returned and
//! always reports back, whatever happened. Stage changes are sent to the
//! station as messages (rare, never lost); byte counts go into atomics the
//! station samples on its tick, so a fast writer never floods a channel.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::Msg;
use super::images::Prepared;
use crate::guard::Guard;
use crate::image::Image;
use crate::pipeline::{self, Cancel, EjectMode, JobError, Observer, Options, Report, Stage, StageOutcome};

/// The card a job writes, as udev described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    pub devnode: PathBuf,
    pub diskseq: Option<u64>,
    pub size: u64,
    pub serial: Option<String>,
    pub vendor: Option<String>,
    pub model: Option<String>,
}

/// Byte counts of the running stage, written by the job, read by the station.
#[derive(Debug, Default)]
pub(super) struct JobProgress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    pub written: AtomicU64,
}

/// The configuration a job runs with, fixed when it starts: a reload does
/// not change the settings of jobs in flight.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    pub verify: bool,
    pub expand: bool,
    pub resize: bool,
    pub eject: EjectMode,
}

/// Everything a job needs.
#[derive(Debug, Clone)]
pub(super) struct JobSpec {
    pub id: u64,
    pub card: Card,
    pub image: Arc<Prepared>,
    pub settings: Settings,
    pub cancel: Cancel,
    pub progress: Arc<JobProgress>,
    /// The job's log context: slot, device, DISKSEQ, serial, image.
    pub span: tracing::Span,
}

pub(super) async fn run(spec: JobSpec, permit: OwnedSemaphorePermit, tx: mpsc::Sender<Msg>) {
    let id = spec.id;
    let observer = JobObserver { id, tx: tx.clone(), progress: Arc::clone(&spec.progress) };
    let result = tokio::task::spawn_blocking(move || {
        let _entered = spec.span.enter();
        flash(&spec, &observer)
    })
    .await
    .unwrap_or_else(|e| Err(JobError::Internal(format!("job panicked: {e}"))));
    drop(permit);
    let _ = tx.send(Msg::Finished { job: id, result: Box::new(result) }).await;
}

fn flash(spec: &JobSpec, observer: &JobObserver) -> Result<Report, JobError> {
    let mut image = Image::open(&spec.image.raw)?;
    // Known from preparation: never measure again per card.
    image.raw_size = Some(spec.image.raw_size);
    let opts = Options {
        verify: spec.settings.verify,
        expand: spec.settings.expand,
        resize: spec.settings.resize,
        eject: spec.settings.eject,
        // The operator named this port in the configuration: fixed disks are
        // allowed there; the system-disk and in-use rules still hold.
        force: true,
        expected_diskseq: spec.card.diskseq,
        // The image's SHA-256 is known from preparation.
        hash: false,
        ..Options::default()
    };
    pipeline::flash(&mut image, &spec.card.devnode, &opts, &Guard::default(), observer, &spec.cancel)
}

struct JobObserver {
    id: u64,
    tx: mpsc::Sender<Msg>,
    progress: Arc<JobProgress>,
}

impl Observer for JobObserver {
    fn stage(&self, stage: Stage) {
        self.progress.done.store(0, Ordering::Relaxed);
        self.progress.total.store(0, Ordering::Relaxed);
        let _ = self.tx.blocking_send(Msg::Stage { job: self.id, stage });
    }

    fn outcome(&self, outcome: &StageOutcome) {
        let _ = self.tx.blocking_send(Msg::Outcome { job: self.id, outcome: outcome.clone() });
    }

    fn progress(&self, stage: Stage, done: u64, total: u64) {
        self.progress.done.store(done, Ordering::Relaxed);
        self.progress.total.store(total, Ordering::Relaxed);
        if stage == Stage::Write {
            self.progress.written.store(done, Ordering::Relaxed);
        }
    }
}
