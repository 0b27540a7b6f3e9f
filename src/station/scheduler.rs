//! Which waiting card gets a writer next: first in, first out, while fewer
//! than `concurrency` jobs run (those of replaced cards included).
//!
//! A card whose image is still being prepared, or changed on disk since it
//! was, keeps its place, and does not hold up the cards behind it; one whose image failed fails with the
//! image's error; one whose device is still held by the job of the card it
//! replaced waits for that job. Concurrency is a count of running jobs, not
//! a pool of permits, so lowering and raising it in quick succession
//! cannot lose a writer.
//!
//! A pure function of the queue, the slots and the images: the core asks
//! for one decision at a time and applies it, until there is none.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;

use super::catalog::{Catalog, ImageState};
use super::slot::Slot;

/// The next thing to do for the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Decision {
    /// The job's slot is gone: drop it from the queue.
    Forget { job: u64 },
    /// A waiting card needs this image, which nobody is preparing.
    Prepare(PathBuf),
    /// A waiting card's image changed on disk since it was prepared.
    Stale(PathBuf),
    /// The card's image is unusable: the card fails with its error.
    Fail { job: u64, slot: usize, error: String },
    /// Give the card a writer.
    Start { job: u64, slot: usize },
}

/// What the queue needs next; `None` when every waiting card waits.
pub(super) fn next(
    queue: &VecDeque<u64>,
    slots: &[Slot],
    images: &Catalog,
    stale: &[PathBuf],
    orphans: &HashMap<u64, (String, PathBuf)>,
    running: usize,
    concurrency: usize,
) -> Option<Decision> {
    for &job in queue {
        let Some(slot) = slots.iter().position(|s| s.job_id() == Some(job)) else {
            return Some(Decision::Forget { job });
        };
        let image = &slots[slot].config.image;
        match images.get(image) {
            None => return Some(Decision::Prepare(image.clone())),
            Some(ImageState::Preparing) => {}
            Some(ImageState::Failed(error)) => return Some(Decision::Fail { job, slot, error: error.clone() }),
            // Replaced or rewritten since it was prepared: this card waits
            // for the new version.
            Some(ImageState::Ready(_)) if stale.contains(image) => return Some(Decision::Stale(image.clone())),
            // The job for the card this one replaced still holds the device.
            Some(ImageState::Ready(_))
                if slots[slot].card.as_ref().is_some_and(|c| orphans.values().any(|(_, d)| *d == c.devnode)) => {}
            Some(ImageState::Ready(_)) if running >= concurrency => return None,
            Some(ImageState::Ready(_)) => return Some(Decision::Start { job, slot }),
        }
    }
    None
}
