//! Hooks: commands the operator configures to run when a slot changes
//! state (`on_state`), finishes a card (`on_done`) or fails one
//! (`on_failed`, for `failed` and `refused`): buzzers, label printers,
//! GPIO lines through libgpiod's tools.
//!
//! A hook is an argv, run without a shell (write `sh -c '…'` for one), with
//! `FLASHBAY_SLOT`, `FLASHBAY_STATE`, `FLASHBAY_DEVNAME`, `FLASHBAY_SERIAL`,
//! `FLASHBAY_IMAGE` and `FLASHBAY_ERROR` in its environment. It is killed at
//! its timeout; its failure is logged, never fatal, and it never holds up
//! the station (hooks run on their own, a few at a time).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;

use tokio::sync::{Semaphore, broadcast, watch};

use crate::config::Config;
use crate::model::SlotState;
use crate::station::status::{Event, SlotStatus};

/// Hooks running at once; more wait their turn.
const PARALLEL: usize = 4;

/// Follows slot changes until the station stops.
pub async fn run(config: watch::Receiver<Arc<Config>>, mut events: broadcast::Receiver<Event>) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(PARALLEL));
    let mut last: HashMap<String, SlotState> = HashMap::new();
    loop {
        let slot = match events.recv().await {
            Ok(Event::Slot(slot)) => slot,
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("hooks missed {n} events");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        };
        // Progress updates repeat the state; hooks fire on changes only.
        if last.insert(slot.name.clone(), slot.state) == Some(slot.state) {
            continue;
        }
        let hooks = config.borrow().hooks.clone();
        let finished = match slot.state {
            SlotState::Done => hooks.on_done.as_ref(),
            SlotState::Failed | SlotState::Refused => hooks.on_failed.as_ref(),
            _ => None,
        };
        for argv in [hooks.on_state.as_ref(), finished].into_iter().flatten() {
            let (argv, slot, permits) = (argv.clone(), Arc::clone(&slot), Arc::clone(&permits));
            tokio::spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else { return };
                if let Err(e) = run_one(&argv, &slot, hooks.timeout).await {
                    tracing::warn!(slot = %slot.name, "hook {}: {e}", argv.join(" "));
                }
            });
        }
    }
}

async fn run_one(argv: &[String], slot: &SlotStatus, timeout: std::time::Duration) -> Result<(), String> {
    let (program, rest) = argv.split_first().ok_or("empty command")?;
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let child = tokio::process::Command::new(program)
        .args(rest)
        .env("FLASHBAY_SLOT", &slot.name)
        .env("FLASHBAY_STATE", slot.state.name())
        .env("FLASHBAY_DEVNAME", slot.device.as_ref().map(|d| d.display().to_string()).unwrap_or_default())
        .env("FLASHBAY_SERIAL", text(&slot.serial))
        .env("FLASHBAY_IMAGE", slot.image.display().to_string())
        .env("FLASHBAY_ERROR", text(&slot.error))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Err(format!("killed after {timeout:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            Err(format!("{}: {}", out.status, stderr.trim()))
        }
    }
}
