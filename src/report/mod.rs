//! Outputs that follow the station's state. Each reads the published
//! snapshot on its own schedule; none can block or fail a job.

pub mod hooks;
pub mod http;
pub mod journal;
pub mod leds;
pub mod metrics;
pub mod notify;
pub mod status_file;
