//! Output for a human: progress on stderr (a redrawn bar on a terminal, a
//! plain line every few seconds otherwise: logs, pipes, CI), and the
//! summaries the one-shot commands print.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::image::{Image, Measured};
use crate::pipeline::{Observer, Report, Stage, StageResult};
use crate::units::{Bytes, Clock, Rate};

const BAR_INTERVAL: Duration = Duration::from_millis(200);
const LINE_INTERVAL: Duration = Duration::from_secs(5);
const BAR_WIDTH: usize = 30;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A bar redrawn in place, for a terminal.
    Bar,
    /// A line every few seconds, for logs and pipes.
    Lines,
    Off,
}

#[derive(Debug)]
pub struct Progress {
    style: Style,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    started: Instant,
    last_print: Option<Instant>,
    /// Whether a bar is on screen and needs a newline before other output.
    bar_drawn: bool,
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise; nothing when quiet.
    pub fn auto(quiet: bool) -> Self {
        Self::new(match (quiet, std::io::stderr().is_terminal()) {
            (true, _) => Style::Off,
            (false, true) => Style::Bar,
            (false, false) => Style::Lines,
        })
    }

    pub fn new(style: Style) -> Self {
        Self { style, state: Mutex::new(State { started: Instant::now(), last_print: None, bar_drawn: false }) }
    }

    /// Ends the bar line, if one is drawn, before other output.
    pub fn finish(&self) {
        if let Ok(mut s) = self.state.lock()
            && s.bar_drawn
        {
            eprintln!();
            s.bar_drawn = false;
        }
    }
}

impl Observer for Progress {
    fn stage(&self, _stage: Stage) {
        self.finish();
        if let Ok(mut s) = self.state.lock() {
            *s = State { started: Instant::now(), last_print: None, bar_drawn: false };
        }
    }

    fn progress(&self, stage: Stage, done: u64, total: u64) {
        if self.style == Style::Off {
            return;
        }
        let Ok(mut s) = self.state.lock() else { return };
        let now = Instant::now();
        let interval = if self.style == Style::Bar { BAR_INTERVAL } else { LINE_INTERVAL };
        let last = done >= total;
        if s.last_print.is_some_and(|t| now - t < interval) && !last {
            return;
        }
        s.last_print = Some(now);
        let elapsed = (now - s.started).as_secs_f64();
        let rate = if elapsed > 0.0 { done as f64 / elapsed } else { 0.0 };
        let eta = if rate > 0.0 {
            Duration::from_secs_f64((total.saturating_sub(done)) as f64 / rate)
        } else {
            Duration::ZERO
        };
        let fraction = if total > 0 { done as f64 / total as f64 } else { 1.0 };
        let text = format!(
            "{:>6}: {:5.1}% {} / {}  {}  ETA {}",
            stage.name(),
            fraction * 100.0,
            Bytes(done),
            Bytes(total),
            Rate(rate),
            Clock(eta)
        );
        let mut err = std::io::stderr().lock();
        if self.style == Style::Bar {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 0..=BAR_WIDTH
            let filled = ((fraction * BAR_WIDTH as f64) as usize).min(BAR_WIDTH);
            let _ = write!(err, "\r\x1b[2K[{}{}] {text}", "#".repeat(filled), "-".repeat(BAR_WIDTH - filled));
            s.bar_drawn = true;
        } else {
            let _ = writeln!(err, "{text}");
        }
        let _ = err.flush();
    }
}

/// What `flashbay write` prints when it is done.
pub fn summary(report: &Report) -> String {
    let write = report.seconds(Stage::Write).unwrap_or_default();
    let verified = match (report.seconds(Stage::Verify), &report.sha256) {
        (Some(s), Some(sha)) => format!(", verified in {s:.1} s\nsha256 {sha}"),
        _ => ", not verified".to_owned(),
    };
    let mut out = format!(
        "wrote {} ({}) to {} in {write:.1} s ({}){verified}\n",
        Bytes(report.raw_size),
        report.format,
        report.target.display(),
        Rate(report.raw_size as f64 / write.max(1e-9)),
    );
    for s in report.stages.iter().filter(|s| !matches!(s.stage, Stage::Write | Stage::Verify)) {
        let skipped = if s.result == StageResult::Skipped { "skipped: " } else { "" };
        let _ = writeln!(out, "{}: {skipped}{}", s.stage.name(), s.detail);
    }
    out
}

/// `flashbay image inspect`, for a human.
pub fn inspect_text(image: &Image, measured: &Measured) -> String {
    format!(
        "image:      {}\nformat:     {}\ncompressed: {} ({} bytes)\nraw:        {} ({} bytes)\nsha256:     {}\n",
        image.path.display(),
        image.format,
        Bytes(image.compressed_size),
        image.compressed_size,
        Bytes(measured.raw_size),
        measured.raw_size,
        measured.sha256
    )
}

/// `flashbay image inspect --json`.
pub fn inspect_json(image: &Image, measured: &Measured) -> serde_json::Value {
    serde_json::json!({
        "path": image.path,
        "format": image.format,
        "compressed_size": image.compressed_size,
        "raw_size": measured.raw_size,
        "sha256": measured.sha256,
    })
}
