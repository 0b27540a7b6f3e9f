//! flashbay: a headless, udev-triggered auto-flash daemon for SD card and
//! USB stick duplication stations.
//!
//! An operator plugs a card into a port of a USB hub; the daemon recognises
//! the port (its udev `ID_PATH`) as a configured slot and runs the job on
//! its own: write the image, verify it by reading the card back, grow the
//! last partition and filesystem, eject. The same job is available one-shot
//! as `flashbay write`.
//!
//! How the pieces fit (see `flashbay run`, the daemon):
//!
//! ```text
//! udev (kernel → systemd-udevd)            config (YAML → validated Config)
//!   │ udev: DeviceEvent {devnode, ID_PATH, DISKSEQ, size, serial, model}
//!   ▼
//! station ─ one state machine per slot (port = ID_PATH), a job per new
//!   │       DISKSEQ, FIFO queue, concurrency permits, images prepared once
//!   ▼
//! pipeline ─ one job on one card: write → verify → expand → resize → eject
//!   │        (image decodes, blockdev does O_DIRECT I/O, guard says yes first)
//!   ▼
//! published state: a snapshot (watch) and an ordered event stream (broadcast)
//!   ├─ report::journal      tracing → journald fields SLOT, DEVNAME, DISKSEQ, STAGE …
//!   ├─ report::status_file  atomic JSON
//!   ├─ report::http         /api/status, /api/events (SSE), /metrics, the page
//!   ├─ report::leds         Linux LED class
//!   ├─ report::hooks        operator commands
//!   └─ report::notify       READY / STATUS / WATCHDOG / RELOADING / STOPPING
//! ```
//!
//! - [`image`] classifies an image by magic bytes (raw, xz, gzip, zstd),
//!   knows its raw size and streams its bytes, naming the compressed
//!   offset of any damage.
//! - [`blockdev`] opens targets for direct, exclusive, locked I/O with
//!   aligned buffers; reads sysfs; edits partition tables through
//!   util-linux; sends SCSI commands.
//! - [`guard`] decides whether a target may be written at all.
//! - [`pipeline`] is one job, used alike by `flashbay write` and the daemon.
//! - [`config`], [`udev`], [`station`], [`report`], [`tasks`] and
//!   [`daemon`] make the daemon; [`learn`] and [`udev_rules`] are other
//!   commands (the binary holds `demo` and the `status` client).
//!
//! Device work is synchronous and runs on plain threads (the daemon uses
//! tokio's blocking pool); everything else is async on tokio.

pub mod blockdev;
pub mod config;
pub mod daemon;
pub mod guard;
pub mod image;
pub mod learn;
pub mod model;
pub mod pipeline;
pub mod probe;
pub mod progress;
pub mod report;
pub mod station;
pub mod tasks;
pub mod tools;
pub mod udev;
pub mod udev_rules;
pub mod units;
