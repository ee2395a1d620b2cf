//! PostgreSQL store: enqueue in the caller's sqlx transaction, claims by due unit (one
//! statement, no table-wide lock), `LISTEN/NOTIFY` wake-up.
//!
//! ```no_run
//! use outbox_core::{Message, Outbox, StdoutPublisher, KeepOrder};
//! use outbox_sql::postgres::PgStore;
//! # async fn demo() -> outbox_core::Result<()> {
//! let store = PgStore::connect("postgres://app@127.0.0.1/shop").await?;   // table "outbox"
//! outbox_core::Store::migrate(&store).await?;
//! let outbox = Outbox::builder(store.clone(), StdoutPublisher::default())
//!     .strategy(KeepOrder::default())
//!     .build()?;
//!
//! let mut tx = store.pool().begin().await.map_err(outbox_sql::postgres::map_err)?;
//! // ... business writes on &mut *tx ...
//! let after = outbox.enqueue(&mut tx, [Message::json("orders.placed", &1)?]).await?;
//! outbox_sql::postgres::commit(tx, after).await?;     // commit, then publish on commit
//! # Ok(()) }
//! ```

#[cfg(feature = "pg-wal")]
#[cfg_attr(docsrs, doc(cfg(feature = "pg-wal")))]
pub mod wal;

use outbox_core::StoreAdmin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use outbox_core::{
    to_millis, validate_identifier, AfterCommit, Claim, Enqueue, Error, Failure, NewMessage,
    Outcome, Retry, Selector, Stats, Store, StoredMessage, StreamFilter,
};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{PgConnection, Postgres, Transaction};
use tokio::sync::Notify;

use crate::common::{claimed, keep_order_units, listed, redact_url, rolled_back, stats_from_rows};

pub use crate::common::map_err;
/// The sqlx this store is built with, for the application's own queries and transactions.
pub use sqlx;

/// The database clock in milliseconds.
const NOW: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// The columns an insert writes, and their values from one row's scalar parameters.
const INSERT_COLS: &str =
    "id, stream, destination, msg_key, okey, payload, content_type, headers, strategy, \
    status, attempts, created_at, next_attempt_at, locked_by, locked_until, last_error, signature, on_exhausted";
/// `$17` is the unit, `$18` the exhaustion policy, `$19` the earliest attempt (ms, or NULL).
const ONE_VALUES: &str = "$1::uuid, $2, $3, $4, $17, $5, $6, $7::jsonb, $8, $9, $10::int4, $11::int8, \
    GREATEST((EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT + GREATEST($12::int8, COALESCE($14::int8, 0)), \
      COALESCE($19::int8, 0)), $13, \
    (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT + $14::int8, $15, $16, $18";

/// The columns a row is read back from, each prefixed with `prefix`; `payload` is the
/// payload's expression (the column itself, or one that leaves an oversized payload unread).
fn cols(prefix: &str, payload: &str) -> String {
    format!(
        "{p}seq, {p}id::text, {p}stream, {p}destination, {p}msg_key, {payload}, {p}content_type, {p}headers::text, \
         {p}strategy, {p}status, {p}attempts, {p}created_at, {p}next_attempt_at, {p}last_error, {p}sent_at, {p}signature, \
         {p}okey, {p}on_exhausted",
        p = prefix
    )
}

/// Settings of a [`PgStore`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Table name (validated, never interpolated raw; at most 54 characters so that the
    /// companion tables' and indexes' names fit). Default: `outbox`.
    pub table: String,
    /// Pool size. Default: 5. The `LISTEN` connection of a relay's store is apart.
    pub max_connections: u32,
    /// How long to wait for a pooled connection (and for the first connection at start-up).
    /// Default: 5 s.
    pub acquire_timeout: Duration,
    /// Longest wait for a row lock (`lock_timeout` of the claim and settle statements): a lock
    /// held longer (a session holding a unit's row of `<table>_due` while a relay records its
    /// batch) becomes a logged, retried store error instead of a silent stall. Claims skip
    /// locked units and rows, so in practice only recording a batch's outcome can wait.
    /// Default: 5 s.
    pub lock_timeout: Duration,
    /// Whether a relay of this store holds a `LISTEN` connection to hear commits. `false`:
    /// it polls every `poll_interval` instead and opens only its pool. For a connection
    /// pooler in transaction mode (PgBouncer), where `LISTEN` does not work, or many stores
    /// on one server (a relay over 100 tenant databases would otherwise hold 100 `LISTEN`
    /// connections on top of their pools). Default: true.
    pub listen: bool,
    /// How often the pool's connections drop their prepared statements, so that PostgreSQL
    /// plans them again for the tables as they are now. PostgreSQL keeps a prepared
    /// statement's generic plan for as long as the session lasts, or until an `ANALYZE` of
    /// the table: a plan made while the outbox held a few hundred rows reads the whole table
    /// on every batch once a backlog has grown it, for up to a minute (autovacuum's
    /// `naptime`) after the growth began. `None`: never (plans then follow `ANALYZE` only).
    /// A connection is refreshed when it is taken from the pool after the period ended;
    /// one that was in use at that moment is refreshed at the end of the next period. The
    /// cost is one round trip and the statements' planning once per period. Pools built by
    /// the application ([`PgStore::from_pool`]) get it from [`with_plan_refresh`].
    /// Default: 5 s.
    pub plan_refresh: Option<Duration>,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            table: "outbox".into(),
            max_connections: 5,
            acquire_timeout: Duration::from_secs(5),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            listen: true,
            plan_refresh: Some(DEFAULT_PLAN_REFRESH),
        }
    }
}

const DEFAULT_PLAN_REFRESH: Duration = Duration::from_secs(5);

/// `pool` with [`PgOptions::plan_refresh`]: each connection drops its prepared statements
/// when it is taken from the pool after a period of `every` ended since it was last
/// released (`Duration::ZERO`: whenever it is taken), so that they are planned again for the
/// tables' current size. For an application's own pool given to [`PgStore::from_pool`]. It
/// sets the pool's `before_acquire` callback, replacing one set before.
pub fn with_plan_refresh(pool: PgPoolOptions, every: Duration) -> PgPoolOptions {
    pool.before_acquire(move |conn, meta| {
        Box::pin(async move {
            if period_ended(meta.age, meta.idle_for, every) {
                sqlx::Connection::clear_cached_statements(conn).await?;
            }
            Ok(true)
        })
    })
}

/// The options of a pool the store opens: with [`PgOptions::plan_refresh`].
fn pool_options(plan_refresh: Option<Duration>) -> PgPoolOptions {
    match plan_refresh {
        Some(every) => with_plan_refresh(PgPoolOptions::new(), every),
        None => PgPoolOptions::new(),
    }
}

/// Whether a period of `every`, counted from the connection's opening, ended since it was
/// released (`age - idle_for` after it opened).
fn period_ended(age: Duration, idle_for: Duration, every: Duration) -> bool {
    if every.is_zero() {
        return true;
    }
    let released = age.saturating_sub(idle_for);
    age.as_nanos() / every.as_nanos() > released.as_nanos() / every.as_nanos()
}

const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

use outbox_core::PARKED_NEXT_AT as PARKED;

mod admin;
mod sql;

use sql::Sql;

/// How often a store looks for keep-order rows whose unit it does not know.
const ADOPT_EVERY: Duration = Duration::from_secs(60);

/// How long [`Store::start_listening`] waits for `LISTEN` before the relay starts polling.
const LISTEN_START: Duration = Duration::from_secs(10);

struct Inner {
    lock_timeout: Duration,
    /// Whether the pool's connections have JIT on (an application's own pool): then the
    /// relay's statements run in a transaction with `SET LOCAL jit = off`. Asked once.
    jit: tokio::sync::OnceCell<bool>,
    /// When orphaned units were last looked for (see `Sql::adopt`).
    adopted: std::sync::Mutex<Option<std::time::Instant>>,
    pool: PgPool,
    table: String,
    sql: Sql,
    notify: Arc<Notify>,
    listening: AtomicBool,
    /// Whether to `LISTEN` at all ([`PgOptions::listen`]).
    listen: bool,
    /// [`PgOptions::plan_refresh`] of the pool this store opened (`None` for the
    /// application's own pool), for the pool of [`PgStore::reopen`].
    plan_refresh: Option<Duration>,
    /// A claim's empty units are being forgotten in the background (at most one such task:
    /// a claim that finds one running leaves its empties for a later claim).
    forgetting: crate::common::Background,
    /// How many times `LISTEN` has been established (0: not yet).
    listens: Arc<tokio::sync::watch::Sender<u64>>,
}

/// The PostgreSQL outbox store. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("table", &self.inner.table)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connect with the default options (table `outbox`). Fails at once, with a typed error,
    /// on a malformed URL ([`outbox_core::ErrorKind::Config`]) or an unreachable server
    /// ([`outbox_core::ErrorKind::Store`], transient).
    ///
    /// TLS (feature `tls`, on by default) follows libpq's parameters: `sslmode` `disable`,
    /// `allow`, `prefer` (the default: TLS when the server offers it), `require` (encrypted,
    /// not verified), `verify-ca` (signed by `sslrootcert`, else the system's roots),
    /// `verify-full` (and the host name matches); `sslcert` + `sslkey` for a client
    /// certificate. An unsupported mode or an unreadable or malformed file is a `Config`
    /// error naming the parameter, before any connection is tried; a failed handshake (wrong
    /// CA, expired certificate, wrong host name) is a transient `Store` error saying why.
    pub async fn connect(url: &str) -> outbox_core::Result<Self> {
        Self::connect_with(url, PgOptions::default()).await
    }

    /// Connect with options.
    pub async fn connect_with(url: &str, options: PgOptions) -> outbox_core::Result<Self> {
        validate_identifier(&options.table)?;
        crate::common::check_tls_params(url, &crate::common::PG_TLS)?;
        let connect: PgConnectOptions = url.parse().map_err(|e| {
            Error::config(format!("invalid PostgreSQL URL {}", redact_url(url))).with_source(e)
        })?;
        // The relay's statements are short, but their estimates grow with the table: JIT would
        // compile them for about a second each on a million-row backlog.
        let connect = connect.options([("jit", "off")]);
        let pool = crate::common::open_pool(
            pool_options(options.plan_refresh),
            connect,
            options.max_connections,
            options.acquire_timeout,
            url,
            "PostgreSQL",
        )
        .await?;
        let mut store = Self::from_pool(pool, &options.table)?;
        if let Some(inner) = Arc::get_mut(&mut store.inner) {
            inner.lock_timeout = options.lock_timeout;
            inner.listen = options.listen;
            inner.plan_refresh = options.plan_refresh;
        }
        Ok(store)
    }

    /// Use an existing pool (the application's own).
    pub fn from_pool(pool: PgPool, table: &str) -> outbox_core::Result<Self> {
        validate_identifier(table)?;
        // PostgreSQL cuts names at 63 bytes: `<table>_due_next` must fit.
        if table.len() > 54 {
            return Err(Error::new(
                outbox_core::ErrorKind::InvalidIdentifier,
                Retry::Permanent,
                format!("PostgreSQL table name {table:?} is over 54 characters"),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                lock_timeout: DEFAULT_LOCK_TIMEOUT,
                jit: tokio::sync::OnceCell::new(),
                adopted: std::sync::Mutex::new(None),
                pool,
                table: table.to_owned(),
                sql: Sql::new(table),
                notify: Arc::new(Notify::new()),
                listening: AtomicBool::new(false),
                listen: true,
                plan_refresh: None,
                forgetting: Default::default(),
                listens: Arc::new(tokio::sync::watch::channel(0).0),
            }),
        })
    }

    /// The pool (for the application's transactions).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// The statements `migrate` runs for `table`, for a DBA to review and run as the
    /// tables' owner (`outbox migrate --print-sql`); all idempotent. `migrate` also takes an
    /// advisory lock so that several processes migrate one at a time.
    pub fn schema_sql(table: &str) -> outbox_core::Result<Vec<String>> {
        validate_identifier(table)?;
        let mut out = vec![sql::versions(table)];
        for step in outbox_core::SCHEMA_STEPS {
            out.extend(Self::step_sql(table, step.version)?);
            out.push(sql::record_version(table, step));
        }
        Ok(out)
    }

    /// The statements of one schema step (see [`outbox_core::SCHEMA_STEPS`]).
    fn step_sql(table: &str, version: u32) -> outbox_core::Result<Vec<String>> {
        match version {
            // Idempotent, and upgrades every table an earlier build made.
            1 => {
                let sql = Sql::new(table);
                Ok(sql
                    .schema
                    .split(';')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .chain([sql.adopt.clone()])
                    .collect())
            }
            v => Err(Error::config(format!(
                "schema step {v} has no PostgreSQL statements in this build"
            ))),
        }
    }

    /// Whether the outbox table exists in the connection's search path.
    pub async fn table_exists(&self) -> outbox_core::Result<bool> {
        let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&self.inner.table)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(map_err)?;
        Ok(found.is_some())
    }

    /// Start the `LISTEN` task once. It holds a connection of its own; after every
    /// reconnect (not the first connect: the relay claims right after
    /// [`Store::start_listening`]) it wakes the relay, since commits made while it was
    /// disconnected were not heard.
    fn start_listener(&self) {
        if !self.inner.listen || self.inner.listening.swap(true, Ordering::SeqCst) {
            return;
        }
        // A connection of its own, outside the store's pool: a listener holds its connection
        // for good, and taking it from the pool left the claims one short (a pool of one
        // left them none, and the relay stalled).
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with((*self.inner.pool.connect_options()).clone());
        let channel = self.inner.table.clone();
        let notify: Weak<Notify> = Arc::downgrade(&self.inner.notify);
        let listens = Arc::downgrade(&self.inner.listens);
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                if notify.strong_count() == 0 {
                    return;
                }
                let mut listener = match PgListener::connect_with(&pool).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection failed; relays poll until it is back");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(30));
                        continue;
                    }
                };
                if let Err(e) = listener.listen(&channel).await {
                    tracing::warn!(error = %e, "LISTEN failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(30));
                    continue;
                }
                pause = Duration::from_millis(100);
                let Some(listens) = listens.upgrade() else {
                    return;
                };
                let mut first = false;
                listens.send_modify(|n| {
                    first = *n == 0;
                    *n += 1;
                });
                drop(listens);
                if !first {
                    // Commits while we were away sent NOTIFYs nobody heard: look now.
                    match notify.upgrade() {
                        Some(n) => n.notify_one(),
                        None => return,
                    }
                }
                loop {
                    let Some(n) = notify.upgrade() else { return };
                    match listener.try_recv().await {
                        Ok(Some(_)) => n.notify_one(),
                        // The connection dropped. sqlx would reconnect on the next call, but
                        // out of our sight: reconnect here instead, so the wake-up above
                        // happens after LISTEN is back.
                        Ok(None) => {
                            tracing::warn!("LISTEN connection lost; reconnecting");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// Rows are written in the caller's transaction, in one statement; either all are written
/// or, on error, none. Keep-order rows lock their ordering unit until the transaction ends
/// and send `NOTIFY` on commit.
///
/// Only a transaction is accepted (not a bare connection): in autocommit, the unit lock
/// would end with the statement, and two writers of a unit could commit out of `seq` order.
///
/// Do the business writes that lock shared rows *before* enqueueing, as usual: a transaction
/// that waits for a unit lock while holding a row another writer of that unit needs
/// deadlocks, and PostgreSQL aborts one of the two.
#[async_trait]
impl<'c> Enqueue<Transaction<'c, Postgres>> for PgStore {
    async fn write_rows(
        &self,
        tx: &mut Transaction<'c, Postgres>,
        rows: &[NewMessage],
        _need_seqs: bool,
    ) -> outbox_core::Result<Vec<i64>> {
        let units = keep_order_units(rows);
        insert(tx, &self.inner.sql, rows, &units).await
    }

    fn transaction_depth(&self, tx: &Transaction<'c, Postgres>) -> usize {
        depth(tx)
    }
}

/// How deeply `tx` is nested (1: the outermost transaction; more: a savepoint).
fn depth(tx: &Transaction<'_, Postgres>) -> usize {
    use sqlx::TransactionManager;
    let conn: &PgConnection = tx;
    <Postgres as sqlx::Database>::TransactionManager::get_transaction_depth(conn)
}

/// Commit `tx`, then publish its publish-on-commit messages in the background. Nothing is
/// published if the commit fails.
///
/// A savepoint (a nested transaction) with something to publish is refused with an
/// [`outbox_core::ErrorKind::Savepoint`] error and rolled back (it is dropped): releasing it
/// would commit nothing, and publishing then could announce what its parent rolls back.
/// [`Outbox::enqueue`](outbox_core::Outbox::enqueue) already refuses such messages in a
/// savepoint; this catches a handle carried into one.
pub async fn commit(tx: Transaction<'_, Postgres>, after: AfterCommit) -> outbox_core::Result<()> {
    let depth = depth(&tx);
    if depth > 1 && !after.is_empty() {
        return Err(Error::savepoint(depth));
    }
    tx.commit().await.map_err(map_err)?;
    after.dispatch();
    Ok(())
}

/// Insert `rows` in one statement; `units` (keep-order ordering units, sorted) are locked until
/// the transaction ends (their rows in `<table>_units`) and, when there are any, relays are
/// notified at commit.
async fn insert(
    conn: &mut PgConnection,
    sql: &Sql,
    rows: &[NewMessage],
    units: &[(String, String)],
) -> outbox_core::Result<Vec<i64>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    if let [r] = rows {
        return insert_one(conn, sql, r, !units.is_empty())
            .await
            .map(|seq| vec![seq]);
    }
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let (mut streams, mut dests, mut keys, mut payloads) = (vec![], vec![], vec![], vec![]);
    let (mut ctypes, mut headers, mut strategies, mut statuses) = (vec![], vec![], vec![], vec![]);
    let (mut attempts, mut created, mut retry, mut lockers) = (vec![], vec![], vec![], vec![]);
    let (mut leases, mut errors, mut sigs) = (vec![], vec![], vec![]);
    let (mut okeys, mut exhausted, mut not_before) = (vec![], vec![], vec![]);
    for r in rows {
        okeys.push(r.unit.as_str());
        exhausted.push(r.exhausted.as_stored());
        not_before.push(r.not_before.map(to_millis));
        let m = &r.envelope.message;
        ids.push(r.envelope.id.to_string());
        streams.push(m.stream.clone());
        dests.push(m.destination.clone());
        keys.push(m.key.clone());
        payloads.push(m.payload.clone());
        ctypes.push(m.content_type.clone());
        headers.push(serde_json::to_string(&m.headers)?);
        strategies.push(r.order.as_str());
        statuses.push(r.status.as_str());
        attempts.push(r.attempts as i32);
        created.push(to_millis(r.envelope.created_at));
        retry.push(r.retry_after.as_millis() as i64);
        lockers.push(r.lease.as_ref().map(|(o, _)| o.clone()));
        leases.push(r.lease.as_ref().map(|(_, d)| d.as_millis() as i64));
        errors.push(r.last_error.clone());
        sigs.push(r.signature.clone());
    }
    let locked = !units.is_empty();
    let mut q = sqlx::query_as::<_, (i64, String)>(if locked {
        &sql.insert
    } else {
        &sql.insert_plain
    })
    .bind(&ids)
    .bind(streams)
    .bind(dests)
    .bind(keys)
    .bind(payloads)
    .bind(ctypes)
    .bind(headers)
    .bind(strategies)
    .bind(statuses)
    .bind(attempts)
    .bind(created)
    .bind(retry)
    .bind(lockers)
    .bind(leases)
    .bind(errors)
    .bind(sigs)
    .bind(okeys)
    .bind(exhausted)
    .bind(not_before);
    if locked {
        let (unit_streams, unit_keys): (Vec<&str>, Vec<&str>) =
            units.iter().map(|(s, k)| (s.as_str(), k.as_str())).unzip();
        q = q.bind(unit_streams).bind(unit_keys).bind(true);
    }
    let returned = q.fetch_all(&mut *conn).await.map_err(map_err)?;
    let by_id: std::collections::HashMap<String, i64> =
        returned.into_iter().map(|(s, id)| (id, s)).collect();
    ids.iter()
        .map(|id| {
            by_id
                .get(id)
                .copied()
                .ok_or_else(|| Error::store("insert did not return every row"))
        })
        .collect()
}

/// One row: the same statement with scalar parameters. PostgreSQL re-plans the array form on
/// every execution (its custom plan for the array's actual length always looks cheaper than
/// the generic one), about 0.4 ms, more than the insert itself; this form keeps its plan.
async fn insert_one(
    conn: &mut PgConnection,
    sql: &Sql,
    r: &NewMessage,
    keep_order: bool,
) -> outbox_core::Result<i64> {
    let m = &r.envelope.message;
    sqlx::query_scalar::<_, i64>(if keep_order {
        &sql.insert_one
    } else {
        &sql.insert_one_plain
    })
    .bind(r.envelope.id.to_string())
    .bind(&m.stream)
    .bind(&m.destination)
    .bind(&m.key)
    .bind(&m.payload)
    .bind(&m.content_type)
    .bind(serde_json::to_string(&m.headers)?)
    .bind(r.order.as_str())
    .bind(r.status.as_str())
    .bind(r.attempts as i32)
    .bind(to_millis(r.envelope.created_at))
    .bind(r.retry_after.as_millis() as i64)
    .bind(r.lease.as_ref().map(|(o, _)| o.as_str()))
    .bind(r.lease.as_ref().map(|(_, d)| d.as_millis() as i64))
    .bind(&r.last_error)
    .bind(&r.signature)
    .bind(&r.unit)
    .bind(r.exhausted.as_stored())
    .bind(r.not_before.map(to_millis))
    .fetch_one(&mut *conn)
    .await
    .map_err(map_err)
}

fn selector(sel: &Selector) -> (&'static str, Option<String>, Option<Vec<i64>>) {
    match sel {
        Selector::All => ("", None, None),
        Selector::Stream(s) => (" AND stream = $1", Some(s.clone()), None),
        Selector::Seqs(seqs) => (" AND seq = ANY($1)", None, Some(seqs.clone())),
    }
}

#[async_trait]
impl Store for PgStore {
    fn signing_scope(&self) -> String {
        self.inner.table.clone()
    }

    async fn migrate(&self) -> outbox_core::Result<()> {
        let mut tx = self.inner.pool.begin().await.map_err(map_err)?;
        // Several processes may migrate at once: one at a time. Any role may take an
        // advisory lock, so the wait is capped like the claim's (then lifted for the DDL).
        let t = &self.inner.table;
        let wait = self.lock_wait();
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(&wait)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        let locked =
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('outbox-migrate'), hashtext($1))")
                .bind(t)
                .execute(&mut *tx)
                .await;
        if let Err(e) = locked {
            let mapped = map_err(e);
            return Err(Error::new(
                mapped.kind(),
                Retry::Transient,
                format!(
                    "the migration lock of table {t} was held for over {wait}: another `outbox migrate` is running, or a session holds pg_advisory_lock(hashtext('outbox-migrate'), hashtext('{t}'))"
                ),
            )
            .with_source(mapped));
        }
        sqlx::query("SET LOCAL lock_timeout TO DEFAULT")
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query(&sql::versions(t))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        let found: Option<i32> =
            sqlx::query_scalar(&format!("SELECT max(version) FROM {t}_schema"))
                .fetch_one(&mut *tx)
                .await
                .map_err(map_err)?;
        // A table dropped since (by hand): every step again (each is idempotent), or the
        // recorded version would leave it missing.
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(t)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        let found = found.filter(|_| exists.is_some());
        let steps = outbox_core::SchemaStep::after(t, found.map(|v| v.max(0) as u32))?;
        for step in &steps {
            for statement in Self::step_sql(t, step.version)? {
                sqlx::query(&statement)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
            sqlx::query(&sql::record_version(t, step))
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)?;
        for step in &steps {
            tracing::info!(table = %t, version = step.version, step = step.name, "schema step applied");
        }
        Ok(())
    }

    async fn insert(&self, rows: &[NewMessage]) -> outbox_core::Result<Vec<i64>> {
        let mut tx = self.inner.pool.begin().await.map_err(map_err)?;
        let seqs = insert(&mut tx, &self.inner.sql, rows, &keep_order_units(rows)).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(seqs)
    }

    async fn claim(&self, claim: &Claim) -> outbox_core::Result<Vec<outbox_core::Claimed>> {
        let streams: Option<Vec<String>> = match &claim.streams {
            StreamFilter::All => None,
            StreamFilter::Only(s) => Some(s.clone()),
        };
        self.adopt_orphans(false).await?;
        // Empty units (no pending row left) are forgotten between two claims; a claim that
        // found only those looks again, so it never reports "nothing to do" while units wait.
        for _ in 0..3 {
            // One statement, its own transaction: row locks are waited for at most
            // `lock_timeout` (set for this statement only).
            let q = sqlx::query(&self.inner.sql.claim)
                .bind(&claim.owner)
                .bind(claim.limit as i64)
                .bind(claim.lease.as_millis() as i64)
                .bind(&streams)
                .bind(claim.max_row_bytes.min(i32::MAX as usize) as i32)
                .bind(claim.max_batch_bytes.min(i64::MAX as usize) as i64)
                .bind(format!("{}ms", self.inner.lock_timeout.as_millis().max(1)))
                .bind(claim.depth.clamp(1, claim.limit.max(1)) as i64);
            let rows = self.fetch_short(q).await?;
            let mut out = Vec::with_capacity(rows.len());
            let mut empty: (Vec<String>, Vec<String>) = (vec![], vec![]);
            for r in &rows {
                if sqlx::Row::try_get::<Option<i64>, _>(r, 0)
                    .map_err(map_err)?
                    .is_none()
                {
                    empty.0.push(sqlx::Row::try_get(r, 2).map_err(map_err)?);
                    empty.1.push(sqlx::Row::try_get(r, 16).map_err(map_err)?);
                } else {
                    out.push(claimed(r, claim)?);
                }
            }
            let retry = out.is_empty() && !empty.0.is_empty();
            if retry {
                self.forget_empty_units(&empty.0, &empty.1).await?;
            } else if !empty.0.is_empty() {
                // Off the path to publishing: a unit left unforgotten is found again.
                let store = self.clone();
                self.inner
                    .forgetting
                    .run(async move { store.forget_empty_units(&empty.0, &empty.1).await });
            }
            if !retry {
                out.sort_by_key(|r| match r {
                    Ok(m) => m.seq,
                    Err(q) => q.seq,
                });
                return Ok(out);
            }
        }
        Ok(Vec::new())
    }

    /// Publish-on-commit rows (the committing process's path, one row per transaction
    /// often) go through a plain statement: the batch statement that also settles units is
    /// planned afresh on every execution (its array parameters keep PostgreSQL on custom
    /// plans), about 3 ms, more than the rest of the after-commit path. Rows it did not take
    /// (keep-order ones) go through the batch statement.
    async fn complete(&self, seqs: &[i64], delete: bool) -> outbox_core::Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let sql = if delete {
            &self.inner.sql.complete_oc_delete
        } else {
            &self.inner.sql.complete_oc_mark
        };
        let taken: std::collections::HashSet<i64> = self
            .fetch_short(sqlx::query(sql).bind(seqs))
            .await?
            .iter()
            .map(|r| sqlx::Row::try_get::<i64, _>(r, 0))
            .collect::<Result<_, _>>()
            .map_err(map_err)?;
        let rest: Vec<i64> = seqs
            .iter()
            .copied()
            .filter(|s| !taken.contains(s))
            .collect();
        if rest.is_empty() {
            return Ok(());
        }
        self.settle_rows(None, &rest, delete, &[]).await
    }

    async fn fail(&self, owner: &str, failures: &[Failure]) -> outbox_core::Result<()> {
        self.settle_rows(Some(owner), &[], false, failures).await
    }

    async fn settle(
        &self,
        owner: &str,
        done: &[i64],
        delete: bool,
        failures: &[Failure],
    ) -> outbox_core::Result<()> {
        self.settle_rows(Some(owner), done, delete, failures).await
    }

    async fn park_unit(&self, stream: &str, unit: &str, reason: &str) -> outbox_core::Result<()> {
        let t = &self.inner.table;
        let pending = format!(
            "EXISTS (SELECT 1 FROM {t} WHERE status = 'pending' AND stream = $1 AND okey = $2
               AND strategy <> 'on_commit')"
        );
        let mut tx = self.inner.pool.begin().await.map_err(map_err)?;
        // A unit the claims do not know yet (rows written by SQL) is adopted first.
        for adopt in [
            format!("INSERT INTO {t}_units (stream, okey) SELECT $1, $2 WHERE {pending} ON CONFLICT DO NOTHING"),
            format!(
                "INSERT INTO {t}_due (stream, okey, next_at) SELECT $1, $2, 0 WHERE {pending} ON CONFLICT DO NOTHING"
            ),
        ] {
            sqlx::query(&adopt)
                .bind(stream)
                .bind(unit)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        // Parked units are never due: claims pick units through <table>_due_next.
        let state: Option<bool> = sqlx::query_scalar(&format!(
            "WITH p AS (
               UPDATE {t}_due SET parked_at = {NOW}, parked_reason = $3, next_at = {PARKED}
               WHERE stream = $1 AND okey = $2 AND parked_at IS NULL AND {pending} RETURNING 1)
             SELECT true FROM p
             UNION ALL SELECT parked_at IS NOT NULL FROM {t}_due WHERE stream = $1 AND okey = $2
               AND NOT EXISTS (SELECT 1 FROM p)"
        ))
        .bind(stream)
        .bind(unit)
        .bind(reason)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        if state != Some(true) {
            return Err(rolled_back(tx, outbox_core::no_such_unit(stream, unit, false)).await);
        }
        tx.commit().await.map_err(map_err)
    }

    async fn wait_for_work(&self, timeout: Duration) {
        self.start_listener();
        let _ = tokio::time::timeout(timeout, self.inner.notify.notified()).await;
    }

    async fn start_listening(&self) -> outbox_core::Result<()> {
        if !self.inner.listen {
            return Ok(());
        }
        self.start_listener();
        let mut listens = self.inner.listens.subscribe();
        let ready = tokio::time::timeout(LISTEN_START, listens.wait_for(|n| *n > 0))
            .await
            .is_ok_and(|r| r.is_ok());
        match ready {
            true => Ok(()),
            false => Err(Error::new(
                outbox_core::ErrorKind::Timeout,
                Retry::Transient,
                format!("LISTEN was not established within {LISTEN_START:?}"),
            )),
        }
    }

    fn notify_committed(&self) {
        self.inner.notify.notify_one();
    }
}

impl PgStore {
    /// Un-park (`stream`, `unit`) in `tx`: due now, its failed rows with a fresh retry budget,
    /// relays told at commit.
    async fn resume(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        stream: &str,
        unit: &str,
    ) -> outbox_core::Result<()> {
        let t = &self.inner.table;
        let resumed: Option<i32> = sqlx::query_scalar(&format!(
            "UPDATE {t}_due SET parked_at = NULL, parked_reason = NULL, next_at = {NOW}, leased_by = NULL,
               claims = 0
             WHERE stream = $1 AND okey = $2 AND parked_at IS NOT NULL RETURNING 1"
        ))
        .bind(stream)
        .bind(unit)
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_err)?;
        if resumed.is_none() {
            return Err(outbox_core::no_such_unit(stream, unit, true));
        }
        sqlx::query(&format!(
            "UPDATE {t} SET attempts = 0, next_attempt_at = LEAST(next_attempt_at, {NOW})
             WHERE status = 'pending' AND stream = $1 AND okey = $2 AND strategy <> 'on_commit' AND attempts > 0"
        ))
        .bind(stream)
        .bind(unit)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(t)
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    /// Give keep-order rows without a known unit one (see `Sql::adopt`): on the first claim,
    /// then at most once every [`ADOPT_EVERY`], or now when `force`.
    async fn adopt_orphans(&self, force: bool) -> outbox_core::Result<()> {
        {
            let last = self.inner.adopted.lock().unwrap_or_else(|p| p.into_inner());
            if !force && last.is_some_and(|t| t.elapsed() < ADOPT_EVERY) {
                return Ok(());
            }
        }
        // A writer holding one of these units waits no longer than a claim would.
        let mut tx = self.inner.pool.begin().await.map_err(map_err)?;
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(self.lock_wait())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query(&self.inner.sql.adopt)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        *self.inner.adopted.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now());
        Ok(())
    }

    /// `lock_timeout` as PostgreSQL takes it.
    fn lock_wait(&self) -> String {
        format!("{}ms", self.inner.lock_timeout.as_millis().max(1))
    }

    /// Run one of the relay's statements: on the pool, or, when its connections have JIT on,
    /// in a transaction that turns it off first.
    async fn fetch_short(
        &self,
        q: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> outbox_core::Result<Vec<sqlx::postgres::PgRow>> {
        let jit = *self
            .inner
            .jit
            .get_or_try_init(|| async {
                sqlx::query_scalar::<_, bool>("SELECT current_setting('jit') = 'on'")
                    .fetch_one(&self.inner.pool)
                    .await
                    .map_err(map_err)
            })
            .await?;
        if !jit {
            return q.fetch_all(&self.inner.pool).await.map_err(map_err);
        }
        let mut tx = self
            .inner
            .pool
            .begin_with("BEGIN; SET LOCAL jit = off")
            .await
            .map_err(map_err)?;
        let rows = q.fetch_all(&mut *tx).await.map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(rows)
    }

    /// One statement for a batch's outcome (see `Sql::settle_mark`).
    async fn settle_rows(
        &self,
        owner: Option<&str>,
        done: &[i64],
        delete: bool,
        failures: &[Failure],
    ) -> outbox_core::Result<()> {
        if done.is_empty() && failures.is_empty() {
            return Ok(());
        }
        let mut seqs = Vec::with_capacity(failures.len());
        let (mut kinds, mut errs, mut afters) = (vec![], vec![], vec![]);
        for f in failures {
            seqs.push(f.seq);
            let (kind, after) = match f.outcome {
                Outcome::Retry { after } => ("retry", after.as_millis() as i64),
                Outcome::Dead => ("dead", 0),
                Outcome::Release => ("release", 0),
            };
            kinds.push(kind);
            afters.push(after);
            errs.push(f.error.clone());
        }
        let sql = if delete {
            &self.inner.sql.settle_delete
        } else {
            &self.inner.sql.settle_mark
        };
        let q = sqlx::query(sql)
            .bind(done)
            .bind(seqs)
            .bind(kinds)
            .bind(errs)
            .bind(owner)
            .bind(afters)
            .bind(format!("{}ms", self.inner.lock_timeout.as_millis().max(1)));
        self.fetch_short(q).await?;
        Ok(())
    }

    /// Forget units a claim found with no pending row. Writers add a unit's row of
    /// `<table>_due` while they hold its row of `<table>_units`: so this takes the units'
    /// writer locks first (skipping a unit a writer holds: it is not empty for long), then,
    /// in a second statement whose snapshot sees every writer that committed before, deletes
    /// the units that still have no pending row.
    async fn forget_empty_units(
        &self,
        streams: &[String],
        keys: &[String],
    ) -> outbox_core::Result<()> {
        let t = &self.inner.table;
        // Bookkeeping, as a claim's lease: a unit deleted here and restored by a crash is
        // found empty again (see `Sql::claim` on `synchronous_commit`).
        let mut tx = self
            .inner
            .pool
            .begin_with("BEGIN; SET LOCAL synchronous_commit = off")
            .await
            .map_err(map_err)?;
        let locked: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT u.stream, u.okey FROM {t}_units u JOIN unnest($1::text[], $2::text[]) AS x(s, k)
               ON u.stream = x.s AND u.okey = x.k
             ORDER BY u.stream, u.okey FOR UPDATE OF u SKIP LOCKED"
        ))
        .bind(streams)
        .bind(keys)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        if !locked.is_empty() {
            let (s, k): (Vec<String>, Vec<String>) = locked.into_iter().unzip();
            sqlx::query(&format!(
                "WITH gone AS (
                   DELETE FROM {t}_due d USING unnest($1::text[], $2::text[]) AS x(s, k)
                   WHERE d.stream = x.s AND d.okey = x.k AND NOT EXISTS (
                     SELECT 1 FROM {t} o WHERE o.stream = x.s AND o.okey = x.k AND o.status = 'pending'
                       AND o.strategy <> 'on_commit')
                   RETURNING d.stream, d.okey)
                 , healed AS (
                   -- A unit that was not empty after all (rows the claim's snapshot did not
                   -- see): look from its start again.
                   UPDATE {t}_due d SET head_seq = 0 FROM unnest($1::text[], $2::text[]) AS x(s, k)
                   WHERE d.stream = x.s AND d.okey = x.k AND d.head_seq > 0
                     AND NOT EXISTS (SELECT 1 FROM gone WHERE gone.stream = x.s AND gone.okey = x.k))
                 DELETE FROM {t}_units u USING gone WHERE u.stream = gone.stream AND u.okey = gone.okey"
            ))
            .bind(s)
            .bind(k)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
    }

    /// A second store on the same table with its own pool (as another process would have).
    pub async fn reopen(&self) -> outbox_core::Result<Self> {
        let options = self.inner.pool.connect_options().as_ref().clone();
        let pool = pool_options(self.inner.plan_refresh)
            .max_connections(5)
            .connect_with(options)
            .await
            .map_err(map_err)?;
        Self::from_pool(pool, &self.inner.table)
    }
}

#[cfg(test)]
mod tests {
    use super::period_ended;
    use std::time::Duration;

    #[test]
    fn a_refresh_period_ends_once_per_period_of_the_connections_age() {
        let s = Duration::from_secs;
        let every = s(5);
        // Released at 3 s, taken at 4 s: same period.
        assert!(!period_ended(s(4), s(1), every));
        // Released at 4 s, taken at 6 s: the period that ended at 5 s.
        assert!(period_ended(s(6), s(2), every));
        // Idle longer than a period: always.
        assert!(period_ended(s(12), s(6), every));
        // Released at 6 s, taken at 9 s: already refreshed for that period.
        assert!(!period_ended(s(9), s(3), every));
        assert!(period_ended(s(1), Duration::ZERO, Duration::ZERO));
    }
}
