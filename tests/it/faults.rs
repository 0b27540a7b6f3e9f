//! The fault bench: faulty cards, yanks, crashes and a storm of udev
//! events, through the real daemon, real udev and real loop devices.
//!
//! Each test runs a reduced number of trials in the suite; with
//! `FLASHBAY_FAULT_BENCH=full` (scripts/bench-faults) it runs the counts the
//! published table in docs/benchmarks.md is made of. Every test prints one
//! `FAULT-BENCH | …` line per result for the script to collect.

use std::fs;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::bed::{self, Bed, MIB, Reader, Rng, first_difference};
use crate::fusecard::FaultyCard;
use crate::station::{Daemon, Throttle, UdevRule, one_slot_yaml, slot_of, slots_yaml};

const LONG: Duration = Duration::from_secs(90);

/// Trials: `reduced` in the suite, `full` from scripts/bench-faults.
fn trials(reduced: usize, full: usize) -> usize {
    if std::env::var("FLASHBAY_FAULT_BENCH").is_ok_and(|v| v == "full") { full } else { reduced }
}

fn rng() -> Rng {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    Rng(u64::try_from(seed % u128::from(u64::MAX)).unwrap() | 1)
}

fn below(rng: &mut Rng, n: u64) -> u64 {
    let mut b = [0u8; 8];
    rng.fill(&mut b);
    u64::from_le_bytes(b) % n.max(1)
}

fn state(status: &Value, slot: &str) -> String {
    slot_of(status, slot)["state"].as_str().unwrap_or_default().to_owned()
}

/// Waits for the end of the slot's job number `job` (its `jobs` count).
fn ended(d: &Daemon, slot: &str, job: u64) -> Value {
    let status = d.wait_until(
        &format!("{slot} job {job} to end"),
        LONG,
        |_| {},
        |s| {
            slot_of(s, slot)["jobs"].as_u64() >= Some(job)
                && matches!(state(s, slot).as_str(), "done" | "failed" | "refused")
        },
    );
    slot_of(&status, slot)
}

/// Whether the daemon is still running (a zombie is not).
fn alive(d: &Daemon) -> bool {
    fs::read_to_string(format!("/proc/{}/stat", d.pid()))
        .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

/// A FUSE card in a directory of its own.
fn faulty(bed: &Bed, name: &str, size: u64) -> FaultyCard {
    let mnt = bed.path(&format!("{name}-mnt"));
    fs::create_dir_all(&mnt).unwrap();
    FaultyCard::mount(&bed.card(name, size), &mnt)
}

/// Every kind of faulty card ends failed or refused with its reason; none
/// is reported done.
#[test]
fn every_kind_of_faulty_card_fails_with_its_reason() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let image = bed.random_image("img", 16 * MIB, 71);
    let d = Daemon::start(&bed, &one_slot_yaml(&image, &reader, ""));
    type Fault = fn(&FaultyCard);
    let kinds: [(&str, Fault, &str); 8] = [
        ("EIO at one spot", |c| c.eio_at(9 * MIB + 4096), "failed at offset 8388608"),
        ("dies past 10 MiB", |c| c.fail_after(10 * MIB), "failed at offset"),
        ("drops writes inside the image", |c| c.drop_writes_past(4 * MIB), "card does not match the image at byte"),
        ("wraps inside the image", |c| c.wrap_at(8 * MIB), "card does not match the image at byte"),
        ("flips a bit on read", |c| c.flip_on_read(5 * MIB + 7), "card does not match the image at byte 5242880"),
        ("counterfeit: wraps past the image", |c| c.wrap_at(64 * MIB), "counterfeit card: about"),
        ("counterfeit: drops writes past the image", |c| c.drop_writes_past(64 * MIB), "counterfeit card: about"),
        (
            "slow and dying",
            |c| {
                c.slow(32 * MIB);
                c.fail_after(12 * MIB);
            },
            "failed at offset",
        ),
    ];
    let reps = trials(1, 4);
    let (mut done, mut job) = (0, 0);
    for (kind, fault, reason) in kinds {
        let mut right = 0;
        for rep in 0..reps {
            let card = faulty(&bed, &format!("card-{}-{rep}", kind.replace([' ', ':'], "-")), 256 * MIB);
            fault(&card);
            let inserted = reader.insert(&card.file()); // dropped before `card`
            job += 1;
            let slot = ended(&d, "A1", job);
            let error = slot["error"].as_str().unwrap_or_default().to_owned();
            done += usize::from(slot["state"] == "done");
            assert_ne!(slot["state"], "done", "{kind}: a faulty card ended done");
            assert!(error.contains(reason) && !error.contains('\n'), "{kind}: {error}");
            right += 1;
            drop(inserted);
            drop(card);
            println!("FAULT-BENCH | faulty card | {kind} | {} | {error}", slot["state"].as_str().unwrap());
        }
        println!("FAULT-BENCH | faulty cards | {kind} | {right}/{reps} failed with the right reason");
    }
    assert_eq!(done, 0);
}

/// Cards pulled at random moments of writing and verifying fail, each only
/// its own slot: the card beside it ends done and exact, and the daemon
/// never crashes.
#[test]
fn yanks_at_random_moments_fail_only_their_own_slot() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let (ra, rb) = (Reader::new(), Reader::new());
    let image = bed.random_image("img", 8 * MIB, 72);
    let slots = slots_yaml(&[("A1", &ra), ("B1", &rb)]);
    let d = Daemon::start(&bed, &format!("image: {}\n{slots}", image.display()));
    let _slow = Throttle::new(d.pid(), &[&ra, &rb], 6 * MIB);
    let mut rng = rng();
    let n = trials(3, 200);
    let (mut failed, mut neighbour_done, mut late) = (0, 0, 0);
    for trial in 0..n {
        let card = faulty(&bed, &format!("yank{trial}"), 64 * MIB);
        let good = bed.card(&format!("good{trial}"), 64 * MIB);
        let inserted = ra.insert(&card.file());
        let beside = rb.insert(&good);
        // A random stage, then a random point in it.
        let stage = if below(&mut rng, 2) == 0 { "writing" } else { "verifying" };
        let at = below(&mut rng, 7 * MIB);
        d.wait_until(
            &format!("A1 {stage} past {at}"),
            LONG,
            |_| {},
            |s| {
                let slot = slot_of(s, "A1");
                let done = (slot["progress"].as_f64().unwrap_or(0.0) * 8.0 * MIB as f64) as u64;
                let st = slot["state"].as_str().unwrap_or_default();
                (st == stage && done >= at) || (stage == "writing" && st == "verifying") || st == "done"
            },
        );
        card.fail_all();
        bed::run("losetup", &["-d", inserted.path()]);
        let job = u64::try_from(trial).unwrap() + 1;
        let a = ended(&d, "A1", job);
        let b = ended(&d, "B1", job);
        assert!(alive(&d), "trial {trial}: the daemon died; log:\n{}", d.log());
        assert_eq!(b["state"], "done", "trial {trial}: the neighbour was disturbed: {b}");
        neighbour_done += 1;
        // The job can be past its last I/O when the card goes (status is
        // sampled): then `done` is right, and the card must hold the image.
        if a["state"] == "done" {
            let backing = bed.path(&format!("yank{trial}"));
            assert_eq!(first_difference(&image, &backing, 8 * MIB), None, "trial {trial}: done but not exact");
            late += 1;
        } else {
            assert_eq!(a["state"], "failed", "trial {trial} ({stage} at {at}): {a}");
            failed += 1;
        }
        drop(beside);
        drop(inserted);
        drop(card);
        assert_eq!(first_difference(&image, &good, 8 * MIB), None);
        let _ = fs::remove_file(&good);
    }
    println!(
        "FAULT-BENCH | yanks | {n} trials | {failed} yanked mid-job and failed, {late} yanked after their last I/O and done byte-exact, 0 done without the image, {neighbour_done} neighbours done and exact, 0 daemon crashes"
    );
}

/// `kill -9` at random moments of a job: after each restart, the card is
/// either done (the kill came later) or reported interrupted, and never
/// left half-written with a valid partition table.
#[test]
fn kill_9_at_random_moments_never_leaves_a_valid_looking_card() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let image = bed.os_image("os.img", bed::Table::Gpt);
    let yaml = one_slot_yaml(&image, &reader, "expand: true\nresize: true\n");
    let mut d = Daemon::start(&bed, &yaml);
    let mut rng = rng();
    let n = trials(3, 50);
    let (mut interrupted, mut completed) = (0, 0);
    for trial in 0..n {
        let slow = Throttle::new(d.pid(), &[&reader], 64 * MIB);
        let card = bed.card(&format!("card{trial}"), 256 * MIB);
        let inserted = reader.insert(&card);
        d.wait_until("the job to start", LONG, |_| {}, |s| state(s, "A1") == "writing");
        std::thread::sleep(Duration::from_millis(below(&mut rng, 4500)));
        d.signal(Signal::SIGKILL);
        d.wait_exit(Duration::from_secs(5)).expect("kill -9");
        drop(slow);
        d = d.restart();
        let status = d.wait_until(
            "the slot after restart",
            LONG,
            |_| {},
            |s| matches!(state(s, "A1").as_str(), "present" | "failed"),
        );
        let slot = slot_of(&status, "A1");
        let head_blank = bed::read_at(&card, 0, MIB as usize).iter().all(|&b| b == 0);
        if slot["state"] == "failed" {
            assert_eq!(slot["error"], "interrupted by restart", "trial {trial}: {slot}");
            assert!(head_blank, "trial {trial}: an interrupted card kept a partition table");
            interrupted += 1;
        } else {
            // The kill came after the job ended: the card was done before.
            let lines = fs::read_to_string(d.dir("state_dir").join("history.jsonl")).unwrap_or_default();
            let last: Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
            assert_eq!(last["state"], "done", "trial {trial}: a present card whose job did not end done: {slot}");
            completed += 1;
        }
        drop(inserted);
        d.wait_until("the slot to empty", LONG, |_| {}, |s| state(s, "A1") == "empty");
        let _ = fs::remove_file(&card);
    }
    println!(
        "FAULT-BENCH | kill -9 | {n} trials | {interrupted} mid-job cards reported interrupted with blank tables, {completed} done before the kill, 0 half-written with a valid table"
    );
}

/// A storm of udev events (add, change, remove, for slot and foreign
/// devices, empty readers, partitions, cards that did not change) writes
/// not one byte to any device but a card inserted into a slot, and starts
/// exactly one job per inserted card.
#[test]
fn udev_event_storm_writes_only_to_inserted_slot_cards() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let slots = [Reader::new(), Reader::new()];
    let image = bed.random_image("img", 4 * MIB, 73);
    let yaml = format!("image: {}\n{}", image.display(), slots_yaml(&[("A1", &slots[0]), ("A2", &slots[1])]));
    let d = Daemon::start(&bed, &yaml);

    // Foreign disks the rule also gives an ID_PATH to, one with partitions.
    let foreign_image = bed.os_image("foreign.img", bed::Table::Mbr);
    let foreign: Vec<_> = (0..2)
        .map(|i| {
            let backing = bed.card(&format!("foreign{i}"), 160 * MIB);
            fs::write(&backing, fs::read(&foreign_image).unwrap()).unwrap();
            bed::run("truncate", &["-s", &(160 * MIB).to_string(), backing.to_str().unwrap()]);
            (bed::sha256(&backing), backing)
        })
        .collect();
    let attached: Vec<_> = foreign.iter().map(|(_, b)| bed.attach(b)).collect();
    attached[0].add_partitions();
    let mut nodes: Vec<String> = attached.iter().map(|l| l.path().to_owned()).collect();
    nodes.extend(fs::read_dir("/dev").unwrap().flatten().filter_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.starts_with(&format!("{}p", attached[0].name())).then(|| format!("/dev/{name}"))
    }));
    nodes.extend(slots.iter().map(|r| r.dev().to_str().unwrap().to_owned()));

    let mut rng = rng();
    let events = trials(300, 10_000);
    let (mut sent, mut inserted_cards) = (0, [0u64; 2]);
    let mut cards: [Option<crate::bed::Loop>; 2] = [None, None];
    let started = Instant::now();
    while sent < events {
        match below(&mut rng, 20) {
            // Now and then a real card goes into, or out of, a slot.
            0 => {
                let s = usize::try_from(below(&mut rng, 2)).unwrap();
                // A reader whose last card is still held open (autoclear
                // armed) cannot take the next one yet.
                let name = slots[s].dev().file_name().unwrap().to_string_lossy().into_owned();
                let free = fs::read_to_string(format!("/sys/block/{name}/size")).is_ok_and(|n| n.trim() == "0");
                if cards[s].take().is_none() && free {
                    let backing = bed.card(&format!("slotcard{sent}"), 16 * MIB);
                    cards[s] = Some(slots[s].insert(&backing));
                    inserted_cards[s] += 1;
                }
                sent += 1;
            }
            _ => {
                let action = ["add", "change", "remove"][usize::try_from(below(&mut rng, 3)).unwrap()];
                let batch: Vec<&str> = (0..8)
                    .map(|_| nodes[usize::try_from(below(&mut rng, nodes.len() as u64)).unwrap()].as_str())
                    .collect();
                let mut args = vec!["trigger", "--action", action];
                args.extend(&batch);
                let _ = std::process::Command::new("udevadm").args(&args).status();
                sent += batch.len();
            }
        }
    }
    // Put every device's udev state back as it was (a `remove` drops links).
    let mut args = vec!["trigger", "--action=change", "--settle"];
    args.extend(nodes.iter().map(String::as_str));
    bed::run("udevadm", &args);
    // Let the station catch up with the last cards, then check every disk.
    std::thread::sleep(Duration::from_secs(2));
    let status = d.wait_until(
        "no job running",
        LONG,
        |_| {},
        |s| ["A1", "A2"].iter().all(|n| !matches!(state(s, n).as_str(), "queued" | "writing" | "verifying")),
    );
    assert!(alive(&d), "the daemon died; log:\n{}", d.log());
    drop(attached);
    for (sha, backing) in &foreign {
        assert_eq!(&bed::sha256(backing), sha, "{} was written", backing.display());
    }
    // One job per medium: a DISKSEQ already seen on a slot starts nothing
    // again, whatever events repeat it. (A loop attach can itself change
    // the medium twice in a row; each medium still gets at most one job.)
    let log = d.log();
    for name in ["A1", "A2"] {
        let seqs: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("{name}: card inserted")))
            .filter_map(|l| l.split("diskseq=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next())
            .collect();
        let mut unique = seqs.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), seqs.len(), "{name}: a DISKSEQ got two jobs: {seqs:?}");
        let jobs = slot_of(&status, name)["jobs"].as_u64().unwrap();
        assert!(jobs <= seqs.len() as u64, "{name}: {jobs} jobs for {} media", seqs.len());
    }
    println!(
        "FAULT-BENCH | udev storm | {sent} events in {:.0} s | {} cards inserted into slots, 0 bytes written to {} foreign disks and partitions",
        started.elapsed().as_secs_f64(),
        inserted_cards.iter().sum::<u64>(),
        nodes.len() - slots.len()
    );
    drop(cards);
}
