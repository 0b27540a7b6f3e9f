//! The safety guard, against real mounts, swap, partitions and namespaces.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use flashbay::blockdev::{Access, Sysfs, Target};
use flashbay::guard::{Guard, Refusal, Request};

use crate::bed::{self, MIB, Mount, Reader, Swap, Table};

/// Asserts a refused write: exit code 3, one line naming the device and
/// containing `reason`, and the card byte-identical afterwards.
fn assert_refused(bed: &bed::Bed, args: &[&str], card: &Path, reason: &str) {
    let before = bed::sha256(card);
    let out = bed.flashbay(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(stderr.starts_with("error: /dev/"), "{stderr}");
    assert!(stderr.contains(reason), "{args:?}: expected {reason:?} in {stderr}");
    assert_eq!(bed::sha256(card), before, "{args:?}: the card was modified");
}

#[test]
fn too_small_card_is_refused_before_any_write() {
    let bed = bed!();
    let image = bed.random_image("img", 24 * MIB, 5);
    let card = bed.card("card", 16 * MIB);
    let dev = bed.attach(&card);
    // gzip has no size index: the image is measured first, still before any write.
    for source in [image.clone(), bed.compress(&image, "gz"), bed.compress(&image, "xz"), bed.compress(&image, "zst")] {
        assert_refused(
            &bed,
            &["write", source.to_str().unwrap(), dev.path()],
            &card,
            &format!("{}: device is 16.0 MiB, image needs 24.0 MiB", dev.path()),
        );
    }
}

#[test]
fn mounted_disk_and_mounted_partition_are_refused() {
    let bed = bed!();
    let image = bed.random_image("img", 2 * MIB, 6);

    // A whole-disk filesystem, mounted.
    let card = bed.card("fs", 32 * MIB);
    bed::run("mkfs.ext4", &["-q", "-F", card.to_str().unwrap()]);
    let dev = bed.attach(&card);
    let mnt = bed.path("mnt");
    let mount = Mount::new(dev.path(), &mnt);
    assert_refused(&bed, &["write", "--force", image.to_str().unwrap(), dev.path()], &card, "is mounted from");
    drop(mount);

    // A mounted partition of a partitioned card.
    let os = bed.os_image("os.img", Table::Mbr);
    let card2 = bed.card("os-card", 200 * MIB);
    fs::OpenOptions::new()
        .write(true)
        .open(&card2)
        .map(|f| {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&fs::read(&os).unwrap(), 0).unwrap();
        })
        .unwrap();
    let dev2 = bed.attach(&card2);
    dev2.add_partitions();
    let mnt2 = bed.path("mnt2");
    let _mount = Mount::new(&format!("{}p2", dev2.path()), &mnt2);
    assert_refused(
        &bed,
        &["write", image.to_str().unwrap(), dev2.path()],
        &card2,
        &format!("{} is mounted from /dev/{}p2", mnt2.display(), dev2.name()),
    );
}

#[test]
fn partition_is_refused_with_the_whole_disk_named() {
    let bed = bed!();
    let image = bed.random_image("img", MIB, 7);
    let os = bed.os_image("os.img", Table::Gpt);
    let dev = bed.attach(&os);
    dev.add_partitions();
    let part = format!("{}p1", dev.path());
    assert_refused(
        &bed,
        &["write", image.to_str().unwrap(), &part],
        &os,
        &format!("is a partition; write to the whole disk {}", dev.path()),
    );
}

/// The system-disk rule against a real mount table: in a private mount
/// namespace a loop device is mounted at /boot, so for flashbay running in
/// that namespace it holds the running system. `--force` must not help.
#[test]
fn system_disk_is_refused_even_with_force() {
    let bed = bed!();
    let image = bed.random_image("img", MIB, 8);
    // Mounting changes the filesystem itself, so the evidence that flashbay
    // wrote nothing is the card's last MiB, beyond the filesystem, which a
    // write would blank first.
    let card = bed.card("boot", 32 * MIB);
    bed::run("mkfs.ext4", &["-q", "-F", card.to_str().unwrap(), "24M"]);
    let dev = bed.attach(&card);
    let script = format!(
        "mount --make-rprivate / && mount {dev} /boot && exec {bin} write --force {img} {dev}",
        dev = dev.path(),
        bin = env!("CARGO_BIN_EXE_flashbay"),
        img = image.display()
    );
    let out = Command::new("unshare").args(["-m", "sh", "-c", &script]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("holds the running system (/boot is mounted from /dev/{})", dev.name())),
        "{stderr}"
    );
    assert!(stderr.contains("even with --force"), "{stderr}");
    let tail = bed::pattern(31 * MIB);
    assert_eq!(bed::read_at(&card, 31 * MIB, tail.len()), tail, "the card was written");
}

#[test]
fn swap_device_is_refused_as_system() {
    let bed = bed!();
    let image = bed.random_image("img", MIB, 9);
    let card = bed.card("swap", 32 * MIB);
    let dev = bed.attach(&card);
    let _swap = Swap::new(dev.path());
    assert_refused(&bed, &["write", "--force", image.to_str().unwrap(), dev.path()], &card, "is in use as swap");
}

#[test]
fn write_protected_card_and_empty_reader_are_refused() {
    let bed = bed!();
    let image = bed.random_image("img", MIB, 10);
    let card = bed.card("ro", 8 * MIB);
    let dev = bed.attach_with(&card, &["-r"]);
    let out = bed.flashbay(&["write", image.to_str().unwrap(), dev.path()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // A read-only loop device refuses O_RDWR outright; either message names the cause.
    assert!(stderr.contains("read-only") || stderr.contains("Read-only"), "{stderr}");
    drop(dev);

    let reader = Reader::new();
    let out = bed.flashbay(&["write", image.to_str().unwrap(), reader.dev().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no medium"), "{stderr}");
}

/// Rules this kernel cannot show for real (no device mapper, no fixed
/// disks to spare) checked through the guard's sysfs seam: a real loop
/// device looked up in a sysfs tree that says it is held, or fixed.
#[test]
fn held_and_fixed_disks_via_a_fake_sysfs() {
    let bed = bed!();
    let card = bed.card("card", 8 * MIB);
    let dev = bed.attach(&card);
    let target = Target::open(&dev.dev, Access::Read).unwrap();
    let num = target.dev().unwrap();
    let req = Request { image: Path::new("/nonexistent"), image_size: MIB, force: false };

    let build = |holder: bool| {
        let root = tempfile::tempdir().unwrap();
        let disk = root.path().join("devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda");
        fs::create_dir_all(disk.join("holders")).unwrap();
        fs::write(disk.join("dev"), format!("{num}\n")).unwrap();
        fs::write(disk.join("removable"), "0\n").unwrap();
        fs::write(disk.join("ro"), "0\n").unwrap();
        fs::create_dir_all(root.path().join("dev/block")).unwrap();
        symlink(&disk, root.path().join(format!("dev/block/{num}"))).unwrap();
        if holder {
            let dm = root.path().join("devices/virtual/block/dm-0");
            fs::create_dir_all(&dm).unwrap();
            fs::write(dm.join("dev"), "253:0\n").unwrap();
            symlink(&dm, disk.join("holders/dm-0")).unwrap();
        }
        root
    };
    let guard = |root: &Path| Guard { sysfs: Sysfs::new(root), ..Guard::default() };

    let fixed = build(false);
    assert!(matches!(guard(fixed.path()).check(&target, &req), Err(Refusal::NotRemovable { .. })));
    assert_eq!(guard(fixed.path()).check(&target, &Request { force: true, ..req }), Ok(()));

    let held = build(true);
    let err = guard(held.path()).check(&target, &Request { force: true, ..req }).unwrap_err();
    assert!(err.to_string().contains("/dev/sda is held by /dev/dm-0"), "{err}");
}
