//! LEDs beside the ports, through the Linux LED class
//! (`/sys/class/leds/NAME/{brightness,trigger,delay_on,delay_off}`).
//!
//! Each slot may name a green and a red LED, or a single one. A state maps
//! to a pattern per LED (documented below, overridable in the config).
//! Blinking is the kernel's `timer` trigger, so the LEDs keep blinking
//! without us. A missing LED is reported once at startup and skipped; a
//! failed write is a warning: LEDs never fail a job.
//!
//! Default mapping:
//!
//! | state                        | green + red          | single LED      |
//! |------------------------------|----------------------|-----------------|
//! | empty, present               | off                  | off             |
//! | queued                       | green blink 1000/1000| blink 1000/1000 |
//! | writing                      | green blink 500/500  | blink 500/500   |
//! | verifying, expanding, resizing, ejecting | green blink 100/100 | blink 250/250 |
//! | done                         | green on             | on              |
//! | failed, refused              | red on               | blink 100/100   |

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::station::status::{SlotState, Snapshot};

/// What one LED does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Off,
    On,
    Blink { on_ms: u32, off_ms: u32 },
}

impl Pattern {
    /// `off`, `on`, or `blink ON/OFF` (milliseconds, e.g. `blink 500/500`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "off" => return Ok(Self::Off),
            "on" => return Ok(Self::On),
            _ => {}
        }
        let times = s.strip_prefix("blink").map(str::trim);
        let parsed = times.and_then(|t| {
            let (on, off) = t.split_once('/')?;
            Some((on.trim().parse().ok()?, off.trim().parse().ok()?))
        });
        match parsed {
            Some((on_ms, off_ms)) if on_ms > 0 && off_ms > 0 => Ok(Self::Blink { on_ms, off_ms }),
            _ => Err(format!("LED pattern must be off, on or `blink ON/OFF` in ms (like blink 500/500), not `{s}`")),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::On => f.write_str("on"),
            Self::Blink { on_ms, off_ms } => write!(f, "blink {on_ms}/{off_ms}"),
        }
    }
}

/// Which LED of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Green,
    Red,
    /// The only LED of a slot.
    Single,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "green" => Self::Green,
            "red" => Self::Red,
            "led" => Self::Single,
            _ => return None,
        })
    }
}

#[allow(clippy::match_same_arms)] // one arm per row of the table above
pub fn default_pattern(state: SlotState, role: Role) -> Pattern {
    use SlotState as S;
    let blink = |on_ms, off_ms| Pattern::Blink { on_ms, off_ms };
    let failed = matches!(state, S::Failed | S::Refused);
    match (role, state) {
        (Role::Red, _) => {
            if failed {
                Pattern::On
            } else {
                Pattern::Off
            }
        }
        (_, S::Empty | S::Present) => Pattern::Off,
        (_, S::Queued) => blink(1000, 1000),
        (_, S::Writing) => blink(500, 500),
        (Role::Single, S::Verifying | S::Expanding | S::Resizing | S::Ejecting) => blink(250, 250),
        (_, S::Verifying | S::Expanding | S::Resizing | S::Ejecting) => blink(100, 100),
        (_, S::Done) => Pattern::On,
        (Role::Single, S::Failed | S::Refused) => blink(100, 100),
        (_, S::Failed | S::Refused) => Pattern::Off,
    }
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

/// Follows the station and sets every configured LED; picks up new LED
/// settings on reload; ends when the station stops publishing.
pub async fn run(
    mut config: watch::Receiver<Arc<Config>>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
) -> anyhow::Result<()> {
    let mut setup = open(&config.borrow_and_update().leds);
    let mut shown: HashMap<(String, Role), Pattern> = HashMap::new();
    // The configuration stops changing when the daemon stops; without this
    // the closed channel would be ready on every turn of the loop.
    let mut config_open = true;
    loop {
        let snapshot = Arc::clone(&snapshots.borrow_and_update());
        for (slot, role, led) in &setup.leds {
            let Some(state) = snapshot.slots.iter().find(|s| &s.name == slot).map(|s| s.state) else { continue };
            let pattern = setup.config.pattern(state, *role);
            if shown.get(&(slot.clone(), *role)) != Some(&pattern) {
                if let Err(e) = led.set(pattern) {
                    tracing::warn!(slot = %slot, "LED {}: {e}", led.dir.display());
                }
                shown.insert((slot.clone(), *role), pattern);
            }
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return Ok(()) },
            changed = config.changed(), if config_open => {
                config_open = changed.is_ok();
                if config_open && config.borrow().leds != setup.config {
                    setup = open(&config.borrow_and_update().leds);
                    shown.clear();
                }
            }
        }
    }
}

/// The LEDs that exist, by slot and role; missing ones are reported once.
struct Setup {
    config: LedConfig,
    leds: Vec<(String, Role, Led)>,
}

fn open(config: &LedConfig) -> Setup {
    let mut leds = Vec::new();
    for (slot, roles) in &config.slots {
        for (role, name) in roles {
            match Led::open(&config.root, name) {
                Ok(led) => leds.push((slot.clone(), *role, led)),
                Err(e) => tracing::warn!(slot = %slot, "LED {name} skipped: {e}"),
            }
        }
    }
    Setup { config: config.clone(), leds }
}

/// One LED class device.
#[derive(Debug)]
struct Led {
    dir: PathBuf,
    max: String,
}

impl Led {
    fn open(root: &Path, name: &str) -> std::io::Result<Self> {
        let dir = root.join(name);
        if !dir.join("brightness").exists() {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("no LED at {}", dir.display())));
        }
        let max = std::fs::read_to_string(dir.join("max_brightness"))
            .map_or_else(|_| "1".to_owned(), |s| s.trim().to_owned());
        Ok(Self { dir, max })
    }

    fn set(&self, pattern: Pattern) -> std::io::Result<()> {
        let write = |file: &str, value: &str| std::fs::write(self.dir.join(file), value);
        match pattern {
            Pattern::Off => {
                write("trigger", "none")?;
                write("brightness", "0")
            }
            Pattern::On => {
                write("trigger", "none")?;
                write("brightness", &self.max)
            }
            Pattern::Blink { on_ms, off_ms } => {
                // The timer trigger creates delay_on/delay_off when selected.
                write("trigger", "timer")?;
                write("delay_on", &on_ms.to_string())?;
                write("delay_off", &off_ms.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_patterns() {
        assert_eq!(Pattern::parse("off"), Ok(Pattern::Off));
        assert_eq!(Pattern::parse(" on "), Ok(Pattern::On));
        assert_eq!(Pattern::parse("blink 500/250"), Ok(Pattern::Blink { on_ms: 500, off_ms: 250 }));
        assert!(Pattern::parse("blink 0/5").is_err());
        assert!(Pattern::parse("fast").is_err());
    }

    #[test]
    fn default_mapping_matches_the_documentation() {
        use SlotState as S;
        assert_eq!(default_pattern(S::Empty, Role::Green), Pattern::Off);
        assert_eq!(default_pattern(S::Queued, Role::Green), Pattern::Blink { on_ms: 1000, off_ms: 1000 });
        assert_eq!(default_pattern(S::Writing, Role::Green), Pattern::Blink { on_ms: 500, off_ms: 500 });
        assert_eq!(default_pattern(S::Writing, Role::Red), Pattern::Off);
        assert_eq!(default_pattern(S::Verifying, Role::Green), Pattern::Blink { on_ms: 100, off_ms: 100 });
        assert_eq!(default_pattern(S::Done, Role::Green), Pattern::On);
        assert_eq!(default_pattern(S::Done, Role::Red), Pattern::Off);
        assert_eq!(default_pattern(S::Failed, Role::Red), Pattern::On);
        assert_eq!(default_pattern(S::Failed, Role::Green), Pattern::Off);
        assert_eq!(default_pattern(S::Refused, Role::Single), Pattern::Blink { on_ms: 100, off_ms: 100 });
        assert_eq!(default_pattern(S::Done, Role::Single), Pattern::On);
    }
}
