//! `flashbay run` against a real systemd-udevd: loop devices are card
//! readers on USB ports (see tests/udev/), attaching a backing file is
//! inserting a card, detaching it is pulling the card out.

use std::fs;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::bed::{self, MIB, Reader, first_difference};
use crate::fusecard::FaultyCard;
use crate::station::{Daemon, Throttle, UdevRule, one_slot_yaml, port, slot_of, slots_yaml};

const LONG: Duration = Duration::from_secs(60);

fn states(status: &Value) -> Vec<String> {
    status["slots"]
        .as_array()
        .map(|s| s.iter().map(|s| s["state"].as_str().unwrap_or("").to_owned()).collect())
        .unwrap_or_default()
}

fn is_active(state: &str) -> bool {
    matches!(state, "writing" | "verifying" | "expanding" | "resizing" | "ejecting")
}

/// Three cards on three slots with two writers: all end byte-exact, at most
/// two are written at once, and the third waits its turn as `queued`.
#[test]
fn three_cards_two_writers_all_done_byte_exact() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let readers = [Reader::new(), Reader::new(), Reader::new()];
    let image = bed.random_image("img", 12 * MIB, 21);
    let xz = bed.compress(&image, "xz");
    let slots = slots_yaml(&[("A1", &readers[0]), ("A2", &readers[1]), ("A3", &readers[2])]);
    let d = Daemon::start(&bed, &format!("image: {}\nconcurrency: 2\n{slots}", xz.display()));
    let _slow = Throttle::new(d.pid(), &readers.iter().collect::<Vec<_>>(), 8 * MIB);

    let cards: Vec<_> = (0..3).map(|i| bed.card(&format!("card{i}"), 32 * MIB)).collect();
    let inserted: Vec<_> = readers.iter().zip(&cards).map(|(r, c)| r.insert(c)).collect();
    let (mut max_active, mut queued_behind_two) = (0, false);
    let status = d.wait_until(
        "all three done",
        LONG,
        |s| {
            let st = states(s);
            let active = st.iter().filter(|s| is_active(s)).count();
            max_active = max_active.max(active);
            queued_behind_two |= active == 2 && st.iter().any(|s| s == "queued");
        },
        |s| states(s) == ["done", "done", "done"],
    );
    assert_eq!(max_active, 2, "never more than two, and two at once");
    assert!(queued_behind_two, "the third card should have waited as queued");
    assert_eq!(status["summary"]["done"], 3);
    for slot in status["slots"].as_array().unwrap() {
        assert_eq!(slot["jobs"], 1, "{slot}");
    }
    assert_eq!(status["images"][0]["cached"], true, "the xz image is decompressed once into the cache");
    drop(inserted);
    for card in &cards {
        assert_eq!(first_difference(&image, card, 12 * MIB), None, "{}", card.display());
    }
}

/// A disk whose port is not a slot is never opened for writing.
#[test]
fn device_outside_any_slot_is_never_touched() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let (slot, stranger) = (Reader::new(), Reader::new());
    let image = bed.random_image("img", 4 * MIB, 22);
    let d = Daemon::start(&bed, &format!("image: {}\n{}", image.display(), slots_yaml(&[("A1", &slot)])));
    let other = bed.card("other", 16 * MIB);
    let before = bed::sha256(&other);
    let _x = stranger.insert(&other);
    let card = bed.card("card", 16 * MIB);
    let _a = slot.insert(&card);
    d.wait_slot("A1", "done", LONG);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(bed::sha256(&other), before, "a device outside the slots was written");
    assert!(
        d.log().contains(&format!("{}: ID_PATH {} is not a slot", stranger.dev().display(), port(&stranger))),
        "{}",
        d.log()
    );
}

/// After a card is written, the kernel re-reads its partitions and udev
/// sends change events and partition add/remove events with the same
/// DISKSEQ: exactly one job per insertion.
#[test]
fn partition_rereads_after_the_write_start_no_second_job() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let image = bed.os_image("os.img", bed::Table::Mbr);
    // Byte-exact comparison below: keep the table as written.
    let yaml = one_slot_yaml(&image, &reader, "expand: false\nresize: false\n");
    let d = Daemon::start(&bed, &yaml);
    let card = bed.card("card", 160 * MIB);
    let inserted = reader.insert(&card);
    d.wait_slot("A1", "done", LONG);
    // udev's own change event after our writer closed the device.
    bed::settle();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.slot("A1")["jobs"], 1, "the change event after the write started a second job");

    // Partitions going and coming (as a re-read makes them), and change
    // events on the disk. Tolerant commands: should a second job be
    // rewriting the card, the assertions below are what must report it.
    for args in [&["-d"][..], &["-a"], &["-u"]] {
        let _ = std::process::Command::new("partx").args(args).arg(inserted.path()).output();
    }
    bed::run("udevadm", &["trigger", "--action=change", "--settle", inserted.path()]);
    bed::settle();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let slot = d.slot("A1");
        assert_eq!(slot["jobs"], 1, "a second job started: {slot}");
        assert_eq!(slot["state"], "done");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.log().matches("card inserted").count(), 1, "{}", d.log());
    drop(inserted);
    assert_eq!(first_difference(&image, &card, fs::metadata(&image).unwrap().len()), None);
}

/// A card pulled mid-write fails its own slot, with an error saying it was
/// removed; the other slot finishes. The yank is a FUSE backing file that
/// starts failing every I/O, then `losetup -d` (which completes once the
/// daemon lets go of the device, as the kernel does for a real card).
#[test]
fn yanked_card_fails_only_its_own_slot() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let (ra, rb) = (Reader::new(), Reader::new());
    let image = bed.random_image("img", 24 * MIB, 23);
    let d = Daemon::start(&bed, &format!("image: {}\n{}", image.display(), slots_yaml(&[("A1", &ra), ("B1", &rb)])));
    let _slow = Throttle::new(d.pid(), &[&ra, &rb], 6 * MIB);

    let mnt = bed.path("fuse");
    fs::create_dir_all(&mnt).unwrap();
    let fuse = FaultyCard::mount(&bed.card("a", 64 * MIB), &mnt);
    let card_b = bed.card("b", 64 * MIB);
    let inserted_a = ra.insert(&fuse.file()); // dropped before `fuse`
    let inserted_b = rb.insert(&card_b);
    d.wait_until(
        "A1 writing",
        LONG,
        |_| {},
        |s| slot_of(s, "A1")["state"] == "writing" && slot_of(s, "A1")["bytes_written"].as_u64() > Some(MIB),
    );

    fuse.fail_all();
    bed::run("losetup", &["-d", inserted_a.path()]);
    // The job fails on the I/O errors first; the removal (once the kernel
    // can let go of the device) turns the error into "card removed".
    let removed = |s: &Value| {
        slot_of(s, "A1")["state"] == "failed"
            && slot_of(s, "A1")["error"].as_str().is_some_and(|e| e.starts_with("card removed during writing"))
    };
    d.wait_until("A1 failed: card removed", LONG, |_| {}, removed);
    let b = d.wait_slot("B1", "done", LONG);
    assert_eq!(b["jobs"], 1);
    // The failed slot stays failed after its card is gone, for the operator to see.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.slot("A1")["state"], "failed");
    drop(inserted_b);
    assert_eq!(first_difference(&image, &card_b, 24 * MIB), None);
    drop(inserted_a);
}

/// Cards already inserted when the daemon starts are left alone (`present`)
/// unless `flash_present_at_start` says otherwise.
#[test]
fn cards_present_at_start_follow_flash_present_at_start() {
    let bed = bed!(udev);
    let rule = UdevRule::install();
    let image = bed.random_image("img", 4 * MIB, 24);
    for flash in [false, true] {
        let reader = Reader::new();
        let card = bed.card(&bed::unique("card"), 16 * MIB);
        let before = bed::sha256(&card);
        let inserted = reader.insert(&card);
        rule.apply(&inserted.dev);
        let yaml = one_slot_yaml(&image, &reader, &format!("flash_present_at_start: {flash}\n"));
        let d = Daemon::start(&bed, &yaml);
        if flash {
            d.wait_slot("A1", "done", LONG);
            drop(inserted);
            assert_eq!(first_difference(&image, &card, 4 * MIB), None);
        } else {
            let slot = d.wait_slot("A1", "present", LONG);
            assert_eq!(slot["device"], inserted.path());
            std::thread::sleep(Duration::from_millis(500));
            assert_eq!(d.slot("A1")["jobs"], 0);
            assert_eq!(bed::sha256(&card), before, "a present card was written");
            // Pulled and put back, it is a new card and gets flashed.
            drop(inserted);
            d.wait_slot("A1", "empty", LONG);
            let _again = reader.insert(&card);
            d.wait_slot("A1", "done", LONG);
        }
    }
}

/// SIGHUP with a broken file keeps the running configuration (and says so);
/// a valid one is applied, adding a slot.
#[test]
fn sighup_reloads_and_a_broken_config_keeps_the_old_one() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let (ra, rb) = (Reader::new(), Reader::new());
    let image = bed.random_image("img", 4 * MIB, 25);
    let one = format!("image: {}\n{}", image.display(), slots_yaml(&[("A1", &ra)]));
    let mut d = Daemon::start(&bed, &one);

    d.rewrite(&format!("{one}colour: blue\nconcurrency: 0\n"));
    d.signal(Signal::SIGHUP);
    d.wait_notified("RELOADING=1", LONG);
    let readies = |d: &mut Daemon| d.notifications().iter().filter(|m| *m == "READY=1").count();
    let start = Instant::now();
    while readies(&mut d) < 2 {
        assert!(start.elapsed() < LONG, "no READY=1 after the reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.notifications().iter().any(|m| m.starts_with("MONOTONIC_USEC=")), "{:?}", d.notifications());
    let log = d.log();
    assert!(
        log.contains("reload refused")
            && log.contains("unknown key `colour`")
            && log.contains("concurrency must be at least 1"),
        "{log}"
    );
    let card_a = bed.card("a", 16 * MIB);
    let _a = ra.insert(&card_a);
    d.wait_slot("A1", "done", LONG);

    d.rewrite(&format!("image: {}\n{}", image.display(), slots_yaml(&[("A1", &ra), ("B1", &rb)])));
    d.signal(Signal::SIGHUP);
    d.wait_until("slot B1", LONG, |_| {}, |s| slot_of(s, "B1")["state"] == "empty");
    assert_eq!(d.slot("A1")["state"], "done", "a reload keeps the slots it keeps");
    let card_b = bed.card("b", 16 * MIB);
    let _b = rb.insert(&card_b);
    d.wait_slot("B1", "done", LONG);
}

/// SIGTERM mid-write: the daemon exits within 5 s, the slot is `failed`
/// with `interrupted` in the final status file, systemd hears STOPPING=1,
/// and the card is left without a partition table.
#[test]
fn sigterm_mid_write_interrupts_within_five_seconds() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let image = bed.os_image("os.img", bed::Table::Gpt);
    let mut d = Daemon::start(&bed, &one_slot_yaml(&image, &reader, ""));
    let _slow = Throttle::new(d.pid(), &[&reader], 4 * MIB);
    let card = bed.card("card", 160 * MIB);
    let inserted = reader.insert(&card);
    d.wait_until("writing", LONG, |_| {}, |s| slot_of(s, "A1")["bytes_written"].as_u64() > Some(2 * MIB));

    let asked = Instant::now();
    d.signal(Signal::SIGTERM);
    let exit = d
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running 5 s after SIGTERM; log:\n{}", d.log()));
    assert!(exit.success(), "{exit}: {}", d.log());
    assert!(asked.elapsed() < Duration::from_secs(5));
    let slot = d.slot("A1");
    assert_eq!(slot["state"], "failed");
    assert_eq!(slot["error"], "interrupted");
    assert!(d.notifications().iter().any(|m| m == "STOPPING=1"));
    drop(inserted);
    assert!(
        bed::read_at(&card, 0, 1 << 20).iter().all(|&b| b == 0),
        "an interrupted card must not get a partition table"
    );
}

/// READY=1 once listening, a STATUS= line that follows the station, and
/// WATCHDOG=1 at half of WATCHDOG_USEC.
#[test]
fn systemd_notifications_and_watchdog() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let image = bed.random_image("img", 2 * MIB, 26);
    let yaml = one_slot_yaml(&image, &reader, "");
    let mut d = Daemon::start_with(&bed, &yaml, &[], &[("WATCHDOG_USEC", "400000")]);
    std::thread::sleep(Duration::from_millis(1100));
    let pings = d.notifications().iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!((4..=7).contains(&pings), "expected a ping every 200 ms, got {pings}: {:?}", d.notifications());
    let card = bed.card("card", 8 * MIB);
    let _c = reader.insert(&card);
    d.wait_slot("A1", "done", LONG);
    d.wait_notified("STATUS=0 writing, 0 queued, 1 done, 0 failed", LONG);
    assert!(
        d.notifications().iter().any(|m| m == "STATUS=1 writing, 0 queued, 0 done, 0 failed"),
        "{:?}",
        d.notifications()
    );
}

/// Job lines in the journal carry SLOT, DEVNAME, DISKSEQ, IMAGE and STAGE,
/// so `journalctl SLOT=A1` works.
#[test]
fn journal_entries_carry_slot_fields() {
    let bed = bed!(udev);
    let journald = std::process::Command::new("pgrep").args(["-x", "systemd-journal"]).output().unwrap();
    if !journald.status.success() {
        assert!(std::env::var_os("CI").is_none(), "systemd-journald is not running under CI");
        eprintln!("SKIPPED: systemd-journald is not running (scripts/test starts it)");
        return;
    }
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let image = bed.random_image("img", 2 * MIB, 27);
    let yaml = one_slot_yaml(&image, &reader, "");
    let d = Daemon::start_with(&bed, &yaml, &["--log", "journal"], &[]);
    let card = bed.card("card", 8 * MIB);
    let inserted = reader.insert(&card);
    let slot = d.wait_slot("A1", "done", LONG);

    let pid = format!("_PID={}", d.pid());
    let start = Instant::now();
    let done = loop {
        let out = bed::run("journalctl", &["--no-pager", "-o", "json", &pid, "SLOT=A1"]);
        let entries: Vec<Value> = out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        if let Some(done) = entries.iter().find(|e| e["STAGE"] == "done") {
            assert!(
                entries.iter().any(|e| e["STAGE"] == "writing") && entries.iter().any(|e| e["STAGE"] == "verifying")
            );
            break done.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no done entry for SLOT=A1 in the journal: {out}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(done["SLOT"], "A1");
    assert_eq!(done["DEVNAME"], inserted.path());
    assert_eq!(done["DISKSEQ"], slot["diskseq"].to_string());
    assert_eq!(done["IMAGE"], image.to_str().unwrap());
    assert_eq!(done["SYSLOG_IDENTIFIER"], "flashbay");
    // `journalctl -f` shows only the message: it must name its slot.
    let message = done["MESSAGE"].as_str().unwrap();
    assert!(message.starts_with("A1: done"), "{message}");
}

/// A damaged image fails the slots that use it, before any card is
/// touched, and the daemon carries on with the others.
#[test]
fn damaged_image_fails_its_slot_and_the_daemon_carries_on() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let (ra, rb) = (Reader::new(), Reader::new());
    let good = bed.random_image("good", 4 * MIB, 28);
    let raw = bed.random_image("bad", 8 * MIB, 29);
    let xz = bed.compress(&raw, "xz");
    let mut bytes = fs::read(&xz).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 32].iter_mut().for_each(|b| *b ^= 0xa5);
    fs::write(&xz, bytes).unwrap();
    let yaml = format!(
        "image: {}\nslots:\n  - {{name: A1, port: {}, image: {}}}\n  - {{name: B1, port: {}}}\n",
        good.display(),
        port(&ra),
        xz.display(),
        port(&rb)
    );
    let mut d = Daemon::start(&bed, &yaml);
    let (card_a, card_b) = (bed.card("a", 16 * MIB), bed.card("b", 16 * MIB));
    let before = bed::sha256(&card_a);
    let _a = ra.insert(&card_a);
    let _b = rb.insert(&card_b);
    let a = d.wait_slot("A1", "failed", LONG);
    let error = a["error"].as_str().unwrap();
    assert!(error.starts_with(&format!("image {}: corrupt xz stream at compressed offset ", xz.display())), "{error}");
    d.wait_slot("B1", "done", LONG);
    assert_eq!(bed::sha256(&card_a), before, "a card was written from a damaged image");
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon died");
}

/// A card too small for the image is refused, with the reason, untouched.
#[test]
fn too_small_card_is_refused_untouched() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let image = bed.random_image("img", 24 * MIB, 30);
    let d = Daemon::start(&bed, &one_slot_yaml(&image, &reader, ""));
    let card = bed.card("small", 16 * MIB);
    let before = bed::sha256(&card);
    let inserted = reader.insert(&card);
    let slot = d.wait_slot("A1", "refused", LONG);
    assert_eq!(slot["error"], format!("{}: device is 16.0 MiB, image needs 24.0 MiB", inserted.path()));
    drop(inserted);
    d.wait_slot("A1", "empty", LONG);
    assert_eq!(bed::sha256(&card), before);
    assert_eq!(d.status()["summary"]["refused"], 1);
}

/// `flashbay check` lists every error with its position and exits non-zero;
/// `flashbay run` refuses to start with the same messages.
#[test]
fn check_lists_every_error_and_run_refuses_the_same() {
    let bed = bed!();
    let image = bed.random_image("img", MIB, 31);
    let config = bed.path("bad.yaml");
    fs::write(
        &config,
        format!("image: {}\nconcurrency: 0\nslots:\n  - {{name: A1, port: usb-1}}\n  - {{name: A1, port: usb-1, speed: 3}}\n", image.display()),
    )
    .unwrap();
    let check = bed.flashbay(&["check", "--config", config.to_str().unwrap()]);
    let run = bed.flashbay(&["run", "--config", config.to_str().unwrap()]);
    for out in [&check, &run] {
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let c = config.display();
        for expected in [
            format!("error: {c}:2:14: concurrency must be at least 1"),
            format!("error: {c}:5:12: duplicate slot name `A1` (first used on line 4)"),
            format!("error: {c}:5:22: duplicate port `usb-1` (first used on line 4)"),
            format!("error: {c}:5:29: unknown key `speed`"),
        ] {
            assert!(stderr.lines().any(|l| l == expected), "missing {expected:?} in:\n{stderr}");
        }
    }
    fs::write(&config, format!("image: {}\nslots:\n  - {{name: A1, port: usb-1}}\n", image.display())).unwrap();
    let ok = bed.flashbay(&["check", "--config", config.to_str().unwrap()]);
    assert!(ok.status.success());
    let table = String::from_utf8_lossy(&ok.stdout);
    assert!(table.contains("A1    usb-1") && table.contains(image.to_str().unwrap()), "{table}");
}

/// A missing image does not stop the station: its cards fail with the
/// image's error, and once the operator puts the image in place the next
/// card is flashed.
#[test]
fn missing_image_fails_cards_until_it_appears() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let image = bed.path("later.img");
    let d = Daemon::start(&bed, &one_slot_yaml(&image, &reader, ""));
    assert!(d.log().contains("No such file or directory"), "startup should warn: {}", d.log());
    let card = bed.card("card", 16 * MIB);
    let inserted = reader.insert(&card);
    let slot = d.wait_slot("A1", "failed", LONG);
    assert_eq!(slot["error"], format!("image {}: No such file or directory (os error 2)", image.display()));
    drop(inserted);
    d.wait_slot("A1", "empty", LONG);

    let source = bed.random_image("src", 4 * MIB, 32);
    fs::rename(&source, &image).unwrap();
    let _again = reader.insert(&card);
    d.wait_slot("A1", "done", LONG);
    assert_eq!(first_difference(&image, &card, 4 * MIB), None);
}
