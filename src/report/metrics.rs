//! Prometheus metrics in the text exposition format (0.0.4), which every
//! Prometheus version scrapes.
//!
//! Cards by result and slots by state come from the station's snapshot at
//! scrape time; bytes and stage durations are accumulated from finished-job
//! events by [`follow`].

use std::fmt::Write;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::pipeline::{Stage, StageResult};
use crate::station::status::{Event, JobRecord, SlotState, Snapshot};

/// Upper bounds of the duration buckets: a card takes seconds to an hour.
const BUCKETS: [f64; 11] = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0];

#[derive(Debug, Default)]
pub struct Metrics {
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    written_bytes: u64,
    write: Histogram,
    verify: Histogram,
}

#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, value: f64) {
        for (bucket, bound) in self.buckets.iter_mut().zip(BUCKETS) {
            if value <= bound {
                *bucket += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }
}

impl Metrics {
    pub fn record(&self, record: &JobRecord) {
        let Some(report) = &record.report else { return };
        let Ok(mut counts) = self.counts.lock() else { return };
        for stage in &report.stages {
            if stage.result != StageResult::Done {
                continue;
            }
            match stage.stage {
                Stage::Write => {
                    counts.written_bytes += report.raw_size;
                    counts.write.observe(stage.seconds);
                }
                Stage::Verify => counts.verify.observe(stage.seconds),
                _ => {}
            }
        }
    }

    pub fn render(&self, snapshot: &Snapshot) -> String {
        let counts = self.counts.lock().map(|c| (c.written_bytes, c.write.clone(), c.verify.clone()));
        let (written, write, verify) = counts.unwrap_or_default();
        let mut out = String::new();
        let s = &snapshot.summary;
        family(&mut out, "flashbay_cards_total", "counter", "Cards finished since the daemon started, by result.");
        for (result, n) in [("done", s.done), ("failed", s.failed), ("refused", s.refused)] {
            let _ = writeln!(out, "flashbay_cards_total{{result=\"{result}\"}} {n}");
        }
        family(&mut out, "flashbay_written_bytes_total", "counter", "Bytes written to cards.");
        let _ = writeln!(out, "flashbay_written_bytes_total {written}");
        histogram(&mut out, "flashbay_write_duration_seconds", "Time to write one card.", &write);
        histogram(&mut out, "flashbay_verify_duration_seconds", "Time to read one card back and compare it.", &verify);
        family(&mut out, "flashbay_slots", "gauge", "Slots by state.");
        for state in SlotState::ALL {
            let n = snapshot.slots.iter().filter(|s| s.state == state).count();
            let _ = writeln!(out, "flashbay_slots{{state=\"{}\"}} {n}", state.name());
        }
        family(&mut out, "flashbay_image_info", "gauge", "Images in use (always 1), with their format and SHA-256.");
        for image in &snapshot.images {
            let _ = writeln!(
                out,
                "flashbay_image_info{{path=\"{}\",state=\"{}\",format=\"{}\",sha256=\"{}\"}} 1",
                escape(&image.path.to_string_lossy()),
                image.state,
                image.format.map_or("", |f| f.name()),
                image.sha256.as_deref().unwrap_or_default()
            );
        }
        family(&mut out, "flashbay_image_raw_bytes", "gauge", "Raw (decompressed) size of each image.");
        for image in snapshot.images.iter().filter(|i| i.raw_size.is_some()) {
            let path = escape(&image.path.to_string_lossy());
            let _ = writeln!(out, "flashbay_image_raw_bytes{{path=\"{path}\"}} {}", image.raw_size.unwrap_or_default());
        }
        family(&mut out, "flashbay_build_info", "gauge", "The running flashbay version (always 1).");
        let _ = writeln!(out, "flashbay_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        out
    }
}

/// Follows finished jobs until the station stops.
pub async fn follow(metrics: Arc<Metrics>, mut events: broadcast::Receiver<Event>) -> anyhow::Result<()> {
    loop {
        match events.recv().await {
            Ok(Event::Finished(record)) => metrics.record(&record),
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => tracing::warn!("metrics missed {n} events"),
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    family(out, name, "histogram", help);
    for (count, bound) in h.buckets.iter().zip(BUCKETS) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", h.count, h.sum, h.count);
}

/// Label values escape backslash, double quote and newline.
fn escape(value: &str) -> String {
    value.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        for v in [0.5, 3.0, 3000.0, 9000.0] {
            h.observe(v);
        }
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.buckets[1], 2);
        assert_eq!(h.buckets[10], 3);
        assert_eq!(h.count, 4);
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
