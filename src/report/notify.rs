//! systemd notifications: `READY=1`, a one-line `STATUS=`, `RELOADING=1`
//! around reloads, `STOPPING=1`, and `WATCHDOG=1` pings that are sent only
//! while the station's event loop is demonstrably turning.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call is a no-op.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::station::status::Snapshot;

pub fn ready() {
    send(&[NotifyState::Ready]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

/// Keeps `STATUS=` current and feeds the watchdog until `shutdown`.
pub async fn run(
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    heartbeat: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let watchdog = sd_notify::watchdog_enabled();
    // Half the timeout, as systemd recommends; a day when there is no watchdog.
    let period = watchdog.map_or(std::time::Duration::from_secs(86_400), |t| t / 2);
    let mut ping = tokio::time::interval(period);
    let mut last_beat = heartbeat.load(Ordering::Relaxed);
    let mut last_status = String::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let status = snapshots.borrow_and_update().summary.to_string();
                if status != last_status {
                    send(&[NotifyState::Status(&status)]);
                    last_status = status;
                }
            }
            _ = ping.tick(), if watchdog.is_some() => {
                let beat = heartbeat.load(Ordering::Relaxed);
                if beat == last_beat {
                    tracing::error!("station loop made no progress for {period:?}; withholding the watchdog ping");
                } else {
                    send(&[NotifyState::Watchdog]);
                    last_beat = beat;
                }
            }
        }
    }
}
