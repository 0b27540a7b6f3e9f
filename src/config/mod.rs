//! Configuration: YAML parsed by `serde_yaml` into a raw type, then validated
//! into [`Config`], a type every part of the daemon can use without
//! re-checking.
//!
//! Validation collects every problem rather than stopping at the first:
//! unknown keys (found by `serde_ignored` while deserialising), bad values,
//! duplicate slot names and ports. Each error
//! carries the line and column of the offending key or value, looked up in
//! an index of the document's nodes built with yaml-rust2's event parser.
//! A syntax or type error stops deserialisation, so it is reported alone,
//! at the location `serde_yaml` gives.

mod index;
mod validate;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::{EjectMode, Pattern, Role, SlotState, default_pattern};

pub const DEFAULT_PATH: &str = "/etc/flashbay/flashbay.yaml";
/// Local only unless the operator opens it up: the page shows card serials.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8088";

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::struct_excessive_bools)] // they are the configuration's switches
pub struct Config {
    /// The file this was read from; relative image paths are resolved
    /// against its directory.
    pub file: PathBuf,
    pub concurrency: usize,
    pub verify: bool,
    pub expand: bool,
    pub resize: bool,
    pub eject: EjectMode,
    pub flash_present_at_start: bool,
    pub status_file: PathBuf,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub slots: Vec<SlotConfig>,
    /// The HTTP endpoint; `None` when disabled.
    pub http: Option<HttpConfig>,
    pub leds: LedConfig,
    pub hooks: HooksConfig,
    /// Where each image is named in the file, in document order: messages
    /// about an image (checked by preparation, not here) point at the line.
    pub image_sites: Vec<ImageSite>,
}

/// An image path as written at a 1-based line and column of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSite {
    pub image: PathBuf,
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotConfig {
    pub name: String,
    /// udev `ID_PATH` of the port, without any `/dev/disk/by-path/` prefix.
    pub port: String,
    /// Absolute path of the image this slot writes.
    pub image: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Enables the control endpoints for clients that present it as a
    /// bearer token; without it the endpoint is read-only.
    pub control_token: Option<String>,
}

/// Commands run on slot events: argv, no shell unless the user writes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HooksConfig {
    pub on_state: Option<Vec<String>>,
    pub on_done: Option<Vec<String>>,
    pub on_failed: Option<Vec<String>>,
    pub timeout: Duration,
}

/// The LED setup of the whole station.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LedConfig {
    /// Normally /sys/class/leds; tests use a temporary tree.
    pub root: PathBuf,
    /// Per slot name: its LEDs by role.
    pub slots: Vec<(String, Vec<(Role, String)>)>,
    /// Patterns that replace the defaults.
    pub overrides: HashMap<(SlotState, Role), Pattern>,
}

impl LedConfig {
    pub fn pattern(&self, state: SlotState, role: Role) -> Pattern {
        self.overrides.get(&(state, role)).copied().unwrap_or_else(|| default_pattern(state, role))
    }
}

/// One problem in a configuration file, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Everything wrong with one configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            if e.line == 0 {
                write!(f, "{}: {}", self.file.display(), e.message)?;
            } else {
                write!(f, "{}:{}:{}: {}", self.file.display(), e.line, e.column, e.message)?;
            }
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(file: &Path) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigErrors {
            file: file.to_owned(),
            errors: vec![ConfigError { line: 0, column: 0, message: e.to_string() }],
        })?;
        Self::parse(file, &text)
    }

    /// Validates configuration text as if read from `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigErrors> {
        validate::parse(file, text)
    }

    /// The distinct images the slots use, in slot order.
    pub fn images(&self) -> Vec<&Path> {
        let mut images: Vec<&Path> = Vec::new();
        for slot in &self.slots {
            if !images.contains(&slot.image.as_path()) {
                images.push(&slot.image);
            }
        }
        images
    }

    /// A human-readable summary: settings and the slot table.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = format!(
            "concurrency {}, verify {}, expand {}, resize {}, eject {}, flash present at start {}\n",
            self.concurrency,
            yes(self.verify),
            yes(self.expand),
            yes(self.resize),
            self.eject.name(),
            yes(self.flash_present_at_start)
        );
        let name_w = self.slots.iter().map(|s| s.name.len()).max().unwrap_or(0).max(4);
        let port_w = self.slots.iter().map(|s| s.port.len()).max().unwrap_or(0).max(4);
        let _ = writeln!(out, "{:name_w$}  {:port_w$}  IMAGE", "SLOT", "PORT");
        for s in &self.slots {
            let _ = writeln!(out, "{:name_w$}  {:port_w$}  {}", s.name, s.port, s.image.display());
        }
        out
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults_and_relative_images() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("flashbay.yaml");
        let c =
            Config::parse(&file, "image: os.img\nslots:\n  - {name: A1, port: /dev/disk/by-path/pci-0:1}\n").unwrap();
        assert_eq!(c.concurrency, 2);
        assert!(c.verify && c.expand && c.resize && !c.flash_present_at_start);
        assert_eq!(c.eject, EjectMode::Sync);
        assert_eq!(c.slots[0].port, "pci-0:1");
        assert_eq!(c.slots[0].image, dir.path().join("os.img"));
        assert_eq!(c.status_file, PathBuf::from("/run/flashbay/status.json"));
    }

    #[test]
    fn every_error_is_reported_with_its_position() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.yaml");
        let text = "\
image: os.img
concurrency: 0
eject: yes-please
colour: blue
slots:
  - name: A1
    port: usb-1
  - name: A1
    port: usb-1
    speed: fast
  - name: B1
    port: usb-2
    image: missing.img.xz
";
        let err = Config::parse(&file, text).unwrap_err();
        let lines: Vec<String> =
            err.to_string().lines().map(|l| l.replace(&format!("{}:", file.display()), "")).collect();
        assert_eq!(
            lines,
            [
                "2:14: concurrency must be at least 1",
                "3:8: eject must be none, sync, eject or power-off, not `yes-please`",
                "4:1: unknown key `colour`",
                "8:11: duplicate slot name `A1` (first used on line 6)",
                "9:11: duplicate port `usb-1` (first used on line 7)",
                "10:5: unknown key `speed`",
            ]
        );
    }

    #[test]
    fn http_leds_and_hooks_are_parsed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.yaml");
        let ok = "image: os.img
http: {listen: 0.0.0.0:9000, control_token: t0ken}
leds: {root: /tmp/leds, states: {done: {green: blink 1000/100}}}
hooks: {on_done: \"beep -f 440 'x y'\", on_failed: [notify, fail], timeout: 5}
slots:
  - {name: A1, port: usb-1, leds: {green: a1g, red: a1r}}
  - {name: A2, port: usb-2, led: a2}
";
        let c = Config::parse(&file, ok).unwrap();
        let http = c.http.unwrap();
        assert_eq!((http.listen.port(), http.control_token.as_deref()), (9000, Some("t0ken")));
        assert_eq!(c.leds.pattern(SlotState::Done, Role::Green), Pattern::Blink { on_ms: 1000, off_ms: 100 });
        assert_eq!(
            c.leds.slots[0],
            ("A1".to_owned(), vec![(Role::Green, "a1g".to_owned()), (Role::Red, "a1r".to_owned())])
        );
        assert_eq!(c.leds.slots[1], ("A2".to_owned(), vec![(Role::Single, "a2".to_owned())]));
        assert_eq!(c.hooks.on_done.unwrap(), ["beep", "-f", "440", "x y"]);
        assert_eq!(c.hooks.timeout, Duration::from_secs(5));

        let bad = "image: os.img
http: {listen: somewhere}
leds: {states: {sleeping: {green: on}, done: {blue: on, red: dim}}}
hooks: {on_state: \"echo 'oops\"}
slots:
  - {name: A1, port: usb-1, leds: {amber: x}}
";
        let err = Config::parse(&file, bad).unwrap_err().to_string();
        for expected in [
            "2:16: http.listen must be IP:port like 0.0.0.0:8088, not `somewhere`",
            "3:17: unknown slot state `sleeping`",
            "3:47: LED role must be green, red or led, not `blue`",
            "3:62: LED pattern must be off, on or `blink ON/OFF` in ms (like blink 500/500), not `dim`",
            "4:19: hooks.on_state: unbalanced quotes in `echo 'oops`",
            "6:36: LED must be green or red, not `amber`",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
        }
        let off =
            Config::parse(&file, "image: os.img\nhttp: {enabled: false}\nslots: [{name: A1, port: usb-1}]\n").unwrap();
        assert_eq!(off.http, None);
    }

    #[test]
    fn validation_does_not_touch_images_but_locates_them() {
        let file = Path::new("/nonexistent/f.yaml");
        let text = "slots:\n  - {name: A1, port: usb-1, image: a.img}\nimage: gone.img\n";
        let c = Config::parse(file, text).unwrap();
        let sites: Vec<_> = c.image_sites.iter().map(|s| (s.image.to_str().unwrap(), s.line, s.column)).collect();
        assert_eq!(sites, [("/nonexistent/a.img", 2, 36), ("/nonexistent/gone.img", 3, 8)]);
    }

    #[test]
    fn type_errors_carry_serde_yaml_positions() {
        let err = Config::parse(Path::new("/x.yaml"), "concurrency: two\n").unwrap_err();
        assert_eq!(err.errors.len(), 1);
        assert_eq!((err.errors[0].line, err.errors[0].column), (1, 14));
        assert!(err.errors[0].message.contains("invalid type"), "{}", err.errors[0].message);
    }

    #[test]
    fn slots_without_image_or_port_are_errors() {
        let err = Config::parse(Path::new("/x.yaml"), "slots:\n  - name: A1\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/x.yaml:2:5: slot `A1` has no `port`"), "{text}");
        assert!(text.contains("/x.yaml:2:5: slot `A1` has no image"), "{text}");
        let err = Config::parse(Path::new("/x.yaml"), "").unwrap_err();
        assert!(err.to_string().contains("no slots configured"));
    }
}
