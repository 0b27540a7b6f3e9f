//! flashbay: a headless, udev-triggered auto-flash daemon for SD card and
//! USB stick duplication stations.
//!
//! An operator plugs a card into a port of a USB hub; the daemon recognises
//! the port (its udev `ID_PATH`) as a configured slot and runs the job on
//! its own: write the image, verify it by reading the card back, grow the
//! last partition and filesystem, eject. The same job is available one-shot
//! as `flashbay write`.
//!
//! How the pieces fit:
//!
//! - [`image`] classifies an image by its magic bytes (raw, xz, gzip,
//!   zstd), knows its raw size, and streams its raw bytes, turning every
//!   kind of damage into an error that names the compressed offset.
//! - [`blockdev`] opens a target (block device or file) for direct,
//!   exclusive, locked I/O with aligned buffers, and reads sysfs.
//! - [`guard`] decides whether a target may be written at all: never the
//!   system disk, nothing mounted or held, no partitions, nothing too small.
//! - [`pipeline`] is one job: open and guard the target, then write (image
//!   decoding overlapped with device writes, partition table written last)
//!   and verify (`O_DIRECT` read-back compared against the image).
//! - [`progress`] and [`units`] render progress and sizes for humans.
//!
//! Everything device-facing is synchronous and runs on plain threads; the
//! daemon drives jobs from its async event loop through `spawn_blocking`.

pub mod blockdev;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod guard;
pub mod image;
pub mod learn;
pub mod pipeline;
pub mod progress;
pub mod report;
pub mod station;
pub mod status;
pub mod tasks;
pub mod tools;
pub mod udev;
pub mod udev_rules;
pub mod units;
