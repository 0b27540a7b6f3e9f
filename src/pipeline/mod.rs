//! One job: the stages that turn an image and a target into a flashed card.
//!
//! [`flash`] is the whole job as both the CLI and the daemon run it: size
//! the image, open the target exclusively, ask the guard, check the card is
//! still the one we were asked to write (DISKSEQ), then the stages: write,
//! verify, expand (last partition), resize (its filesystem), eject. It is
//! blocking and runs on the caller's thread plus one image-reader thread;
//! progress and stage outcomes go to an [`Observer`] and a [`Cancel`] stops
//! it between chunks and stages.
//!
//! One target is held for the whole job, and with it one `flock`: udev and
//! automounters never get the card between stages. Write and verify also
//! hold the device `O_EXCL`; expand and resize cannot (an exclusive claim
//! of the whole disk makes every partition unclaimable, and e2fsck opens
//! its partition exclusively), so after verifying the claim is released
//! and the lock kept.
//!
//! A card never looks flashed unless it is: from the first byte written,
//! any failure (mismatch, I/O error, interruption, a failed expand or
//! resize) ends with both partition tables blanked, and every write that
//! can make a card look valid (the final table, the blanking) first checks
//! that the reader still holds the card the job was for (DISKSEQ).

pub mod eject;
mod expand;
mod resize;
mod verify;
mod write;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::blockdev::{Access, DeviceError, Kind, Sysfs, Target};
use crate::guard::{Guard, Refusal, Request};
use crate::image::{BlockDigests, Format, Hashes, Image, ImageError};
use crate::tools::ToolError;

pub use crate::model::{Cancel, EjectMode, Stage, StageOutcome, StageResult};
pub use write::HEAD;

/// Default I/O size: large enough to reach a card's sequential speed,
/// small enough to keep three in flight on a Raspberry Pi.
pub const DEFAULT_CHUNK: usize = 4 << 20;
/// Allowed chunk sizes; a multiple of [`HEAD`] keeps every write aligned.
pub const CHUNK_RANGE: std::ops::RangeInclusive<usize> = HEAD..=(8 << 20);

/// A stage's verdict before it is timed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub result: StageResult,
    pub detail: String,
}

impl Outcome {
    pub fn done(detail: impl Into<String>) -> Self {
        Self { result: StageResult::Done, detail: detail.into() }
    }

    pub fn skipped(detail: impl Into<String>) -> Self {
        Self { result: StageResult::Skipped, detail: detail.into() }
    }
}

/// Receives progress; called from the job's thread, so it must be cheap.
pub trait Observer: Send + Sync {
    fn stage(&self, _stage: Stage) {}
    fn progress(&self, _stage: Stage, _done: u64, _total: u64) {}
    fn outcome(&self, _outcome: &StageOutcome) {}
}

/// The job's end if it was asked to stop: checked between chunks.
fn stopped(cancel: &Cancel, target: &Target) -> Result<(), JobError> {
    if cancel.is_cancelled() { Err(JobError::Cancelled { device: target.path().to_owned() }) } else { Ok(()) }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{}: card does not match the image at byte {offset}", device.display())]
    Mismatch { device: PathBuf, offset: u64 },
    #[error(
        "image {}: the prepared copy does not match the image at byte {offset} (changed or damaged since it was prepared)",
        image.display()
    )]
    ImageChanged { image: PathBuf, offset: u64 },
    #[error("{}: interrupted", device.display())]
    Cancelled { device: PathBuf },
    #[error(transparent)]
    Probe(#[from] crate::probe::ProbeError),
    /// The card's real capacity is less than it claims.
    #[error("{}: {report}", report.device.display())]
    Counterfeit { report: Box<crate::probe::ProbeReport> },
    #[error("{}: {} failed: {message}", device.display(), stage.name())]
    Stage { device: PathBuf, stage: Stage, message: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl JobError {
    /// Whether the card failed I/O: with a removal right after, a pulled card.
    pub fn is_io_failure(&self) -> bool {
        match self {
            Self::Device(d) => d.os_error().is_some(),
            Self::Probe(p) => p.is_io(),
            _ => false,
        }
    }

    /// Exit status for the CLI: 3 refused by the guard, 4 the card does not
    /// hold the image, 130 interrupted, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Refused(_) => 3,
            Self::Mismatch { .. } | Self::Counterfeit { .. } => 4,
            Self::Cancelled { .. } => 130,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone)]
#[allow(clippy::struct_excessive_bools)] // one switch per stage and safety rule
pub struct Options {
    pub verify: bool,
    /// Allow fixed disks; never overrides the other guard rules.
    pub force: bool,
    pub chunk_size: usize,
    /// The media the caller saw; a different card in the reader is refused.
    pub expected_diskseq: Option<u64>,
    /// Compute the image's SHA-256 during verification; the daemon already
    /// knows it from preparing the image and skips the CPU cost per card.
    pub hash: bool,
    /// The image's block digests from preparation. Without them, they are
    /// computed from the decoded stream while it is written.
    pub blocks: Option<Arc<BlockDigests>>,
    /// Grow the last partition to the end of the card.
    pub expand: bool,
    /// Grow the last partition's filesystem to fill it.
    pub resize: bool,
    pub eject: EjectMode,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            verify: true,
            force: false,
            chunk_size: DEFAULT_CHUNK,
            expected_diskseq: None,
            hash: true,
            blocks: None,
            expand: false,
            resize: false,
            eject: EjectMode::None,
        }
    }
}

/// What a finished job did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub image: PathBuf,
    pub format: Format,
    pub target: PathBuf,
    pub diskseq: Option<u64>,
    pub raw_size: u64,
    /// SHA-256 of the raw image bytes, computed from the card's bytes as
    /// the verify pass checks them (off the write path: on a Pi 4 hashing is
    /// slower than a USB 3 device). `None` after `--no-verify`, and in the
    /// daemon, which knows it from preparation.
    pub sha256: Option<String>,
    /// Every stage that ran, in order.
    pub stages: Vec<StageOutcome>,
}

impl Report {
    pub fn seconds(&self, stage: Stage) -> Option<f64> {
        self.stages.iter().find(|s| s.stage == stage && s.result == StageResult::Done).map(|s| s.seconds)
    }
}

/// Writes `image` to `target` and (by default) verifies it.
pub fn flash(
    image: &mut Image,
    target: &Path,
    opts: &Options,
    guard: &Guard,
    observer: &dyn Observer,
    cancel: &Cancel,
) -> Result<Report, JobError> {
    let raw_size = image.raw_size_or_measure()?;
    if let Some(blocks) = &opts.blocks
        && blocks.len != raw_size
    {
        let path = image.path.clone();
        return Err(ImageError::SizeChanged { path, expected: blocks.len, found: raw_size }.into());
    }
    let mut target =
        open_checked(target, &Request { image: &image.path, image_size: raw_size, force: opts.force }, guard)?;
    target.ensure_media(opts.expected_diskseq)?;
    let diskseq = target.diskseq();
    let stages = Stages { observer, done: Vec::new() };
    let mut job = Job { image, opts, guard, observer, cancel, raw_size, stages };
    let mut started = false;
    match job.stages(&mut target, &mut started) {
        Ok(sha256) => Ok(Report {
            image: job.image.path.clone(),
            format: job.image.format,
            target: target.path().to_owned(),
            diskseq,
            raw_size,
            sha256,
            stages: job.stages.done,
        }),
        Err(e) => {
            if started && target.kind() == Kind::BlockDevice {
                let blanked =
                    target.writable_again().map_err(JobError::from).and_then(|()| write::blank(&target, diskseq));
                match blanked {
                    Ok(()) => tracing::info!(
                        "{}: partition tables blanked: the card does not hold the image",
                        target.path().display()
                    ),
                    Err(blank) => tracing::warn!("cannot blank the partition tables after the job failed: {blank}"),
                }
            }
            Err(e)
        }
    }
}

/// Takes the partition tables off a card whose job did not finish (after
/// a restart), if the reader still holds that card (`diskseq`).
pub fn blank_card(device: &Path, diskseq: Option<u64>) -> Result<(), JobError> {
    let target = Target::open(device, Access::Write)?;
    write::blank(&target, diskseq)
}

/// One job's stages, on one target.
struct Job<'a> {
    image: &'a Image,
    opts: &'a Options,
    guard: &'a Guard,
    observer: &'a dyn Observer,
    cancel: &'a Cancel,
    raw_size: u64,
    stages: Stages<'a>,
}

impl Job<'_> {
    /// Runs the stages; `started` turns true once the card may have
    /// changed, so that a failure blanks it.
    fn stages(&mut self, target: &mut Target, started: &mut bool) -> Result<Option<String>, JobError> {
        let (opts, observer, cancel, raw_size) = (self.opts, self.observer, self.cancel, self.raw_size);
        // Digests are for verifying: without it, the write pass computes none.
        let computed = opts.blocks.is_none() && opts.verify;
        let mut chunks = self.image.chunks(opts.chunk_size, Hashes { sha256: false, blocks: computed })?;
        let source = write::Source { path: &self.image.path, raw_size, expected: opts.blocks.as_deref() };
        *started = true;
        self.stages.run(Stage::Write, || {
            write::run(&mut chunks, target, &source, observer, cancel)?;
            Ok(Outcome::done(format!("{} written", crate::units::Bytes(raw_size))))
        })?;
        let streamed = chunks.finish().and_then(|d| d.blocks);
        let sha256 = if opts.verify {
            let blocks = match (&opts.blocks, &streamed) {
                (Some(b), _) => b.as_ref(),
                (None, Some(b)) => b,
                (None, None) => return Err(JobError::Internal("the image reader ended without digests".into())),
            };
            let mut sha = None;
            self.stages.run(Stage::Verify, || {
                let reference = verify::Reference::Blocks(blocks);
                sha = verify::run(target, reference, raw_size, opts.chunk_size, opts.hash, observer, cancel)?;
                if target.kind() != Kind::BlockDevice {
                    return Ok(Outcome::done("the card matches the image"));
                }
                // Before anything grows into the space past the image: is
                // it really there? (A fake card wraps or drops writes.)
                let report = crate::probe::probe(target, raw_size, cancel)?;
                if !report.genuine {
                    return Err(JobError::Counterfeit { report: Box::new(report) });
                }
                Ok(Outcome::done(format!("the card matches the image; {report}")))
            })?;
            sha
        } else {
            None
        };
        if target.kind() != Kind::BlockDevice {
            return Ok(sha256);
        }
        let device = target.path().to_owned();
        let expected = target.diskseq();
        if opts.expand || opts.resize {
            stopped(cancel, target)?;
            target.release_claim()?;
            if opts.expand {
                target.ensure_media(expected)?;
                self.stages.run(Stage::Expand, || {
                    expand::run(&device, target.size()).map_err(|e| stage_error(&device, Stage::Expand, &e))
                })?;
            }
            if opts.resize {
                stopped(cancel, target)?;
                target.ensure_media(expected)?;
                let dev = target.dev();
                self.stages.run(Stage::Resize, || {
                    let syspath = dev.and_then(|d| Sysfs::default().block(d).ok()).map(|b| b.syspath);
                    let syspath =
                        syspath.ok_or_else(|| stage_error(&device, Stage::Resize, &"the disk is not in sysfs"))?;
                    resize::run(&device, &syspath, cancel.stop_flag()).map_err(|e| match e {
                        resize::StageError::Partition { source: ToolError::Interrupted { .. }, .. } => {
                            JobError::Cancelled { device: device.clone() }
                        }
                        e => stage_error(&device, Stage::Resize, &e),
                    })
                })?;
            }
        }
        if let (Some(dev), false) = (target.dev(), opts.eject == EjectMode::None) {
            stopped(cancel, target)?;
            // From here on the card is complete: an eject that fails does
            // not make it any less flashed.
            *started = false;
            let env = eject::Env { sysfs: &Sysfs::default(), scsi: &crate::blockdev::scsi::SgIo, guard: self.guard };
            self.stages.run(Stage::Eject, || {
                eject::run(&device, dev, opts.eject, &env).map_err(|e| stage_error(&device, Stage::Eject, &e))
            })?;
        }
        Ok(sha256)
    }
}

/// Runs stages in order, timing each and telling the observer.
struct Stages<'a> {
    observer: &'a dyn Observer,
    done: Vec<StageOutcome>,
}

impl Stages<'_> {
    fn run(&mut self, stage: Stage, f: impl FnOnce() -> Result<Outcome, JobError>) -> Result<(), JobError> {
        self.observer.stage(stage);
        let started = Instant::now();
        let verdict = f();
        let (result, detail) = match &verdict {
            Ok(o) => (o.result, o.detail.clone()),
            Err(e) => (StageResult::Failed, e.to_string()),
        };
        let outcome = StageOutcome { stage, result, detail, seconds: started.elapsed().as_secs_f64() };
        self.observer.outcome(&outcome);
        self.done.push(outcome);
        verdict.map(drop)
    }
}

fn stage_error(device: &Path, stage: Stage, message: &dyn std::fmt::Display) -> JobError {
    JobError::Stage { device: device.to_owned(), stage, message: message.to_string() }
}

/// Reads a card back and compares it with `image`, on its own; returns the
/// image's SHA-256.
pub fn verify_only(
    image: &mut Image,
    target: &Path,
    chunk_size: usize,
    observer: &dyn Observer,
    cancel: &Cancel,
) -> Result<String, JobError> {
    let raw_size = image.raw_size_or_measure()?;
    let target = Target::open(target, Access::Read)?;
    if target.size() < raw_size && target.kind() == crate::blockdev::Kind::BlockDevice {
        return Err(Refusal::TooSmall {
            device: target.path().to_owned(),
            device_size: target.size(),
            image_size: raw_size,
        }
        .into());
    }
    observer.stage(Stage::Verify);
    let reference = verify::Reference::Image(image.chunks(chunk_size, Hashes::default())?);
    verify::run(&target, reference, raw_size, chunk_size, true, observer, cancel)?
        .ok_or_else(|| JobError::Internal("verification ended without a digest".into()))
}

/// Opens a card for a job of its own (the probe) as a write opens one:
/// exclusively, locked, and only if the guard agrees (not the system disk,
/// nothing on it mounted, a whole disk, a removable one unless `force`).
pub fn open_card(path: &Path, guard: &Guard, force: bool) -> Result<Target, JobError> {
    // Opening for writing would create a missing regular file: a mistyped
    // path must be an error, not an empty new "card".
    if std::fs::metadata(path).is_err() {
        return Err(DeviceError::Missing { path: path.to_owned() }.into());
    }
    // No image: the size check passes and "the target is the image" cannot
    // match (an empty path has no inode).
    open_checked(path, &Request { image: Path::new(""), image_size: 0, force }, guard)
}

/// Opens the target exclusively and asks the guard. When the exclusive open
/// fails because the device is busy, the guard is asked anyway through a
/// shared open, so the operator learns *why* (e.g. "/ is mounted from it").
fn open_checked(path: &Path, req: &Request<'_>, guard: &Guard) -> Result<Target, JobError> {
    match Target::open(path, Access::Write) {
        Ok(target) => {
            guard.check(&target, req)?;
            Ok(target)
        }
        Err(busy @ DeviceError::Busy { .. }) => {
            if let Ok(probe) = Target::open(path, Access::Read) {
                guard.check(&probe, req)?;
            }
            Err(busy.into())
        }
        Err(e) => Err(e.into()),
    }
}
