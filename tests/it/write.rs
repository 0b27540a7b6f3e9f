//! `flashbay write` and `flashbay verify` on loop devices.

use std::fs;

use std::os::unix::fs::FileExt;

use crate::bed::{self, MIB, Table, first_difference};

/// Every supported format lands byte-exact on the card, and the bytes of
/// the card beyond the image are left as they were.
#[test]
fn every_format_round_trips_byte_exact() {
    let bed = bed!();
    // An odd length checks the padded final block.
    let raw = bed.random_image("random.img", 20 * MIB + 1234, 1);
    let os = bed.os_image("os.img", Table::Mbr);
    for image in [raw, os] {
        let len = fs::metadata(&image).unwrap().len();
        for source in
            [image.clone(), bed.compress(&image, "xz"), bed.compress(&image, "gz"), bed.compress(&image, "zst")]
        {
            let card = bed.card(&bed::unique("card"), 160 * MIB);
            let dev = bed.attach(&card);
            let out = bed.flashbay(&["write", source.to_str().unwrap(), dev.path()]);
            assert!(out.status.success(), "{}: {}", source.display(), String::from_utf8_lossy(&out.stderr));
            drop(dev);
            assert_eq!(first_difference(&image, &card, len), None, "{} differs on the card", source.display());
            // Beyond the image the card is untouched, except its last MiB
            // (where a stale backup GPT would live), which is blanked.
            let beyond = bed::pattern(150 * MIB);
            assert_eq!(bed::read_at(&card, 150 * MIB, beyond.len()), beyond);
            assert!(bed::read_at(&card, 159 * MIB, 4096).iter().all(|&b| b == 0), "stale backup GPT area not zeroed");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains(&format!("sha256 {}", bed::sha256(&image))), "{stderr}");
        }
    }
}

/// The final partial block keeps the card's bytes after the image.
#[test]
fn partial_final_block_keeps_following_bytes() {
    let bed = bed!();
    let image = bed.random_image("odd.img", 3 * MIB + 100, 2);
    let card = bed.card("card", 8 * MIB);
    fs::OpenOptions::new().write(true).open(&card).unwrap().write_all_at(&[0xab; 412], 3 * MIB + 100).unwrap();
    let dev = bed.attach(&card);
    let out = bed.flashbay(&["write", "--no-verify", image.to_str().unwrap(), dev.path()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop(dev);
    assert_eq!(first_difference(&image, &card, 3 * MIB + 100), None);
    assert_eq!(bed::read_at(&card, 3 * MIB + 100, 412), vec![0xab; 412]);
}

/// A regular file target gets exactly the image, including on tmpfs,
/// which refuses O_DIRECT.
#[test]
fn writes_to_regular_files_on_disk_and_tmpfs() {
    let bed = bed!();
    let image = bed.random_image("img", 5 * MIB + 7, 3);
    let xz = bed.compress(&image, "xz");
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    for target in [bed.path("out.img"), shm.path().join("out.img")] {
        let out = bed.flashbay(&["write", xz.to_str().unwrap(), target.to_str().unwrap()]);
        assert!(out.status.success(), "{}: {}", target.display(), String::from_utf8_lossy(&out.stderr));
        assert_eq!(fs::read(&target).unwrap(), fs::read(&image).unwrap(), "{}", target.display());
    }
}

/// Verification reads the card, not RAM: after the card's content changes
/// underneath the kernel's cache, `verify` finds the first changed byte.
#[test]
fn verify_reads_the_card_not_the_page_cache() {
    let bed = bed!();
    let image = bed.random_image("img", 12 * MIB, 4);
    let card = bed.card("card", 16 * MIB);
    let dev = bed.attach(&card);
    let out = bed.flashbay(&["write", image.to_str().unwrap(), dev.path()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    bed::settle();
    // Pull the device's content into its page cache (held open: the kernel
    // drops a block device's cache on last close), then change the "card"
    // behind it, as flaky flash or a fake-capacity card would.
    let offset = 7 * MIB + 12345;
    let holder = fs::File::open(&dev.dev).unwrap();
    let mut cached = [0u8; 1];
    holder.read_exact_at(&mut cached, offset).unwrap();
    let backing = fs::OpenOptions::new().write(true).open(&card).unwrap();
    backing.write_all_at(&[!cached[0]], offset).unwrap();
    // A buffered read still sees the old byte: this is the trap.
    let mut seen = [0u8; 1];
    holder.read_exact_at(&mut seen, offset).unwrap();
    assert_eq!(seen, cached, "page cache did not hold the old byte; test proves nothing");

    let out = bed.flashbay(&["verify", "-q", image.to_str().unwrap(), dev.path()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains(&format!("card does not match the image at byte {offset}")), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");

    // Put the byte back: the same card now verifies.
    backing.write_all_at(&cached, offset).unwrap();
    let good = bed.flashbay(&["verify", "-q", image.to_str().unwrap(), dev.path()]);
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
}

/// Corrupt and truncated compressed images fail with a clear message and
/// never leave a card that looks flashed: the partition table area stays blank.
#[test]
fn corrupt_and_truncated_images_never_succeed() {
    let bed = bed!();
    let image = bed.os_image("os.img", Table::Gpt);
    let cases = [
        ("xz", "truncated"),
        ("xz", "corrupt"),
        ("gz", "truncated"),
        ("gz", "corrupt"),
        ("zst", "truncated"),
        ("zst", "corrupt"),
    ];
    for (format, damage) in cases {
        let good = bed.compress(&image, format);
        let mut bytes = fs::read(&good).unwrap();
        let bad = bed.path(&format!("bad-{damage}.img.{format}"));
        if damage == "truncated" {
            bytes.truncate(bytes.len() * 2 / 3);
        } else {
            let mid = bytes.len() / 2;
            for b in &mut bytes[mid..mid + 64] {
                *b ^= 0x5a;
            }
        }
        fs::write(&bad, &bytes).unwrap();

        let card = bed.card(&bed::unique("card"), 160 * MIB);
        let dev = bed.attach(&card);
        let out = bed.flashbay(&["write", bad.to_str().unwrap(), dev.path()]);
        drop(dev);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{format} {damage}: reported success");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: ") && last.contains(bad.to_str().unwrap()), "{format} {damage}: {stderr}");
        assert!(last.contains(damage) || last.contains("corrupt"), "{format} {damage}: {last}");
        assert!(last.contains("offset"), "{format} {damage}: no offset in {last}");
        let head = bed::read_at(&card, 0, 1 << 20);
        assert!(head != bed::read_at(&image, 0, 1 << 20), "{format} {damage}: card got a partition table");
    }
}
