//! Every statement of the PostgreSQL store, built once per table: each one written whole by
//! its own function (a shared fragment is a function too), none derived from another by
//! replacing text.

use super::*;

pub(super) struct Sql {
    pub(super) schema: String,
    pub(super) insert: String,
    /// The same INSERT without the unit locks and NOTIFY (no keep-order row in the batch).
    pub(super) insert_plain: String,
    /// One keep-order row (its unit locked, NOTIFY), scalar parameters.
    pub(super) insert_one: String,
    /// One row without a unit, scalar parameters.
    pub(super) insert_one_plain: String,
    pub(super) claim: String,
    /// Mark publish-on-commit rows sent (or delete them), returning their `seq`s.
    pub(super) complete_oc_mark: String,
    pub(super) complete_oc_delete: String,
    pub(super) settle_mark: String,
    pub(super) settle_delete: String,
    pub(super) adopt: String,
    pub(super) get: String,
}

impl Sql {
    pub(super) fn new(t: &str) -> Self {
        Self {
            schema: schema(t),
            insert: insert(t),
            insert_plain: insert_plain(t),
            insert_one: insert_one(t),
            insert_one_plain: insert_one_plain(t),
            claim: claim(t),
            complete_oc_mark: complete_oc(t, false),
            complete_oc_delete: complete_oc(t, true),
            settle_mark: settle(t, false),
            settle_delete: settle(t, true),
            adopt: adopt(t),
            get: format!("SELECT {} FROM {t} WHERE seq = $1", cols("", "payload")),
        }
    }
}

// `<table>_units`: one row per keep-order unit with pending rows, locked by writers for the
// whole transaction (commit order). `<table>_due`: the same units as the claim sees them, with
// when each may be claimed next (`next_at`: now when free, the lease's end when leased, the
// head's retry time when backing off), so a claim picks due units through `<table>_due_next`
// and never reads a blocked unit's rows.
fn schema(t: &str) -> String {
    format!(
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
                    signature TEXT,
                    on_exhausted TEXT,
                    claims INTEGER NOT NULL DEFAULT 0
                );
                ALTER TABLE {t} ADD COLUMN IF NOT EXISTS on_exhausted TEXT;
                ALTER TABLE {t} ADD COLUMN IF NOT EXISTS claims INTEGER NOT NULL DEFAULT 0;
                CREATE INDEX IF NOT EXISTS {t}_unit ON {t} (stream, okey, seq) WHERE status = 'pending';
                CREATE INDEX IF NOT EXISTS {t}_oc ON {t} (next_attempt_at) WHERE status = 'pending' AND strategy = 'on_commit';
                CREATE INDEX IF NOT EXISTS {t}_sent ON {t} (sent_at) WHERE status = 'sent';
                CREATE INDEX IF NOT EXISTS {t}_dead ON {t} (created_at) WHERE status = 'dead';
                DROP INDEX IF EXISTS {t}_pending;
                DROP INDEX IF EXISTS {t}_leased;
                DROP INDEX IF EXISTS {t}_backoff;
                DROP TABLE IF EXISTS {t}_claim;
                CREATE TABLE IF NOT EXISTS {t}_units (
                    stream TEXT NOT NULL,
                    okey TEXT NOT NULL,
                    PRIMARY KEY (stream, okey)
                );
                CREATE TABLE IF NOT EXISTS {t}_due (
                    stream TEXT NOT NULL,
                    okey TEXT NOT NULL,
                    next_at BIGINT NOT NULL,
                    leased_by TEXT,
                    head_seq BIGINT NOT NULL DEFAULT 0,
                    parked_at BIGINT,
                    parked_reason TEXT,
                    claims INTEGER NOT NULL DEFAULT 0,
                    PRIMARY KEY (stream, okey)
                );
                ALTER TABLE {t}_due ADD COLUMN IF NOT EXISTS claims INTEGER NOT NULL DEFAULT 0;
                ALTER TABLE {t}_due ADD COLUMN IF NOT EXISTS head_seq BIGINT NOT NULL DEFAULT 0;
                ALTER TABLE {t}_due ADD COLUMN IF NOT EXISTS parked_at BIGINT;
                ALTER TABLE {t}_due ADD COLUMN IF NOT EXISTS parked_reason TEXT;
                CREATE INDEX IF NOT EXISTS {t}_due_next ON {t}_due (next_at);
                CREATE INDEX IF NOT EXISTS {t}_due_parked ON {t}_due (parked_at) WHERE parked_at IS NOT NULL;
                UPDATE {t} SET next_attempt_at = locked_until
                  WHERE status = 'pending' AND strategy = 'on_commit' AND locked_until > next_attempt_at"
    )
}

fn insert_one(t: &str) -> String {
    format!(
        "WITH locks AS (
                   INSERT INTO {t}_units (stream, okey) VALUES ($2, $17)
                   ON CONFLICT (stream, okey) DO UPDATE SET okey = EXCLUDED.okey WHERE false RETURNING 1),
                 due AS (
                   INSERT INTO {t}_due (stream, okey, next_at)
                   SELECT $2, $17, {NOW} WHERE (SELECT count(*) FROM locks) >= 0
                   ON CONFLICT (stream, okey) DO NOTHING RETURNING 1),
                 wake AS (SELECT pg_notify('{t}', ''))
                 INSERT INTO {t} ({INSERT_COLS})
                 SELECT {ONE_VALUES}
                 WHERE (SELECT count(*) FROM due) >= 0 AND (SELECT count(*) FROM wake) >= 0
                 RETURNING seq"
    )
}

fn insert_one_plain(t: &str) -> String {
    format!("INSERT INTO {t} ({INSERT_COLS}) VALUES ({ONE_VALUES}) RETURNING seq")
}

// One round trip: the keep-order unit locks (rows of <table>_units for the units in $20/$21,
// sorted, so writers never deadlock on them; only roles that can write the outbox's tables
// can take them; `DO UPDATE ... WHERE false` locks an existing row without writing a new
// version of it), then, under those locks, the units' rows of <table>_due (written only for a
// unit that had none), and the NOTIFY ($22), are taken by CTEs that one-time filters evaluate
// in that order before the first row is inserted.
fn insert(t: &str) -> String {
    format!(
        "WITH locks AS (
                   INSERT INTO {t}_units (stream, okey) SELECT * FROM unnest($20::text[], $21::text[])
                   ON CONFLICT (stream, okey) DO UPDATE SET okey = EXCLUDED.okey WHERE false RETURNING 1),
                 due AS (
                   INSERT INTO {t}_due (stream, okey, next_at)
                   SELECT s, k, {NOW} FROM unnest($20::text[], $21::text[]) AS x(s, k)
                   WHERE (SELECT count(*) FROM locks) >= 0
                   ON CONFLICT (stream, okey) DO NOTHING RETURNING 1),
                 wake AS (SELECT pg_notify('{t}', '') WHERE $22::bool)
                 {rows}
                 WHERE (SELECT count(*) FROM due) >= 0 AND (SELECT count(*) FROM wake) >= 0
                 RETURNING seq, id::text",
        rows = insert_rows(t)
    )
}

/// A batch without keep-order rows: no unit lock, no NOTIFY.
fn insert_plain(t: &str) -> String {
    format!("{} RETURNING seq, id::text", insert_rows(t))
}

/// The rows of a batch insert, from arrays `$1`..`$19`.
fn insert_rows(t: &str) -> String {
    format!(
        "INSERT INTO {t} ({INSERT_COLS})
                 SELECT u.id::uuid, u.stream, u.destination, u.msg_key, u.okey, u.payload,
                    u.content_type, u.headers::jsonb, u.strategy, u.status, u.attempts, u.created_at,
                    GREATEST({NOW} + GREATEST(u.retry_ms, COALESCE(u.lease_ms, 0)), COALESCE(u.not_before, 0)),
                    u.locked_by, {NOW} + u.lease_ms, u.last_error, u.signature, u.on_exhausted
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::text[],
                    $8::text[], $9::text[], $10::int4[], $11::int8[], $12::int8[], $13::text[], $14::int8[],
                    $15::text[], $16::text[], $17::text[], $18::text[], $19::int8[])
                   AS u(id, stream, destination, msg_key, payload, content_type, headers, strategy, status,
                        attempts, created_at, retry_ms, locked_by, lease_ms, last_error, signature, okey,
                        on_exhausted, not_before)"
    )
}

// One statement, no table-wide lock: due keep-order units are locked with SKIP LOCKED (a unit
// is claimed by one relay at a time, so a second relay never sees message 2 free while
// message 1 is being leased), and each unit's first rows are read through <table>_unit: a
// blocked unit's rows are never read. Publish-on-commit rows left for the relay are due
// through <table>_oc (their `next_attempt_at` is the lease's end while leased). Sizes first;
// payloads only for the rows taken (an oversized one, over $5, is read as NULL).
//
// The claim commits without waiting for its WAL flush (`synchronous_commit` off for this
// statement only): what it writes is a lease, and a lease lost with the server's last
// moments is one that ended early; the relay that held it then cannot record its batch, whose
// rows are published again (a duplicate, as when a relay dies before recording). Every later
// synchronous commit flushes it anyway. This takes a WAL flush (0.2-4 ms) off the path from
// commit to publish.
fn claim(t: &str) -> String {
    let capped = format!("CASE WHEN octet_length({t}.payload) > $5 THEN NULL ELSE {t}.payload END");
    let cols = cols(&format!("{t}."), &capped);
    format!(
        "WITH cfg AS MATERIALIZED (SELECT set_config('lock_timeout', $7, true) AS v,
                   set_config('synchronous_commit', 'off', true) AS s),
                 now AS MATERIALIZED (SELECT {NOW} AS ms FROM cfg),
                 u AS MATERIALIZED (
                   SELECT d.stream, d.okey, d.head_seq FROM {t}_due d
                   WHERE d.next_at <= (SELECT ms FROM now) AND ($4::text[] IS NULL OR d.stream = ANY($4))
                   ORDER BY d.next_at LIMIT $2
                   FOR UPDATE SKIP LOCKED),
                 per AS (SELECT GREATEST($8, $2 / GREATEST(count(*), 1)) AS n FROM u),
                 k AS MATERIALIZED (
                   SELECT m.* FROM u CROSS JOIN LATERAL (
                     SELECT o.seq, o.stream, o.okey, octet_length(o.payload) + octet_length(o.headers::text) AS size,
                       CASE WHEN o.locked_until > (SELECT ms FROM now) THEN 0
                            WHEN o.next_attempt_at > (SELECT ms FROM now) THEN o.next_attempt_at END AS blocked
                     FROM {t} o
                     WHERE o.stream = u.stream AND o.okey = u.okey AND o.seq > u.head_seq AND o.status = 'pending'
                       AND o.strategy <> 'on_commit'
                     ORDER BY o.seq LIMIT (SELECT n FROM per)) m),
                 kf AS (
                   SELECT k.*, MIN(CASE WHEN blocked IS NOT NULL THEN seq END) OVER (PARTITION BY stream, okey) AS first_blocked,
                     MIN(seq) OVER (PARTITION BY stream, okey) AS head
                   FROM k),
                 oc AS (
                   SELECT o.seq, octet_length(o.payload) + octet_length(o.headers::text) AS size FROM {t} o
                   WHERE o.status = 'pending' AND o.strategy = 'on_commit' AND o.next_attempt_at <= (SELECT ms FROM now)
                     AND (o.locked_until IS NULL OR o.locked_until <= (SELECT ms FROM now))
                     AND ($4::text[] IS NULL OR o.stream = ANY($4))
                   ORDER BY o.next_attempt_at LIMIT $2
                   FOR UPDATE SKIP LOCKED),
                 -- Unit by unit (the unit whose first row is oldest first), each in seq order;
                 -- a publish-on-commit row is a unit of its own.
                 c AS (
                   SELECT seq, size, ko, head FROM (
                     SELECT seq, size, true AS ko, head FROM kf WHERE first_blocked IS NULL OR seq < first_blocked
                     UNION ALL SELECT seq, size, false, seq FROM oc) all_rows
                   ORDER BY head, seq LIMIT $2),
                 -- The byte budget ($6), in the same order (so each unit stays a prefix):
                 -- oversized rows ($5) cost nothing (they are not loaded), the first other row
                 -- always fits.
                 b AS (
                   SELECT seq, size, ko, SUM(CASE WHEN size > $5 THEN 0 ELSE size END) OVER (ORDER BY head, seq) AS running
                   FROM c),
                 taken AS MATERIALIZED (
                   SELECT seq, size, ko FROM b
                   WHERE running - CASE WHEN size > $5 THEN 0 ELSE size END = 0 OR running <= $6),
                 -- Units: leased while rows were taken; a head backing off makes its unit due at
                 -- the head's retry time; otherwise unchanged.
                 units AS (
                   UPDATE {t}_due d SET next_at = x.next_at, leased_by = x.leased_by,
                     claims = CASE WHEN x.leased_by IS NOT NULL THEN d.claims + 1 ELSE d.claims END
                   FROM (
                     SELECT kf.stream, kf.okey,
                       CASE WHEN bool_or(taken.seq IS NOT NULL) THEN (SELECT ms FROM now) + $3
                            ELSE MAX(CASE WHEN kf.seq = kf.first_blocked THEN kf.blocked END) END AS next_at,
                       CASE WHEN bool_or(taken.seq IS NOT NULL) THEN $1 END AS leased_by
                     FROM kf LEFT JOIN taken ON taken.seq = kf.seq
                     GROUP BY kf.stream, kf.okey) x
                   WHERE d.stream = x.stream AND d.okey = x.okey AND x.next_at > 0
                   RETURNING d.stream, d.okey, d.claims),
                 -- Publish-on-commit rows carry their own lease; keep-order rows are leased
                 -- through their unit (no row is rewritten).
                 upd AS (
                   UPDATE {t} SET locked_by = $1, locked_until = (SELECT ms FROM now) + $3,
                     next_attempt_at = (SELECT ms FROM now) + $3, claims = {t}.claims + 1
                   FROM taken WHERE {t}.seq = taken.seq AND NOT taken.ko AND (SELECT count(*) FROM units) >= 0
                   RETURNING {cols}, taken.size, {t}.claims)
                 SELECT * FROM upd
                 UNION ALL
                 SELECT {cols}, taken.size,
                   COALESCE((SELECT un.claims FROM units un WHERE un.stream = {t}.stream AND un.okey = {t}.okey), 0)
                 FROM {t} JOIN taken ON {t}.seq = taken.seq WHERE taken.ko
                 UNION ALL
                 SELECT NULL::bigint, NULL, u.stream, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                   NULL, NULL, NULL, u.okey, NULL, -1, 0
                 FROM u WHERE NOT EXISTS (SELECT 1 FROM k WHERE k.stream = u.stream AND k.okey = u.okey)"
    )
}

/// Mark publish-on-commit rows sent, or delete them.
fn complete_oc(t: &str, delete: bool) -> String {
    if delete {
        format!(
            "DELETE FROM {t} WHERE seq = ANY($1::int8[]) AND strategy = 'on_commit' RETURNING seq"
        )
    } else {
        format!(
            "UPDATE {t} SET status = 'sent', sent_at = {NOW}, locked_by = NULL, locked_until = NULL
                 WHERE seq = ANY($1::int8[]) AND strategy = 'on_commit' RETURNING seq"
        )
    }
}

// One statement for a batch's outcome: the units first (a unit whose head failed gets its
// retry time, the others are free again), only while this relay still holds them ($5; NULL for
// `complete`, which settles whoever holds the rows), then the published rows ($1): marked sent
// or deleted, then the failures ($2..).
fn settle(t: &str, delete: bool) -> String {
    let done = if delete {
        format!("done AS (DELETE FROM {t}")
    } else {
        format!(
            "done AS (UPDATE {t} SET status = 'sent', sent_at = (SELECT ms FROM now), locked_by = NULL, locked_until = NULL"
        )
    };
    format!(
        "WITH cfg AS MATERIALIZED (SELECT set_config('lock_timeout', $7, true) AS v),
                 now AS MATERIALIZED (SELECT {NOW} AS ms FROM cfg),
                 f AS (SELECT * FROM UNNEST($2::int8[], $3::text[], $4::text[], $6::int8[]) AS f(seq, kind, err, after_ms)),
                 r AS MATERIALIZED (SELECT o.seq, o.stream, o.okey FROM unnest($1::int8[] || $2::int8[]) AS x(seq)
                       CROSS JOIN LATERAL (SELECT o.seq, o.stream, o.okey FROM {t} o
                         WHERE o.seq = x.seq AND o.strategy <> 'on_commit' OFFSET 0) o),
                 units AS (
                   UPDATE {t}_due d SET leased_by = NULL, claims = 0,
                     next_at = (SELECT ms FROM now) + x.delay,
                     head_seq = CASE WHEN $5::text IS NOT NULL AND x.done_to IS NOT NULL
                                     THEN GREATEST(d.head_seq, x.done_to) ELSE d.head_seq END
                   FROM (SELECT r.stream, r.okey, MAX(CASE WHEN f.kind = 'retry' THEN f.after_ms ELSE 0 END) AS delay,
                           MAX(r.seq) FILTER (WHERE r.seq = ANY($1)) AS done_to
                         FROM r LEFT JOIN f ON f.seq = r.seq GROUP BY r.stream, r.okey) x
                   WHERE d.stream = x.stream AND d.okey = x.okey AND ($5::text IS NULL OR d.leased_by = $5)
                     AND d.parked_at IS NULL
                   RETURNING 1),
                 {done}
                   WHERE seq = ANY($1) AND seq BETWEEN (SELECT min(x) FROM unnest($1::int8[]) x) AND (SELECT max(x) FROM unnest($1::int8[]) x)
                     AND (SELECT count(*) FROM units) >= 0 RETURNING 1)
                 UPDATE {t} SET
                   attempts = CASE WHEN f.kind = 'release' THEN {t}.attempts ELSE {t}.attempts + 1 END,
                   last_error = CASE WHEN f.kind = 'release' THEN {t}.last_error ELSE f.err END,
                   next_attempt_at = CASE WHEN f.kind = 'retry' THEN (SELECT ms FROM now) + f.after_ms
                                          WHEN {t}.strategy = 'on_commit' THEN (SELECT ms FROM now)
                                          ELSE {t}.next_attempt_at END,
                   status = CASE WHEN f.kind = 'dead' THEN 'dead' ELSE {t}.status END,
                   locked_by = NULL, locked_until = NULL, claims = 0
                 FROM f
                 WHERE {t}.seq = f.seq AND {t}.seq = ANY($2)
                   AND {t}.seq BETWEEN (SELECT min(x) FROM unnest($2::int8[]) x) AND (SELECT max(x) FROM unnest($2::int8[]) x)
                   -- `IS TRUE` (the same test: status is never NULL) keeps a plan from reading
                   -- <table>_unit, the pending rows' index, whole by a `seq` range.
                   AND ({t}.status = 'pending') IS TRUE
                   AND ({t}.locked_by = $5 OR ({t}.strategy <> 'on_commit' AND EXISTS (
                     SELECT 1 FROM {t}_due held WHERE held.stream = {t}.stream AND held.okey = {t}.okey
                       AND held.leased_by = $5)))
                   AND (SELECT count(*) FROM units) >= 0 AND (SELECT count(*) FROM done) >= 0"
    )
}

// Keep-order rows whose unit the claim does not know (written by an older version, by SQL, or
// moved to another unit by hand): walk the distinct units of <table>_unit (one index probe per
// unit, never the rows) and add the missing ones.
fn adopt(t: &str) -> String {
    format!(
        "WITH RECURSIVE walk AS (
                   (SELECT stream, okey FROM {t} WHERE status = 'pending' ORDER BY stream, okey LIMIT 1)
                   UNION ALL
                   SELECT n.stream, n.okey FROM walk w CROSS JOIN LATERAL (
                     SELECT stream, okey FROM {t}
                     WHERE status = 'pending' AND (stream, okey) > (w.stream, w.okey)
                     ORDER BY stream, okey LIMIT 1) n),
                 orphans AS MATERIALIZED (
                   SELECT w.stream, w.okey FROM walk w
                   WHERE NOT EXISTS (SELECT 1 FROM {t}_due d WHERE d.stream = w.stream AND d.okey = w.okey)
                     AND EXISTS (SELECT 1 FROM {t} o WHERE o.stream = w.stream AND o.okey = w.okey
                                 AND o.status = 'pending' AND o.strategy <> 'on_commit')),
                 lockable AS (INSERT INTO {t}_units (stream, okey) SELECT * FROM orphans ON CONFLICT DO NOTHING)
                 INSERT INTO {t}_due (stream, okey, next_at) SELECT stream, okey, 0 FROM orphans
                 ON CONFLICT DO NOTHING"
    )
}

/// The table of applied schema steps (see [`outbox_core::SCHEMA_STEPS`]).
pub(super) fn versions(t: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {t}_schema (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at BIGINT NOT NULL
        )"
    )
}

/// Records `step` as applied (once: a concurrent migrate's record stands).
pub(super) fn record_version(t: &str, step: &outbox_core::SchemaStep) -> String {
    format!(
        "INSERT INTO {t}_schema (version, name, applied_at) VALUES ({}, '{}', {NOW})
         ON CONFLICT (version) DO NOTHING",
        step.version,
        step.name.replace('\'', "''")
    )
}
