//! The vocabulary every part of flashbay shares: slot states, job stages,
//! the stop switch of a job, eject modes, LED patterns and roles. Plain data with their names and
//! parsers; this module depends on nothing else in the crate, so config,
//! station, pipeline and report can all use it without depending on each
//! other.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

/// The state of one slot. The names are part of the interface: they appear
/// in the status file, the journal and the HTTP API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// No card.
    Empty,
    /// A card waits for a free writer (or for its image to be prepared).
    Queued,
    Writing,
    Verifying,
    Expanding,
    Resizing,
    Ejecting,
    /// Finished; stays until the card is removed.
    Done,
    /// Failed; stays until the card is removed (or, if the card was pulled
    /// mid-job, until the next card arrives).
    Failed,
    /// The safety checks refused the card (too small, write-protected, …).
    Refused,
    /// Present at startup and left alone (`flash_present_at_start: false`).
    Present,
}

impl SlotState {
    pub const ALL: [Self; 11] = [
        Self::Empty,
        Self::Queued,
        Self::Writing,
        Self::Verifying,
        Self::Expanding,
        Self::Resizing,
        Self::Ejecting,
        Self::Done,
        Self::Failed,
        Self::Refused,
        Self::Present,
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Queued => "queued",
            Self::Writing => "writing",
            Self::Verifying => "verifying",
            Self::Expanding => "expanding",
            Self::Resizing => "resizing",
            Self::Ejecting => "ejecting",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Refused => "refused",
            Self::Present => "present",
        }
    }

    /// A job is working on the card.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Writing | Self::Verifying | Self::Expanding | Self::Resizing | Self::Ejecting)
    }
}

impl fmt::Display for SlotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// --- Job stages ---

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Write,
    Verify,
    Expand,
    Resize,
    Eject,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Write => "write",
            Stage::Verify => "verify",
            Stage::Expand => "expand",
            Stage::Resize => "resize",
            Stage::Eject => "eject",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageResult {
    Done,
    Skipped,
    Failed,
}

/// What a stage did, with why and how long; part of every job's record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageOutcome {
    pub stage: Stage,
    pub result: StageResult,
    pub detail: String,
    pub seconds: f64,
}

// --- Stopping a job ---

/// Asks a running job to stop at its next chunk.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// The flag, for a tool that must die with the job.
    pub fn stop_flag(&self) -> &AtomicBool {
        &self.0
    }

    /// The flag itself, for `signal_hook::flag::register`.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0)
    }
}

// --- Eject ---

/// How a card is handed back after its job (`eject:` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EjectMode {
    None,
    Sync,
    Eject,
    PowerOff,
}

impl EjectMode {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Self::None,
            "sync" => Self::Sync,
            "eject" => Self::Eject,
            "power-off" => Self::PowerOff,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Sync => "sync",
            Self::Eject => "eject",
            Self::PowerOff => "power-off",
        }
    }
}

// --- LEDs ---

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

/// The pattern of an LED when the operator did not choose one:
///
/// | state                        | green + red          | single LED      |
/// |------------------------------|----------------------|-----------------|
/// | empty, present               | off                  | off             |
/// | queued                       | green blink 1000/1000| blink 1000/1000 |
/// | writing                      | green blink 500/500  | blink 500/500   |
/// | verifying, expanding, resizing, ejecting | green blink 100/100 | blink 250/250 |
/// | done                         | green on             | on              |
/// | failed, refused              | red on               | blink 100/100   |
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
