//! Which waiting card gets a writer next: first in, first out, while fewer
//! than `concurrency` jobs run (those of replaced cards included).
//!
//! A card whose image is still being prepared keeps its place, and does not
//! hold up the cards behind it; one whose image failed fails with the
//! image's error; one whose device is still held by the job of the card it
//! replaced waits for that job. Concurrency is a count of running jobs, not
//! a pool of permits, so lowering and raising it in quick succession
//! cannot lose a writer.

use super::catalog::ImageState;
use super::machine::{Core, Effect, Start};
use crate::model::SlotState;

impl Core {
    /// Starts every queued job that can start, in insertion order.
    pub(super) fn schedule(&mut self) {
        if self.stopping {
            return;
        }
        let mut i = 0;
        while i < self.queue.len() {
            let id = self.queue[i];
            let Some(s) = self.slots.iter().position(|s| s.job_id() == Some(id)) else {
                self.queue.remove(i);
                continue;
            };
            let image = self.slots[s].config.image.clone();
            match self.images.get(&image) {
                None => {
                    self.prepare(&image, super::catalog::Rebuild::IfNeeded);
                    i += 1;
                }
                Some(ImageState::Preparing) => i += 1,
                Some(ImageState::Failed(e)) => {
                    let e = e.clone();
                    self.queue.remove(i);
                    // Let the next card retry, in case the image was fixed.
                    self.images.forget_failed(&image);
                    self.finish(s, SlotState::Failed, Some(e), None);
                }
                // The job for the card this one replaced still holds the device.
                Some(ImageState::Ready(_)) if self.device_held_by_orphan(s) => i += 1,
                Some(ImageState::Ready(facts)) => {
                    if self.running() >= self.config.concurrency {
                        break;
                    }
                    let sha256 = facts.sha256.clone();
                    self.queue.remove(i);
                    self.start_job(s, sha256);
                }
            }
        }
    }

    fn device_held_by_orphan(&self, s: usize) -> bool {
        self.slots[s].card.as_ref().is_some_and(|c| self.orphans.values().any(|(_, d)| *d == c.devnode))
    }

    fn start_job(&mut self, s: usize, sha256: String) {
        let settings = self.settings();
        let wall = self.now.wall;
        let slot = &mut self.slots[s];
        let (Some(job), Some(card)) = (slot.job.as_mut(), slot.card.clone()) else { return };
        job.running = true;
        slot.jobs += 1;
        slot.image_sha256 = Some(sha256);
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
}
