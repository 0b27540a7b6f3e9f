//! Running the standard tools we rely on (util-linux, e2fsprogs) with
//! errors that name the tool, what it said, and the package to install.

use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{tool} not found (install the {package} package)")]
    Missing { tool: &'static str, package: &'static str },
    #[error("{tool}: {source}")]
    Spawn { tool: &'static str, source: std::io::Error },
    #[error("{tool} failed ({status}): {output}")]
    Failed { tool: &'static str, status: String, output: String },
}

/// What a tool printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Both streams, trimmed, on one line: for error messages.
    pub fn text(&self) -> String {
        let joined = format!("{} {}", self.stdout.trim(), self.stderr.trim());
        joined.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// The Debian package that ships a tool, for the "install it" hint.
fn package(tool: &str) -> &'static str {
    match tool {
        "sfdisk" => "fdisk",
        "e2fsck" | "resize2fs" | "dumpe2fs" => "e2fsprogs",
        _ => "util-linux",
    }
}

/// Runs `tool args…` with `stdin` as input; any exit status is returned.
pub fn run(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<Output, ToolError> {
    let mut cmd = Command::new(tool);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).env("LC_ALL", "C");
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ToolError::Missing { tool, package: package(tool) },
        _ => ToolError::Spawn { tool, source },
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(|source| ToolError::Spawn { tool, source })?;
    }
    let out = child.wait_with_output().map_err(|source| ToolError::Spawn { tool, source })?;
    Ok(Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs a tool that must succeed (exit status 0).
pub fn check(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<Output, ToolError> {
    let out = run(tool, args, stdin)?;
    if out.code == Some(0) {
        Ok(out)
    } else {
        let status = out.code.map_or_else(|| "killed".to_owned(), |c| format!("exit status {c}"));
        Err(ToolError::Failed { tool, status, output: out.text() })
    }
}
