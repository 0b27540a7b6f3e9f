//! After the write: expand, resize and eject, on realistic partitioned
//! images (FAT32 boot + ext4 root, MBR and GPT), checked with the tools an
//! operator would trust: sfdisk, sgdisk, e2fsck, dumpe2fs, debugfs, mtools.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use flashbay::blockdev::scsi::Scsi;
use flashbay::blockdev::{Access, Sysfs, Target};
use flashbay::guard::Guard;
use flashbay::model::EjectMode;
use flashbay::pipeline::StageResult;
use flashbay::pipeline::eject::{self, Env};
use serde_json::Value;

use crate::bed::{self, Loop, MIB, OsSpec, Reader, Table, run};
use crate::station::{Daemon, UdevRule, port};

fn sfdisk_json(dev: &str) -> Value {
    serde_json::from_str::<Value>(&run("sfdisk", &["--json", dev])).unwrap()["partitiontable"].clone()
}

fn fs_bytes(node: &str) -> u64 {
    let out = run("dumpe2fs", &["-h", node]);
    let field = |name: &str| -> u64 { out.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().parse().unwrap() };
    field("Block count:") * field("Block size:")
}

/// Plays the kernel's part (this VM's kernel parses no tables) and checks
/// both partitions' files against their sources.
fn assert_files_intact(dev: &Loop, os: &bed::OsImage) {
    run("partx", &["-u", dev.path()]);
    let (boot, root) = (format!("{}p1", dev.path()), format!("{}p2", dev.path()));
    for (name, source) in &os.boot_files {
        let copy = dev.backing.with_file_name(format!("out-{name}"));
        run("mcopy", &["-n", "-i", &boot, &format!("::{name}"), copy.to_str().unwrap()]);
        assert_eq!(fs::read(&copy).unwrap(), fs::read(source).unwrap(), "boot:{name}");
    }
    for (path, source) in &os.root_files {
        let copy = dev.backing.with_file_name("out-root-file");
        run("debugfs", &["-R", &format!("dump {path} {}", copy.display()), &root]);
        assert_eq!(fs::read(&copy).unwrap(), fs::read(source).unwrap(), "root:{path}");
    }
}

/// MBR and GPT images (xz, a few hundred MiB) on a bigger card: the last
/// partition ends at the end of the card, GPT is valid with its backup at
/// the last LBA, ext4 is clean and bigger, every file reads back.
#[test]
fn expand_and_resize_mbr_and_gpt_images() {
    let bed = bed!();
    for table in [Table::Mbr, Table::Gpt] {
        let os = bed.os_image_with(&bed::unique("os"), &OsSpec { table, root_mib: 160, ..OsSpec::default() });
        let xz = bed.compress(&os.path, "xz");
        let card_size = 512 * MIB;
        let card = bed.card(&bed::unique("card"), card_size);
        let dev = bed.attach(&card);
        let out = bed.flashbay(&["write", "--expand", "--resize", "--eject", "sync", xz.to_str().unwrap(), dev.path()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{table:?}: {stderr}");
        assert!(stderr.contains("expand: partition 2 grown from 160.0 MiB to"), "{stderr}");
        assert!(stderr.contains("resize: ext4 on partition 2 grown from 160.0 MiB to"), "{stderr}");
        assert!(stderr.contains("eject: synced"), "{stderr}");

        let t = sfdisk_json(dev.path());
        let sectors = card_size / 512;
        let last = &t["partitions"][1];
        let end = last["start"].as_u64().unwrap() + last["size"].as_u64().unwrap();
        match table {
            Table::Mbr => assert_eq!(end, sectors, "MBR: the last partition must end at the end of the card"),
            Table::Gpt => {
                assert_eq!(t["lastlba"], sectors - 34, "GPT usable area must reach the backup table at the end");
                assert!(sectors - 34 + 1 - end < 2048, "GPT: within the 1 MiB alignment of the end, got {end}");
                let verify = run("sgdisk", &["-v", dev.path()]);
                assert!(verify.contains("No problems found"), "{verify}");
                // The backup header is in the very last sector.
                assert_eq!(&bed::read_at(&card, card_size - 512, 8), b"EFI PART");
                // The protective MBR covers the whole card.
                let pmbr = bed::read_at(&card, 446, 16);
                assert_eq!(pmbr[4], 0xee);
                assert_eq!(u32::from_le_bytes(pmbr[12..16].try_into().unwrap()), u32::try_from(sectors - 1).unwrap());
            }
        }
        run("sfdisk", &["--verify", dev.path()]);

        assert_files_intact(&dev, &os);
        let root = format!("{}p2", dev.path());
        run("e2fsck", &["-fn", &root]);
        let grown = fs_bytes(&root);
        assert!(grown > os.root_bytes + 250 * MIB, "filesystem is {grown} bytes, image had {}", os.root_bytes);
        assert_eq!(grown / MIB, last["size"].as_u64().unwrap() * 512 / MIB, "the filesystem fills its partition");
    }
}

/// A root filesystem that e2fsck -p cannot repair fails the job with
/// e2fsck's exit status and its last line (continued on an indented one).
#[test]
fn unrepairable_ext4_fails_with_e2fsck_message() {
    let bed = bed!();
    let os = bed.os_image_with("broken", &OsSpec { break_root: true, ..OsSpec::default() });
    let card = bed.card("card", 256 * MIB);
    let dev = bed.attach(&card);
    let out = bed.flashbay(&["write", "-q", "--expand", "--resize", os.path.to_str().unwrap(), dev.path()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let device = dev.path();
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: {device}: resize failed: {device}p2: e2fsck failed (exit status 4): rootfs: UNEXPECTED \
             INCONSISTENCY; RUN fsck MANUALLY. (i.e., without -a or -p options)"
        )
    );
}

/// No partition table: both stages are skipped, the card holds the image.
#[test]
fn image_without_partition_table_skips_expand_and_resize() {
    let bed = bed!();
    let image = bed.random_image("raw.img", 8 * MIB, 41);
    let card = bed.card("card", 64 * MIB);
    let dev = bed.attach(&card);
    let out = bed.flashbay(&["write", "--expand", "--resize", image.to_str().unwrap(), dev.path()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("expand: skipped: no partition table"), "{stderr}");
    assert!(stderr.contains("resize: skipped: no partition table"), "{stderr}");
    drop(dev);
    assert_eq!(bed::first_difference(&image, &card, 8 * MIB), None);
}

/// An MBR with an extended partition is left exactly as written.
#[test]
fn extended_partitions_are_left_alone() {
    let bed = bed!();
    let image = bed.path("ext.img");
    fs::File::create(&image).unwrap().set_len(32 * MIB).unwrap();
    bed::run_stdin(
        "sfdisk",
        &["-q", image.to_str().unwrap()],
        "label: dos\nstart=2048, size=16384, type=c\nstart=18432, type=5\nstart=20480, size=20480, type=83\n",
    );
    let card = bed.card("card", 128 * MIB);
    let dev = bed.attach(&card);
    let out = bed.flashbay(&["write", "--expand", image.to_str().unwrap(), dev.path()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("expand: skipped: extended partitions are not grown"), "{stderr}");
    drop(dev);
    assert_eq!(bed::first_difference(&image, &card, 32 * MIB), None, "the table must be untouched");
}

/// The daemon runs the same stages, shows the states in order, and records
/// each stage's outcome in the status file.
#[test]
fn daemon_runs_expand_resize_eject_in_order() {
    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let reader = Reader::new();
    let os = bed.os_image_with("os", &OsSpec { table: Table::Gpt, ..OsSpec::default() });
    let xz = bed.compress(&os.path, "xz");
    let yaml = format!(
        "image: {}\nexpand: true\nresize: true\neject: sync\nslots:\n  - {{name: A1, port: {}}}\n",
        xz.display(),
        port(&reader)
    );
    let d = Daemon::start(&bed, &yaml);
    let card = bed.card("card", 256 * MIB);
    let inserted = reader.insert(&card);
    let slot = d.wait_slot("A1", "done", Duration::from_secs(60));

    let stages: Vec<(String, String)> = slot["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["stage"].as_str().unwrap().to_owned(), s["result"].as_str().unwrap().to_owned()))
        .collect();
    let expected: Vec<(String, String)> =
        ["write", "verify", "expand", "resize", "eject"].iter().map(|s| ((*s).to_owned(), "done".to_owned())).collect();
    assert_eq!(stages, expected, "{slot}");
    let log = d.log();
    let order: Vec<usize> = ["queued", "writing", "verifying", "expanding", "resizing", "ejecting", "\"done\""]
        .iter()
        .map(|state| {
            log.find(&format!("stage=\"{}\"", state.trim_matches('"')))
                .unwrap_or_else(|| panic!("no {state} in:\n{log}"))
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "states out of order: {order:?}\n{log}");
    assert_files_intact(&inserted, &os);
    let t = sfdisk_json(inserted.path());
    assert_eq!(t["lastlba"], 256 * MIB / 512 - 34);
}

/// Records the SCSI commands instead of sending them.
#[derive(Default)]
struct Recorder(Mutex<Vec<&'static str>>);

impl Scsi for Recorder {
    fn synchronize_cache(&self, _: &fs::File) -> std::io::Result<()> {
        self.0.lock().unwrap().push("SYNCHRONIZE CACHE");
        Ok(())
    }

    fn stop_and_eject(&self, _: &fs::File) -> std::io::Result<()> {
        self.0.lock().unwrap().push("START STOP UNIT (eject)");
        Ok(())
    }
}

/// A sysfs tree in which real loop devices appear as LUNs of one USB card
/// reader (bus 1, port 1): SCSI host, target, LUN, block device.
struct FakeUsbReader {
    root: tempfile::TempDir,
    usb: PathBuf,
}

impl FakeUsbReader {
    fn new(luns: &[&Loop]) -> Self {
        let root = tempfile::tempdir().unwrap();
        let usb = root.path().join("devices/pci0000:00/0000:00:14.0/usb1/1-1");
        fs::create_dir_all(&usb).unwrap();
        fs::write(usb.join("idVendor"), "0bda\n").unwrap();
        fs::write(usb.join("remove"), "").unwrap();
        fs::create_dir_all(root.path().join("dev/block")).unwrap();
        fs::create_dir_all(root.path().join("block")).unwrap();
        for (i, lun) in luns.iter().enumerate() {
            let name = lun.name();
            let disk = usb.join(format!("1-1:1.0/host7/target7:0:0/7:0:0:{i}/block/{name}"));
            fs::create_dir_all(&disk).unwrap();
            let num = fs::read_to_string(format!("/sys/block/{name}/dev")).unwrap();
            fs::write(disk.join("dev"), &num).unwrap();
            symlink(&disk, root.path().join(format!("dev/block/{}", num.trim()))).unwrap();
            symlink(&disk, root.path().join(format!("block/{name}"))).unwrap();
        }
        Self { root, usb }
    }

    fn removed(&self) -> String {
        fs::read_to_string(self.usb.join("remove")).unwrap()
    }
}

fn eject(dev: &Loop, mode: EjectMode, sysfs: &Sysfs, scsi: &Recorder) -> flashbay::pipeline::Outcome {
    let num = Target::open(&dev.dev, Access::Read).unwrap().dev().unwrap();
    eject::run(&dev.dev, num, mode, &Env { sysfs, scsi, guard: &Guard::default() }).unwrap()
}

#[test]
fn eject_modes_on_a_usb_card_reader() {
    let bed = bed!();
    let (a, b) = (bed.attach(&bed.card("a", 8 * MIB)), bed.attach(&bed.card("b", 8 * MIB)));
    let reader = FakeUsbReader::new(&[&a, &b]);
    let sysfs = Sysfs::new(reader.root.path());

    let scsi = Recorder::default();
    let out = eject(&a, EjectMode::Eject, &sysfs, &scsi);
    assert_eq!((out.result, out.detail.as_str()), (StageResult::Done, "ejected"));
    assert_eq!(*scsi.0.lock().unwrap(), ["SYNCHRONIZE CACHE", "START STOP UNIT (eject)"]);
    assert_eq!(reader.removed(), "", "eject must not power the reader off");

    // Another LUN of the same reader is busy (a job holds its lock):
    // powering off would cut it too, so it is refused, and nothing is sent.
    let busy = nix::fcntl::Flock::lock(fs::File::open(&b.dev).unwrap(), nix::fcntl::FlockArg::LockExclusive).unwrap();
    let scsi = Recorder::default();
    let out = eject(&a, EjectMode::PowerOff, &sysfs, &scsi);
    assert_eq!(out.result, StageResult::Skipped);
    assert!(
        out.detail.contains(&format!("power-off refused: {} on the same USB device (1-1) is busy", b.path())),
        "{}",
        out.detail
    );
    assert!(scsi.0.lock().unwrap().is_empty());
    assert_eq!(reader.removed(), "");
    drop(busy);

    let scsi = Recorder::default();
    let out = eject(&a, EjectMode::PowerOff, &sysfs, &scsi);
    assert_eq!((out.result, out.detail.as_str()), (StageResult::Done, "ejected and powered off USB device 1-1"));
    assert_eq!(*scsi.0.lock().unwrap(), ["SYNCHRONIZE CACHE", "START STOP UNIT (eject)"]);
    assert_eq!(reader.removed(), "1");
}

/// Loop, virtio and MMC disks have no SCSI/USB parent: they are synced,
/// and the outcome says why that is all.
#[test]
fn eject_without_scsi_parent_syncs_and_says_why() {
    let bed = bed!();
    let dev = bed.attach(&bed.card("a", 8 * MIB));
    for mode in [EjectMode::Sync, EjectMode::Eject, EjectMode::PowerOff] {
        let scsi = Recorder::default();
        let out = eject(&dev, mode, &Sysfs::default(), &scsi);
        assert_eq!(out.result, StageResult::Done);
        if mode == EjectMode::Sync {
            assert_eq!(out.detail, "synced");
        } else {
            assert_eq!(out.detail, format!("synced only: {} has no SCSI/USB parent to {}", dev.path(), mode.name()));
        }
        assert!(scsi.0.lock().unwrap().is_empty());
    }
}
