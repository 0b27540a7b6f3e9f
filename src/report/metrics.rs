//! Prometheus metrics in the text exposition format (0.0.4), which every
//! Prometheus version scrapes.
//!
//! Everything comes from the station's snapshot at scrape time: the cards
//! by result, bytes and stage durations are counted by the station as each
//! card ends, so `/metrics`, the status file and `history.jsonl` agree.

use std::fmt::Write;

use crate::model::SlotState;
use crate::station::status::{BUCKETS, Histogram, Snapshot};

#[derive(Debug, Default)]
pub struct Metrics;

impl Metrics {
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let (written, write, verify) = (snapshot.totals.written_bytes, &snapshot.totals.write, &snapshot.totals.verify);
        let mut out = String::new();
        let s = &snapshot.summary;
        family(&mut out, "flashbay_cards_total", "counter", "Cards finished since the daemon started, by result.");
        for (result, n) in [("done", s.done), ("failed", s.failed), ("refused", s.refused)] {
            let _ = writeln!(out, "flashbay_cards_total{{result=\"{result}\"}} {n}");
        }
        family(&mut out, "flashbay_written_bytes_total", "counter", "Bytes written to cards.");
        let _ = writeln!(out, "flashbay_written_bytes_total {written}");
        histogram(&mut out, "flashbay_write_duration_seconds", "Time to write one card.", write);
        histogram(&mut out, "flashbay_verify_duration_seconds", "Time to read one card back and compare it.", verify);
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
    fn escapes_label_values() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
