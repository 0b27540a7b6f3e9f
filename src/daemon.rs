//! `flashbay run`: wires the parts together, in the order they depend on
//! each other, and runs them until a signal says stop.
//!
//! udev thread → station task → reporters (status file, systemd), with
//! signals for reload and shutdown. The configuration is validated before
//! anything starts; an invalid one is refused with every error listed.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::report::metrics::Metrics;
use crate::report::{hooks, http, leds, notify, status_file};
use crate::station::{self, Msg, Station};
use crate::tasks::Tasks;

pub async fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let config = Arc::new(Config::load(&config_path)?);
    require_diskseq(std::path::Path::new("/sys"))?;
    tracing::info!("starting with {} slots, concurrency {}", config.slots.len(), config.concurrency);
    for warning in station::check_images(&config) {
        tracing::warn!("{warning}");
    }
    let shutdown = CancellationToken::new();
    let mut tasks = Tasks::new(shutdown.clone());
    // Signals first, so that none is lost while the rest starts.
    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

    // Bind before anything else runs: a taken port is a startup error.
    let listener = match &config.http {
        Some(h) => Some(http::bind(h.listen).await?),
        None => None,
    };
    let url = listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| format!("http://{a}"));
    let (config_tx, config_rx) = watch::channel(Arc::clone(&config));

    let (devices_tx, devices) = mpsc::channel(256);
    let (rescan_tx, rescan) = mpsc::channel(4);
    // Cards a previous run left mid-job lose their tables before udev is read.
    let interrupted = crate::station::inflight::leftovers(&config.state_dir);
    if !interrupted.is_empty() {
        let jobs = interrupted.clone();
        tokio::task::spawn_blocking(move || crate::station::inflight::recover(&jobs)).await?;
    }
    let (station, handles) = Station::new(Arc::clone(&config), rescan_tx, url.clone(), interrupted);
    // Followers subscribe before the station runs, so they miss nothing.
    let hook_events = handles.events.resubscribe();
    tasks.spawn("station", station.run(devices, shutdown.clone()));
    tasks.spawn("status-file", status_file::run(config.status_file.clone(), handles.snapshots.clone()));
    tasks.spawn("notify", notify::run(handles.snapshots.clone(), Arc::clone(&handles.heartbeat), shutdown.clone()));
    tasks.spawn("leds", leds::run(config_rx.clone(), handles.snapshots.clone()));
    tasks.spawn("hooks", hooks::run(config_rx.clone(), hook_events));
    if let (Some(listener), Some(url)) = (listener, &url) {
        let metrics = Arc::new(Metrics);
        let state = http::Http::new(handles.snapshots.clone(), handles.events, handles.tx.clone(), config_rx, metrics);
        tasks.spawn("http", http::serve(listener, state, shutdown.clone()));
        tracing::info!("status page at {url}");
    }

    let (ready_tx, ready) = oneshot::channel();
    let udev =
        crate::udev::spawn(devices_tx, rescan, ready_tx, shutdown.clone()).context("cannot start udev thread")?;
    tasks.spawn("udev", async move {
        tokio::task::spawn_blocking(move || udev.join())
            .await?
            .map_err(|_| anyhow::anyhow!("udev thread panicked"))?
            .context("udev monitor")
    });
    ready.await.context("udev thread ended before listening")?.context("cannot listen to udev")?;
    notify::ready();
    tracing::info!("ready: listening for cards");

    let station = handles.tx.clone();
    let stop = shutdown.clone();
    tasks.spawn("signals", async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                _ = hangup.recv() => reload(&config_path, &station, &config_tx).await,
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        tracing::info!("stopping: interrupting running jobs");
        notify::stopping();
        stop.cancel();
        Ok(())
    });
    tasks.supervise().await
}

/// The station tells one card from the next, and checks the card before
/// every write that matters, by the kernel's DISKSEQ (Linux 5.15). Without
/// it a swapped card could get the rest of another card's job: refuse.
fn require_diskseq(sysfs: &std::path::Path) -> anyhow::Result<()> {
    let found = std::fs::read_dir(sysfs.join("block"))
        .is_ok_and(|mut entries| entries.any(|e| e.is_ok_and(|e| e.path().join("diskseq").exists())));
    anyhow::ensure!(
        found,
        "this kernel does not report DISKSEQ ({}/block/*/diskseq is missing): flashbay needs Linux 5.15 or later to tell one card from the next",
        sysfs.display()
    );
    Ok(())
}

/// SIGHUP: read and validate the configuration again; apply it only if it
/// is valid. Jobs in flight keep the settings they started with.
async fn reload(config_path: &std::path::Path, station: &mpsc::Sender<Msg>, current: &watch::Sender<Arc<Config>>) {
    notify::reloading();
    let path = config_path.to_owned();
    match tokio::task::spawn_blocking(move || Config::load(&path).map(|c| (station::check_images(&c), c))).await {
        Ok(Ok((warnings, config))) => {
            for warning in warnings {
                tracing::warn!("{warning}");
            }
            if config.http.as_ref().map(|h| h.listen) != current.borrow().http.as_ref().map(|h| h.listen) {
                tracing::warn!("http.listen changes take effect at the next restart");
            }
            let config = Arc::new(config);
            let (done, applied) = oneshot::channel();
            if station.send(Msg::Reload { config: Arc::clone(&config), done }).await.is_ok() {
                let _ = applied.await;
            }
            current.send_replace(config);
        }
        Ok(Err(errors)) => {
            for line in errors.to_string().lines() {
                tracing::error!("reload refused, keeping the running configuration: {line}");
            }
        }
        Err(e) => tracing::error!("reload failed: {e}"),
    }
    notify::ready();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_without_diskseq_is_refused_with_the_reason() {
        let sys = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(sys.path().join("block/sda")).unwrap();
        let err = require_diskseq(sys.path()).unwrap_err().to_string();
        assert!(err.contains("DISKSEQ") && err.contains("5.15"), "{err}");
        std::fs::write(sys.path().join("block/sda/diskseq"), "3\n").unwrap();
        require_diskseq(sys.path()).unwrap();
    }
}
