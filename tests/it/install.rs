//! Ready for a real station: the systemd unit, the installer, the udev
//! rules loaded into the real udevd.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::bed::{self, MIB, Reader, run};
use crate::station::{UdevRule, port};

const UNIT: &str = include_str!("../../systemd/flashbay.service");

/// `systemd-analyze verify` accepts the unit (with ExecStart pointing at
/// the binary under test, the one thing that differs from an install), and
/// the offline security analysis rates it "OK".
#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let bed = bed!();
    let unit = bed.path("flashbay.service");
    fs::write(&unit, UNIT.replace("/usr/bin/flashbay", env!("CARGO_BIN_EXE_flashbay"))).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", unit.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));

    let out =
        Command::new("systemd-analyze").args(["security", "--offline=true", unit.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{text}"));
    let exposure: f64 = line.split(": ").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().parse().unwrap();
    assert!(exposure <= 3.0, "{line}");
    for setting in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StateDirectory=flashbay",
        "CacheDirectory=flashbay",
        "KillMode=mixed",
    ] {
        assert!(UNIT.contains(setting), "{setting}");
    }
}

/// The installer stages everything under DESTDIR with PREFIX applied, and
/// never overwrites an existing configuration.
#[test]
fn installer_stages_files_and_keeps_an_existing_config() {
    let bed = bed!();
    let root = bed.path("root");
    let install = || {
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install"))
            .env("DESTDIR", &root)
            .env("PREFIX", "/opt/fb")
            .env("FLASHBAY_BIN", env!("CARGO_BIN_EXE_flashbay"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    install();
    let unit = fs::read_to_string(root.join("lib/systemd/system/flashbay.service")).unwrap();
    assert!(unit.contains("ExecStart=/opt/fb/bin/flashbay run --config /etc/flashbay/flashbay.yaml"), "{unit}");
    assert!(root.join("opt/fb/bin/flashbay").exists() && root.join("opt/fb/share/doc/flashbay/README.md").exists());
    let config = root.join("etc/flashbay/flashbay.yaml");
    assert_eq!(fs::read_to_string(&config).unwrap(), include_str!("../../etc/flashbay.yaml"));
    fs::write(&config, "# mine\n").unwrap();
    install();
    assert_eq!(fs::read_to_string(&config).unwrap(), "# mine\n");
}

/// The generated rules, loaded into the real udevd, mark a slot's disk and
/// its partitions for automounters to leave alone, and nothing else.
#[test]
fn udev_rules_mark_slot_devices_and_nothing_else() {
    let bed = bed!(udev);
    let _ports = UdevRule::install();
    let (slot, other) = (Reader::new(), Reader::new());
    let image = bed.random_image("img", MIB, 61);
    let config = bed.path("flashbay.yaml");
    fs::write(&config, format!("image: {}\nslots:\n  - {{name: A1, port: {}}}\n", image.display(), port(&slot)))
        .unwrap();
    let rules = bed.flashbay(&["udev-rules", "--config", config.to_str().unwrap()]);
    assert!(rules.status.success());
    let installed = Path::new("/run/udev/rules.d").join(format!("90-flashbay-test-{}.rules", std::process::id()));
    fs::write(&installed, &rules.stdout).unwrap();
    struct Remove<'a>(&'a Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = fs::remove_file(self.0);
            let _ = Command::new("udevadm").args(["control", "--reload"]).status();
        }
    }
    let _remove = Remove(&installed);
    run("udevadm", &["control", "--reload"]);

    let os = bed.os_image("os.img", bed::Table::Mbr);
    let (a, b) = (bed.card("a", 160 * MIB), bed.card("b", 160 * MIB));
    for card in [&a, &b] {
        fs::OpenOptions::new()
            .write(true)
            .open(card)
            .map(|f| {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&fs::read(&os).unwrap(), 0).unwrap();
            })
            .unwrap();
    }
    let (in_slot, elsewhere) = (slot.insert(&a), other.insert(&b));
    in_slot.add_partitions();
    elsewhere.add_partitions();
    bed::settle();
    let props = |dev: &str| run("udevadm", &["info", "--query=property", dev]);
    for dev in [in_slot.path().to_owned(), format!("{}p2", in_slot.path())] {
        let p = props(&dev);
        for want in ["UDISKS_IGNORE=1", "UDISKS_AUTO=0", "FLASHBAY_SLOT=A1"] {
            assert!(p.lines().any(|l| l == want), "{dev} lacks {want}:\n{p}");
        }
    }
    for dev in [elsewhere.path().to_owned(), format!("{}p2", elsewhere.path())] {
        let p = props(&dev);
        assert!(p.contains("ID_PATH="), "{dev} should have a port:\n{p}");
        assert!(!p.contains("UDISKS_IGNORE") && !p.contains("FLASHBAY_SLOT"), "{dev} is not a slot:\n{p}");
    }
}

/// `flashbay learn --write`: each new port gets the next name, a known
/// port and a re-inserted card add nothing, Ctrl-C ends it, and the slots
/// land in the config file with its comments and layout intact.
#[test]
fn learn_names_new_ports_and_writes_them_into_the_config() {
    use std::io::BufRead;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    let bed = bed!(udev);
    let _rule = UdevRule::install();
    let (known, r1, r2) = (Reader::new(), Reader::new(), Reader::new());
    let image = bed.random_image("img", MIB, 62);
    let config = bed.path("station.yaml");
    let original = format!(
        "# my station\nimage: {}\nslots:\n  - name: A1\n    port: {}   # by the door\n\nhttp: {{listen: 127.0.0.1:0}}\n",
        image.display(),
        port(&known)
    );
    fs::write(&config, &original).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashbay"))
        .args(["learn", "--write", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = |pipe: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        rx
    };
    let (out, err) = (lines(Box::new(child.stdout.take().unwrap())), lines(Box::new(child.stderr.take().unwrap())));
    let expect = |rx: &mpsc::Receiver<String>, what: &str| -> String {
        let start = Instant::now();
        loop {
            let left =
                Duration::from_secs(15).checked_sub(start.elapsed()).unwrap_or_else(|| panic!("no line with {what:?}"));
            let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no line with {what:?}"));
            if line.contains(what) {
                return line;
            }
        }
    };
    expect(&err, "insert a card into each port in turn");
    let cards: Vec<_> = (0..3).map(|i| bed.card(&format!("c{i}"), 8 * MIB)).collect();
    let _k = known.insert(&cards[0]);
    expect(&err, &format!("{}: already slot A1", port(&known)));
    let first = r1.insert(&cards[1]);
    assert!(expect(&out, "A2").starts_with(&format!("A2  {}  (", port(&r1))));
    drop(first);
    let _again = r1.insert(&cards[1]);
    expect(&err, &format!("{}: already slot A2", port(&r1)));
    let _c = r2.insert(&cards[2]);
    assert!(expect(&out, "A3").starts_with(&format!("A3  {}  (", port(&r2))));

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let written = fs::read_to_string(&config).unwrap();
    assert_eq!(
        written,
        original.replace(
            "# by the door\n",
            &format!("# by the door\n  - name: A2\n    port: {}\n  - name: A3\n    port: {}\n", port(&r1), port(&r2))
        )
    );
    let check = bed.flashbay(&["check", "--config", config.to_str().unwrap()]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}

/// `flashbay demo`, the README's first command, runs a station to the end
/// and leaves no loop device, udev rule or file behind.
#[test]
fn demo_station_runs_and_leaves_nothing_behind() {
    let _bed = bed!(udev);
    // The demo's readers are loop devices it creates from 200 up; other
    // tests attach low-numbered ones meanwhile.
    let demo_loops = || -> Vec<String> {
        fs::read_dir("/sys/block")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.strip_prefix("loop").and_then(|d| d.parse::<u32>().ok()).is_some_and(|d| d >= 200))
            .collect()
    };
    let before = demo_loops();
    let out = Command::new(env!("CARGO_BIN_EXE_flashbay"))
        .args(["demo", "--speed", "0", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let table: Vec<&str> = stdout.lines().filter(|l| l.starts_with('H')).collect();
    for (slot, state) in [("H1", "done"), ("H2", "done"), ("H3", "refused"), ("H4", "done")] {
        assert!(table.iter().any(|l| l.starts_with(&format!("{slot}    {state}"))), "{slot} not {state}:\n{stdout}");
    }
    assert!(stdout.contains("H1 expand: done partition 2 grown from 28.0 MiB to"), "{stdout}");
    assert!(stdout.ends_with("done: loop devices, udev rule and files removed\n"), "{stdout}");
    assert_eq!(demo_loops(), before, "loop devices left behind");
    assert!(!run("losetup", &["-a"]).contains("flashbay-demo-"), "a card file is still attached");
    let leftovers: Vec<_> = fs::read_dir("/run/udev/rules.d")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("demo"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let scratch: Vec<_> = fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("flashbay-demo-"))
        .collect();
    assert!(scratch.is_empty(), "{scratch:?}");
}

/// udev-rules/90-flashbay.rules is what the generator makes for the
/// example configuration (only the source path in its first line differs).
#[test]
fn shipped_udev_rules_match_the_generator() {
    let bed = bed!();
    let out = bed.flashbay(&["udev-rules", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/etc/flashbay.yaml")]);
    assert!(out.status.success());
    let generated = String::from_utf8_lossy(&out.stdout);
    let shipped = include_str!("../../udev-rules/90-flashbay.rules");
    let body = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(body(shipped), body(&generated), "regenerate udev-rules/90-flashbay.rules");
}
