//! The `flashbay` command: parses arguments and hands over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flashbay::config::Config;
use flashbay::guard::Guard;
use flashbay::image::Image;
use flashbay::pipeline::{self, Cancel, EjectMode, JobError, Options};
use flashbay::probe::ProbeError;
use flashbay::progress::Progress;
use flashbay::report::journal::{self, Target};

#[derive(Debug, Parser)]
#[command(version, about = "Plug-and-flash duplication station for SD cards and USB sticks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--log`: the library's [`Target`], as the command line spells it.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogTo {
    /// journald when stderr is the journal, else stderr
    Auto,
    Journal,
    Stderr,
}

impl From<LogTo> for Target {
    fn from(to: LogTo) -> Self {
        match to {
            LogTo::Auto => Target::Auto,
            LogTo::Journal => Target::Journal,
            LogTo::Stderr => Target::Stderr,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the station: flash every card inserted into a configured slot
    Run {
        #[arg(long, short, default_value = flashbay::config::DEFAULT_PATH)]
        config: PathBuf,
        /// Where log lines go: journald when stderr is the journal (auto)
        #[arg(long, value_enum, default_value = "auto")]
        log: LogTo,
    },
    /// Show the station: every slot's state, card, progress and error
    Status {
        /// The daemon's HTTP address (default: from the configuration)
        #[arg(long)]
        url: Option<String>,
        #[arg(long, short, default_value = flashbay::config::DEFAULT_PATH)]
        config: PathBuf,
        /// Print the whole station as JSON
        #[arg(long)]
        json: bool,
    },
    /// A whole station on this machine: emulated 4-port hub, real daemon, status page (root)
    Demo {
        /// Status page address (another free port if this one is taken)
        #[arg(long, default_value = "127.0.0.1:8088")]
        listen: String,
        /// Card speed in MiB/s, so the page is worth watching (0: full speed)
        #[arg(long, default_value_t = 8)]
        speed: u64,
        /// Keep the station running after the summary, until Ctrl-C
        #[arg(long)]
        stay: bool,
    },
    /// Learn the ports: insert a card into each port in turn, Ctrl-C when done
    Learn {
        #[arg(long, short, default_value = flashbay::config::DEFAULT_PATH)]
        config: PathBuf,
        /// Add the new slots to the configuration file
        #[arg(long)]
        write: bool,
        /// Slot names: PREFIX1, PREFIX2, …
        #[arg(long, default_value = "A")]
        prefix: String,
    },
    /// Print udev rules for the configured slots (keeps automounters away)
    UdevRules {
        #[arg(long, short, default_value = flashbay::config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate a configuration and print its slot table
    Check {
        #[arg(long, short, default_value = flashbay::config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Write an image to a card or file, then read the card back to verify it
    Write {
        /// Image file: raw, xz, gzip or zstd (detected from its content)
        image: PathBuf,
        /// Whole-disk block device (e.g. /dev/sdb) or a regular file
        target: PathBuf,
        /// Skip reading the card back after writing
        #[arg(long)]
        no_verify: bool,
        /// Allow a fixed (non-removable, non-USB) disk; never allows the system disk
        #[arg(long)]
        force: bool,
        /// Grow the last partition to the end of the card
        #[arg(long)]
        expand: bool,
        /// Grow the last partition's ext2/3/4 filesystem to fill it
        #[arg(long)]
        resize: bool,
        /// After writing: none, sync, eject (SCSI stop/eject) or power-off (USB)
        #[arg(long, default_value = "none", value_parser = parse_eject)]
        eject: EjectMode,
        #[command(flatten)]
        io: IoArgs,
        /// Print the job report as JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Read a card back and compare it with an image
    Verify {
        image: PathBuf,
        target: PathBuf,
        #[command(flatten)]
        io: IoArgs,
    },
    /// Check a card holds what it claims (counterfeit cards wrap or drop writes); puts every byte back
    Probe {
        /// Whole-disk block device (e.g. /dev/sdb)
        device: PathBuf,
        /// Allow a fixed (non-removable, non-USB) disk; never allows the system disk
        #[arg(long)]
        force: bool,
        /// Print the report as JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Work with image files
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
}

#[derive(Debug, clap::Args)]
struct IoArgs {
    /// I/O size per request, a multiple of 1M between 1M and 8M
    #[arg(long, default_value = "4M", value_parser = parse_chunk)]
    chunk_size: usize,
    /// No progress output
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Print an image's format, sizes and the SHA-256 of its raw bytes
    Inspect {
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn parse_chunk(s: &str) -> Result<usize, String> {
    let n = usize::try_from(flashbay::units::parse_size(s)?).map_err(|_| "too large".to_owned())?;
    if pipeline::CHUNK_RANGE.contains(&n) && n % pipeline::HEAD == 0 {
        Ok(n)
    } else {
        Err(format!("{s}: must be a multiple of 1M between 1M and 8M"))
    }
}

fn parse_eject(s: &str) -> Result<EjectMode, String> {
    EjectMode::parse(s).ok_or_else(|| format!("{s}: must be none, sync, eject or power-off"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Run { log, .. } => journal::init((*log).into(), "info"),
        _ => journal::init(Target::Stderr, "warn"),
    }
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            for line in one_line(&err).lines() {
                eprintln!("error: {line}");
            }
            let code = match (err.downcast_ref::<JobError>(), err.downcast_ref::<ProbeError>()) {
                (Some(job), _) => job.exit_code(),
                (None, Some(probe)) => probe.exit_code(),
                (None, None) => 1,
            };
            ExitCode::from(code)
        }
    }
}

/// The error and its causes joined with ": ", skipping causes the message
/// already quotes (our errors name their cause in their own text).
fn one_line(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let done = match cli.command {
        Command::Run { config, .. } => block_on(flashbay::daemon::run(config)),
        Command::Status { url, config, json } => status(url.as_deref(), &config, json),
        Command::Learn { config, write, prefix } => block_on(async move {
            let stop = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            flashbay::learn::run(&config, write, &prefix, stop).await.map(drop)
        }),
        Command::Demo { listen, speed, stay } => cli::demo::run(&cli::demo::Options { listen, speed, stay }),
        Command::UdevRules { config } => {
            print!("{}", flashbay::udev_rules::generate(&Config::load(&config)?));
            Ok(())
        }
        Command::Check { config } => {
            let config = Config::load(&config)?;
            for warning in flashbay::station::check_images(&config) {
                eprintln!("warning: {warning}");
            }
            println!("{}: ok", config.file.display());
            print!("{}", config.describe());
            Ok(())
        }
        Command::Write { image, target, no_verify, force, expand, resize, eject, io, json } => {
            let opts = Options {
                verify: !no_verify,
                force,
                chunk_size: io.chunk_size,
                expand,
                resize,
                eject,
                ..Options::default()
            };
            write(&image, &target, &opts, io.quiet, json)
        }
        Command::Verify { image, target, io } => {
            let mut image = Image::open(&image)?;
            let (cancel, progress) = (interruptible()?, Progress::auto(io.quiet));
            let result = pipeline::verify_only(&mut image, &target, io.chunk_size, &progress, &cancel);
            progress.finish();
            let sha256 = result?;
            if !io.quiet {
                eprintln!("{} matches {}\nsha256 {sha256}", target.display(), image.path.display());
            }
            Ok(())
        }
        Command::Image { command: ImageCommand::Inspect { image, json } } => {
            let image = Image::open(&image)?;
            let measured = image.measure()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&flashbay::progress::inspect_json(&image, &measured))?);
            } else {
                print!("{}", flashbay::progress::inspect_text(&image, &measured));
            }
            Ok(())
        }
        Command::Probe { device, force, json } => return probe(&device, force, json),
    };
    done.map(|()| ExitCode::SUCCESS)
}

/// Runs an async command to completion; a job stuck in the kernel on a
/// dead device must not keep the process alive afterwards.
fn block_on(future: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let result = runtime.block_on(future);
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

fn write(image: &Path, target: &Path, opts: &Options, quiet: bool, json: bool) -> anyhow::Result<()> {
    let mut image = Image::open(image)?;
    let (cancel, progress) = (interruptible()?, Progress::auto(quiet));
    let result = pipeline::flash(&mut image, target, opts, &Guard::default(), &progress, &cancel);
    progress.finish();
    let report = result?;
    if !quiet {
        eprint!("{}", flashbay::progress::summary(&report));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Exit status 0 for a genuine card, 4 for a counterfeit one (it cannot
/// hold an image of its claimed size, as a failed verification).
fn probe(device: &Path, force: bool, json: bool) -> anyhow::Result<ExitCode> {
    let cancel = interruptible()?;
    let target = pipeline::open_card(device, &Guard::default(), force)?;
    // The whole card, from byte 0: the probe puts back every block it
    // stamps, so nothing on the card needs keeping out of its way.
    let report = flashbay::probe::probe(&target, 0, &cancel)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}: {report}", device.display());
    }
    Ok(if report.genuine { ExitCode::SUCCESS } else { ExitCode::from(4) })
}

fn status(url: Option<&str>, config: &Path, json: bool) -> anyhow::Result<()> {
    let (doc, source) = cli::status::fetch(url, config)?;
    if let cli::status::Source::File { path, reason } = &source {
        eprintln!("warning: daemon not reachable ({reason}); showing {}", path.display());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", cli::status::table(&doc));
    }
    Ok(())
}

/// Ctrl-C or SIGTERM stops the job at its next chunk; the card is left
/// without a partition table rather than half-written and valid-looking.
fn interruptible() -> anyhow::Result<Cancel> {
    let cancel = Cancel::default();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, cancel.flag()).context("cannot install signal handler")?;
    }
    Ok(cancel)
}
