//! The station core, transition by transition: the state table in the
//! README ("What happens to a card"), one test per row or story. Pure: no
//! root, no devices, no runtime; each test runs in microseconds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::catalog::{ImageFacts, Rebuild};
use super::machine::{Core, Effect, Failure, FailureKind, Input, Interrupted, Now, YANK_WINDOW};
use super::slot::{Card, Sample};
use crate::config::Config;
use crate::image::Format;
use crate::model::{SlotState, Stage, StageOutcome, StageResult};
use crate::pipeline::Report;

const IMAGE: &str = "/station/os.img";

fn config(text: &str) -> Arc<Config> {
    Arc::new(Config::parse(Path::new("/station/flashbay.yaml"), text).expect("valid test configuration"))
}

/// Slots A1..An on ports p1..pn, one image.
fn slots(n: usize, concurrency: usize, extra: &str) -> String {
    let slots: Vec<String> = (1..=n).map(|i| format!("  - {{name: A{i}, port: p{i}}}")).collect();
    format!("image: os.img\nconcurrency: {concurrency}\n{extra}slots:\n{}\n", slots.join("\n"))
}

fn facts() -> ImageFacts {
    ImageFacts { format: Format::Raw, raw_size: 1 << 20, sha256: "ab".repeat(32), cached: false }
}

fn report(stages: &[(Stage, &str)]) -> Report {
    Report {
        image: IMAGE.into(),
        format: Format::Raw,
        target: "/dev/sdx".into(),
        diskseq: None,
        raw_size: 1 << 20,
        sha256: None,
        stages: stages
            .iter()
            .map(|&(stage, detail)| StageOutcome {
                stage,
                result: StageResult::Done,
                detail: detail.into(),
                seconds: 1.0,
            })
            .collect(),
    }
}

fn failure(kind: FailureKind, message: &str) -> Failure {
    Failure { kind, message: message.into() }
}

/// A core, a clock, and what the last input made it do.
struct Bench {
    core: Core,
    start: Instant,
    wall: SystemTime,
    elapsed: Duration,
    /// Images whose file "changed on disk", as the shell would report.
    stale: Vec<PathBuf>,
    effects: Vec<Effect>,
}

impl Bench {
    /// Started, with its image prepared.
    fn new(text: &str) -> Self {
        let mut b = Self::unprepared(text);
        b.prepared(IMAGE);
        b
    }

    /// Started; its image still being prepared.
    fn unprepared(text: &str) -> Self {
        let mut b = Self {
            core: Core::new(config(text)),
            start: Instant::now(),
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            elapsed: Duration::ZERO,
            stale: Vec::new(),
            effects: Vec::new(),
        };
        b.send(Input::Start { interrupted: Vec::new() });
        b
    }

    fn send(&mut self, input: Input) -> &[Effect] {
        let now = Now { at: self.start + self.elapsed, wall: self.wall + self.elapsed };
        self.effects = self.core.handle(input, now, &self.stale);
        &self.effects
    }

    fn wait(&mut self, d: Duration) {
        self.elapsed += d;
    }

    fn prepared(&mut self, image: &str) {
        self.send(Input::Prepared { image: image.into(), result: Ok(facts()) });
    }

    fn insert(&mut self, slot: usize, diskseq: u64) {
        let card = Card {
            devnode: PathBuf::from(format!("/dev/sd{}", char::from(b'a' + u8::try_from(slot).unwrap()))),
            diskseq: Some(diskseq),
            size: 8 << 30,
            serial: Some(format!("SN{diskseq}")),
            vendor: None,
            model: None,
        };
        self.send(Input::CardSeen { port: format!("p{slot}"), card, at_start: false });
    }

    fn remove(&mut self, slot: usize) {
        self.send(Input::CardGone { port: format!("p{slot}"), devnode: "/dev/sdx".into() });
    }

    fn state(&self, slot: &str) -> SlotState {
        self.slot(slot).state
    }

    fn error(&self, slot: &str) -> Option<String> {
        self.slot(slot).error
    }

    fn slot(&self, name: &str) -> super::status::SlotStatus {
        self.core.snapshot(None).slots.into_iter().find(|s| s.name == name).expect("slot")
    }

    /// Jobs the last input started, by slot name.
    fn started(&self) -> Vec<(String, u64)> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Start(s) => Some((s.slot.clone(), s.job)),
                _ => None,
            })
            .collect()
    }

    fn start_one(&self) -> u64 {
        match self.started().as_slice() {
            [(_, job)] => *job,
            other => panic!("expected one job to start, got {other:?}"),
        }
    }

    fn cancelled(&self) -> Vec<u64> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Cancel(job) => Some(*job),
                _ => None,
            })
            .collect()
    }

    fn stage(&mut self, job: u64, stage: Stage) {
        self.send(Input::Stage { job, stage });
    }

    fn finish(&mut self, job: u64, end: Result<Report, Failure>) {
        self.send(Input::Finished { job, end, last: Sample::default() });
    }

    fn done(&mut self, job: u64) {
        self.finish(job, Ok(report(&[(Stage::Write, "1 MiB"), (Stage::Verify, "matches")])));
    }

    fn history(&self) -> Vec<(String, SlotState, Option<String>, bool)> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::History(h) => Some((h.slot.clone(), h.state, h.error.clone(), h.verified)),
                _ => None,
            })
            .collect()
    }

    fn reply(&self) -> Result<String, String> {
        self.effects
            .iter()
            .find_map(|e| match e {
                Effect::Reply(r) => Some(r.clone()),
                _ => None,
            })
            .expect("a reply")
    }

    fn summary(&self) -> (u64, u64, u64) {
        let s = self.core.snapshot(None).summary;
        (s.done, s.failed, s.refused)
    }
}

// --- empty → queued / present ---

#[test]
fn an_inserted_card_is_queued_and_written_at_once_when_a_writer_is_free() {
    let mut b = Bench::new(&slots(1, 1, ""));
    assert_eq!(b.state("A1"), SlotState::Empty);
    b.insert(1, 7);
    let start = match &b.effects.iter().find(|e| matches!(e, Effect::Start(_))) {
        Some(Effect::Start(s)) => s.clone(),
        _ => panic!("no job started: {:?}", b.effects),
    };
    assert_eq!((start.slot.as_str(), start.image.as_path(), start.card.diskseq), ("A1", Path::new(IMAGE), Some(7)));
    assert!(start.settings.verify && start.settings.expand, "defaults: {:?}", start.settings);
    assert_eq!(b.state("A1"), SlotState::Queued, "queued until the job reports its first stage");
    b.stage(start.job, Stage::Write);
    assert_eq!(b.state("A1"), SlotState::Writing);
}

#[test]
fn a_card_present_at_start_is_left_alone_unless_configured() {
    let present = |extra: &str| {
        let mut b = Bench::new(&slots(1, 1, extra));
        let card = Card {
            devnode: "/dev/sdb".into(),
            diskseq: Some(3),
            size: 1 << 30,
            serial: None,
            vendor: None,
            model: None,
        };
        b.send(Input::CardSeen { port: "p1".into(), card, at_start: true });
        (b.state("A1"), b.started().len())
    };
    assert_eq!(present(""), (SlotState::Present, 0));
    assert_eq!(present("flash_present_at_start: true\n"), (SlotState::Queued, 1));
}

#[test]
fn a_disk_on_an_unknown_port_starts_nothing() {
    let mut b = Bench::new(&slots(1, 1, ""));
    let card =
        Card { devnode: "/dev/sdz".into(), diskseq: Some(1), size: 1 << 30, serial: None, vendor: None, model: None };
    b.send(Input::CardSeen { port: "elsewhere".into(), card, at_start: false });
    assert!(b.started().is_empty());
    assert_eq!(b.state("A1"), SlotState::Empty);
}

#[test]
fn the_same_media_seen_again_is_not_a_new_card() {
    let mut b = Bench::new(&slots(1, 1, ""));
    b.insert(1, 7);
    let job = b.start_one();
    b.stage(job, Stage::Write);
    // udev's change event after our own partition-table write: same DISKSEQ.
    b.insert(1, 7);
    assert!(b.started().is_empty() && b.cancelled().is_empty(), "{:?}", b.effects);
    assert_eq!(b.state("A1"), SlotState::Writing);
}

// --- queued: waits in order, for a writer or for its image ---

#[test]
fn cards_wait_in_insertion_order_for_a_writer() {
    let mut b = Bench::new(&slots(3, 1, ""));
    b.insert(1, 1);
    let first = b.start_one();
    b.insert(3, 3);
    b.insert(2, 2);
    assert!(b.started().is_empty());
    assert_eq!((b.state("A2"), b.state("A3")), (SlotState::Queued, SlotState::Queued));
    assert_eq!(b.core.snapshot(None).summary.queued, 2);
    b.done(first);
    assert_eq!(b.started().iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), ["A3"], "first in, first out");
}

#[test]
fn cards_wait_while_their_image_is_prepared_and_start_when_it_is_ready() {
    let mut b = Bench::unprepared(&slots(2, 2, ""));
    assert!(
        b.effects.iter().any(|e| matches!(e, Effect::Prepare { rebuild: Rebuild::IfNeeded, .. })),
        "preparation starts with the station"
    );
    b.insert(1, 1);
    b.insert(2, 2);
    assert!(b.started().is_empty());
    assert_eq!(b.core.snapshot(None).images[0].state, "preparing");
    b.prepared(IMAGE);
    assert_eq!(b.started().len(), 2);
    assert_eq!(b.core.snapshot(None).images[0].state, "ready");
}

#[test]
fn an_unusable_image_fails_its_waiting_cards_and_is_tried_again_for_the_next() {
    let mut b = Bench::unprepared(&slots(2, 2, ""));
    b.insert(1, 1);
    b.insert(2, 2);
    let error = format!("image {IMAGE}: corrupt xz stream at byte 99");
    b.send(Input::Prepared { image: IMAGE.into(), result: Err(error.clone()) });
    assert_eq!((b.state("A1"), b.error("A1")), (SlotState::Failed, Some(error.clone())));
    // Each card tries the image once more, in case it was fixed meanwhile.
    assert_eq!(b.state("A2"), SlotState::Queued);
    assert!(b.effects.iter().any(|e| matches!(e, Effect::Prepare { .. })));
    b.send(Input::Prepared { image: IMAGE.into(), result: Err(error.clone()) });
    assert_eq!((b.state("A2"), b.error("A2")), (SlotState::Failed, Some(error.clone())));
    assert!(b.started().is_empty(), "no card is touched");
    assert_eq!(b.summary(), (0, 2, 0));
    // The operator fixed the image: the next card prepares it again.
    b.remove(1);
    b.insert(1, 3);
    assert!(b.effects.iter().any(|e| matches!(e, Effect::Prepare { .. })), "{:?}", b.effects);
    assert_eq!(b.state("A1"), SlotState::Queued);
    b.prepared(IMAGE);
    assert_eq!(b.start_one(), 3, "job ids: 1, 2 failed with the image, 3 written");
}

#[test]
fn an_image_changed_on_disk_makes_waiting_cards_wait_for_the_new_version() {
    let mut b = Bench::new(&slots(2, 1, ""));
    b.insert(1, 1);
    let first = b.start_one();
    b.insert(2, 2);
    b.stale = vec![IMAGE.into()];
    b.stage(first, Stage::Write);
    assert!(!b.effects.iter().any(|e| matches!(e, Effect::Prepare { .. })), "only when a card is about to start");
    b.done(first);
    assert!(b.started().is_empty(), "A2 must wait for the new preparation");
    assert!(b.effects.iter().any(|e| matches!(e, Effect::Prepare { rebuild: Rebuild::IfNeeded, .. })));
    // Changed again while it was prepared: prepared once more, then used.
    b.prepared(IMAGE);
    assert!(b.started().is_empty() && b.effects.iter().any(|e| matches!(e, Effect::Prepare { .. })));
    b.stale.clear();
    b.prepared(IMAGE);
    assert_eq!(b.started()[0].0, "A2");
}

#[test]
fn a_damaged_prepared_copy_fails_the_card_and_is_rebuilt_from_the_source() {
    let mut b = Bench::new(&slots(1, 1, ""));
    b.insert(1, 1);
    let job = b.start_one();
    let message = format!("image {IMAGE}: the prepared copy does not match the image at byte 5242880");
    b.finish(job, Err(failure(FailureKind::ImageChanged(IMAGE.into()), &message)));
    assert_eq!((b.state("A1"), b.error("A1")), (SlotState::Failed, Some(message)));
    assert!(b.effects.iter().any(|e| matches!(e, Effect::Prepare { rebuild: Rebuild::Always, .. })));
}

#[test]
fn a_queued_card_removed_empties_its_slot_and_frees_its_place() {
    let mut b = Bench::new(&slots(2, 1, ""));
    b.insert(1, 1);
    let first = b.start_one();
    b.insert(2, 2);
    b.remove(2);
    assert_eq!((b.state("A2"), b.error("A2")), (SlotState::Empty, None));
    b.done(first);
    assert!(b.started().is_empty());
    assert_eq!(b.summary(), (1, 0, 0), "a card never written is not counted");
}

#[test]
fn an_operator_cancels_a_queued_card() {
    let mut b = Bench::new(&slots(2, 1, ""));
    b.insert(1, 1);
    let first = b.start_one();
    b.insert(2, 2);
    b.send(Input::Cancel { slot: "A2".into() });
    assert_eq!(b.reply(), Ok("A2: cancelled".into()));
    assert_eq!(b.error("A2").as_deref(), Some("cancelled by the operator before it started"));
    assert_eq!(b.history(), [("A2".into(), SlotState::Failed, b.error("A2"), false)]);
    b.done(first);
    assert!(b.started().is_empty(), "the cancelled card stays unwritten");
    assert_eq!(b.summary(), (1, 1, 0));
    b.send(Input::Cancel { slot: "A9".into() });
    assert_eq!(b.reply(), Err("no slot named A9".into()));
    b.send(Input::Cancel { slot: "A1".into() });
    assert_eq!(b.reply(), Err("A1: nothing to cancel (done)".into()));
}

// --- writing → verifying → … → done, failed or refused ---

#[test]
fn a_job_goes_through_its_stages_and_ends_done() {
    let mut b = Bench::new(&slots(1, 1, ""));
    b.insert(1, 1);
    let job = b.start_one();
    for (stage, state) in [
        (Stage::Write, SlotState::Writing),
        (Stage::Verify, SlotState::Verifying),
        (Stage::Expand, SlotState::Expanding),
        (Stage::Resize, SlotState::Resizing),
        (Stage::Eject, SlotState::Ejecting),
    ] {
        b.stage(job, stage);
        assert_eq!(b.state("A1"), state);
    }
    b.send(Input::Outcome {
        job,
        outcome: StageOutcome { stage: Stage::Write, result: StageResult::Done, detail: "1 MiB".into(), seconds: 1.0 },
    });
    assert_eq!(b.slot("A1").stages.len(), 1);
    b.done(job);
    assert_eq!((b.state("A1"), b.error("A1")), (SlotState::Done, None));
    assert_eq!(b.history(), [("A1".into(), SlotState::Done, None, true)], "verified, in the history");
    assert!(b.effects.iter().any(|e| matches!(e, Effect::Finished(r) if r.state == SlotState::Done)));
    assert_eq!(b.summary(), (1, 0, 0));
    assert_eq!(b.core.snapshot(None).totals.written_bytes, 1 << 20);
    // done stays until the card is pulled.
    b.remove(1);
    assert_eq!(b.state("A1"), SlotState::Empty);
}

#[test]
fn a_refused_card_and_a_failed_card_keep_their_reasons() {
    let mut b = Bench::new(&slots(2, 2, ""));
    b.insert(1, 1);
    let a1 = b.start_one();
    b.insert(2, 2);
    let a2 = b.start_one();
    b.finish(a1, Err(failure(FailureKind::Refused, "/dev/sda: device is 1.0 GiB, image needs 1.4 GiB")));
    assert_eq!(
        (b.state("A1"), b.error("A1").as_deref()),
        (SlotState::Refused, Some("/dev/sda: device is 1.0 GiB, image needs 1.4 GiB"))
    );
    b.finish(a2, Err(failure(FailureKind::Other, "/dev/sdb: card does not match the image at byte 4096")));
    assert_eq!(b.state("A2"), SlotState::Failed);
    assert_eq!(b.summary(), (0, 1, 1));
    // Pulled later, a failed card leaves an empty slot.
    b.remove(2);
    assert_eq!((b.state("A2"), b.error("A2")), (SlotState::Empty, None));
}

#[test]
fn a_card_pulled_mid_job_fails_its_slot_only() {
    let mut b = Bench::new(&slots(2, 2, ""));
    b.insert(1, 1);
    let a1 = b.start_one();
    b.insert(2, 2);
    let a2 = b.start_one();
    b.stage(a1, Stage::Verify);
    b.stage(a2, Stage::Write);
    b.remove(1);
    assert_eq!(b.cancelled(), [a1], "only the pulled card's job is stopped");
    b.finish(a1, Err(failure(FailureKind::Cancelled, "cancelled")));
    assert_eq!(b.error("A1").as_deref(), Some("card removed during verifying"));
    assert_eq!(b.state("A2"), SlotState::Writing);
    b.done(a2);
    assert_eq!(b.state("A2"), SlotState::Done);
}

#[test]
fn an_io_failure_followed_by_removal_is_a_pulled_card() {
    let mut b = Bench::new(&slots(1, 1, ""));
    b.insert(1, 1);
    let job = b.start_one();
    b.stage(job, Stage::Write);
    b.finish(job, Err(failure(FailureKind::Io, "/dev/sdb: write failed at offset 0: Input/output error")));
    b.wait(Duration::from_secs(2));
    b.remove(1);
    assert_eq!(
        (b.state("A1"), b.error("A1").as_deref()),
        (
            SlotState::Failed,
            Some("card removed during writing (/dev/sdb: write failed at offset 0: Input/output error)")
        )
    );
    // After the window, an I/O failure and a removal are two things.
    let mut b = Bench::new(&slots(1, 1, ""));
    b.insert(1, 1);
    let job = b.start_one();
    b.finish(job, Err(failure(FailureKind::Io, "read failed")));
    b.wait(YANK_WINDOW + Duration::from_secs(1));
    b.remove(1);
    assert_eq!(b.state("A1"), SlotState::Empty);
}

#[test]
fn an_ejected_done_card_stays_done_when_pulled() {
    let mut b = Bench::new(&slots(1, 1, ""));
    b.insert(1, 1);
    let job = b.start_one();
    b.finish(job, Ok(report(&[(Stage::Write, "1 MiB"), (Stage::Eject, "ejected")])));
    b.remove(1);
    assert_eq!(b.state("A1"), SlotState::Done);
}

#[test]
fn a_card_swapped_mid_job_gets_its_own_job_once_the_old_one_lets_go() {
    let mut b = Bench::new(&slots(1, 2, ""));
    b.insert(1, 1);
    let old = b.start_one();
    b.stage(old, Stage::Write);
    // Another card in the same reader, without a removal in between.
    b.insert(1, 2);
    assert_eq!(b.cancelled(), [old]);
    assert!(b.started().is_empty(), "the old job still holds the device");
    assert_eq!(b.state("A1"), SlotState::Queued);
    assert_eq!(b.core.running(), 1, "the old job counts against concurrency");
    b.finish(old, Err(failure(FailureKind::Cancelled, "cancelled")));
    let new = b.start_one();
    assert_ne!(new, old);
    assert!(b.history().is_empty(), "the replaced card's end is no card's result");
    b.stage(old, Stage::Verify);
    assert_eq!(b.state("A1"), SlotState::Queued, "a stale job's messages are ignored");
}

#[test]
fn an_operator_cancels_a_running_job_and_retries_it() {
    let mut b = Bench::new(&slots(1, 1, ""));
    b.insert(1, 1);
    let job = b.start_one();
    b.send(Input::Cancel { slot: "A1".into() });
    assert_eq!((b.reply(), b.cancelled()), (Ok("A1: stopping".into()), vec![job]));
    b.finish(job, Err(failure(FailureKind::Cancelled, "cancelled")));
    assert_eq!(b.error("A1").as_deref(), Some("cancelled by the operator"));
    b.send(Input::Retry { slot: "A1".into() });
    assert_eq!(b.reply(), Ok("A1: queued".into()));
    assert_eq!(b.started().len(), 1);
    b.send(Input::Retry { slot: "A1".into() });
    assert_eq!(b.reply(), Err("A1: busy (queued)".into()));
    b.remove(1);
    b.send(Input::Retry { slot: "A1".into() });
    assert_eq!(b.reply(), Err("A1: no card".into()));
}

#[test]
fn a_present_card_can_be_written_on_request() {
    let mut b = Bench::new(&slots(1, 1, ""));
    let card =
        Card { devnode: "/dev/sdb".into(), diskseq: Some(3), size: 1 << 30, serial: None, vendor: None, model: None };
    b.send(Input::CardSeen { port: "p1".into(), card, at_start: true });
    b.send(Input::Retry { slot: "A1".into() });
    assert_eq!(b.started().len(), 1);
}

// --- the station as a whole: reload, concurrency, restart, shutdown ---

#[test]
fn concurrency_lowered_then_raised_loses_no_writer() {
    let mut b = Bench::new(&slots(4, 2, ""));
    for i in 1..=4 {
        b.insert(i, i as u64);
    }
    assert_eq!(b.core.running(), 2);
    b.send(Input::Reload(config(&slots(4, 1, ""))));
    b.send(Input::Reload(config(&slots(4, 3, ""))));
    assert!(b.started().is_empty(), "a reload looks at the image again first");
    b.prepared(IMAGE);
    assert_eq!(b.started().len(), 1, "the third writer starts");
    assert_eq!(b.core.running(), 3);
    let jobs: Vec<u64> = (1..=3).collect();
    for job in jobs {
        b.done(job);
    }
    assert_eq!(b.core.running(), 1, "the fourth card got the freed writer");
    b.done(4);
    assert_eq!(b.summary(), (4, 0, 0));
}

#[test]
fn a_reload_keeps_running_jobs_and_their_settings() {
    let mut b = Bench::new(&slots(2, 2, ""));
    b.insert(1, 1);
    let a1 = b.start_one();
    b.stage(a1, Stage::Write);
    // A2 goes, B1 comes, verify is turned off for new jobs.
    let text = "image: os.img\nverify: false\nslots:\n  - {name: A1, port: p1}\n  - {name: B1, port: p9}\n";
    b.send(Input::Reload(config(text)));
    assert!(b.effects.iter().any(|e| matches!(e, Effect::Rescan)), "new slots may hold cards");
    assert_eq!(b.state("A1"), SlotState::Writing, "the running job is untouched");
    let names: Vec<String> = b.core.snapshot(None).slots.iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["A1", "B1"]);
    b.prepared(IMAGE);
    let card =
        Card { devnode: "/dev/sdq".into(), diskseq: Some(5), size: 8 << 30, serial: None, vendor: None, model: None };
    b.send(Input::CardSeen { port: "p9".into(), card, at_start: false });
    let start = b.effects.iter().find_map(|e| match e {
        Effect::Start(s) => Some(s.clone()),
        _ => None,
    });
    assert!(!start.expect("B1 starts").settings.verify, "new jobs use the new settings");
    b.done(a1);
    assert_eq!(b.state("A1"), SlotState::Done);
}

#[test]
fn a_slot_removed_by_a_reload_finishes_its_running_job_then_goes() {
    let mut b = Bench::new(&slots(2, 2, ""));
    b.insert(2, 2);
    let a2 = b.start_one();
    b.send(Input::Reload(config(&slots(1, 2, ""))));
    assert_eq!(b.core.snapshot(None).slots.len(), 1, "retired slots are not shown");
    assert!(b.core.busy());
    b.done(a2);
    assert_eq!(b.history(), [("A2".into(), SlotState::Done, None, true)], "its card is still recorded");
    assert!(!b.core.busy());
}

#[test]
fn a_job_interrupted_by_a_restart_fails_its_slot_once() {
    let mut b = Bench {
        core: Core::new(config(&slots(2, 1, ""))),
        start: Instant::now(),
        wall: SystemTime::now(),
        elapsed: Duration::ZERO,
        stale: Vec::new(),
        effects: Vec::new(),
    };
    let interrupted = vec![
        Interrupted { slot: "A1".into(), port: "p1".into(), diskseq: Some(41) },
        Interrupted { slot: "Z9".into(), port: "gone".into(), diskseq: Some(1) },
    ];
    b.send(Input::Start { interrupted });
    assert_eq!((b.state("A1"), b.error("A1").as_deref()), (SlotState::Failed, Some("interrupted by restart")));
    assert_eq!(b.history().len(), 1, "the slot no longer configured is only logged");
    b.prepared(IMAGE);
    // Its card, listed by udev at start, is the same media: not written again.
    let card =
        Card { devnode: "/dev/sdb".into(), diskseq: Some(41), size: 1 << 30, serial: None, vendor: None, model: None };
    b.send(Input::CardSeen { port: "p1".into(), card, at_start: true });
    assert_eq!((b.state("A1"), b.started().len()), (SlotState::Failed, 0));
    assert_eq!(b.slot("A1").device.as_deref(), Some(Path::new("/dev/sdb")));
}

#[test]
fn shutdown_interrupts_queued_and_running_cards_and_starts_nothing() {
    let mut b = Bench::new(&slots(3, 2, ""));
    b.insert(1, 1);
    let a1 = b.start_one();
    b.insert(2, 2);
    let a2 = b.start_one();
    b.insert(3, 3);
    b.send(Input::Shutdown);
    assert_eq!(b.cancelled(), [a1, a2]);
    assert_eq!(b.error("A3").as_deref(), Some("interrupted"));
    b.finish(a1, Err(failure(FailureKind::Cancelled, "cancelled")));
    assert_eq!(b.error("A1").as_deref(), Some("interrupted"));
    // A writer is free now: a new card would get it, were the station not stopping.
    b.insert(3, 4);
    assert!(b.started().is_empty(), "nothing new starts while stopping");
}

#[test]
fn a_job_that_does_not_stop_in_time_is_given_up() {
    let mut b = Bench::new(&slots(1, 1, ""));
    b.insert(1, 1);
    b.start_one();
    b.send(Input::Shutdown);
    assert!(b.core.busy());
    b.send(Input::Abandon);
    assert!(!b.core.busy());
    assert_eq!(b.history(), [("A1".into(), SlotState::Failed, Some("interrupted".into()), false)]);
}

#[test]
fn progress_gives_a_rate_and_an_eta() {
    let mut b = Bench::new(&slots(1, 1, ""));
    b.insert(1, 1);
    let job = b.start_one();
    b.stage(job, Stage::Write);
    let sample = |done| Sample { done, total: 100 << 20, written: done };
    b.send(Input::Progress(vec![(job, sample(0))]));
    b.wait(Duration::from_secs(1));
    b.send(Input::Progress(vec![(job, sample(10 << 20))]));
    let slot = b.slot("A1");
    assert!((slot.rate - f64::from(10 << 20)).abs() < 1.0, "rate {}", slot.rate);
    assert!((slot.eta_seconds.unwrap() - 9.0).abs() < 0.01, "eta {:?}", slot.eta_seconds);
    assert!((slot.progress - 0.1).abs() < 1e-9);
    assert!(matches!(b.effects.last(), Some(Effect::Publish(s)) if s.slots[0].rate > 0.0));
}

#[test]
fn every_slot_line_names_its_slot_and_card() {
    let mut b = Bench::new(&slots(1, 1, ""));
    b.insert(1, 7);
    let log = b
        .effects
        .iter()
        .find_map(|e| match e {
            Effect::Log(l) => Some(l.clone()),
            _ => None,
        })
        .expect("a log line");
    assert_eq!((log.stage.as_str(), log.context.slot.as_str(), log.context.diskseq), ("queued", "A1", Some(7)));
    assert_eq!(log.context.image, PathBuf::from(IMAGE));
}

#[test]
fn a_finished_slot_empties_when_pulled_and_takes_the_next_card() {
    let mut b = Bench::new(&slots(1, 1, ""));
    b.insert(1, 1);
    let job = b.start_one();
    b.finish(job, Err(failure(FailureKind::Refused, "/dev/sdb: write-protected")));
    b.remove(1);
    assert_eq!((b.state("A1"), b.error("A1")), (SlotState::Empty, None));
    b.insert(1, 2);
    let job = b.start_one();
    b.done(job);
    // A new card straight after, with no removal event in between.
    b.insert(1, 3);
    assert_eq!((b.state("A1"), b.started().len()), (SlotState::Queued, 1));
    assert_eq!(b.slot("A1").stages.len(), 0, "the last card's stages are gone");
}
