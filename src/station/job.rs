//! One job on one card, run for the station.
//!
//! The pipeline is blocking, so it runs on tokio's blocking pool; the async
//! wrapper always reports back, whatever happened, and the station counts
//! the job as running until it has. Around the device work the job keeps
//! its record in `state_dir/jobs/` ([`super::inflight`]), so a crash
//! leaves a trace the next start acts on. Stage changes are sent to the
//! station as messages (rare, never lost); byte counts go into atomics the
//! station samples on its tick, so a fast writer never floods a channel.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use super::Msg;
use super::images::Prepared;
use super::machine::{Failure, FailureKind, Settings};
use super::slot::{Card, Sample};
use crate::guard::Guard;
use crate::model::{Stage, StageOutcome};
use crate::pipeline::{self, Cancel, JobError, Observer, Options, Report};

/// Byte counts of the running stage, written by the job, read by the station.
#[derive(Debug, Default)]
pub(super) struct JobProgress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    pub written: AtomicU64,
}

impl JobProgress {
    pub(super) fn sample(&self) -> Sample {
        Sample {
            done: self.done.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
        }
    }
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
    /// Where the in-flight record goes, and what it says.
    pub state_dir: PathBuf,
    pub record: super::inflight::InFlight,
}

pub(super) async fn run(spec: JobSpec, tx: mpsc::Sender<Msg>) {
    let id = spec.id;
    let (state_dir, slot) = (spec.state_dir.clone(), spec.record.slot.clone());
    let observer = JobObserver { id, tx: tx.clone(), progress: Arc::clone(&spec.progress) };
    let result = tokio::task::spawn_blocking(move || {
        let _entered = spec.span.enter();
        // No record, no write: a crash must never leave an unknown card behind.
        super::inflight::begin(&spec.state_dir, &spec.record)
            .map_err(|e| JobError::Internal(format!("cannot record the job in {}: {e}", spec.state_dir.display())))?;
        flash(&spec, &observer)
    })
    .await
    .unwrap_or_else(|e| Err(JobError::Internal(format!("job panicked: {e}"))));
    super::inflight::end(&state_dir, &slot);
    let _ = tx.send(Msg::Finished { job: id, result: Box::new(result.map_err(|e| failure(&e))) }).await;
}

/// What the station core needs to know of a job's error.
fn failure(e: &JobError) -> Failure {
    let kind = match e {
        JobError::Refused(_) => FailureKind::Refused,
        JobError::Cancelled { .. } => FailureKind::Cancelled,
        JobError::ImageChanged { image, .. } => FailureKind::ImageChanged(image.clone()),
        e if e.is_io_failure() => FailureKind::Io,
        _ => FailureKind::Other,
    };
    let message = match e {
        JobError::Refused(r) => r.to_string(),
        e => e.to_string(),
    };
    Failure { kind, message }
}

fn flash(spec: &JobSpec, observer: &JobObserver) -> Result<Report, JobError> {
    // The file preparation opened and sized, whatever its name points at now.
    let mut image =
        spec.image.file.clone().ok_or_else(|| JobError::Internal("image prepared without its file".into()))?;
    let opts = Options {
        verify: spec.settings.verify,
        expand: spec.settings.expand,
        resize: spec.settings.resize,
        eject: spec.settings.eject,
        // The operator named this port in the configuration: fixed disks are
        // allowed there; the system-disk and in-use rules still hold.
        force: true,
        expected_diskseq: spec.card.diskseq,
        // The image's SHA-256 is known from preparation, and so are its
        // block digests: the copy and the card are checked against them.
        hash: false,
        blocks: Some(Arc::clone(&spec.image.blocks)),
        ..Options::default()
    };
    pipeline::flash(&mut image, &spec.card.devnode, &opts, &Guard::default(), observer, &spec.cancel).map_err(|e| {
        match e {
            // Name the image as configured, not its copy in the cache.
            JobError::ImageChanged { offset, .. } => {
                JobError::ImageChanged { image: spec.image.source.clone(), offset }
            }
            e => e,
        }
    })
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
