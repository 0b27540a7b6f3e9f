//! Whole-disk block devices from udev, as owned [`DeviceEvent`] values:
//! first the disks already present (coldplug), then live events.
//!
//! libudev handles are not `Send`, so the monitor lives on its own thread
//! with a single-threaded runtime driving tokio-udev; each event is turned
//! into a `DeviceEvent` right where it is read, and nothing past this module
//! knows about libudev. The monitor is opened before enumerating, so no
//! event between the two is lost; duplicates are harmless because the
//! station identifies media by DISKSEQ.

use std::ffi::OsStr;
use std::path::PathBuf;

use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Present when we started (or re-listed after a reload).
    Existing,
    Add,
    Change,
    Remove,
}

/// One whole disk as udev reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEvent {
    pub action: Action,
    pub devnode: PathBuf,
    pub id_path: Option<String>,
    /// Media sequence number: a new value means new media in the device.
    pub diskseq: Option<u64>,
    /// Bytes; zero for an empty card reader.
    pub size: u64,
    pub serial: Option<String>,
    pub vendor: Option<String>,
    pub model: Option<String>,
}

impl DeviceEvent {
    /// Whether this event says there is no medium (any more).
    pub fn is_removal(&self) -> bool {
        self.action == Action::Remove || self.size == 0
    }

    fn from_device(action: Action, dev: &udev::Device) -> Option<Self> {
        let prop = |k: &str| dev.property_value(k).and_then(OsStr::to_str).map(str::to_owned).filter(|s| !s.is_empty());
        let sectors: u64 =
            dev.attribute_value("size").and_then(OsStr::to_str).and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        Some(Self {
            action,
            devnode: dev.devnode()?.to_owned(),
            id_path: prop("ID_PATH"),
            diskseq: prop("DISKSEQ").and_then(|s| s.parse().ok()),
            // sysfs "size" is in 512-byte units whatever the sector size.
            size: if action == Action::Remove { 0 } else { sectors * 512 },
            serial: prop("ID_SERIAL_SHORT").or_else(|| prop("ID_SERIAL")),
            vendor: prop("ID_VENDOR"),
            model: prop("ID_MODEL"),
        })
    }
}

/// Requests to the udev thread.
#[derive(Debug)]
pub enum Request {
    /// List present disks again as `Existing` events (after a reload adds slots).
    Rescan,
}

/// Starts the udev thread. `ready` fires once coldplug events are sent and
/// the monitor is listening (or with the error that prevented it).
pub fn spawn(
    events: mpsc::Sender<DeviceEvent>,
    requests: mpsc::Receiver<Request>,
    ready: oneshot::Sender<std::io::Result<()>>,
    cancel: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<std::io::Result<()>>> {
    std::thread::Builder::new().name("udev".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(watch(events, requests, ready, cancel))
    })
}

async fn watch(
    events: mpsc::Sender<DeviceEvent>,
    mut requests: mpsc::Receiver<Request>,
    ready: oneshot::Sender<std::io::Result<()>>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let monitor = match listen() {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(std::io::Error::new(e.kind(), format!("udev monitor: {e}"))));
            return Ok(());
        }
    };
    let mut monitor = tokio_udev::AsyncMonitorSocket::new(monitor)?;
    if let Err(e) = enumerate(&events).await {
        let _ = ready.send(Err(e));
        return Ok(());
    }
    let _ = ready.send(Ok(()));

    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            Some(Request::Rescan) = requests.recv() => enumerate(&events).await?,
            event = monitor.next() => match event {
                Some(Ok(event)) => {
                    let action = match event.event_type() {
                        tokio_udev::EventType::Add => Action::Add,
                        tokio_udev::EventType::Remove => Action::Remove,
                        tokio_udev::EventType::Change => Action::Change,
                        _ => continue,
                    };
                    if let Some(ev) = DeviceEvent::from_device(action, &event.device()) {
                        tracing::debug!(?ev, "udev event");
                        if events.send(ev).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                // The socket buffer overflowed (ENOBUFS): events were lost, so
                // list what is there now; the station dedupes by DISKSEQ.
                Some(Err(e)) => {
                    tracing::warn!("udev monitor: {e}; re-listing devices");
                    enumerate_as(&events, Action::Change).await?;
                }
                None => return Err(std::io::Error::other("udev monitor closed")),
            },
        }
    }
}

fn listen() -> std::io::Result<udev::MonitorSocket> {
    udev::MonitorBuilder::new()?.match_subsystem_devtype("block", "disk")?.listen()
}

async fn enumerate(events: &mpsc::Sender<DeviceEvent>) -> std::io::Result<()> {
    enumerate_as(events, Action::Existing).await
}

async fn enumerate_as(events: &mpsc::Sender<DeviceEvent>, action: Action) -> std::io::Result<()> {
    let found: Vec<DeviceEvent> = {
        let mut e = udev::Enumerator::new()?;
        e.match_subsystem("block")?;
        e.match_property("DEVTYPE", "disk")?;
        e.scan_devices()?.filter_map(|d| DeviceEvent::from_device(action, &d)).collect()
    };
    for ev in found {
        if events.send(ev).await.is_err() {
            break;
        }
    }
    Ok(())
}
