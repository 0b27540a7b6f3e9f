//! The `flashbay` command: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flashbay::guard::Guard;
use flashbay::image::Image;
use flashbay::pipeline::{self, Cancel, JobError, Options};
use flashbay::progress::Progress;
use flashbay::units::{Bytes, Rate};

#[derive(Debug, Parser)]
#[command(version, about = "Plug-and-flash duplication station for SD cards and USB sticks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FLASHBAY_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(err.downcast_ref::<JobError>().map_or(1, JobError::exit_code))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Write { image, target, no_verify, force, io, json } => {
            let mut image = Image::open(&image)?;
            let cancel = interruptible()?;
            let progress = Progress::auto(io.quiet);
            let opts = Options { verify: !no_verify, force, chunk_size: io.chunk_size, expected_diskseq: None };
            let result = pipeline::flash(&mut image, &target, &opts, &Guard::default(), &progress, &cancel);
            progress.finish();
            let report = result?;
            if !io.quiet {
                let verified = match (report.verify_seconds, &report.sha256) {
                    (Some(s), Some(sha)) => format!(", verified in {s:.1} s\nsha256 {sha}"),
                    _ => ", not verified".to_owned(),
                };
                eprintln!(
                    "wrote {} ({}) to {} in {:.1} s ({}){verified}",
                    Bytes(report.raw_size),
                    report.format,
                    report.target.display(),
                    report.write_seconds,
                    Rate(report.raw_size as f64 / report.write_seconds.max(1e-9)),
                );
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
        }
        Command::Verify { image, target, io } => {
            let mut image = Image::open(&image)?;
            let cancel = interruptible()?;
            let progress = Progress::auto(io.quiet);
            let result = pipeline::verify_only(&mut image, &target, io.chunk_size, &progress, &cancel);
            progress.finish();
            let sha256 = result?;
            if !io.quiet {
                eprintln!("{} matches {}\nsha256 {sha256}", target.display(), image.path.display());
            }
        }
        Command::Image { command: ImageCommand::Inspect { image, json } } => {
            let image = Image::open(&image)?;
            let measured = image.measure()?;
            if json {
                let doc = serde_json::json!({
                    "path": image.path,
                    "format": image.format,
                    "compressed_size": image.compressed_size,
                    "raw_size": measured.raw_size,
                    "sha256": measured.sha256,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!("image:      {}", image.path.display());
                println!("format:     {}", image.format);
                println!("compressed: {} ({} bytes)", Bytes(image.compressed_size), image.compressed_size);
                println!("raw:        {} ({} bytes)", Bytes(measured.raw_size), measured.raw_size);
                println!("sha256:     {}", measured.sha256);
            }
        }
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
