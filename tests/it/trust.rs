//! "done" must mean done: each test here is a way a card used to end
//! `done` (or look flashed) without holding the image, run through the real
//! daemon, real udev and real loop devices.

use std::fs;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::bed::{self, MIB, Reader, first_difference};
use crate::station::{Daemon, Throttle, UdevRule, one_slot_yaml, slot_of, slots_yaml};

const LONG: Duration = Duration::from_secs(60);

/// Waits until A1's card has ended, done or failed, and returns its slot.
fn ended(d: &Daemon, what: &str) -> Value {
    let status =
        d.wait_until(what, LONG, |_| {}, |s| matches!(slot_of(s, "A1")["state"].as_str(), Some("done" | "failed")));
    slot_of(&status, "A1")
}

fn history(d: &Daemon) -> Vec<Value> {
    let text = fs::read_to_string(d.dir("state_dir").join("history.jsonl")).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// One byte of the decompressed cache changes after preparation (the
/// station's own SD card rots): the next card fails, naming the byte, the
/// cache is rebuilt from the source, and the card after that is exact.
#[test]
fn damaged_cache_fails_the_card_and_is_rebuilt() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let image = bed.random_image("img", 12 * MIB, 91);
    let xz = bed.compress(&image, "xz");
    let d = Daemon::start(&bed, &one_slot_yaml(&xz, &reader, ""));
    let first = bed.card("first", 16 * MIB);
    let inserted = reader.insert(&first);
    d.wait_slot("A1", "done", LONG);
    drop(inserted);
    d.wait_slot("A1", "empty", LONG);

    let cache: Vec<_> = fs::read_dir(d.dir("cache_dir"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "img"))
        .collect();
    assert_eq!(cache.len(), 1, "{cache:?}");
    let offset = 5 * MIB + 123;
    let copy = fs::OpenOptions::new().write(true).open(&cache[0]).unwrap();
    copy.write_all_at(&[!bed::read_at(&image, offset, 1)[0]], offset).unwrap();
    drop(copy);

    let second = bed.card("second", 16 * MIB);
    let inserted = reader.insert(&second);
    let slot = ended(&d, "the card on the damaged cache to end");
    assert_eq!(slot["state"], "failed", "a card written from a damaged cache ended {slot}");
    let error = slot["error"].as_str().unwrap();
    assert!(error.contains(&format!("does not match the image at byte {}", 5 * MIB)), "{error}");
    assert!(error.contains(xz.to_str().unwrap()), "names the configured image: {error}");
    assert!(bed::read_at(&second, 0, MIB as usize).iter().all(|&b| b == 0), "the failed card got a table");
    drop(inserted);
    d.wait_slot("A1", "empty", LONG);

    // Rebuilt from the source: the copy is the image again, and cards are exact.
    let third = bed.card("third", 16 * MIB);
    let inserted = reader.insert(&third);
    d.wait_slot("A1", "done", LONG);
    drop(inserted);
    assert_eq!(first_difference(&image, &cache[0], 12 * MIB), None, "the cache was not rebuilt");
    assert_eq!(first_difference(&image, &third, 12 * MIB), None);

    let lines = history(&d);
    let results: Vec<_> = lines.iter().map(|l| l["state"].as_str().unwrap().to_owned()).collect();
    assert_eq!(results, ["done", "failed", "done"]);
    let sha = bed::sha256(&image);
    for line in &lines {
        assert_eq!(line["image_sha256"], sha.as_str(), "{line}");
    }
    assert_eq!(lines[0]["verified"], true);
    assert_eq!(lines[1]["verified"], false);
}

/// A raw image replaced under the same name (renamed over, or rewritten in
/// place) is prepared again before the next card: that card holds the new
/// image and the status page shows the new SHA-256.
#[test]
fn raw_image_replaced_under_the_same_name_is_prepared_again() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let path = bed.path("os.img");
    let v1 = bed.random_image("v1", 8 * MIB, 5);
    let v2 = bed.random_image("v2", 8 * MIB, 6);
    let v3 = bed.random_image("v3", 8 * MIB, 7);
    fs::copy(&v1, &path).unwrap();
    let d = Daemon::start(&bed, &one_slot_yaml(&path, &reader, ""));

    let flash = |name: &str| {
        let card = bed.card(name, 16 * MIB);
        let inserted = reader.insert(&card);
        let status = d.wait_until("done", LONG, |_| {}, |s| slot_of(s, "A1")["state"] == "done");
        drop(inserted);
        d.wait_slot("A1", "empty", LONG);
        (card, status["images"][0]["sha256"].as_str().unwrap().to_owned())
    };
    let (card, sha) = flash("c1");
    assert_eq!((first_difference(&v1, &card, 8 * MIB), sha), (None, bed::sha256(&v1)));

    // Renamed over: a new inode under the old name.
    let tmp = bed.path("os.img.new");
    fs::copy(&v2, &tmp).unwrap();
    fs::rename(&tmp, &path).unwrap();
    let (card, sha) = flash("c2");
    assert_eq!((first_difference(&v2, &card, 8 * MIB), sha), (None, bed::sha256(&v2)));

    // Rewritten in place: same inode, new bytes.
    fs::write(&path, fs::read(&v3).unwrap()).unwrap();
    let (card, sha) = flash("c3");
    assert_eq!((first_difference(&v3, &card, 8 * MIB), sha), (None, bed::sha256(&v3)));
}

/// `kill -9` mid-job (a crash, a watchdog restart): after the restart the
/// slot is `failed: interrupted by restart`, not `present`, and a card that
/// looked flashed (as one killed mid-resize does) has lost its table.
#[test]
fn kill_9_mid_job_fails_the_card_after_restart_and_blanks_it() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let image = bed.os_image("os.img", bed::Table::Gpt);
    let mut d = Daemon::start(&bed, &one_slot_yaml(&image, &reader, ""));
    let slow = Throttle::new(d.pid(), &[&reader], 4 * MIB);
    let card = bed.card("card", 160 * MIB);
    let _inserted = reader.insert(&card);
    d.wait_until("writing", LONG, |_| {}, |s| slot_of(s, "A1")["bytes_written"].as_u64() > Some(2 * MIB));
    d.signal(Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(5)).expect("kill -9");
    drop(slow);
    // What a kill during expand or resize leaves: a complete, valid-looking table.
    let head = bed::read_at(&image, 0, MIB as usize);
    fs::OpenOptions::new().write(true).open(&card).unwrap().write_all_at(&head, 0).unwrap();
    let before = d.slot("A1");

    let d = d.restart();
    let slot = d.wait_until("the slot to settle", LONG, |_| {}, |s| slot_of(s, "A1")["device"].is_string());
    let slot = slot_of(&slot, "A1");
    assert_eq!(slot["state"], "failed", "{slot}");
    assert_eq!(slot["error"], "interrupted by restart");
    assert_eq!(slot["diskseq"], before["diskseq"]);
    assert!(bed::read_at(&card, 0, MIB as usize).iter().all(|&b| b == 0), "the interrupted card kept its table");
    let lines = history(&d);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["error"], "interrupted by restart");
    assert!(!d.dir("state_dir").join("jobs/A1.json").exists(), "the record is taken once");
}

/// Lowering `concurrency` while two jobs run and raising it again at once
/// must leave two writers, not one.
#[test]
fn concurrency_lowered_then_raised_keeps_every_writer() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let readers = [Reader::new(), Reader::new()];
    let image = bed.random_image("img", 8 * MIB, 33);
    let slots = slots_yaml(&[("A1", &readers[0]), ("A2", &readers[1])]);
    let yaml = |n: usize| format!("image: {}\nconcurrency: {n}\n{slots}", image.display());
    let d = Daemon::start(&bed, &yaml(2));
    let _slow = Throttle::new(d.pid(), &readers.iter().collect::<Vec<_>>(), 4 * MIB);
    let both_writing = |s: &Value| ["A1", "A2"].iter().all(|n| slot_of(s, n)["state"] == "writing");

    let cards: Vec<_> = (0..2).map(|i| bed.card(&format!("a{i}"), 16 * MIB)).collect();
    let inserted: Vec<_> = readers.iter().zip(&cards).map(|(r, c)| r.insert(c)).collect();
    d.wait_until("two writers", LONG, |_| {}, both_writing);
    for n in [1, 2] {
        d.rewrite(&yaml(n));
        d.signal(Signal::SIGHUP);
        d.wait_until("the reload", LONG, |_| {}, |s| s["concurrency"] == n);
    }
    d.wait_until("both done", LONG, |_| {}, |s| ["A1", "A2"].iter().all(|n| slot_of(s, n)["state"] == "done"));
    drop(inserted);
    d.wait_until("both empty", LONG, |_| {}, |s| ["A1", "A2"].iter().all(|n| slot_of(s, n)["state"] == "empty"));

    let cards: Vec<_> = (0..2).map(|i| bed.card(&format!("b{i}"), 16 * MIB)).collect();
    let _inserted: Vec<_> = readers.iter().zip(&cards).map(|(r, c)| r.insert(c)).collect();
    d.wait_until("two writers again", LONG, |_| {}, both_writing);
}

/// The writes that make a card look flashed or not (the final table, the
/// blanking) happen only on the card the job was for: with another DISKSEQ
/// in the reader, nothing is written.
#[test]
fn blanking_checks_the_card_is_still_the_one() {
    let bed = bed!();
    let image = bed.os_image("os.img", bed::Table::Mbr);
    let card = bed.card("card", 160 * MIB);
    fs::write(&card, fs::read(&image).unwrap()).unwrap();
    bed::run("truncate", &["-s", &(160 * MIB).to_string(), card.to_str().unwrap()]);
    let dev = bed.attach(&card);
    let seq: u64 =
        fs::read_to_string(format!("/sys/class/block/{}/diskseq", dev.name())).unwrap().trim().parse().unwrap();
    bed::settle();

    let err = flashbay::pipeline::blank_card(&dev.dev, Some(seq + 1000)).unwrap_err().to_string();
    assert!(err.contains("the card was changed"), "{err}");
    assert_eq!(bed::read_at(&card, 0, MIB as usize), bed::read_at(&image, 0, MIB as usize), "another card was blanked");

    flashbay::pipeline::blank_card(&dev.dev, Some(seq)).unwrap();
    assert!(bed::read_at(&card, 0, MIB as usize).iter().all(|&b| b == 0));
}

/// A `.tar.xz` of a disk image used to be decoded and written raw, and the
/// card reported done: now the image fails with a hint, no card touched.
#[test]
fn archive_inside_a_compressor_fails_the_slot_without_touching_the_card() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    bed.random_image("disk.img", 4 * MIB, 12);
    let tarxz = bed.path("disk.img.tar.xz");
    bed::run("tar", &["-cJf", tarxz.to_str().unwrap(), "-C", bed.path("").to_str().unwrap(), "disk.img"]);
    let d = Daemon::start(&bed, &one_slot_yaml(&tarxz, &reader, ""));
    let card = bed.card("card", 16 * MIB);
    bed::run(
        "dd",
        &["if=/dev/urandom", &format!("of={}", card.display()), "bs=1M", "count=16", "conv=notrunc", "status=none"],
    );
    let before = bed::sha256(&card);
    let _inserted = reader.insert(&card);
    let slot = ended(&d, "the slot to end");
    assert_eq!(slot["state"], "failed", "{slot}");
    assert!(slot["error"].as_str().unwrap().contains("tar archive: extract the disk image first"), "{slot}");
    assert_eq!(bed::sha256(&card), before, "the card was written");
}

/// A card claiming 256 MiB that holds 64 MiB and wraps around: the image
/// (16 MiB) verifies, but the card must not be grown to its fake size and
/// called done. It fails as counterfeit, with its table blanked.
#[test]
fn counterfeit_card_fails_before_it_is_expanded() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let image = bed.os_image_with("os.img", &bed::OsSpec { table: bed::Table::Mbr, ..bed::OsSpec::default() });
    let yaml = one_slot_yaml(&image.path, &reader, "expand: true\nresize: true\n");
    let d = Daemon::start(&bed, &yaml);
    let mnt = bed.path("fuse");
    fs::create_dir_all(&mnt).unwrap();
    let backing = bed.card("fake", 1024 * MIB);
    let fake = crate::fusecard::FaultyCard::mount(&backing, &mnt);
    fake.wrap_at(160 * MIB);
    let inserted = reader.insert(&fake.file()); // dropped before `fake`
    let slot = ended(&d, "the fake card to end");
    assert_eq!(slot["state"], "failed", "{slot}");
    let error = slot["error"].as_str().unwrap();
    // The located capacity is approximate for a wrap at a size that is not
    // a power of two; what matters is the verdict, before any growth.
    assert!(error.contains("counterfeit card: about ") && error.ends_with("usable of 1.0 GiB claimed"), "{error}");
    assert!(!error.contains('\n'));
    assert!(bed::read_at(&backing, 0, MIB as usize).iter().all(|&b| b == 0), "the fake card kept its table");
    drop(inserted);
}

/// `systemctl stop` while resize2fs grows a filesystem onto a big, slow
/// card: the tool is killed with its job, the card loses its table (it must
/// not look flashed with a half-grown filesystem), and the daemon is gone
/// within five seconds.
#[test]
fn stop_during_resize_kills_the_tool_and_blanks_the_card() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let image = bed.os_image("os.img", bed::Table::Gpt);
    let yaml = one_slot_yaml(&image, &reader, "expand: true\nresize: true\n");
    let mut d = Daemon::start(&bed, &yaml);
    let _slow = Throttle::new(d.pid(), &[&reader], 24 * MIB);
    let card = bed.card("card", 64 * 1024 * MIB);
    let _inserted = reader.insert(&card);
    d.wait_until("resizing", Duration::from_secs(120), |_| {}, |s| slot_of(s, "A1")["state"] == "resizing");
    std::thread::sleep(Duration::from_millis(300));
    d.signal(Signal::SIGTERM);
    let exit = d.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| panic!("still running; log:\n{}", d.log()));
    assert!(exit.success(), "{exit}");
    let slot = d.slot("A1");
    assert_eq!((slot["state"].as_str(), slot["error"].as_str()), (Some("failed"), Some("interrupted")), "{slot}");
    assert!(bed::read_at(&card, 0, MIB as usize).iter().all(|&b| b == 0), "the card kept its table");
    assert!(!d.dir("state_dir").join("jobs/A1.json").exists(), "the job ended and said so");
}

/// From the first write to the last stage the job holds the card's lock:
/// a program waiting for it (udev, an automounter) gets it only once the
/// job has ended, never in between (it used to get it between verify and
/// expand, and the job then failed or worked on a card someone else held).
#[test]
fn nothing_gets_the_card_between_stages() {
    use nix::fcntl::{Flock, FlockArg};
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let image = bed.random_image("img", 16 * MIB, 44);
    let yaml = one_slot_yaml(&image, &reader, "expand: true\nresize: true\n");
    let d = Daemon::start(&bed, &yaml);
    let _slow = Throttle::new(d.pid(), &[&reader], 8 * MIB);
    let card = bed.card("card", 64 * MIB);
    let _inserted = reader.insert(&card);
    d.wait_until("writing", LONG, |_| {}, |s| slot_of(s, "A1")["bytes_written"].as_u64() > Some(MIB));
    let probe = Flock::lock(fs::File::open(reader.dev()).unwrap(), FlockArg::LockExclusiveNonblock);
    assert!(
        matches!(probe, Err((_, nix::errno::Errno::EWOULDBLOCK))),
        "the job does not hold the card's lock while writing"
    );
    let dev = fs::File::open(reader.dev()).unwrap();
    // Wait for the lock the way udev's workers and automounters do, and
    // hold it a while once given: a job that needs it back fails.
    let waiter = std::thread::spawn(move || {
        let locked = Flock::lock(dev, FlockArg::LockExclusive).unwrap();
        std::thread::sleep(Duration::from_secs(12));
        drop(locked);
    });
    let slot = ended(&d, "the job to end");
    assert_eq!(slot["state"], "done", "{slot}");
    waiter.join().unwrap();
}

/// Every end of a card is counted and recorded the same way: a queued card
/// cancelled by the operator and a card failed by an unusable image used to
/// skip the counters and `history.jsonl`; the status file, `/metrics` and
/// the history must agree.
#[test]
fn every_end_of_a_card_is_counted_and_recorded() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let readers = [Reader::new(), Reader::new(), Reader::new()];
    let image = bed.random_image("img", 16 * MIB, 81);
    let missing = bed.path("missing.img.xz");
    let yaml = format!(
        "image: {}\nconcurrency: 1\nhttp:\n  listen: 127.0.0.1:0\n  control_token: t0ken-for-tests\nslots:\n  - {{name: A1, port: {}}}\n  - {{name: A2, port: {}}}\n  - {{name: A3, port: {}, image: {}}}\n",
        image.display(),
        crate::station::port(&readers[0]),
        crate::station::port(&readers[1]),
        crate::station::port(&readers[2]),
        missing.display()
    );
    let d = Daemon::start(&bed, &yaml);
    let url = d.url();
    let _slow = Throttle::new(d.pid(), &[&readers[0]], 4 * MIB);
    let cards: Vec<_> = (0..3).map(|i| bed.card(&format!("c{i}"), 32 * MIB)).collect();
    let untouched = bed::sha256(&cards[1]);
    let _a1 = readers[0].insert(&cards[0]);
    d.wait_slot("A1", "writing", LONG);
    let _a2 = readers[1].insert(&cards[1]);
    d.wait_slot("A2", "queued", LONG);
    let (code, body) = crate::station::http(
        "POST",
        &format!("{url}/api/slots/A2/cancel"),
        &[("Authorization", "Bearer t0ken-for-tests")],
    );
    assert_eq!(code, 200, "{body}");
    let _a3 = readers[2].insert(&cards[2]);
    let status = d.wait_until(
        "A2 and A3 to end",
        LONG,
        |_| {},
        |s| slot_of(s, "A2")["state"] == "failed" && slot_of(s, "A3")["state"] == "failed",
    );
    assert_eq!(status["summary"]["failed"], 2, "{}", status["summary"]);
    let lines = history(&d);
    let slots: Vec<_> = lines.iter().map(|l| l["slot"].as_str().unwrap().to_owned()).collect();
    assert!(slots.contains(&"A2".to_owned()) && slots.contains(&"A3".to_owned()), "history: {slots:?}");
    let (_, metrics) = crate::station::http("GET", &format!("{url}/metrics"), &[]);
    assert!(metrics.contains("flashbay_cards_total{result=\"failed\"} 2"), "{metrics}");
    assert_eq!(bed::sha256(&cards[1]), untouched, "the cancelled card was written");
}
