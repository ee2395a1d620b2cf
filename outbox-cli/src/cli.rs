//! The command line: the commands, their flags and environment variables (clap).

use super::*;

#[derive(Parser, Debug)]
#[command(
    name = "outbox",
    version,
    about = "Transactional outbox: relay, clean, stats, dead letters, migrate, doctor",
    after_help = report::EXIT_CODES_HELP
)]
pub(crate) struct Cli {
    /// TOML file with settings (flags and environment variables win over it).
    #[arg(long, env = "OUTBOX_CONFIG", global = true)]
    pub(crate) config: Option<PathBuf>,
    /// Store URL: sqlite://PATH, postgres://…, mysql://… (a password in a flag shows in `ps`:
    /// prefer OUTBOX_STORE, --store-file or the config file)
    #[arg(long, env = "OUTBOX_STORE", global = true, hide_env_values = true)]
    pub(crate) store: Option<String>,
    /// File holding the store URL (a mounted secret); read once at start-up.
    #[arg(long, env = "OUTBOX_STORE_FILE", global = true)]
    pub(crate) store_file: Option<PathBuf>,
    /// Outbox table name [default: outbox]
    #[arg(long, env = "OUTBOX_TABLE", global = true)]
    pub(crate) table: Option<String>,
    /// Log format [default: human]; colours only on a terminal and never with NO_COLOR set
    #[arg(long, env = "OUTBOX_LOG_FORMAT", global = true, value_enum)]
    pub(crate) log_format: Option<LogFormat>,
    /// How stats, dead list, migrate, clean and doctor print their data [default: text]
    #[arg(long, env = "OUTBOX_OUTPUT", global = true, value_enum)]
    pub(crate) output: Option<Output>,
    /// Same as --output json.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Publish pending messages (once, or in a loop with --loop).
    Relay(Box<RelayArgs>),
    /// Delete sent rows older than a retention.
    Clean(CleanArgs),
    /// Pending / sent / dead counts per stream and the oldest pending age.
    Stats {
        /// Also the WAL relay's slot: the WAL it keeps on the server and whether a relay is
        /// reading it (PostgreSQL).
        #[arg(long)]
        wal: bool,
        #[command(flatten)]
        wal_names: WalNames,
        #[command(flatten)]
        list: StoresList,
    },
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
        /// Also create the WAL relay's publication and logical replication slot (PostgreSQL
        /// with wal_level = logical; a role with REPLICATION).
        #[arg(long)]
        wal: bool,
        #[command(flatten)]
        wal_names: WalNames,
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
pub(crate) struct GrantsArgs {
    /// The application's role: inserts outbox rows, reads back only their seq and id.
    #[arg(long)]
    pub(crate) writer: Option<String>,
    /// The relay's role: claims, settles, deletes; cannot write or rewrite a message.
    #[arg(long)]
    pub(crate) relay: Option<String>,
    /// The console's role: reads; requeues, purges, parks, resumes, skips.
    #[arg(long)]
    pub(crate) admin: Option<String>,
    /// MySQL/MariaDB: the host part of the accounts ('role'@'host').
    #[arg(long, default_value = "%")]
    pub(crate) account_host: String,
    /// PostgreSQL with the WAL relay: also only the writer may emit logical messages, and
    /// the relay gets REPLICATION and inserts (for the messages it writes aside).
    #[arg(long)]
    pub(crate) wal: bool,
    /// With --wal, table mode: the writer inserts into `<table>_wal`, the relay deletes.
    #[arg(long, requires = "wal")]
    pub(crate) wal_rows: bool,
}

#[derive(Args, Debug)]
pub(crate) struct AdminArgs {
    /// Address to listen on; beyond loopback a token is required.
    #[arg(long, env = "OUTBOX_ADMIN_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,
    /// Token every request must carry (Authorization: Bearer, or the session a POST to /login
    /// gives). Prefer the environment or --auth-token-file: `ps` shows a command line.
    #[arg(long, env = "OUTBOX_ADMIN_TOKEN", hide_env_values = true)]
    pub(crate) auth_token: Option<String>,
    /// A file holding the token (its first line).
    #[arg(long, env = "OUTBOX_ADMIN_TOKEN_FILE", conflicts_with = "auth_token")]
    pub(crate) auth_token_file: Option<PathBuf>,
    /// No actions: pages and API only read.
    #[arg(long, env = "OUTBOX_ADMIN_READ_ONLY")]
    pub(crate) read_only: bool,
    /// Keep payloads (personal data) off the pages and the API.
    #[arg(long, env = "OUTBOX_ADMIN_HIDE_PAYLOADS")]
    pub(crate) hide_payloads: bool,
    /// How often the overview's chart samples the counts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) sample_every: Duration,
    /// Also show the WAL relay's slot on the overview and in `/api/stats`: the WAL it keeps,
    /// whether a relay reads it, and its lag (PostgreSQL).
    #[arg(long)]
    pub(crate) wal: bool,
    #[command(flatten)]
    pub(crate) wal_names: WalNames,
    /// Show every store of a list (--stores or --stores-catalog) instead of --store: a totals
    /// page at `/`, a store picker on every page, each store's pages under `/s/<name>/`.
    /// The list is read once, at start.
    #[command(flatten)]
    pub(crate) list: StoresList,
}

#[derive(Args, Debug, Default)]
pub(crate) struct DoctorArgs {
    /// Publisher URL to ping (no message is sent) [default: relay.publisher of --config]
    #[arg(long, env = "OUTBOX_PUBLISHER", hide_env_values = true)]
    pub(crate) publisher: Option<String>,
    /// File holding the publisher URL.
    #[arg(long, env = "OUTBOX_PUBLISHER_FILE")]
    pub(crate) publisher_file: Option<PathBuf>,
    /// Signature verification keys file, as for `relay`.
    #[arg(long, env = "OUTBOX_SIGNING_KEYS_FILE")]
    pub(crate) signing_keys_file: Option<PathBuf>,
    /// Also check the WAL relay's set-up: wal_level, the publication, the slot and how
    /// much WAL it keeps (PostgreSQL).
    #[arg(long)]
    pub(crate) wal: bool,
    #[command(flatten)]
    pub(crate) wal_names: WalNames,
    #[command(flatten)]
    pub(crate) list: StoresList,
}

/// Many stores instead of --store (`relay`, `stats`, `doctor`, `admin`): a TOML list, or the
/// rows of a query on a catalog database.
#[derive(Args, Debug, Default, Clone)]
pub(crate) struct StoresList {
    /// Every store of this TOML list instead of --store ([[store]] entries: name, url or
    /// url_file, table).
    #[arg(long, env = "OUTBOX_STORES_FILE", conflicts_with = "wal")]
    pub(crate) stores: Option<PathBuf>,
    /// Instead of --stores: a database (URL) holding the list of stores, read by
    /// --stores-query.
    #[arg(long, env = "OUTBOX_STORES_CATALOG", hide_env_values = true, conflicts_with_all = ["wal", "stores"], requires = "stores_query")]
    pub(crate) stores_catalog: Option<String>,
    /// The query that lists the stores in --stores-catalog: text columns name, url and
    /// optionally table (e.g. `SELECT name, db_url FROM tenants WHERE active`).
    #[arg(long, env = "OUTBOX_STORES_QUERY", requires = "stores_catalog")]
    pub(crate) stores_query: Option<String>,
}

impl StoresList {
    /// Whether a list was named.
    pub(crate) fn given(&self) -> bool {
        self.stores.is_some() || self.stores_catalog.is_some()
    }
}

#[derive(Args, Debug, Default)]
pub(crate) struct RelayArgs {
    /// Read the messages of a table-less writer (`WalStore`) from the write-ahead log through
    /// a logical replication slot instead of claiming rows (PostgreSQL; always runs until
    /// stopped). The table still takes dead letters and the units the broker refused, and is
    /// served alongside.
    #[arg(long, env = "OUTBOX_WAL")]
    pub(crate) wal: bool,
    #[command(flatten)]
    pub(crate) wal_names: WalNames,
    /// Serve every store of a list (--stores or --stores-catalog) in one process instead of
    /// --store; always runs until stopped.
    #[command(flatten)]
    pub(crate) list: StoresList,
    /// How often the list of stores is read again: stores added are served, stores removed
    /// finish their batch in flight and are let go.
    #[arg(long, env = "OUTBOX_STORES_REFRESH", default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) stores_refresh: Duration,
    /// PostgreSQL: poll every --interval instead of holding a LISTEN connection per
    /// store to hear commits: behind a pooler in transaction mode (PgBouncer), where LISTEN
    /// does not work, or for many stores on one server (with --stores, every store of the
    /// list; an entry can also say `listen = false`).
    #[arg(long, env = "OUTBOX_NO_LISTEN")]
    pub(crate) no_listen: bool,
    /// With --stores: batches in flight at once across all the stores, handed out in turn
    /// (a store with a large backlog takes one batch per turn like the others).
    #[arg(long, env = "OUTBOX_MAX_BATCHES", default_value_t = 8)]
    pub(crate) max_batches: usize,
    /// Publisher URL: stdout, null, kafka://…, amqp(s)://…, redis(s)://…, nats://…, http(s)://… (webhooks)
    #[arg(long, env = "OUTBOX_PUBLISHER", hide_env_values = true)]
    pub(crate) publisher: Option<String>,
    /// File holding the publisher URL (a mounted secret: SASL or broker passwords).
    #[arg(long, env = "OUTBOX_PUBLISHER_FILE")]
    pub(crate) publisher_file: Option<PathBuf>,
    /// Keep running (jaiminho's --run-in-loop); without it, publish until nothing is due.
    #[arg(long = "loop", env = "OUTBOX_LOOP")]
    pub(crate) run_loop: bool,
    /// Idle poll interval in loop mode, e.g. 500ms, 1s [default: 1s]
    #[arg(long, env = "OUTBOX_INTERVAL", value_parser = humantime::parse_duration)]
    pub(crate) interval: Option<Duration>,
    /// Serve only these streams (repeatable) [default: all]
    #[arg(long = "stream", env = "OUTBOX_STREAMS", value_delimiter = ',')]
    pub(crate) streams: Vec<String>,
    /// Rows per batch [default: 100]
    #[arg(long, env = "OUTBOX_BATCH")]
    pub(crate) batch: Option<usize>,
    /// Batches in flight at once (overlaps claiming and publishing) [default: 1]
    #[arg(long, env = "OUTBOX_CONCURRENCY")]
    pub(crate) concurrency: Option<usize>,
    /// Lease on claimed rows [default: 30s]
    #[arg(long, env = "OUTBOX_LEASE", value_parser = humantime::parse_duration)]
    pub(crate) lease: Option<Duration>,
    /// Deadline of one publish call; must be under 90% of the lease [default: 10s]
    #[arg(long, env = "OUTBOX_PUBLISH_TIMEOUT", value_parser = humantime::parse_duration)]
    pub(crate) publish_timeout: Option<Duration>,
    /// Deadline of one store call (claim, settle): a database that stops answering without
    /// closing the connection is given up and retried [default: 30s]
    #[arg(long, env = "OUTBOX_STORE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub(crate) store_timeout: Option<Duration>,
    /// First retry delay after a failed publish, doubling per attempt [default: 1s]
    #[arg(long, env = "OUTBOX_RETRY_INITIAL", value_parser = humantime::parse_duration)]
    pub(crate) retry_initial: Option<Duration>,
    /// Longest retry delay [default: 5m]
    #[arg(long, env = "OUTBOX_RETRY_MAX", value_parser = humantime::parse_duration)]
    pub(crate) retry_max: Option<Duration>,
    /// Attempts before dead-lettering (publish-on-commit) or reporting stuck (keep-order) [default: 10]
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS")]
    pub(crate) max_attempts: Option<u32>,
    /// Delete rows once published instead of marking them sent.
    #[arg(long, env = "OUTBOX_DELETE_AFTER_SEND")]
    pub(crate) delete_after_send: bool,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9000), path /metrics.
    #[arg(long, env = "OUTBOX_METRICS_ADDR")]
    pub(crate) metrics_addr: Option<SocketAddr>,
    /// File of signature verification keys, one `id:secret` per line, the active key first
    /// ('#' comments). Keys can also come from OUTBOX_SIGNING_KEYS or the config file, never
    /// from a flag. Signed rows that do not verify are never published.
    #[arg(long, env = "OUTBOX_SIGNING_KEYS_FILE")]
    pub(crate) signing_keys_file: Option<PathBuf>,
    /// Also refuse rows that carry no signature (needs verification keys). The default
    /// whenever keys are loaded: whoever can write the table could otherwise strip a
    /// signature and change the row.
    #[arg(long, env = "OUTBOX_REQUIRE_SIGNATURES")]
    pub(crate) require_signatures: bool,
    /// With verification keys loaded, publish rows that carry no signature anyway (while
    /// writers are being moved to signing); a warning says so at start-up.
    #[arg(
        long,
        env = "OUTBOX_ALLOW_UNSIGNED",
        conflicts_with = "require_signatures"
    )]
    pub(crate) allow_unsigned: bool,
    /// Deployment label bound into signatures (`Signer::label` of the writers) [default: none]
    #[arg(long, env = "OUTBOX_SIGNING_LABEL")]
    pub(crate) signing_label: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct WalNames {
    /// The WAL relay's logical replication slot.
    #[arg(long, env = "OUTBOX_WAL_SLOT", default_value = "outbox")]
    pub(crate) slot: String,
    /// The WAL relay's publication.
    #[arg(long, env = "OUTBOX_WAL_PUBLICATION", default_value = "outbox")]
    pub(crate) publication: String,
    /// The logical-message prefix the writers' `WalStore` uses.
    #[arg(long, env = "OUTBOX_WAL_PREFIX", default_value = "outbox")]
    pub(crate) wal_prefix: String,
    /// Table mode: the writers insert into `<table>_wal` (`WalStore::rows`) instead of
    /// emitting logical messages.
    #[arg(long, env = "OUTBOX_WAL_ROWS")]
    pub(crate) wal_rows: bool,
}

impl Default for WalNames {
    fn default() -> Self {
        Self {
            slot: "outbox".into(),
            publication: "outbox".into(),
            wal_prefix: "outbox".into(),
            wal_rows: false,
        }
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct CleanArgs {
    /// Retention, e.g. 7d, 12h [default: 7d]
    #[arg(long, env = "OUTBOX_OLDER_THAN", value_parser = humantime::parse_duration)]
    pub(crate) older_than: Option<Duration>,
    /// Also delete dead letters older than the retention.
    #[arg(long)]
    pub(crate) include_dead: bool,
    /// Rows per DELETE [default: 1000]
    #[arg(long)]
    pub(crate) batch: Option<usize>,
    /// Also delete this inbox table's marks of processed messages; repeat for several.
    #[arg(long = "inbox", value_name = "TABLE")]
    pub(crate) inboxes: Vec<String>,
    /// How long inbox marks are kept: longer than the broker can redeliver a message, or a
    /// redelivered one is processed again [default: 14d]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) inbox_older_than: Option<Duration>,
}

/// How long `outbox clean --inbox` keeps inbox marks by default.
pub(crate) const DEFAULT_INBOX_RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);

#[derive(Subcommand, Debug)]
pub(crate) enum InboxCommand {
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
pub(crate) enum DeadCommand {
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
pub(crate) struct SelectArgs {
    /// Every dead letter.
    #[arg(long)]
    pub(crate) all: bool,
    /// The dead letters of one stream.
    #[arg(long)]
    pub(crate) stream: Option<String>,
    /// These rows (repeatable).
    #[arg(long = "seq", value_delimiter = ',')]
    pub(crate) seqs: Vec<i64>,
}

impl SelectArgs {
    pub(crate) fn selector(&self) -> Selector {
        match (&self.stream, self.seqs.is_empty()) {
            (Some(s), _) => Selector::Stream(s.clone()),
            (None, false) => Selector::Seqs(self.seqs.clone()),
            _ => Selector::All,
        }
    }
}
