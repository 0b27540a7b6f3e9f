//! Configuration: YAML parsed by `serde_yaml` into a raw type, then validated
//! into [`Config`], a type every part of the daemon can use without
//! re-checking.
//!
//! Validation collects every problem rather than stopping at the first:
//! unknown keys (found by `serde_ignored` while deserialising), bad values,
//! duplicate slot names and ports, missing or unusable images. Each error
//! carries the line and column of the offending key or value, looked up in
//! an index of the document's nodes built with yaml-rust2's event parser.
//! A syntax or type error stops deserialisation, so it is reported alone,
//! at the location `serde_yaml` gives.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::image::Image;
pub use crate::pipeline::EjectMode;
use crate::report::leds::{LedConfig, Pattern, Role};
use crate::station::status::SlotState;

pub const DEFAULT_PATH: &str = "/etc/flashbay/flashbay.yaml";
/// More writers than any hub has ports; also keeps the semaphore in range.
const MAX_CONCURRENCY: u64 = 1024;
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
    /// Problems that do not stop the station, formatted `file:line:col: text`:
    /// an image that is missing or unusable fails only its slots' cards (and
    /// is retried for the next card, once fixed).
    pub warnings: Vec<String>,
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

#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    image: Option<PathBuf>,
    concurrency: Option<u64>,
    verify: Option<bool>,
    expand: Option<bool>,
    resize: Option<bool>,
    eject: Option<String>,
    flash_present_at_start: Option<bool>,
    status_file: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    http: Option<RawHttp>,
    leds: Option<RawLeds>,
    hooks: Option<RawHooks>,
    slots: Option<Vec<RawSlot>>,
}

#[derive(Debug, Default, Deserialize)]
struct RawSlot {
    name: Option<String>,
    port: Option<String>,
    image: Option<PathBuf>,
    /// `{green: NAME, red: NAME}`
    leds: Option<BTreeMap<String, String>>,
    /// A single LED.
    led: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawHttp {
    enabled: Option<bool>,
    listen: Option<String>,
    control_token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawLeds {
    root: Option<PathBuf>,
    /// state → role → pattern
    states: Option<BTreeMap<String, BTreeMap<String, String>>>,
}

#[derive(Debug, Default, Deserialize)]
struct RawHooks {
    on_state: Option<RawCommand>,
    on_done: Option<RawCommand>,
    on_failed: Option<RawCommand>,
    /// Seconds.
    timeout: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawCommand {
    Line(String),
    Argv(Vec<String>),
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
        // Relative image paths are relative to the file, wherever we run from.
        let file = &std::path::absolute(file).unwrap_or_else(|_| file.to_owned());
        let fail = |errors| ConfigErrors { file: file.to_owned(), errors };
        let mut unknown = Vec::new();
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            let de = serde_yaml::Deserializer::from_str(text);
            serde_ignored::deserialize(de, |path| unknown.push(key_path(&path)))
                .map_err(|e| fail(vec![yaml_error(&e)]))?
        };
        let index = Index::build(text);
        let mut v = Validator { index: &index, errors: Vec::new(), warnings: Vec::new() };
        for path in unknown {
            let (line, column) = index.locate_key(&path);
            let message = format!("unknown key `{}`", path.rsplit('.').next().unwrap_or(&path));
            v.errors.push(ConfigError { line, column, message });
        }
        let mut config = v.validate(file, raw);
        if v.errors.is_empty() {
            v.warnings.sort_by_key(|e| (e.line, e.column));
            config.warnings = v
                .warnings
                .iter()
                .map(|w| format!("{}:{}:{}: {}", file.display(), w.line, w.column, w.message))
                .collect();
            Ok(config)
        } else {
            v.errors.sort_by_key(|e| (e.line, e.column));
            Err(fail(v.errors))
        }
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

/// Slot names appear in journal fields, URLs and file names.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 32 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

struct Validator<'a> {
    index: &'a Index,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
}

impl Validator<'_> {
    fn error(&mut self, path: &str, message: String) {
        let (line, column) = self.index.locate(path);
        self.errors.push(ConfigError { line, column, message });
    }

    /// An error about a key itself (not its value), shown at the key.
    fn key_error(&mut self, path: &str, message: String) {
        let (line, column) = self.index.locate_key(path);
        self.errors.push(ConfigError { line, column, message });
    }

    /// An error about a whole slot, shown at the slot's first key.
    fn slot_error(&mut self, i: usize, message: String) {
        let first_key =
            self.index.keys.iter().filter(|(k, _)| k.starts_with(&format!("slots.{i}."))).map(|(_, &p)| p).min();
        let (line, column) = first_key.unwrap_or_else(|| self.index.locate(&format!("slots.{i}")));
        self.errors.push(ConfigError { line, column, message });
    }

    fn validate(&mut self, file: &Path, raw: RawConfig) -> Config {
        let base = file.parent().unwrap_or(Path::new("/"));
        let resolve = |p: &Path| if p.is_absolute() { p.to_owned() } else { base.join(p) };

        let concurrency = raw.concurrency.unwrap_or(2);
        if concurrency == 0 {
            self.error("concurrency", "concurrency must be at least 1".into());
        } else if concurrency > MAX_CONCURRENCY {
            self.error("concurrency", format!("concurrency must be at most {MAX_CONCURRENCY}"));
        }
        let eject = match raw.eject.as_deref().map(|s| (s, EjectMode::parse(s))) {
            None => EjectMode::Sync,
            Some((_, Some(mode))) => mode,
            Some((s, None)) => {
                self.error("eject", format!("eject must be none, sync, eject or power-off, not `{s}`"));
                EjectMode::Sync
            }
        };
        let default_image = raw.image.as_deref().map(resolve);
        if let Some(image) = &default_image {
            self.check_image("image", image);
        }

        let mut slots: Vec<SlotConfig> = Vec::new();
        let mut led_slots = Vec::new();
        let mut seen_names: HashMap<String, usize> = HashMap::new();
        let mut seen_ports: HashMap<String, usize> = HashMap::new();
        let raw_slots = raw.slots.unwrap_or_default();
        if raw_slots.is_empty() {
            self.error("slots", "no slots configured: add at least one under `slots:` (see `flashbay learn`)".into());
        }
        for (i, slot) in raw_slots.into_iter().enumerate() {
            let at = |key: &str| format!("slots.{i}.{key}");
            let name = slot.name.unwrap_or_default();
            if name.is_empty() {
                self.slot_error(i, format!("slot {} has no `name`", i + 1));
            } else if !valid_name(&name) {
                self.error(&at("name"), format!("slot name `{name}` may only use letters, digits and -_.: (up to 32)"));
            } else if let Some(first) = seen_names.insert(name.clone(), i) {
                let line = self.index.locate(&format!("slots.{first}.name")).0;
                self.error(&at("name"), format!("duplicate slot name `{name}` (first used on line {line})"));
            }
            let port = slot.port.unwrap_or_default();
            let port = port.strip_prefix("/dev/disk/by-path/").unwrap_or(&port).to_owned();
            if port.is_empty() {
                self.slot_error(i, format!("slot `{name}` has no `port` (its udev ID_PATH)"));
            } else if port.contains(['/', ' ']) {
                self.error(&at("port"), format!("port `{port}` is not a udev ID_PATH"));
            } else if let Some(first) = seen_ports.insert(port.clone(), i) {
                let line = self.index.locate(&format!("slots.{first}.port")).0;
                self.error(&at("port"), format!("duplicate port `{port}` (first used on line {line})"));
            }
            let image = match (slot.image.as_deref().map(resolve), &default_image) {
                (Some(own), _) => {
                    self.check_image(&at("image"), &own);
                    own
                }
                (None, Some(default)) => default.clone(),
                (None, None) => {
                    self.slot_error(i, format!("slot `{name}` has no image: set `image:` at the top or on the slot"));
                    PathBuf::new()
                }
            };
            led_slots.push((name.clone(), self.slot_leds(i, slot.leds, slot.led)));
            slots.push(SlotConfig { name, port, image });
        }

        let dir = |p: Option<PathBuf>, default: &str| p.map_or_else(|| PathBuf::from(default), |p| resolve(&p));
        Config {
            file: file.to_owned(),
            concurrency: usize::try_from(concurrency).unwrap_or(usize::MAX),
            verify: raw.verify.unwrap_or(true),
            expand: raw.expand.unwrap_or(true),
            resize: raw.resize.unwrap_or(true),
            eject,
            flash_present_at_start: raw.flash_present_at_start.unwrap_or(false),
            status_file: dir(raw.status_file, "/run/flashbay/status.json"),
            state_dir: dir(raw.state_dir, "/var/lib/flashbay"),
            cache_dir: dir(raw.cache_dir, "/var/cache/flashbay"),
            slots,
            http: self.http(raw.http.unwrap_or_default()),
            leds: self.leds(raw.leds.unwrap_or_default(), led_slots),
            hooks: self.hooks(raw.hooks.unwrap_or_default()),
            warnings: Vec::new(),
        }
    }

    fn http(&mut self, raw: RawHttp) -> Option<HttpConfig> {
        if raw.enabled == Some(false) {
            return None;
        }
        let listen = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen.parse().unwrap_or_else(|_| {
            self.error("http.listen", format!("http.listen must be IP:port like 0.0.0.0:8088, not `{listen}`"));
            SocketAddr::from(([127, 0, 0, 1], 8088))
        });
        if raw.control_token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            self.error("http.control_token", "http.control_token is empty: remove it or set a secret".into());
        }
        Some(HttpConfig { listen, control_token: raw.control_token.filter(|t| !t.trim().is_empty()) })
    }

    fn leds(&mut self, raw: RawLeds, slots: Vec<(String, Vec<(Role, String)>)>) -> LedConfig {
        let mut overrides = HashMap::new();
        for (state_name, roles) in raw.states.unwrap_or_default() {
            let at = format!("leds.states.{state_name}");
            let Some(state) = SlotState::parse(&state_name) else {
                self.key_error(&at, format!("unknown slot state `{state_name}`"));
                continue;
            };
            for (role_name, pattern) in roles {
                let at = format!("{at}.{role_name}");
                match (Role::parse(&role_name), Pattern::parse(&pattern)) {
                    (None, _) => self.key_error(&at, format!("LED role must be green, red or led, not `{role_name}`")),
                    (_, Err(e)) => self.error(&at, e),
                    (Some(role), Ok(p)) => {
                        overrides.insert((state, role), p);
                    }
                }
            }
        }
        LedConfig { root: raw.root.unwrap_or_else(|| PathBuf::from("/sys/class/leds")), slots, overrides }
    }

    fn slot_leds(
        &mut self,
        i: usize,
        leds: Option<BTreeMap<String, String>>,
        led: Option<String>,
    ) -> Vec<(Role, String)> {
        let mut out = Vec::new();
        if let Some(name) = led {
            out.push((Role::Single, name));
        }
        for (role_name, name) in leds.unwrap_or_default() {
            match Role::parse(&role_name) {
                Some(Role::Green | Role::Red) if out.iter().any(|(r, _)| *r == Role::Single) => {
                    self.error(&format!("slots.{i}.leds"), "use either `led:` or `leds:`, not both".into());
                }
                Some(role @ (Role::Green | Role::Red)) => out.push((role, name)),
                _ => self.key_error(
                    &format!("slots.{i}.leds.{role_name}"),
                    format!("LED must be green or red, not `{role_name}`"),
                ),
            }
        }
        out
    }

    fn hooks(&mut self, raw: RawHooks) -> HooksConfig {
        let mut command = |key: &str, raw: Option<RawCommand>| -> Option<Vec<String>> {
            let argv = match raw? {
                RawCommand::Argv(v) => v,
                RawCommand::Line(line) => {
                    let Some(argv) = shlex::split(&line) else {
                        self.error(&format!("hooks.{key}"), format!("hooks.{key}: unbalanced quotes in `{line}`"));
                        return None;
                    };
                    argv
                }
            };
            if argv.first().is_none_or(String::is_empty) {
                self.error(&format!("hooks.{key}"), format!("hooks.{key} is empty"));
                return None;
            }
            Some(argv)
        };
        let on_state = command("on_state", raw.on_state);
        let on_done = command("on_done", raw.on_done);
        let on_failed = command("on_failed", raw.on_failed);
        if raw.timeout == Some(0) {
            self.error("hooks.timeout", "hooks.timeout must be at least 1 (seconds)".into());
        }
        HooksConfig { on_state, on_done, on_failed, timeout: Duration::from_secs(raw.timeout.unwrap_or(30).max(1)) }
    }

    /// An image should exist and be a format we can write; saying so here
    /// turns "the first card failed" into a pointer at the line to fix.
    fn check_image(&mut self, path_key: &str, image: &Path) {
        if let Err(e) = Image::open(image) {
            let (line, column) = self.index.locate(path_key);
            self.warnings.push(ConfigError { line, column, message: format!("image {e}") });
        }
    }
}

/// Dotted path (`slots.1.port`) of a node, as the index keys it.
fn key_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => join(&key_path(parent), &index.to_string()),
        P::Map { parent, key } => join(&key_path(parent), key),
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => key_path(parent),
    }
}

fn join(parent: &str, segment: &str) -> String {
    if parent.is_empty() { segment.to_owned() } else { format!("{parent}.{segment}") }
}

fn yaml_error(e: &serde_yaml::Error) -> ConfigError {
    let message = e.to_string();
    match e.location() {
        Some(loc) => {
            // serde_yaml appends the location to the message; we print it first.
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            let message = message.replace(&suffix, "");
            ConfigError { line: loc.line(), column: loc.column(), message }
        }
        None => ConfigError { line: 0, column: 0, message },
    }
}

/// Where each node of a YAML document starts, by dotted path, with 1-based
/// lines and columns: values for "bad value" errors, keys for "unknown key".
#[derive(Debug, Default)]
struct Index {
    values: HashMap<String, (usize, usize)>,
    keys: HashMap<String, (usize, usize)>,
}

impl Index {
    fn build(text: &str) -> Self {
        let mut builder = IndexBuilder::default();
        // A document that serde_yaml accepted parses here too; if not, errors
        // just lose their positions.
        let _ = yaml_rust2::parser::Parser::new_from_str(text).load(&mut builder, false);
        builder.index
    }

    /// Where the value at `path` starts, or its nearest located ancestor.
    fn locate(&self, path: &str) -> (usize, usize) {
        let mut p = path;
        loop {
            if let Some(&pos) = self.values.get(p) {
                return pos;
            }
            match p.rfind('.') {
                Some(i) => p = &p[..i],
                None => return self.values.get("").copied().unwrap_or((1, 1)),
            }
        }
    }

    fn locate_key(&self, path: &str) -> (usize, usize) {
        self.keys.get(path).copied().unwrap_or_else(|| self.locate(path))
    }
}

#[derive(Default)]
struct IndexBuilder {
    index: Index,
    /// Open containers: for a mapping, the key awaiting its value.
    stack: Vec<Frame>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

impl IndexBuilder {
    /// Path of the node that starts now, advancing the parent past it.
    /// `None` when the node is a mapping key (recorded, not a value).
    fn next_node(&mut self, scalar: Option<&str>, pos: (usize, usize)) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = join(path, &next.to_string());
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => {
                if let Some(k) = key.take() {
                    return Some(join(path, &k));
                }
                let k = scalar.unwrap_or_default().to_owned();
                self.index.keys.insert(join(path, &k), pos);
                *key = Some(k);
                None
            }
        }
    }
}

impl yaml_rust2::parser::MarkedEventReceiver for IndexBuilder {
    fn on_event(&mut self, ev: yaml_rust2::parser::Event, mark: yaml_rust2::scanner::Marker) {
        use yaml_rust2::parser::Event;
        // yaml-rust2 columns are 0-based (despite its docs); ours are 1-based.
        let pos = (mark.line(), mark.col() + 1);
        match ev {
            Event::Scalar(value, ..) => {
                if let Some(path) = self.next_node(Some(&value), pos) {
                    self.index.values.insert(path, pos);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = self.next_node(None, pos).unwrap_or_default();
                self.index.values.insert(path.clone(), pos);
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { path, key: None }
                } else {
                    Frame::Seq { path, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Alias(_) => {
                let _ = self.next_node(None, pos);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path) -> PathBuf {
        let p = dir.join("os.img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        p
    }

    #[test]
    fn minimal_config_gets_defaults_and_relative_images() {
        let dir = tempfile::tempdir().unwrap();
        image(dir.path());
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
        image(dir.path());
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
        image(dir.path());
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
    fn missing_image_file_is_a_located_warning() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.yaml");
        let c = Config::parse(&file, "image: gone.img\nslots:\n  - {name: A1, port: usb-1}\n").unwrap();
        let gone = dir.path().join("gone.img");
        assert_eq!(
            c.warnings,
            [format!("{}:1:8: image {}: No such file or directory (os error 2)", file.display(), gone.display())]
        );
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
