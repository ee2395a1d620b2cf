//! How the command reports: exit codes, error lines with what to do next, colours only on a
//! terminal, JSON documents for scripts, and progress of long operations.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{Error, ErrorKind};

/// Exit codes, listed in `--help`.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// Failed: a `doctor` check failed, a table is missing, or another error.
    pub const FAILED: u8 = 1;
    /// Configuration: a flag, variable, config file or URL is wrong.
    pub const CONFIG: u8 = 2;
    /// A service (database, broker) cannot be reached.
    pub const UNREACHABLE: u8 = 3;
    /// Partly done: the relay ran, but some messages failed, were dead-lettered or were
    /// quarantined.
    pub const PARTIAL: u8 = 4;
    /// Stopped by Ctrl-C (SIGINT) between two batches; what was done is kept.
    pub const INTERRUPTED: u8 = 130;
}

/// The `--help` text listing the exit codes.
pub const EXIT_CODES_HELP: &str = "Exit codes:
  0    done
  1    failed (a doctor check, a missing table, another error)
  2    configuration error (flag, OUTBOX_* variable, config file, URL)
  3    a database or broker cannot be reached
  4    partly done: the relay ran but some messages failed, were dead-lettered or quarantined
  130  interrupted (Ctrl-C) between two batches; what was done is kept";

/// The exit code of an error.
pub fn exit_code(e: &Error) -> u8 {
    match e.kind() {
        ErrorKind::Config | ErrorKind::InvalidIdentifier | ErrorKind::InvalidMessage => {
            exit::CONFIG
        }
        ErrorKind::Store | ErrorKind::Publish | ErrorKind::Timeout | ErrorKind::Closed
            if e.is_transient() =>
        {
            exit::UNREACHABLE
        }
        _ => exit::FAILED,
    }
}

/// What to do about an error, when there is something to say.
pub fn hint(e: &Error) -> Option<&'static str> {
    match (e.kind(), e.is_transient()) {
        (ErrorKind::Config, _) => Some(
            "fix the setting named above (its flag, OUTBOX_* variable or --config file); `outbox help <command>` lists them",
        ),
        (ErrorKind::InvalidIdentifier, _) => {
            Some("table names are 1 to 63 ASCII letters, digits or '_', not starting with a digit")
        }
        (ErrorKind::Store | ErrorKind::Timeout, true) => Some(
            "check that the database runs and is reachable at that URL (host, port, credentials, TLS); `outbox doctor` checks the whole set-up",
        ),
        (ErrorKind::Publish, true) => Some(
            "check that the broker runs and is reachable at that URL; `outbox doctor --publisher URL` pings it",
        ),
        (ErrorKind::NotFound, _) => Some(
            "`outbox parked` lists the parked units; `outbox stats` the streams with pending messages",
        ),
        (ErrorKind::Store, false) => Some(
            "`outbox doctor` checks the table and its schema; `outbox migrate` creates or upgrades them",
        ),
        _ => None,
    }
}

/// The problem first: the message and its causes, without the kind (kept for JSON logs).
pub fn describe(e: &Error) -> String {
    let mut text = e.message().to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        // Our own errors by their message: their Display repeats the kind and the sources.
        let s_text = match s.downcast_ref::<Error>() {
            Some(inner) => inner.message().to_owned(),
            None => s.to_string(),
        };
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Print `e` on stderr: `error: …` and `hint: …` lines, or, when JSON was asked for (logs or
/// output), one flat JSON object with a timestamp, the kind, retry class and exit code.
pub fn print_error(e: &Error, json: bool) {
    let code = exit_code(e);
    if json {
        // One line, flat, as the JSON log lines are.
        let doc = serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": "ERROR",
            "target": "outbox",
            "message": describe(e),
            "kind": format!("{:?}", e.kind()),
            "retry": if e.is_transient() { "transient" } else { "permanent" },
            "exit_code": code,
            "hint": hint(e),
        });
        eprintln!("{doc}");
    } else {
        eprintln!("error: {}", describe(e));
        if let Some(h) = hint(e) {
            eprintln!("hint: {h}");
        }
    }
}

/// Whether log lines on stderr get ANSI colours: only on a terminal, never with `NO_COLOR`.
pub fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// How data is printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// Aligned text for people.
    #[default]
    Text,
    /// One JSON document (field names are stable; see the README).
    Json,
}

/// Set by Ctrl-C while a long operation runs; it stops after its current batch.
#[derive(Clone, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// Catch Ctrl-C (SIGINT) from now on: the first one asks the operation to stop after
    /// its current batch, a second one exits at once.
    pub fn catch() -> Self {
        let me = Self::default();
        let flag = me.0.clone();
        // Registered now, not when the task first runs: a Ctrl-C right after this call is
        // caught, never the default kill.
        #[cfg(unix)]
        let mut sigint =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        tokio::spawn(async move {
            let mut caught = 0;
            loop {
                #[cfg(unix)]
                let got = match sigint.as_mut() {
                    Some(s) => s.recv().await.is_some(),
                    None => tokio::signal::ctrl_c().await.is_ok(),
                };
                #[cfg(not(unix))]
                let got = tokio::signal::ctrl_c().await.is_ok();
                if !got {
                    return;
                }
                caught += 1;
                if caught > 1 {
                    std::process::exit(exit::INTERRUPTED as i32);
                }
                flag.store(true, Ordering::SeqCst);
                tracing::warn!(
                    "interrupted: stopping after the current batch (Ctrl-C again to quit now)"
                );
            }
        });
        me
    }

    pub fn asked(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Progress of a long operation on stderr: a line rewritten in place on a terminal, else a
/// log line at the first batch and then at most every 2 s.
pub struct Progress {
    what: &'static str,
    tty: bool,
    started: Instant,
    last: Option<Instant>,
}

impl Progress {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            last: None,
        }
    }

    /// `done` rows so far.
    pub fn update(&mut self, done: u64) {
        let now = Instant::now();
        if self.tty {
            let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
            eprint!("\r{}: {done} rows ({rate:.0} rows/s)   ", self.what);
        } else if self
            .last
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(2))
        {
            tracing::info!(rows = done, elapsed = ?self.started.elapsed(), "{} in progress", self.what);
        } else {
            return;
        }
        self.last = Some(now);
    }

    pub fn finish(&self) {
        if self.tty && self.last.is_some() {
            eprintln!();
        }
    }
}
