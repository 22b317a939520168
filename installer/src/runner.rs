//! Commands as data and the runners that execute them.
//!
//! The service-manager drivers never run anything themselves: they return [`Step`]s, which the
//! installer executes through a [`Runner`]. Tests substitute a [`RecordingRunner`] and compare
//! the exact command lines, which is how the SMF driver is tested on a machine without SMF.

use std::fmt;
use std::sync::Mutex;

use camino::Utf8PathBuf;

use crate::error::{Error, Result};

/// One command: a program, its arguments, and what it is for (used in error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
    pub description: String,
}

impl Cmd {
    /// A command with the given description, program and arguments.
    pub fn new(description: impl Into<String>, program: &str, args: &[&str]) -> Cmd {
        Cmd {
            program: program.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            description: description.into(),
        }
    }
}

impl fmt::Display for Cmd {
    /// The command line as a person would type it; only for messages and tests, never run.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.program)?;
        for arg in &self.args {
            write!(f, " {arg}")?;
        }
        Ok(())
    }
}

/// What a command printed and how it ended.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub success: bool,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

/// Runs commands. Implemented by [`SystemRunner`] for real and by [`RecordingRunner`] in tests.
pub trait Runner: Send + Sync {
    /// Runs the command and returns its output, whether or not it succeeded; errors only when it
    /// cannot be started.
    fn output(&self, cmd: &Cmd) -> Result<Output>;

    /// Runs the command and fails, keeping its stderr, unless it succeeded.
    fn run(&self, cmd: &Cmd) -> Result<Output> {
        let out = self.output(cmd)?;
        if !out.success {
            return Err(Error::Command {
                description: cmd.description.clone(),
                command: cmd.to_string(),
                status: out.status,
                stderr: out.stderr.trim().to_owned(),
            });
        }
        Ok(out)
    }
}

/// Runs commands on this machine with `std::process::Command`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn output(&self, cmd: &Cmd) -> Result<Output> {
        let out = std::process::Command::new(&cmd.program)
            .args(&cmd.args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| Error::Spawn {
                description: cmd.description.clone(),
                command: cmd.to_string(),
                source,
            })?;
        Ok(Output {
            success: out.status.success(),
            status: out.status.to_string(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// The answer a [`RecordingRunner`] gives to a command.
pub type Responder = dyn Fn(&Cmd) -> Output + Send + Sync;

/// Records every command line instead of running it, answering with a scripted output.
pub struct RecordingRunner {
    commands: Mutex<Vec<String>>,
    respond: Box<Responder>,
}

impl RecordingRunner {
    /// A runner where every command succeeds with empty output.
    pub fn succeeding() -> RecordingRunner {
        RecordingRunner::with(|_| Output {
            success: true,
            status: "exit status: 0".into(),
            ..Output::default()
        })
    }

    /// A runner that answers with `respond`.
    pub fn with(respond: impl Fn(&Cmd) -> Output + Send + Sync + 'static) -> RecordingRunner {
        RecordingRunner { commands: Mutex::new(Vec::new()), respond: Box::new(respond) }
    }

    /// The command lines run so far, and forgets them.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.commands.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Runner for RecordingRunner {
    fn output(&self, cmd: &Cmd) -> Result<Output> {
        self.commands.lock().unwrap_or_else(|e| e.into_inner()).push(cmd.to_string());
        Ok((self.respond)(cmd))
    }
}

/// One step of activating or deactivating services: a command, or a change to a service
/// definition file that the service manager reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Run a command.
    Run(Cmd),
    /// Copy a file into place atomically (temporary file, then rename).
    Install { from: Utf8PathBuf, to: Utf8PathBuf },
    /// Remove a file if it exists.
    Remove { path: Utf8PathBuf },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Run(cmd) => write!(f, "{cmd}"),
            Step::Install { from, to } => write!(f, "install {from} {to}"),
            Step::Remove { path } => write!(f, "remove {path}"),
        }
    }
}
