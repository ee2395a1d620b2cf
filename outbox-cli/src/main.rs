//! `outbox`: run the relay as a process (or a cron job), clean old rows, show counts, manage
//! dead letters, create the table.
//!
//! Settings come from flags, then `OUTBOX_*` environment variables, then an optional TOML
//! file (`--config`), then the defaults. Errors are one line on stderr and a non-zero exit.
#![forbid(unsafe_code)]

mod admin;
mod backends;
mod doctor;
mod json;
mod metrics_endpoint;
mod report;
mod signing;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use outbox_core::{
    printable, Cleaner, Error, Relay, RelayConfig, RetryPolicy, Selector, Store, StreamFilter,
};
use serde::Deserialize;

use crate::backends::{open_publisher, AnyStore};
use crate::report::{exit, Output};

#[derive(Parser, Debug)]
#[command(
    name = "outbox",
    version,
    about = "Transactional outbox: relay, clean, stats, dead letters, migrate, doctor",
    after_help = report::EXIT_CODES_HELP
)]
struct Cli {
    /// TOML file with settings (flags and environment variables win over it).
    #[arg(long, env = "OUTBOX_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Store URL: sqlite://PATH, postgres://…, mysql://… (a password in a flag shows in `ps`:
    /// prefer OUTBOX_STORE, --store-file or the config file)
    #[arg(long, env = "OUTBOX_STORE", global = true, hide_env_values = true)]
    store: Option<String>,
    /// File holding the store URL (a mounted secret); read once at start-up.
    #[arg(long, env = "OUTBOX_STORE_FILE", global = true)]
    store_file: Option<PathBuf>,
    /// Outbox table name [default: outbox]
    #[arg(long, env = "OUTBOX_TABLE", global = true)]
    table: Option<String>,
    /// Log format [default: human]; colours only on a terminal and never with NO_COLOR set
    #[arg(long, env = "OUTBOX_LOG_FORMAT", global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// How stats, dead list, migrate, clean and doctor print their data [default: text]
    #[arg(long, env = "OUTBOX_OUTPUT", global = true, value_enum)]
    output: Option<Output>,
    /// Same as --output json.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publish pending messages (once, or in a loop with --loop).
    Relay(Box<RelayArgs>),
    /// Delete sent rows older than a retention.
    Clean(CleanArgs),
    /// Pending / sent / dead counts per stream and the oldest pending age.
    Stats,
    /// List, requeue or purge dead letters.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Keep-order units parked for an operator (oldest first): their messages wait, in order,
    /// until `outbox resume` or `outbox skip`.
    Parked {
        /// Only this stream's units.
        #[arg(long)]
        stream: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Park a keep-order unit: its messages, and those written to it meanwhile, wait in order.
    Park {
        /// The unit's stream.
        stream: String,
        /// The unit (the message key, for KeepOrder).
        unit: String,
        /// Why (shown by `outbox parked`).
        #[arg(long, default_value = "parked by an operator")]
        reason: String,
    },
    /// Resume a parked unit: its messages are published in their order, from the head, with
    /// a fresh retry budget.
    Resume {
        /// The unit's stream.
        stream: String,
        /// The unit.
        unit: String,
    },
    /// Dead-letter a parked unit's head (just that message), then resume the rest.
    Skip {
        /// The unit's stream.
        stream: String,
        /// The unit.
        unit: String,
    },
    /// The web console: backlog, messages, dead letters and parked units, with actions and a
    /// JSON API under /api/ (loopback unless --auth-token is set).
    Admin(AdminArgs),
    /// Create the outbox table and indexes (idempotent); with --inbox, inbox tables too.
    Migrate {
        /// Also create this inbox table (the consumer side); repeat for several.
        #[arg(long = "inbox", value_name = "TABLE")]
        inboxes: Vec<String>,
        /// Print the statements instead of running them, for a DBA to review and run as the
        /// tables' owner (PostgreSQL, MySQL/MariaDB); nothing is changed.
        #[arg(long)]
        print_sql: bool,
    },
    /// Print the GRANTs that let the writer, the relay and the console each run as a
    /// database role of its own, with no more than its part needs (PostgreSQL,
    /// MySQL/MariaDB); nothing is changed.
    Grants(GrantsArgs),
    /// An inbox table (the consumer side): its dead letters, and requeueing them.
    Inbox {
        /// The inbox table.
        #[arg(long, default_value = "inbox", global = true)]
        inbox_table: String,
        #[command(subcommand)]
        command: InboxCommand,
    },
    /// Check the deployment: store, table and schema, NOTIFY, clock, publisher, signing keys.
    /// One line per check (OK, WARN, FAIL, SKIP); exits 1 when a check fails.
    Doctor(DoctorArgs),
    /// Print a shell completion script: `outbox completions bash > /etc/bash_completion.d/outbox`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `outbox man > outbox.1`.
    Man,
}

#[derive(Args, Debug)]
struct GrantsArgs {
    /// The application's role: inserts outbox rows, reads back only their seq and id.
    #[arg(long)]
    writer: Option<String>,
    /// The relay's role: claims, settles, deletes; cannot write or rewrite a message.
    #[arg(long)]
    relay: Option<String>,
    /// The console's role: reads; requeues, purges, parks, resumes, skips.
    #[arg(long)]
    admin: Option<String>,
    /// MySQL/MariaDB: the host part of the accounts ('role'@'host').
    #[arg(long, default_value = "%")]
    account_host: String,
}

#[derive(Args, Debug)]
struct AdminArgs {
    /// Address to listen on; beyond loopback a token is required.
    #[arg(long, env = "OUTBOX_ADMIN_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Token every request must carry (Authorization: Bearer, or the session a POST to /login
    /// gives). Prefer the environment or --auth-token-file: `ps` shows a command line.
    #[arg(long, env = "OUTBOX_ADMIN_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// A file holding the token (its first line).
    #[arg(long, env = "OUTBOX_ADMIN_TOKEN_FILE", conflicts_with = "auth_token")]
    auth_token_file: Option<PathBuf>,
    /// No actions: pages and API only read.
    #[arg(long, env = "OUTBOX_ADMIN_READ_ONLY")]
    read_only: bool,
    /// Keep payloads (personal data) off the pages and the API.
    #[arg(long, env = "OUTBOX_ADMIN_HIDE_PAYLOADS")]
    hide_payloads: bool,
    /// How often the overview's chart samples the counts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    sample_every: Duration,
}

#[derive(Args, Debug, Default)]
struct DoctorArgs {
    /// Publisher URL to ping (no message is sent) [default: relay.publisher of --config]
    #[arg(long, env = "OUTBOX_PUBLISHER", hide_env_values = true)]
    publisher: Option<String>,
    /// File holding the publisher URL.
    #[arg(long, env = "OUTBOX_PUBLISHER_FILE")]
    publisher_file: Option<PathBuf>,
    /// Signature verification keys file, as for `relay`.
    #[arg(long, env = "OUTBOX_SIGNING_KEYS_FILE")]
    signing_keys_file: Option<PathBuf>,
}

#[derive(Args, Debug, Default)]
struct RelayArgs {
    /// Publisher URL: stdout, null, kafka://…, amqp(s)://…, redis(s)://…, nats://…, http(s)://… (webhooks)
    #[arg(long, env = "OUTBOX_PUBLISHER", hide_env_values = true)]
    publisher: Option<String>,
    /// File holding the publisher URL (a mounted secret: SASL or broker passwords).
    #[arg(long, env = "OUTBOX_PUBLISHER_FILE")]
    publisher_file: Option<PathBuf>,
    /// Keep running (jaiminho's --run-in-loop); without it, publish until nothing is due.
    #[arg(long = "loop", env = "OUTBOX_LOOP")]
    run_loop: bool,
    /// Idle poll interval in loop mode, e.g. 500ms, 1s [default: 1s]
    #[arg(long, env = "OUTBOX_INTERVAL", value_parser = humantime::parse_duration)]
    interval: Option<Duration>,
    /// Serve only these streams (repeatable) [default: all]
    #[arg(long = "stream", env = "OUTBOX_STREAMS", value_delimiter = ',')]
    streams: Vec<String>,
    /// Rows per batch [default: 100]
    #[arg(long, env = "OUTBOX_BATCH")]
    batch: Option<usize>,
    /// Batches in flight at once (overlaps claiming and publishing) [default: 1]
    #[arg(long, env = "OUTBOX_CONCURRENCY")]
    concurrency: Option<usize>,
    /// Lease on claimed rows [default: 30s]
    #[arg(long, env = "OUTBOX_LEASE", value_parser = humantime::parse_duration)]
    lease: Option<Duration>,
    /// Deadline of one publish call; must be under 90% of the lease [default: 10s]
    #[arg(long, env = "OUTBOX_PUBLISH_TIMEOUT", value_parser = humantime::parse_duration)]
    publish_timeout: Option<Duration>,
    /// Deadline of one store call (claim, settle): a database that stops answering without
    /// closing the connection is given up and retried [default: 30s]
    #[arg(long, env = "OUTBOX_STORE_TIMEOUT", value_parser = humantime::parse_duration)]
    store_timeout: Option<Duration>,
    /// First retry delay after a failed publish, doubling per attempt [default: 1s]
    #[arg(long, env = "OUTBOX_RETRY_INITIAL", value_parser = humantime::parse_duration)]
    retry_initial: Option<Duration>,
    /// Longest retry delay [default: 5m]
    #[arg(long, env = "OUTBOX_RETRY_MAX", value_parser = humantime::parse_duration)]
    retry_max: Option<Duration>,
    /// Attempts before dead-lettering (publish-on-commit) or reporting stuck (keep-order) [default: 10]
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS")]
    max_attempts: Option<u32>,
    /// Delete rows once published instead of marking them sent.
    #[arg(long, env = "OUTBOX_DELETE_AFTER_SEND")]
    delete_after_send: bool,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9000), path /metrics.
    #[arg(long, env = "OUTBOX_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// File of signature verification keys, one `id:secret` per line, the active key first
    /// ('#' comments). Keys can also come from OUTBOX_SIGNING_KEYS or the config file, never
    /// from a flag. Signed rows that do not verify are never published.
    #[arg(long, env = "OUTBOX_SIGNING_KEYS_FILE")]
    signing_keys_file: Option<PathBuf>,
    /// Also refuse rows that carry no signature (needs verification keys). The default
    /// whenever keys are loaded: whoever can write the table could otherwise strip a
    /// signature and change the row.
    #[arg(long, env = "OUTBOX_REQUIRE_SIGNATURES")]
    require_signatures: bool,
    /// With verification keys loaded, publish rows that carry no signature anyway (while
    /// writers are being moved to signing); a warning says so at start-up.
    #[arg(
        long,
        env = "OUTBOX_ALLOW_UNSIGNED",
        conflicts_with = "require_signatures"
    )]
    allow_unsigned: bool,
    /// Deployment label bound into signatures (`Signer::label` of the writers) [default: none]
    #[arg(long, env = "OUTBOX_SIGNING_LABEL")]
    signing_label: Option<String>,
}

#[derive(Args, Debug)]
struct CleanArgs {
    /// Retention, e.g. 7d, 12h [default: 7d]
    #[arg(long, env = "OUTBOX_OLDER_THAN", value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    /// Also delete dead letters older than the retention.
    #[arg(long)]
    include_dead: bool,
    /// Rows per DELETE [default: 1000]
    #[arg(long)]
    batch: Option<usize>,
    /// Also delete this inbox table's marks of processed messages; repeat for several.
    #[arg(long = "inbox", value_name = "TABLE")]
    inboxes: Vec<String>,
    /// How long inbox marks are kept: longer than the broker can redeliver a message, or a
    /// redelivered one is processed again [default: 14d]
    #[arg(long, value_parser = humantime::parse_duration)]
    inbox_older_than: Option<Duration>,
}

/// How long `outbox clean --inbox` keeps inbox marks by default.
const DEFAULT_INBOX_RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);

#[derive(Subcommand, Debug)]
enum InboxCommand {
    /// Show the inbox's dead letters, oldest first.
    Dead {
        /// Only this consumer's.
        #[arg(long)]
        consumer: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Give a dead letter back to its consumer, which processes it again (attempts from zero).
    Requeue {
        /// The consumer.
        #[arg(long)]
        consumer: String,
        /// The message id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum DeadCommand {
    /// Show dead letters, newest first (as the console does), a page at a time.
    List {
        #[arg(long)]
        stream: Option<String>,
        /// Rows per page (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// The next page: rows below this seq (the `next_before` of the previous page).
        #[arg(long)]
        before: Option<i64>,
    },
    /// Move dead letters back to pending (attempts reset).
    Requeue(SelectArgs),
    /// Delete dead letters.
    Purge(SelectArgs),
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct SelectArgs {
    /// Every dead letter.
    #[arg(long)]
    all: bool,
    /// The dead letters of one stream.
    #[arg(long)]
    stream: Option<String>,
    /// These rows (repeatable).
    #[arg(long = "seq", value_delimiter = ',')]
    seqs: Vec<i64>,
}

impl SelectArgs {
    fn selector(&self) -> Selector {
        match (&self.stream, self.seqs.is_empty()) {
            (Some(s), _) => Selector::Stream(s.clone()),
            (None, false) => Selector::Seqs(self.seqs.clone()),
            _ => Selector::All,
        }
    }
}

/// The TOML file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    store: Option<String>,
    store_file: Option<PathBuf>,
    table: Option<String>,
    log_format: Option<LogFormat>,
    output: Option<Output>,
    #[serde(default)]
    relay: FileRelay,
    #[serde(default)]
    clean: FileClean,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRelay {
    publisher: Option<String>,
    store_timeout: Option<String>,
    retry_initial: Option<String>,
    retry_max: Option<String>,
    publisher_file: Option<PathBuf>,
    interval: Option<String>,
    streams: Option<Vec<String>>,
    batch: Option<usize>,
    concurrency: Option<usize>,
    lease: Option<String>,
    publish_timeout: Option<String>,
    max_attempts: Option<u32>,
    delete_after_send: Option<bool>,
    metrics_addr: Option<SocketAddr>,
    signing_keys_file: Option<PathBuf>,
    signing_keys: Option<Vec<String>>,
    require_signatures: Option<bool>,
    allow_unsigned: Option<bool>,
    signing_label: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileClean {
    older_than: Option<String>,
    batch: Option<usize>,
}

fn load_file(path: &Option<PathBuf>) -> Result<FileConfig, Error> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::config(format!("cannot read config file {}", path.display())).with_source(e)
    })?;
    toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| format!(" (line {})", text[..s.start].lines().count().max(1)))
            .unwrap_or_default();
        Error::config(format!(
            "malformed config file {}{line}: {}",
            path.display(),
            without_values(e.message().trim())
        ))
    })
}

/// Write a generated document to stdout. A reader that stops early (`| head`) is not an
/// error (exit 0, as for `cat`); any other write error is.
fn write_out(text: &[u8], what: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write {what}: {e}");
            ExitCode::from(exit::FAILED)
        }
    }
}

/// An action's document with the unit it took.
fn unit_json(mut doc: serde_json::Value, stream: &str, unit: &str) -> serde_json::Value {
    doc["stream"] = serde_json::json!(stream);
    doc["unit"] = serde_json::json!(unit);
    doc
}

/// A relay's counts as log fields (not a `Debug` value).
fn log_report(r: &outbox_core::BatchReport, what: &str) {
    tracing::info!(
        claimed = r.claimed,
        published = r.published,
        failed = r.failed,
        dead = r.dead,
        released = r.released,
        quarantined = r.quarantined,
        parked = r.parked,
        "{what}"
    );
}

/// A TOML error message on one line without the values it quotes (`invalid type: string
/// "k1:s3cret", expected a sequence`: the value may be a secret). What the parser expected
/// and the names of keys (in backticks: `expected `"`, `'``, `unknown field `tabel``) are
/// kept: the user needs them.
fn without_values(message: &str) -> String {
    let chars: Vec<char> = message.chars().collect();
    let mut out = String::with_capacity(message.len());
    let mut in_value = false;
    for (i, &c) in chars.iter().enumerate() {
        // A quote in backticks is a token the parser expected, not a value.
        let token = i > 0 && chars[i - 1] == '`' && chars.get(i + 1) == Some(&'`');
        match c {
            '"' if in_value => {
                in_value = false;
                out.push_str("<value>");
            }
            _ if in_value => {}
            '"' if !token => in_value = true,
            '\n' => out.push_str("; "),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod toml_messages {
    use super::without_values;

    #[test]
    fn values_go_tokens_and_keys_stay() {
        assert_eq!(
            without_values("invalid type: string \"k1:s3cret\", expected a sequence"),
            "invalid type: string <value>, expected a sequence"
        );
        assert_eq!(
            without_values("invalid string\nexpected `\"`, `'`"),
            "invalid string; expected `\"`, `'`"
        );
        assert_eq!(
            without_values("unknown field `tabel`, expected one of `table`, `store`"),
            "unknown field `tabel`, expected one of `table`, `store`"
        );
    }
}

/// A URL from, in order: the flag or its environment variable, the file named by the `-file`
/// flag or variable, the config file's value, the file the config file names. A URL read from
/// a file loses surrounding whitespace (a trailing newline).
fn first_of(
    value: Option<String>,
    value_file: &Option<PathBuf>,
    config_value: Option<String>,
    config_file: &Option<PathBuf>,
    what: &str,
) -> Result<Option<String>, Error> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| {
                Error::config(format!(
                    "cannot read the {what} URL file {}: {e}",
                    path.display()
                ))
            })
    };
    if value.is_some() {
        return Ok(value);
    }
    if let Some(p) = value_file {
        return read(p).map(Some);
    }
    if config_value.is_some() {
        return Ok(config_value);
    }
    config_file.as_ref().map(read).transpose()
}

fn duration(field: &str, value: Option<String>) -> Result<Option<Duration>, Error> {
    value
        .map(|v| {
            humantime::parse_duration(&v)
                .map_err(|e| Error::config(format!("{field} = {v:?}: {e}")))
        })
        .transpose()
}

fn init_logging(format: LogFormat) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Clients that log credentials at verbose levels are capped, whatever RUST_LOG asks (and
    // left alone when it asks for less): the AMQP client logs its handshake at trace, SASL
    // credentials included (capped at debug); the NATS client its CONNECT at debug (capped at
    // info). A directive is added only above the cap: it must never raise a level.
    let asked = filter.max_level_hint();
    for (targets, cap) in [
        (
            &[
                "lapin",
                "amq_protocol",
                "amq_protocol_tcp",
                "amq_protocol_types",
            ][..],
            tracing_subscriber::filter::LevelFilter::DEBUG,
        ),
        (
            &["async_nats"][..],
            tracing_subscriber::filter::LevelFilter::INFO,
        ),
    ] {
        if asked.is_some_and(|a| a > cap) {
            for target in targets {
                if let Ok(d) = format!("{target}={cap}").parse() {
                    filter = filter.add_directive(d);
                }
            }
        }
    }
    // PostgreSQL's "relation … already exists, skipping" notices of an idempotent migrate are
    // not news.
    if let Ok(d) = "sqlx::postgres::notice=warn".parse() {
        filter = filter.add_directive(d);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(report::colour())
        .with_writer(std::io::stderr);
    match format {
        // Flat fields, as the error line prints them.
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Human => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("stop requested; finishing the batch in flight");
}

/// Warn when a URL with a password came from a flag: flags show in `ps` and shell history.
/// SQL statements for a DBA: one per paragraph, `;`-terminated, after a comment; or a JSON
/// document `{"statements": [...]}`.
fn print_statements(statements: &[String], output: Output, what: &str) {
    match output {
        Output::Json => println!("{}", serde_json::json!({ "statements": statements })),
        Output::Text => {
            println!("-- {what}");
            for s in statements {
                println!("{s};\n");
            }
        }
    }
}

fn warn_about_flag_secrets(matches: &clap::ArgMatches) {
    let check = |m: &clap::ArgMatches, id: &str, instead: &str| {
        let from_flag = m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        if let (true, Some(url)) = (from_flag, m.get_one::<String>(id)) {
            if outbox_core::redact_url(url) != *url {
                tracing::warn!(
                    "--{id} carries a password, which other users can read in the process list; use {instead}"
                );
            }
        }
    };
    check(matches, "store", "OUTBOX_STORE or --store-file");
    if let Some(("admin", admin)) = matches.subcommand() {
        if admin.value_source("auth_token") == Some(clap::parser::ValueSource::CommandLine) {
            tracing::warn!("--auth-token is on the command line, where other users of this machine can read it (ps): use OUTBOX_ADMIN_TOKEN or --auth-token-file");
        }
    }
    if let Some(("relay", relay)) = matches.subcommand() {
        check(relay, "publisher", "OUTBOX_PUBLISHER or --publisher-file");
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match &cli.command {
        Command::Completions { shell } => {
            let mut text = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "outbox", &mut text);
            return write_out(&text, "the completion script");
        }
        Command::Man => {
            let mut text = Vec::new();
            if let Err(e) = clap_mangen::Man::new(Cli::command()).render(&mut text) {
                eprintln!("error: cannot render the manual page: {e}");
                return ExitCode::from(exit::FAILED);
            }
            return write_out(&text, "the manual page");
        }
        _ => {}
    }
    // JSON asked for (logs or output): errors are JSON too.
    let json_asked =
        cli.log_format == Some(LogFormat::Json) || cli.json || cli.output == Some(Output::Json);
    let file = match load_file(&cli.config) {
        Ok(f) => f,
        Err(e) => {
            report::print_error(&e, json_asked);
            return ExitCode::from(report::exit_code(&e));
        }
    };
    let log_format = cli
        .log_format
        .or(file.log_format)
        .unwrap_or(LogFormat::Human);
    let json_errors =
        json_asked || log_format == LogFormat::Json || file.output == Some(Output::Json);
    init_logging(log_format);
    warn_about_flag_secrets(&matches);
    match run(cli, file).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            report::print_error(&e, json_errors);
            ExitCode::from(report::exit_code(&e))
        }
    }
}

async fn run(cli: Cli, file: FileConfig) -> Result<u8, Error> {
    let output = if cli.json {
        Output::Json
    } else {
        cli.output.or(file.output).unwrap_or_default()
    };
    let store_url = first_of(
        cli.store,
        &cli.store_file,
        file.store.clone(),
        &file.store_file,
        "store",
    )?
    .ok_or_else(|| {
        Error::config(
            "no store: pass --store URL or --store-file PATH, set OUTBOX_STORE or OUTBOX_STORE_FILE, or set store in --config",
        )
    })?;
    let table = cli.table.or(file.table).unwrap_or_else(|| "outbox".into());
    if let Command::Doctor(args) = cli.command {
        let publisher_url = first_of(
            args.publisher,
            &args.publisher_file,
            file.relay.publisher.clone(),
            &file.relay.publisher_file,
            "publisher",
        )?;
        let signing = signing::load(
            args.signing_keys_file.as_deref(),
            std::env::var("OUTBOX_SIGNING_KEYS").ok().as_deref(),
            file.relay.signing_keys_file.as_deref(),
            file.relay.signing_keys.as_deref(),
        );
        let checks = doctor::examine(doctor::Setup {
            store_url: &store_url,
            table: &table,
            publisher_url,
            signing,
        })
        .await;
        return Ok(if doctor::print(&checks, output) {
            exit::OK
        } else {
            exit::FAILED
        });
    }
    if let Command::Relay(args) = cli.command {
        return relay(&store_url, &table, *args, file.relay).await;
    }
    if let Command::Grants(args) = &cli.command {
        let roles = outbox_sql::roles::Roles {
            writer: args.writer.clone(),
            relay: args.relay.clone(),
            admin: args.admin.clone(),
        };
        if roles == outbox_sql::roles::Roles::default() {
            return Err(Error::config(
                "grants: name at least one role: --writer, --relay or --admin",
            ));
        }
        let statements = match backends::scheme(&store_url) {
            "postgres" | "postgresql" => outbox_sql::roles::postgres(&table, &roles)?,
            "mysql" | "mariadb" => {
                let database = backends::database_of(&store_url).ok_or_else(|| {
                    Error::config("grants: the store URL names no database (mysql://host/DATABASE)")
                })?;
                outbox_sql::roles::mysql(&database, &table, &args.account_host, &roles)?
            }
            _ => {
                return Err(Error::config(
                    "grants: SQLite has no roles; grants are for postgres:// and mysql:// stores",
                ))
            }
        };
        print_statements(
            &statements,
            output,
            "Grants: run as the tables' owner (or a role that may grant on them).",
        );
        return Ok(exit::OK);
    }
    if let Command::Migrate {
        print_sql: true,
        inboxes,
    } = &cli.command
    {
        if !inboxes.is_empty() {
            return Err(Error::config(
                "migrate --print-sql prints the outbox's tables; create inbox tables with `outbox migrate --inbox` as their owner",
            ));
        }
        let statements =
            match backends::scheme(&store_url) {
                "postgres" | "postgresql" => outbox_sql::postgres::PgStore::schema_sql(&table)?,
                "mysql" | "mariadb" => match AnyStore::open(&store_url, &table, false).await? {
                    AnyStore::MySql(s) => s.schema_sql().await?,
                    _ => unreachable!("a mysql:// URL opens a MySQL store"),
                },
                _ => return Err(Error::config(
                    "migrate --print-sql: SQLite has no roles to separate; run `outbox migrate`",
                )),
            };
        print_statements(
            &statements,
            output,
            "The outbox's tables: run as their owner; every statement is idempotent. Upgrades of existing tables: run `outbox migrate` as the owner.",
        );
        return Ok(exit::OK);
    }
    let create = matches!(cli.command, Command::Migrate { .. });
    let store = AnyStore::open(&store_url, &table, create).await?;
    let json = output == Output::Json;
    match cli.command {
        Command::Doctor(_) | Command::Grants(_) | Command::Completions { .. } | Command::Man => {
            Ok(exit::OK)
        }
        Command::Migrate { inboxes, .. } => {
            let started = std::time::Instant::now();
            if store.table_exists().await? {
                tracing::info!(table = %table, "upgrading the table in place if needed (a large table of version 0.1 takes a while)");
            } else {
                tracing::info!(table = %table, "creating the table");
            }
            store.store().migrate().await?;
            for inbox in &inboxes {
                store.inbox_table(inbox)?.migrate().await?;
                if !json {
                    println!("inbox table {inbox} is ready");
                }
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({"table": table, "ready": true, "seconds": started.elapsed().as_secs_f64()})
                );
            } else {
                println!("table {table} is ready");
            }
            Ok(exit::OK)
        }
        Command::Relay(_) => Ok(exit::OK), // handled above
        Command::Clean(args) => {
            store.require_table().await?;
            let older_than = args
                .older_than
                .or(duration("clean.older_than", file.clean.older_than)?);
            let mut cleaner = Cleaner::new(store.store()).include_dead(args.include_dead);
            for inbox in &args.inboxes {
                cleaner = cleaner.inbox(
                    store.inbox_table(inbox)?,
                    args.inbox_older_than.unwrap_or(DEFAULT_INBOX_RETENTION),
                );
            }
            if let Some(r) = older_than {
                cleaner = cleaner.retention(r);
            }
            if let Some(b) = args.batch.or(file.clean.batch) {
                cleaner = cleaner.batch_size(b)?;
            }
            let interrupt = report::Interrupt::catch();
            let mut progress = report::Progress::new("clean");
            let (n, finished) = cleaner
                .run_once_with(|done| {
                    progress.update(done);
                    !interrupt.asked()
                })
                .await?;
            progress.finish();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"deleted": n, "finished": finished})
                );
            } else if finished {
                println!("deleted {n} rows");
            } else {
                println!("deleted {n} rows, then stopped (interrupted); run it again to go on");
            }
            Ok(if finished {
                exit::OK
            } else {
                exit::INTERRUPTED
            })
        }
        Command::Stats => {
            store.require_table().await?;
            let stats = store.store().stats().await?;
            let now = SystemTime::now();
            let age = |s: &outbox_core::StreamStats| {
                s.oldest_pending.and_then(|t| now.duration_since(t).ok())
            };
            if json {
                println!("{}", json::stats(&table, &stats, now));
                return Ok(exit::OK);
            }
            println!(
                "{:<24} {:>10} {:>10} {:>10}  oldest pending",
                "stream", "pending", "sent", "dead"
            );
            let mut rows = stats.streams.clone();
            rows.push(stats.total());
            for s in rows {
                let age = age(&s)
                    .map(|d| {
                        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
                    })
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<24} {:>10} {:>10} {:>10}  {age}",
                    printable(&s.stream),
                    s.pending,
                    s.sent,
                    s.dead
                );
            }
            Ok(exit::OK)
        }
        Command::Admin(args) => {
            let token = match (&args.auth_token, &args.auth_token_file) {
                (_, Some(file)) => {
                    let text = std::fs::read_to_string(file).map_err(|e| {
                        Error::config(format!(
                            "admin: cannot read the token file {}",
                            file.display()
                        ))
                        .with_source(e)
                    })?;
                    Some(text.lines().next().unwrap_or("").trim().to_owned())
                }
                (token, None) => token.clone(),
            };
            let options = admin::AdminOptions {
                listen: args.listen,
                token,
                read_only: args.read_only,
                hide_payloads: args.hide_payloads,
                sample_every: args.sample_every.max(Duration::from_millis(100)),
            };
            admin::check(&options)?;
            store.require_table().await?;
            let label = outbox_core::redact_url(&store_url);
            admin::serve(store.store(), &table, label, options, async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async {
                        match term.as_mut() {
                            Some(t) => { t.recv().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => {}
                }
            })
            .await?;
            Ok(exit::OK)
        }
        Command::Parked { stream, limit } => {
            store.require_table().await?;
            let units = store.store().parked_units(stream.as_deref(), limit).await?;
            let now = SystemTime::now();
            if json {
                println!("{}", json::parked(&units));
                return Ok(exit::OK);
            }
            for u in units {
                let age = now
                    .duration_since(u.parked_at)
                    .map(|d| {
                        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
                    })
                    .unwrap_or_else(|_| "0s".into());
                let more = if u.pending >= outbox_core::PARKED_COUNT_CAP {
                    "+"
                } else {
                    ""
                };
                println!(
                    "stream={} unit={} parked={age} ago pending={}{more} head_seq={} reason={}",
                    printable(&u.stream),
                    printable(&u.unit),
                    u.pending,
                    u.head.map_or_else(|| "-".to_owned(), |h| h.to_string()),
                    printable(&u.reason.unwrap_or_default())
                );
            }
            Ok(exit::OK)
        }
        Command::Park {
            stream,
            unit,
            reason,
        } => {
            store.require_table().await?;
            store.store().park_unit(&stream, &unit, &reason).await?;
            tracing::info!(stream = %printable(&stream), unit = %printable(&unit), "unit parked");
            let said = format!(
                "parked unit {:?} of stream {:?}",
                printable(&unit),
                printable(&stream)
            );
            if json {
                println!(
                    "{}",
                    unit_json(json::action("park", 1, &said), &stream, &unit)
                );
            } else {
                println!("{said}");
            }
            Ok(exit::OK)
        }
        Command::Resume { stream, unit } => {
            store.require_table().await?;
            store.store().resume_unit(&stream, &unit).await?;
            tracing::info!(stream = %printable(&stream), unit = %printable(&unit), "unit resumed");
            let said = format!(
                "resumed unit {:?} of stream {:?}",
                printable(&unit),
                printable(&stream)
            );
            if json {
                println!(
                    "{}",
                    unit_json(json::action("resume", 1, &said), &stream, &unit)
                );
            } else {
                println!("{said}");
            }
            Ok(exit::OK)
        }
        Command::Skip { stream, unit } => {
            store.require_table().await?;
            let head = store.store().skip_head(&stream, &unit).await?;
            tracing::info!(stream = %printable(&stream), unit = %printable(&unit), head = %head.map_or_else(|| "-".to_owned(), |h| h.to_string()), "head skipped, unit resumed");
            let said = match head {
                Some(seq) => format!(
                    "dead-lettered seq {seq} and resumed unit {:?} of stream {:?}",
                    printable(&unit),
                    printable(&stream)
                ),
                None => format!(
                    "unit {:?} of stream {:?} had no pending message; resumed",
                    printable(&unit),
                    printable(&stream)
                ),
            };
            if json {
                let mut doc = unit_json(
                    json::action("skip", u64::from(head.is_some()), &said),
                    &stream,
                    &unit,
                );
                doc["dead_lettered_seq"] = serde_json::json!(head);
                println!("{doc}");
            } else {
                println!("{said}");
            }
            Ok(exit::OK)
        }
        Command::Inbox {
            inbox_table,
            command,
        } => {
            let inbox = store.inbox_table(&inbox_table)?;
            match command {
                InboxCommand::Dead { consumer, limit } => {
                    let dead = inbox.dead_letters(consumer.as_deref(), limit).await?;
                    if json {
                        let rows: Vec<_> = dead
                            .iter()
                            .map(|d| {
                                serde_json::json!({
                                    "consumer": d.consumer,
                                    "id": d.message.id.to_string(),
                                    "source": d.message.source,
                                    "stream": d.message.stream,
                                    "key": d.message.key,
                                    "attempts": d.attempts,
                                    "error": d.error,
                                    "first_seen_at_ms": outbox_core::to_millis(d.first_seen_at),
                                })
                            })
                            .collect();
                        println!("{}", serde_json::json!({ "dead_letters": rows }));
                        return Ok(exit::OK);
                    }
                    for d in dead {
                        println!(
                            "consumer={} id={} source={} attempts={} error={}",
                            printable(&d.consumer),
                            d.message.id,
                            printable(&d.message.source),
                            d.attempts,
                            printable(&d.error.unwrap_or_default())
                        );
                    }
                    Ok(exit::OK)
                }
                InboxCommand::Requeue { consumer, id } => {
                    let id: outbox_core::MessageId = id.parse().map_err(|_| {
                        Error::config(format!("{:?} is not a message id", printable(&id)))
                    })?;
                    inbox.requeue(&consumer, id).await?;
                    if json {
                        println!("{}", serde_json::json!({"requeued": id.to_string()}));
                    } else {
                        println!("requeued {id} for {}", printable(&consumer));
                    }
                    Ok(exit::OK)
                }
            }
        }
        Command::Dead { command } => {
            store.require_table().await?;
            let s = store.store();
            match command {
                DeadCommand::List {
                    stream,
                    limit,
                    before,
                } => {
                    // Newest first, a page at a time, as the console lists them.
                    let filter = outbox_core::MessageFilter {
                        stream,
                        status: Some(outbox_core::Status::Dead),
                        before,
                        limit,
                        ..Default::default()
                    };
                    filter.validate()?;
                    let dead = s.messages(&filter).await?;
                    if json {
                        println!("{}", json::messages(&dead, limit, false));
                        return Ok(exit::OK);
                    }
                    for m in dead {
                        println!(
                            "seq={} id={} stream={} destination={} attempts={} error={}",
                            m.seq,
                            m.envelope.id,
                            printable(&m.envelope.message.stream),
                            printable(&m.envelope.message.destination),
                            m.attempts,
                            printable(&m.last_error.unwrap_or_default())
                        );
                    }
                    Ok(exit::OK)
                }
                DeadCommand::Requeue(sel) => bulk_dead(s, &sel, true, json).await,
                DeadCommand::Purge(sel) => bulk_dead(s, &sel, false, json).await,
            }
        }
    }
}

/// Requeue (or purge) dead letters. `--seq` rows in one statement; `--all` and `--stream` in
/// batches of [`BULK_BATCH`] with progress, each batch its own statement, so Ctrl-C stops
/// between two batches with every row either changed or not.
async fn bulk_dead(
    s: Arc<dyn Store>,
    sel: &SelectArgs,
    requeue: bool,
    json: bool,
) -> Result<u8, Error> {
    let verb = if requeue { "requeued" } else { "purged" };
    let apply = |selector: Selector| {
        let s = s.clone();
        async move {
            if requeue {
                s.requeue(&selector).await
            } else {
                s.purge_dead(&selector).await
            }
        }
    };
    let (n, finished) = if !sel.seqs.is_empty() {
        (apply(sel.selector()).await?, true)
    } else {
        let interrupt = report::Interrupt::catch();
        let mut progress = report::Progress::new(if requeue { "requeue" } else { "purge" });
        let mut n = 0;
        let finished = loop {
            let batch: Vec<i64> = s
                .dead_letters(sel.stream.as_deref(), BULK_BATCH)
                .await?
                .iter()
                .map(|m| m.seq)
                .collect();
            if batch.is_empty() {
                break true;
            }
            let changed = apply(Selector::Seqs(batch)).await?;
            if changed == 0 {
                // Rows listed but not changed (another operator got there first): done.
                break true;
            }
            n += changed;
            progress.update(n);
            if interrupt.asked() {
                break false;
            }
        };
        progress.finish();
        (n, finished)
    };
    if json {
        println!("{}", serde_json::json!({ verb: n, "finished": finished }));
    } else if finished {
        println!("{verb} {n}");
    } else {
        println!("{verb} {n}, then stopped (interrupted); run it again to go on");
    }
    Ok(if finished {
        exit::OK
    } else {
        exit::INTERRUPTED
    })
}

/// Rows per statement of `dead requeue --all` / `dead purge --all`.
const BULK_BATCH: usize = 500;

/// Open the store for a relay in `--loop` mode: an unreachable database or a table not made
/// yet (the relay started before `outbox migrate`) is waited for, with a growing pause (to
/// 30 s), a warning each time and `outbox_store_up` at 0, instead of an exit. None when asked
/// to stop meanwhile.
async fn open_until_ready(url: &str, table: &str) -> Result<Option<AnyStore>, Error> {
    until_ready("store", url, "outbox_store", || async {
        let store = AnyStore::open(url, table, false).await?;
        match store.table_exists().await? {
            true => Ok(store),
            false => Err(Error::transient(format!(
                "table {table:?} does not exist yet (run `outbox migrate`)"
            ))),
        }
    })
    .await
}

/// Open something the relay needs (the store, the publisher) the way a service under
/// systemd or Kubernetes should: a transient failure is logged and tried again, with pauses
/// from 200 ms doubling to 30 s, until it works or the process is asked to stop (`None`); a
/// permanent one (a bad URL, a refused password) is returned. `gauge` gets `_up` (1 or 0)
/// and `_unavailable_total`.
async fn until_ready<T, F, Fut>(
    what: &str,
    url: &str,
    gauge: &'static str,
    mut open: F,
) -> Result<Option<T>, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut pause = Duration::from_millis(200);
    let shown = outbox_core::redact_url(url);
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let problem = match open().await {
            Ok(ready) => {
                metrics::gauge!(format!("{gauge}_up")).set(1.0);
                return Ok(Some(ready));
            }
            Err(e) if e.is_transient() => report::describe(&e),
            Err(e) => return Err(e),
        };
        metrics::gauge!(format!("{gauge}_up")).set(0.0);
        metrics::counter!(format!("{gauge}_unavailable_total")).increment(1);
        tracing::warn!(%what, url = %shown, %problem, retry_in = %humantime::format_duration(pause), "cannot use the {what} yet; retrying");
        tokio::select! {
            _ = &mut stop => return Ok(None),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

async fn relay(
    store_url: &str,
    table: &str,
    args: RelayArgs,
    file: FileRelay,
) -> Result<u8, Error> {
    let publisher_url = first_of(
        args.publisher,
        &args.publisher_file,
        file.publisher.clone(),
        &file.publisher_file,
        "publisher",
    )?
    .ok_or_else(|| {
        Error::config(
            "no publisher: pass --publisher URL or --publisher-file PATH, set OUTBOX_PUBLISHER or OUTBOX_PUBLISHER_FILE, or set relay.publisher",
        )
    })?;
    let metrics_addr = args.metrics_addr.or(file.metrics_addr);
    if let Some(addr) = metrics_addr {
        metrics_endpoint::serve(addr).await?;
        tracing::info!(%addr, "serving Prometheus metrics on GET /metrics");
    }
    // Once: an unreachable store is an error (exit 3). In a loop: it is waited for.
    let store = if args.run_loop {
        match open_until_ready(store_url, table).await? {
            Some(s) => s,
            None => {
                tracing::info!("stopped before the store was ready");
                return Ok(exit::OK);
            }
        }
    } else {
        let s = AnyStore::open(store_url, table, false).await?;
        s.require_table().await?;
        s
    };
    // The same for the broker: a broker that is down during a deploy is waited for, not a
    // crash loop.
    let publisher = if args.run_loop {
        match until_ready("publisher", &publisher_url, "outbox_publisher", || async {
            let p = open_publisher(&publisher_url).await?;
            p.check().await?;
            Ok(p)
        })
        .await?
        {
            Some(p) => p,
            None => {
                tracing::info!("stopped before the publisher was ready");
                return Ok(exit::OK);
            }
        }
    } else {
        open_publisher(&publisher_url).await?
    };
    let defaults = RelayConfig::default();
    let streams = if !args.streams.is_empty() {
        args.streams
    } else {
        file.streams.unwrap_or_default()
    };
    let config = RelayConfig {
        streams: if streams.is_empty() {
            StreamFilter::All
        } else {
            StreamFilter::Only(streams)
        },
        batch_size: args.batch.or(file.batch).unwrap_or(defaults.batch_size),
        concurrency: args
            .concurrency
            .or(file.concurrency)
            .unwrap_or(defaults.concurrency),
        lease: args
            .lease
            .or(duration("relay.lease", file.lease)?)
            .unwrap_or(defaults.lease),
        poll_interval: args
            .interval
            .or(duration("relay.interval", file.interval)?)
            .unwrap_or(defaults.poll_interval),
        store_timeout: args
            .store_timeout
            .or(duration("relay.store_timeout", file.store_timeout)?)
            .unwrap_or(defaults.store_timeout),
        delivery: outbox_core::Delivery {
            publish_timeout: args
                .publish_timeout
                .or(duration("relay.publish_timeout", file.publish_timeout)?)
                .unwrap_or(defaults.delivery.publish_timeout),
            delete_after_send: args.delete_after_send || file.delete_after_send.unwrap_or(false),
            retry: RetryPolicy {
                max_attempts: args
                    .max_attempts
                    .or(file.max_attempts)
                    .unwrap_or(defaults.delivery.retry.max_attempts),
                initial: args
                    .retry_initial
                    .or(duration("relay.retry_initial", file.retry_initial)?)
                    .unwrap_or(defaults.delivery.retry.initial),
                max: args
                    .retry_max
                    .or(duration("relay.retry_max", file.retry_max)?)
                    .unwrap_or(defaults.delivery.retry.max),
                ..defaults.delivery.retry.clone()
            },
            ..defaults.delivery.clone()
        },
        ..defaults
    };
    let signer = signing::load(
        args.signing_keys_file.as_deref(),
        std::env::var("OUTBOX_SIGNING_KEYS").ok().as_deref(),
        file.signing_keys_file.as_deref(),
        file.signing_keys.as_deref(),
    )?;
    let signer = match args.signing_label.or(file.signing_label) {
        Some(label) => signer.map(|s| s.label(label)),
        None => signer,
    };
    let asked = args.require_signatures || file.require_signatures.unwrap_or(false);
    if asked && signer.is_none() {
        return Err(Error::config(
            "--require-signatures needs verification keys: --signing-keys-file, OUTBOX_SIGNING_KEYS or relay.signing_keys",
        ));
    }
    let allow_unsigned = args.allow_unsigned || file.allow_unsigned.unwrap_or(false);
    if asked && allow_unsigned {
        return Err(Error::config(
            "--require-signatures and --allow-unsigned (relay.require_signatures, relay.allow_unsigned) contradict each other",
        ));
    }
    // With keys loaded, unsigned rows are refused unless explicitly allowed.
    let require_signatures = signer.is_some() && !allow_unsigned;
    if signer.is_some() && allow_unsigned {
        tracing::warn!("--allow-unsigned: rows without a signature are published unverified; whoever can write the outbox table can strip a signature and change a row. Remove the flag once every writer signs");
    }
    let config = RelayConfig {
        delivery: outbox_core::Delivery {
            signer,
            ..config.delivery
        },
        require_signatures,
        ..config
    };
    let s = store.store();
    let relay = Relay::builder(s.clone(), publisher)
        .config(config)
        .build()?;
    let verification = match &relay.config().delivery.signer {
        None => "off: signed rows are refused as unverifiable".to_owned(),
        Some(signer) => format!(
            "{} key(s) loaded ({}); unsigned rows are {}",
            signer.key_ids().count(),
            signer.key_ids().collect::<Vec<_>>().join(", "),
            if require_signatures {
                "refused"
            } else {
                "published (--allow-unsigned)"
            }
        ),
    };
    tracing::info!(
        table = store.table(),
        owner = relay.owner(),
        signatures = %verification,
        "relay starting"
    );
    if !args.run_loop {
        let report = relay.run_once().await?;
        log_report(&report, "relay finished");
        let trouble = report.failed + report.dead + report.quarantined;
        if trouble > 0 {
            tracing::warn!(
                failed = report.failed,
                dead = report.dead,
                quarantined = report.quarantined,
                "partly done: some messages were not published (see `outbox dead list` and the log above)"
            );
            return Ok(exit::PARTIAL);
        }
        return Ok(exit::OK);
    }
    // The backlog gauges cost a whole-table stats query: only when someone reads them.
    let gauges = metrics_addr.map(|_| tokio::spawn(backlog_gauges(s.clone())));
    let report = relay.run(shutdown_signal()).await;
    if let Some(g) = gauges {
        g.abort();
    }
    log_report(&report, "relay stopped");
    Ok(exit::OK)
}

/// How often the backlog gauges are refreshed at most: one stats query, independent of the
/// poll interval (a relay woken by NOTIFY may poll only every minute).
const GAUGE_REFRESH: Duration = Duration::from_secs(5);

/// The stats query may take at most this share of the time (and of one connection): on a
/// large table, where it takes longer, the gauges are refreshed less often.
const GAUGE_DUTY: u32 = 20;

/// The pause after a stats query that took `took`: at least [`GAUGE_REFRESH`], and
/// [`GAUGE_DUTY`] times the query, so the gauges never cost more than 1/20 of the time.
fn gauge_pause(took: Duration) -> Duration {
    GAUGE_REFRESH
        .max(took * GAUGE_DUTY)
        .min(Duration::from_secs(600))
}

/// Per-stream gauge series are capped at this many streams (the largest backlogs); the rest
/// are summed under stream "(other)", so a table with 20 000 streams does not make 60 000 series.
const MAX_STREAM_SERIES: usize = 100;

/// Backlog gauges per stream, plus the total under stream "*" (present even on an empty
/// table, so dashboards and alerts see 0 rather than nothing). Series of streams that are
/// gone stop being refreshed and expire (see `metrics_endpoint`).
async fn backlog_gauges(store: Arc<dyn Store>) {
    loop {
        let started = std::time::Instant::now();
        let stats = store.stats().await;
        let took = started.elapsed();
        metrics::gauge!("outbox_stats_query_seconds").set(took.as_secs_f64());
        if let Ok(stats) = stats {
            let now = SystemTime::now();
            let total = stats.total();
            let mut streams = stats.streams;
            streams.sort_by_key(|s| std::cmp::Reverse(s.pending + s.dead));
            let mut rows: Vec<_> = streams
                .drain(..streams.len().min(MAX_STREAM_SERIES))
                .collect();
            if !streams.is_empty() {
                let rest = outbox_core::Stats { streams }.total();
                rows.push(outbox_core::StreamStats {
                    stream: "(other)".into(),
                    ..rest
                });
            }
            rows.push(total);
            for s in rows {
                let stream = printable(&s.stream).into_owned();
                metrics::gauge!("outbox_backlog", "stream" => stream.clone()).set(s.pending as f64);
                metrics::gauge!("outbox_dead", "stream" => stream.clone()).set(s.dead as f64);
                let age = s
                    .oldest_pending
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or_default();
                metrics::gauge!("outbox_oldest_pending_seconds", "stream" => stream)
                    .set(age.as_secs_f64());
            }
        }
        tokio::time::sleep(gauge_pause(took)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stats query behind the gauges takes at most 1/20 of the time, however slow it is
    /// on a large table, and runs at most every 5 s.
    #[test]
    fn gauges_back_off_when_the_stats_query_is_slow() {
        assert_eq!(gauge_pause(Duration::from_millis(3)), GAUGE_REFRESH);
        assert_eq!(
            gauge_pause(Duration::from_millis(800)),
            Duration::from_secs(16)
        );
        assert_eq!(
            gauge_pause(Duration::from_secs(3600)),
            Duration::from_secs(600)
        );
    }
}
