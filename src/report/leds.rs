//! LEDs beside the ports, through the Linux LED class
//! (`/sys/class/leds/NAME/{brightness,trigger,delay_on,delay_off}`).
//!
//! Each slot may name a green and a red LED, or a single one. A state maps
//! to a pattern per LED (overridable in the config).
//! Blinking is the kernel's `timer` trigger, so the LEDs keep blinking
//! without us. A missing LED is reported once at startup and skipped; a
//! failed write is a warning: LEDs never fail a job. The default patterns are
//! [`crate::model::default_pattern`]'s table.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{Config, LedConfig};
use crate::model::{Pattern, Role};
use crate::station::status::Snapshot;

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
