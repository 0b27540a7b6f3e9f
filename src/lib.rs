//! flashbay: a headless, udev-triggered auto-flash daemon for SD card and
//! USB stick duplication stations.
//!
//! An operator plugs a card into a port of a USB hub; the daemon recognises
//! the port (its udev `ID_PATH`) as a configured slot and runs the job on
//! its own: write the image, verify it by reading the card back, grow the
//! last partition and filesystem, eject. The same job is available one-shot
//! as `flashbay write`.
//!
//! How the pieces fit, the layers and the rules are in
//! `docs/architecture.md` (checked by `scripts/check-modules`). In short:
//!
//! - [`model`] is the shared vocabulary (slot states, stages, eject modes,
//!   LED patterns); [`config`] turns YAML into a validated [`config::Config`]
//!   without touching anything else.
//! - [`image`] classifies an image by magic bytes (raw, xz, gzip, zstd),
//!   knows its raw size and streams its bytes, naming the compressed
//!   offset of any damage.
//! - [`blockdev`] opens targets for direct, exclusive, locked I/O with
//!   aligned buffers; reads sysfs; edits partition tables through
//!   util-linux; sends SCSI commands.
//! - [`guard`] decides whether a target may be written at all.
//! - [`pipeline`] is one job, used alike by `flashbay write` and the daemon.
//! - [`station`] is the daemon's brain: a pure core (slot state machines,
//!   scheduler) and the async shell that runs its jobs; [`udev`] feeds it,
//!   [`report`] follows what it publishes, [`daemon`] and [`tasks`] wire
//!   it up. [`learn`] and [`udev_rules`] are other commands.
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
