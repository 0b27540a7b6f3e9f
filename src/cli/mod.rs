//! Commands that only the `flashbay` binary needs, kept out of the library
//! the daemon links: the demo station's loop-device and udevd plumbing, and
//! the `status` client.

pub(crate) mod demo;
pub(crate) mod status;
