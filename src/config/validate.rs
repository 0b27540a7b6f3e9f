//! From the raw YAML types to a [`Config`]: every value checked, every
//! problem collected with its position. Pure: nothing here reads a file or
//! looks at an image (preparation does that, [`crate::station::check_images`]).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::index::{Index, key_path, yaml_error};
use super::{
    Config, ConfigError, ConfigErrors, DEFAULT_LISTEN, HooksConfig, HttpConfig, ImageSite, LedConfig, SlotConfig,
};
use crate::model::{EjectMode, Pattern, Role, SlotState};

/// More writers than any hub has ports.
const MAX_CONCURRENCY: u64 = 1024;

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

/// Validates configuration text as if read from `file`.
pub(super) fn parse(file: &Path, text: &str) -> Result<Config, ConfigErrors> {
    // Relative image paths are relative to the file, wherever we run from.
    let file = &std::path::absolute(file).unwrap_or_else(|_| file.to_owned());
    let fail = |errors| ConfigErrors { file: file.to_owned(), errors };
    let mut unknown = Vec::new();
    let raw: RawConfig = if text.trim().is_empty() {
        RawConfig::default()
    } else {
        let de = serde_yaml::Deserializer::from_str(text);
        serde_ignored::deserialize(de, |path| unknown.push(key_path(&path))).map_err(|e| fail(vec![yaml_error(&e)]))?
    };
    let index = Index::build(text);
    let mut v = Validator { index: &index, errors: Vec::new(), image_sites: Vec::new() };
    for path in unknown {
        let (line, column) = index.locate_key(&path);
        let message = format!("unknown key `{}`", path.rsplit('.').next().unwrap_or(&path));
        v.errors.push(ConfigError { line, column, message });
    }
    let mut config = v.validate(file, raw);
    if v.errors.is_empty() {
        v.image_sites.sort_by_key(|s| (s.line, s.column));
        config.image_sites = v.image_sites;
        Ok(config)
    } else {
        v.errors.sort_by_key(|e| (e.line, e.column));
        Err(fail(v.errors))
    }
}

/// Slot names appear in journal fields, URLs and file names.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 32 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

struct Validator<'a> {
    index: &'a Index,
    errors: Vec<ConfigError>,
    image_sites: Vec<ImageSite>,
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
        let first_key = self.index.first_key_under(&format!("slots.{i}."));
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
            self.image_site("image", image);
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
                    self.image_site(&at("image"), &own);
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
            image_sites: Vec::new(),
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

    fn image_site(&mut self, path_key: &str, image: &Path) {
        let (line, column) = self.index.locate(path_key);
        self.image_sites.push(ImageSite { image: image.to_owned(), line, column });
    }
}
