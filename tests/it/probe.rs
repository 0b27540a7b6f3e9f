//! Counterfeit card detection on loop devices: a genuine card, and FUSE
//! cards that wrap or drop writes past their real 64 MiB while claiming
//! 256 MiB; through the library and through `flashbay probe`.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use flashbay::blockdev::{Access, Target};
use flashbay::guard::Guard;
use flashbay::pipeline::{Cancel, JobError};
use flashbay::probe::{self, ProbeReport};
use serde_json::Value;

use crate::bed::{self, Bed, MIB, Mount};
use crate::fusecard::{FaultyCard, FaultyLoop};

const CLAIMED: u64 = 256 * MIB;
const REAL: u64 = 64 * MIB;

/// A 256 MiB backing file with the bed's pattern and a random 16 MiB
/// "image" at its start.
fn card_with_image(bed: &Bed, name: &str) -> PathBuf {
    let backing = bed.card(name, CLAIMED);
    let image = fs::read(bed.random_image(&format!("{name}.img"), 16 * MIB, 0x9e0)).unwrap();
    OpenOptions::new().write(true).open(&backing).unwrap().write_all_at(&image, 0).unwrap();
    backing
}

/// Turns a well-behaved FUSE card into a counterfeit one.
type Counterfeit = fn(&FaultyCard);

/// A FUSE card claiming 256 MiB that `fake` turns counterfeit, and the
/// checksum of its backing file before anything probed it.
fn fake_card(bed: &Bed, name: &str, fake: Counterfeit) -> (FaultyLoop, String) {
    let card = FaultyLoop::with_backing(bed, name, card_with_image(bed, name));
    let before = bed::sha256(&card.backing);
    fake(&card.card);
    (card, before)
}

fn probe_lib(dev: &Path, keep_below: u64) -> ProbeReport {
    let target = Target::open(dev, Access::Write).unwrap();
    let report = probe::probe(&target, keep_below, &Cancel::default()).unwrap();
    eprintln!("{}: {report} ({:.2} s, {} blocks)", dev.display(), report.seconds, report.blocks_checked);
    assert!(report.seconds < 10.0, "the probe took {:.1} s", report.seconds);
    report
}

/// Runs `flashbay probe` and `flashbay probe --json`: (exit code, the one
/// line of text, the JSON report).
fn probe_cli(bed: &Bed, dev: &str) -> (Option<i32>, String, Value) {
    let out = bed.flashbay(&["probe", dev]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "not one line: {stdout:?}; {}", String::from_utf8_lossy(&out.stderr));
    let json = bed.flashbay(&["probe", "--json", dev]);
    assert_eq!(json.status.code(), out.status.code(), "{}", String::from_utf8_lossy(&json.stderr));
    let report: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["claimed"], CLAIMED);
    assert!(report["blocks_checked"].as_u64().is_some_and(|n| n > 0), "{report}");
    assert!(report["seconds"].as_f64().is_some_and(|s| s < 10.0), "{report}");
    eprintln!("flashbay probe: {} ({} s)", stdout.trim_end(), report["seconds"]);
    (out.status.code(), stdout.trim_end().to_owned(), report)
}

/// A genuine card is genuine, to the library and the command, and holds
/// every byte it held before.
#[test]
fn a_genuine_card_probes_genuine_and_keeps_every_byte() {
    let bed = bed!();
    let backing = card_with_image(&bed, "card");
    let before = bed::sha256(&backing);
    let dev = bed.attach(&backing);

    let report = probe_lib(&dev.dev, 16 * MIB);
    assert!(report.genuine, "{report:?}");
    assert_eq!((report.claimed, report.usable, report.wraps_at), (CLAIMED, CLAIMED, None));
    assert!(report.blocks_checked >= 64, "{report:?}");

    let (code, line, json) = probe_cli(&bed, dev.path());
    assert_eq!(code, Some(0), "{line}");
    assert!(line.starts_with(&format!("{}: genuine card: 256.0 MiB (", dev.path())), "{line}");
    assert_eq!((&json["genuine"], &json["usable"]), (&Value::Bool(true), &Value::from(CLAIMED)));

    drop(dev);
    assert_eq!(bed::sha256(&backing), before, "the probe changed the card");
}

/// A card that wraps at 64 MiB: the probe's writes above the image land
/// in it, and are put back.
#[test]
fn a_wrapping_card_is_counterfeit_and_its_image_survives() {
    let bed = bed!();
    let (card, before) = fake_card(&bed, "wrap", |c| c.wrap_at(REAL));
    let report = probe_lib(&card.dev.dev, REAL);
    assert!(!report.genuine, "{report:?}");
    assert!((REAL - MIB..=REAL).contains(&report.usable), "{report:?}");
    assert_eq!(report.wraps_at, Some(REAL));
    assert_eq!(report.to_string(), "counterfeit card: about 64.0 MiB usable of 256.0 MiB claimed");
    assert_eq!(bed::sha256(&card.backing), before, "the image (or the rest) changed");
}

/// A card that drops writes past 64 MiB and reads zeros there.
#[test]
fn a_card_dropping_writes_is_counterfeit_and_its_image_survives() {
    let bed = bed!();
    let (card, before) = fake_card(&bed, "drop", |c| c.drop_writes_past(REAL));
    let report = probe_lib(&card.dev.dev, REAL);
    assert!(!report.genuine, "{report:?}");
    assert_eq!((report.usable, report.wraps_at), (REAL, None));
    assert_eq!(bed::sha256(&card.backing), before, "the image (or the rest) changed");
}

/// A bad spot fails the probe with an error naming the device and the
/// offset, after the blocks stamped so far have been put back.
#[test]
fn an_io_error_names_device_and_offset_and_the_card_is_restored() {
    let bed = bed!();
    // 130 MiB is on the spread pass's 2 MiB stride above 64 MiB: the probe
    // has stamped the blocks below it by then.
    let (card, before) = fake_card(&bed, "bad", |c| c.eio_at(130 * MIB));
    let target = Target::open(&card.dev.dev, Access::Write).unwrap();
    let err = probe::probe(&target, REAL, &Cancel::default()).unwrap_err();
    assert!(
        matches!(&err, probe::ProbeError::Io { device, offset, .. } if *device == card.dev.dev && *offset == 130 * MIB),
        "{err:?}"
    );
    assert!(err.to_string().starts_with(&format!("{}: probe read failed at offset {}: ", card.dev.path(), 130 * MIB)));
    drop(target);
    assert!(card.card.writes() > 2, "nothing was stamped before the bad spot");
    assert_eq!(bed::sha256(&card.backing), before, "the stamped blocks were not put back");
}

/// Time is bounded by the number of blocks, not the card's size: a slow
/// card claiming 64 GiB that drops writes past 8 GiB and 12 KiB is
/// located to the block well within 10 s.
#[test]
fn a_slow_big_fake_is_located_to_the_block_in_seconds() {
    let bed = bed!();
    let backing = bed.path("big");
    fs::File::create(&backing).unwrap().set_len(64 << 30).unwrap();
    let image = fs::read(bed.random_image("big.img", 16 * MIB, 0xb16)).unwrap();
    OpenOptions::new().write(true).open(&backing).unwrap().write_all_at(&image, 0).unwrap();
    let card = FaultyLoop::with_backing(&bed, "big", backing);
    let real = (8 << 30) + 3 * 4096;
    card.card.drop_writes_past(real);
    // About 2 ms per 4 KiB block, as a cheap card's random I/O.
    card.card.slow(2 * MIB);
    let report = probe_lib(&card.dev.dev, 16 * MIB);
    assert!(!report.genuine, "{report:?}");
    assert_eq!(report.usable, real);
    card.card.slow(0);
    assert_eq!(bed::first_difference(&bed.path("big.img"), &card.backing, 16 * MIB), None, "the image changed");
}

/// `flashbay probe` probes the whole card (the image region included) and
/// still puts everything back; exit status 4 for a counterfeit card.
#[test]
fn flashbay_probe_reports_counterfeit_cards() {
    let bed = bed!();
    let fakes: [(&str, Counterfeit); 2] = [("wrap", |c| c.wrap_at(REAL)), ("drop", |c| c.drop_writes_past(REAL))];
    for (name, fake) in fakes {
        let (card, before) = fake_card(&bed, name, fake);
        let (code, line, json) = probe_cli(&bed, card.dev.path());
        assert_eq!(code, Some(4), "{name}: {line}");
        assert_eq!(line, format!("{}: counterfeit card: about 64.0 MiB usable of 256.0 MiB claimed", card.dev.path()));
        assert_eq!(json["genuine"], false, "{name}: {json}");
        assert_eq!(json["usable"], REAL, "{name}: {json}");
        assert_eq!(bed::sha256(&card.backing), before, "{name}: the card changed");
    }
}

/// The probe writes, so it refuses what `flashbay write` refuses, with the
/// same exit status.
#[test]
fn flashbay_probe_refuses_a_mounted_card() {
    let bed = bed!();
    let dev = bed.attach(&bed.card("card", 64 * MIB));
    bed::run("mkfs.ext4", &["-q", dev.path()]);
    let _mount = Mount::new(dev.path(), &bed.path("mnt"));
    let out = bed.flashbay(&["probe", dev.path()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("is mounted from"), "{stderr}");
    let err = flashbay::pipeline::open_card(&dev.dev, &Guard::default(), false).unwrap_err();
    assert!(matches!(err, JobError::Refused(_)), "{err}");
}
