//! Outputs that follow the station's state. Each reads the published
//! snapshot on its own schedule; none can block or fail a job.

pub mod journal;
pub mod notify;
pub mod status_file;
