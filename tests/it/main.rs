//! Integration tests against real loop devices, real images and real tools.
//! Run as root (scripts/test does everything); without root or loop devices
//! each device test prints `SKIPPED: reason`, except under CI where it fails.

#![allow(unreachable_pub, dead_code)]
#![allow(clippy::unwrap_used, clippy::pedantic, clippy::cast_possible_truncation)]

#[macro_use]
mod bed;
mod browser;
mod daemon;
mod faults;
mod fusecard;
mod guard;
mod image;
mod install;
mod observe;
mod post;
mod probe;
mod station;
mod trust;
mod write;
