//! PostgreSQL store: enqueue in the caller's sqlx transaction, claims serialized per table
//! with leases, `LISTEN/NOTIFY` wake-up.
//!
//! ```no_run
//! use outbox_core::{Message, Outbox, StdoutPublisher, Strategy};
//! use outbox_sql::postgres::PgStore;
//! # async fn demo() -> outbox_core::Result<()> {
//! let store = PgStore::connect("postgres://app@127.0.0.1/shop").await?;   // table "outbox"
//! outbox_core::Store::migrate(&store).await?;
//! let outbox = Outbox::builder(store.clone(), StdoutPublisher::default())
//!     .strategy(Strategy::KeepOrder)
//!     .build()?;
//!
//! let mut tx = store.pool().begin().await.map_err(outbox_sql::postgres::map_err)?;
//! // ... business writes on &mut *tx ...
//! let pending = store.enqueue(&mut tx, &outbox, [Message::json("orders.placed", &1)?]).await?;
//! outbox_sql::postgres::commit(tx, pending).await?;   // commit, then publish on commit
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use outbox_core::{
    to_millis, validate_identifier, Claim, Error, Failure, Message, NewMessage, Outbox, Outcome,
    Pending, Retry, Selector, Stats, Store, StoredMessage, StreamFilter,
};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{PgConnection, Postgres, Transaction};
use tokio::sync::Notify;

use crate::common::{claimed, keep_order_units, listed, redact_url, stats_from_rows};

pub use crate::common::map_err;
/// The sqlx this store is built with, for the application's own queries and transactions.
pub use sqlx;

/// The database clock in milliseconds.
const NOW: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

fn cols(prefix: &str) -> String {
    format!(
        "{p}seq, {p}id::text, {p}stream, {p}destination, {p}msg_key, {p}payload, {p}content_type, {p}headers::text, \
         {p}strategy, {p}status, {p}attempts, {p}created_at, {p}next_attempt_at, {p}last_error, {p}sent_at, {p}signature, \
         {p}okey",
        p = prefix
    )
}

/// Settings of a [`PgStore`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Table name (validated, never interpolated raw). Default: `outbox`.
    pub table: String,
    /// Pool size. Default: 5.
    pub max_connections: u32,
    /// How long to wait for a pooled connection (and for the first connection at start-up).
    /// Default: 5 s.
    pub acquire_timeout: Duration,
    /// Longest wait for the claim lock (`lock_timeout` of the claim transaction): a lock held
    /// longer becomes a logged, retried store error instead of a silent stall. Default: 5 s.
    pub lock_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            table: "outbox".into(),
            max_connections: 5,
            acquire_timeout: Duration::from_secs(5),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        }
    }
}

const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

struct Inner {
    lock_timeout: Duration,
    pool: PgPool,
    table: String,
    sql: Sql,
    notify: Arc<Notify>,
    listening: AtomicBool,
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
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(|e| {
                let mapped = map_err(e);
                Error::new(
                    mapped.kind(),
                    Retry::Transient,
                    format!("cannot connect to PostgreSQL at {}", redact_url(url)),
                )
                .with_source(mapped)
            })?;
        let mut store = Self::from_pool(pool, &options.table)?;
        if let Some(inner) = Arc::get_mut(&mut store.inner) {
            inner.lock_timeout = options.lock_timeout;
        }
        Ok(store)
    }

    /// Use an existing pool (the application's own).
    pub fn from_pool(pool: PgPool, table: &str) -> outbox_core::Result<Self> {
        validate_identifier(table)?;
        Ok(Self {
            inner: Arc::new(Inner {
                lock_timeout: DEFAULT_LOCK_TIMEOUT,
                pool,
                table: table.to_owned(),
                sql: Sql::new(table),
                notify: Arc::new(Notify::new()),
                listening: AtomicBool::new(false),
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

    /// Whether the outbox table exists in the connection's search path.
    pub async fn table_exists(&self) -> outbox_core::Result<bool> {
        let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&self.inner.table)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(map_err)?;
        Ok(found.is_some())
    }

    /// Write `messages` in the caller's transaction (pass `&mut tx`), in one statement.
    /// Either all are written or, on error, none. Keep-order rows lock their ordering unit
    /// until the transaction ends and send `NOTIFY` on commit.
    ///
    /// Do the business writes that lock shared rows *before* enqueueing, as usual: a
    /// transaction that waits for a unit lock while holding a row another writer of that unit
    /// needs deadlocks, and PostgreSQL aborts one of the two.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        outbox: &Outbox,
        messages: impl IntoIterator<Item = Message>,
    ) -> outbox_core::Result<Pending> {
        let prepared = outbox.prepare(messages)?;
        let rows = prepared.rows();
        let units = keep_order_units(rows);
        let seqs = insert(&mut *conn, &self.inner.sql, rows, &units).await?;
        prepared.into_pending(seqs)
    }

    fn start_listener(&self) {
        if self.inner.listening.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = self.inner.pool.clone();
        let channel = self.inner.table.clone();
        let notify: Weak<Notify> = Arc::downgrade(&self.inner.notify);
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
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
                    continue;
                }
                pause = Duration::from_millis(100);
                loop {
                    let Some(n) = notify.upgrade() else { return };
                    match listener.try_recv().await {
                        Ok(Some(_)) => n.notify_one(),
                        // The connection dropped: notifications may have been missed, so make
                        // the relay look now; try_recv reconnects on the next call.
                        Ok(None) => n.notify_one(),
                        Err(e) => {
                            tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                            n.notify_one();
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// Commit `tx`, then publish its publish-on-commit messages in the background. Nothing is
/// published if the commit fails.
pub async fn commit(tx: Transaction<'_, Postgres>, pending: Pending) -> outbox_core::Result<()> {
    tx.commit().await.map_err(map_err)?;
    pending.dispatch();
    Ok(())
}

struct Sql {
    schema: String,
    insert: String,
    /// The same INSERT without the unit locks and NOTIFY (no keep-order row in the batch).
    insert_plain: String,
    claim: String,
    claim_lock: String,
    complete_mark: String,
    complete_delete: String,
    fail: String,
    get: String,
}

impl Sql {
    fn new(t: &str) -> Self {
        let mut sql = Self::build(t);
        let insert = &sql.insert;
        let start = insert.rfind("INSERT INTO").expect("insert statement");
        sql.insert_plain = insert[start..].replace(
            "WHERE (SELECT count(*) FROM locks) >= 0 AND (SELECT count(*) FROM wake) >= 0",
            "",
        );
        sql
    }

    fn build(t: &str) -> Self {
        Self {
            insert_plain: String::new(),
            schema: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    seq BIGSERIAL PRIMARY KEY,
                    id UUID NOT NULL UNIQUE,
                    stream TEXT NOT NULL,
                    destination TEXT NOT NULL,
                    msg_key TEXT,
                    okey TEXT NOT NULL,
                    payload BYTEA NOT NULL,
                    content_type TEXT NOT NULL,
                    headers JSONB NOT NULL,
                    strategy TEXT NOT NULL,
                    status TEXT NOT NULL,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    created_at BIGINT NOT NULL,
                    next_attempt_at BIGINT NOT NULL,
                    locked_by TEXT,
                    locked_until BIGINT,
                    last_error TEXT,
                    sent_at BIGINT,
                    signature TEXT
                );
                CREATE INDEX IF NOT EXISTS {t}_pending ON {t} (seq) WHERE status = 'pending';
                CREATE INDEX IF NOT EXISTS {t}_unit ON {t} (stream, okey, seq) WHERE status = 'pending';
                CREATE INDEX IF NOT EXISTS {t}_leased ON {t} (locked_until) WHERE status = 'pending' AND locked_until IS NOT NULL;
                CREATE INDEX IF NOT EXISTS {t}_backoff ON {t} (next_attempt_at) WHERE status = 'pending' AND attempts > 0;
                CREATE INDEX IF NOT EXISTS {t}_sent ON {t} (sent_at) WHERE status = 'sent';
                CREATE INDEX IF NOT EXISTS {t}_dead ON {t} (created_at) WHERE status = 'dead';
                CREATE TABLE IF NOT EXISTS {t}_units (
                    stream TEXT NOT NULL,
                    okey TEXT NOT NULL,
                    PRIMARY KEY (stream, okey)
                );
                CREATE TABLE IF NOT EXISTS {t}_claim (id SMALLINT PRIMARY KEY CHECK (id = 1));
                INSERT INTO {t}_claim (id) VALUES (1) ON CONFLICT DO NOTHING"
            ),
            // One round trip: the keep-order unit locks (rows of <table>_units for the units in
            // $17/$18, sorted, so writers never deadlock on them; only roles that can write the
            // outbox's tables can take them; `DO UPDATE ... WHERE false` locks an existing row
            // without writing a new version of it) and the NOTIFY ($19) are taken by CTEs that
            // a one-time filter evaluates before the first row is inserted.
            insert: format!(
                "WITH locks AS (
                   INSERT INTO {t}_units (stream, okey) SELECT * FROM unnest($17::text[], $18::text[])
                   ON CONFLICT (stream, okey) DO UPDATE SET okey = EXCLUDED.okey WHERE false RETURNING 1),
                 wake AS (SELECT pg_notify('{t}', '') WHERE $19::bool)
                 INSERT INTO {t} (id, stream, destination, msg_key, okey, payload, content_type, headers, strategy,
                    status, attempts, created_at, next_attempt_at, locked_by, locked_until, last_error, signature)
                 SELECT u.id::uuid, u.stream, u.destination, u.msg_key, COALESCE(u.msg_key, ''), u.payload,
                    u.content_type, u.headers::jsonb, u.strategy, u.status, u.attempts, u.created_at,
                    {NOW} + u.retry_ms, u.locked_by, {NOW} + u.lease_ms, u.last_error, u.signature
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::text[],
                    $8::text[], $9::text[], $10::int4[], $11::int8[], $12::int8[], $13::text[], $14::int8[],
                    $15::text[], $16::text[])
                   AS u(id, stream, destination, msg_key, payload, content_type, headers, strategy, status,
                        attempts, created_at, retry_ms, locked_by, lease_ms, last_error, signature)
                 WHERE (SELECT count(*) FROM locks) >= 0 AND (SELECT count(*) FROM wake) >= 0
                 RETURNING seq, id::text"
            ),
            // Runs after the per-table claim lock: see the crate docs for why.
            // Blocked rows (leased or backing off) are few: find each unit's first blocked
            // seq, then take free, due rows in seq order that come before it. A correlated
            // NOT EXISTS over all earlier pending rows degrades to a pending x pending join on
            // large backlogs.
            claim: format!(
                "WITH now AS (SELECT {NOW} AS ms),
                 blocked AS MATERIALIZED (
                   SELECT b.stream, b.okey, MIN(b.seq) AS seq FROM {t} b, now
                   WHERE b.status = 'pending' AND b.strategy = 'keep_order'
                     AND (b.locked_until > now.ms OR (b.attempts > 0 AND b.next_attempt_at > now.ms))
                   GROUP BY b.stream, b.okey),
                 c AS (
                   SELECT o.seq, octet_length(o.payload) + octet_length(o.headers::text) AS size
                   FROM {t} o, now
                   WHERE o.status = 'pending' AND ($4::text[] IS NULL OR o.stream = ANY($4))
                     AND (o.locked_until IS NULL OR o.locked_until <= now.ms) AND o.next_attempt_at <= now.ms
                     AND (o.strategy = 'on_commit' OR NOT EXISTS (
                       SELECT 1 FROM blocked WHERE blocked.stream = o.stream AND blocked.okey = o.okey
                         AND blocked.seq < o.seq))
                   ORDER BY o.seq LIMIT $2
                   FOR UPDATE OF o SKIP LOCKED),
                 -- The byte budget ($6), in seq order (so each unit stays a prefix): oversized
                 -- rows ($5) cost nothing (they are not loaded), the first other row always fits.
                 b AS (
                   SELECT seq, size, SUM(CASE WHEN size > $5 THEN 0 ELSE size END) OVER (ORDER BY seq) AS running
                   FROM c),
                 taken AS (
                   SELECT seq, size FROM b
                   WHERE running - CASE WHEN size > $5 THEN 0 ELSE size END = 0 OR running <= $6)
                 UPDATE {t} SET locked_by = $1, locked_until = (SELECT ms FROM now) + $3
                 FROM taken WHERE {t}.seq = taken.seq
                 RETURNING {cols}, taken.size",
                cols = cols(&format!("{t}.")).replace(
                    &format!("{t}.payload,"),
                    &format!("CASE WHEN taken.size > $5 THEN NULL ELSE {t}.payload END,")
                )
            ),
            claim_lock: format!("SELECT id FROM {t}_claim WHERE id = 1 FOR UPDATE"),
            complete_mark: format!(
                "UPDATE {t} SET status = 'sent', sent_at = {NOW}, locked_by = NULL, locked_until = NULL
                 WHERE seq = ANY($1)"
            ),
            complete_delete: format!("DELETE FROM {t} WHERE seq = ANY($1)"),
            fail: format!(
                "UPDATE {t} SET
                   attempts = CASE WHEN f.kind = 'release' THEN {t}.attempts ELSE {t}.attempts + 1 END,
                   last_error = CASE WHEN f.kind = 'release' THEN {t}.last_error ELSE f.err END,
                   next_attempt_at = CASE WHEN f.kind = 'retry' THEN {NOW} + f.after_ms ELSE {t}.next_attempt_at END,
                   status = CASE WHEN f.kind = 'dead' THEN 'dead' ELSE {t}.status END,
                   locked_by = NULL, locked_until = NULL
                 FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::int8[]) AS f(seq, kind, err, after_ms)
                 WHERE {t}.seq = f.seq AND {t}.locked_by = $5 AND {t}.status = 'pending'"
            ),
            get: format!("SELECT {} FROM {t} WHERE seq = $1", cols("")),
        }
    }
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
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let (mut streams, mut dests, mut keys, mut payloads) = (vec![], vec![], vec![], vec![]);
    let (mut ctypes, mut headers, mut strategies, mut statuses) = (vec![], vec![], vec![], vec![]);
    let (mut attempts, mut created, mut retry, mut lockers) = (vec![], vec![], vec![], vec![]);
    let (mut leases, mut errors, mut sigs) = (vec![], vec![], vec![]);
    for r in rows {
        let m = &r.envelope.message;
        ids.push(r.envelope.id.to_string());
        streams.push(m.stream.clone());
        dests.push(m.destination.clone());
        keys.push(m.key.clone());
        payloads.push(m.payload.clone());
        ctypes.push(m.content_type.clone());
        headers.push(serde_json::to_string(&m.headers)?);
        strategies.push(r.strategy.as_str());
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
    .bind(sigs);
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
        // Several processes may migrate at once: one at a time.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('outbox-migrate'), hashtext($1))")
            .bind(&self.inner.table)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        for statement in self
            .inner
            .sql
            .schema
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            sqlx::query(statement)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn insert(&self, rows: &[NewMessage]) -> outbox_core::Result<Vec<i64>> {
        let mut conn = self.inner.pool.acquire().await.map_err(map_err)?;
        insert(&mut conn, &self.inner.sql, rows, &[]).await
    }

    async fn claim(&self, claim: &Claim) -> outbox_core::Result<Vec<outbox_core::Claimed>> {
        let streams: Option<Vec<String>> = match &claim.streams {
            StreamFilter::All => None,
            StreamFilter::Only(s) => Some(s.clone()),
        };
        let mut tx = self.inner.pool.begin().await.map_err(map_err)?;
        // Claims are serialized on the one row of <table>_claim (see the crate docs for why):
        // a lock only roles with privileges on the outbox's tables can take, waited for at most
        // `lock_timeout`.
        // One round trip (simple query protocol): both statements are ours, the timeout a
        // number.
        let lock = format!(
            "SET LOCAL lock_timeout = '{}ms'; {}",
            self.inner.lock_timeout.as_millis().max(1),
            self.inner.sql.claim_lock
        );
        sqlx::Executor::execute(&mut *tx, lock.as_str())
            .await
            .map_err(map_err)?;
        let rows = sqlx::query(&self.inner.sql.claim)
            .bind(&claim.owner)
            .bind(claim.limit as i64)
            .bind(claim.lease.as_millis() as i64)
            .bind(streams)
            .bind(claim.max_row_bytes.min(i32::MAX as usize) as i32)
            .bind(claim.max_batch_bytes.min(i64::MAX as usize) as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        let mut out = rows
            .iter()
            .map(|r| claimed(r, claim))
            .collect::<outbox_core::Result<Vec<_>>>()?;
        out.sort_by_key(|r| match r {
            Ok(m) => m.seq,
            Err(q) => q.seq,
        });
        Ok(out)
    }

    async fn complete(&self, seqs: &[i64], delete: bool) -> outbox_core::Result<()> {
        let sql = if delete {
            &self.inner.sql.complete_delete
        } else {
            &self.inner.sql.complete_mark
        };
        sqlx::query(sql)
            .bind(seqs)
            .execute(&self.inner.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn fail(&self, owner: &str, failures: &[Failure]) -> outbox_core::Result<()> {
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
        sqlx::query(&self.inner.sql.fail)
            .bind(seqs)
            .bind(kinds)
            .bind(errs)
            .bind(afters)
            .bind(owner)
            .execute(&self.inner.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn requeue(&self, sel: &Selector) -> outbox_core::Result<u64> {
        let (clause, stream, seqs) = selector(sel);
        let t = &self.inner.table;
        let sql = format!(
            "UPDATE {t} SET status = 'pending', attempts = 0, next_attempt_at = {NOW}, locked_by = NULL,
               locked_until = NULL WHERE status = 'dead'{clause}"
        );
        let mut q = sqlx::query(&sql);
        if let Some(s) = stream {
            q = q.bind(s);
        }
        if let Some(s) = seqs {
            q = q.bind(s);
        }
        let n = q
            .execute(&self.inner.pool)
            .await
            .map_err(map_err)?
            .rows_affected();
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(t)
            .execute(&self.inner.pool)
            .await
            .map_err(map_err)?;
        self.inner.notify.notify_one();
        Ok(n)
    }

    async fn purge_dead(&self, sel: &Selector) -> outbox_core::Result<u64> {
        let (clause, stream, seqs) = selector(sel);
        let sql = format!(
            "DELETE FROM {} WHERE status = 'dead'{clause}",
            self.inner.table
        );
        let mut q = sqlx::query(&sql);
        if let Some(s) = stream {
            q = q.bind(s);
        }
        if let Some(s) = seqs {
            q = q.bind(s);
        }
        Ok(q.execute(&self.inner.pool)
            .await
            .map_err(map_err)?
            .rows_affected())
    }

    async fn dead_letters(
        &self,
        stream: Option<&str>,
        limit: usize,
    ) -> outbox_core::Result<Vec<StoredMessage>> {
        let sql = format!(
            "SELECT {} FROM {} WHERE status = 'dead' AND ($1::text IS NULL OR stream = $1) ORDER BY seq LIMIT $2",
            cols(""),
            self.inner.table
        );
        let rows = sqlx::query(&sql)
            .bind(stream)
            .bind(limit as i64)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(listed).collect()
    }

    async fn clean(
        &self,
        sent_before: SystemTime,
        limit: usize,
        include_dead: bool,
    ) -> outbox_core::Result<u64> {
        let sql = format!(
            "DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t} WHERE (status = 'sent' AND sent_at < $1)
               OR ($2 AND status = 'dead' AND created_at < $1) ORDER BY seq LIMIT $3)",
            t = self.inner.table
        );
        let r = sqlx::query(&sql)
            .bind(to_millis(sent_before))
            .bind(include_dead)
            .bind(limit as i64)
            .execute(&self.inner.pool)
            .await
            .map_err(map_err)?;
        Ok(r.rows_affected())
    }

    async fn stats(&self) -> outbox_core::Result<Stats> {
        let sql = format!(
            "SELECT stream, COUNT(*) FILTER (WHERE status = 'pending'), COUNT(*) FILTER (WHERE status = 'sent'),
               COUNT(*) FILTER (WHERE status = 'dead'), MIN(created_at) FILTER (WHERE status = 'pending')
             FROM {} GROUP BY stream ORDER BY stream",
            self.inner.table
        );
        let rows: Vec<(String, i64, i64, i64, Option<i64>)> = sqlx::query_as(&sql)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(map_err)?;
        Ok(stats_from_rows(rows))
    }

    async fn get(&self, seq: i64) -> outbox_core::Result<Option<StoredMessage>> {
        let row = sqlx::query(&self.inner.sql.get)
            .bind(seq)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(listed).transpose()
    }

    async fn wait_for_work(&self, timeout: Duration) {
        self.start_listener();
        let _ = tokio::time::timeout(timeout, self.inner.notify.notified()).await;
    }

    fn notify_committed(&self) {
        self.inner.notify.notify_one();
    }
}

impl PgStore {
    /// A second store on the same table with its own pool (as another process would have).
    pub async fn reopen(&self) -> outbox_core::Result<Self> {
        let options = self.inner.pool.connect_options().as_ref().clone();
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect_with(options)
            .await
            .map_err(map_err)?;
        Self::from_pool(pool, &self.inner.table)
    }
}
