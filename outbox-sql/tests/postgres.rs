//! The delivery contract against a real PostgreSQL (OUTBOX_PG_URL, default
//! postgres://postgres@127.0.0.1:5432/test). No skip: an unreachable server fails the tests.

use outbox_core::StoreAdmin;

#[macro_use]
mod common;

sql_store_tests! {
    harness: Pg,
    store: PgStore,
    options: PgOptions,
    module: postgres,
    url_env: "OUTBOX_PG_URL",
    default_url: "postgres://postgres@127.0.0.1:5432/test",
    unreachable_url: "postgres://app:hunter2secret@127.0.0.1:1/db",
    business_ddl: "id BIGSERIAL PRIMARY KEY",
    business_insert: "INSERT INTO {}_business DEFAULT VALUES",
    tamper: "UPDATE {} SET payload = 'tampered'::bytea WHERE seq = $1",
    session_id: "SELECT pg_backend_pid()::bigint",
    lock_wait: "SELECT count(*) FROM pg_stat_activity WHERE pid = $1::int AND wait_event_type = 'Lock'",
    relay_poll: std::time::Duration::from_secs(120),
    corrupt: |kind| {
        use outbox_core::conformance::Corruption as C;
        match kind {
            C::HeadersNotAMap => Some("headers = '[1,2]'::jsonb"),
            C::UnknownStrategy => Some("strategy = 'teleport'"),
            C::NegativeAttempts => Some("attempts = -5"),
            C::DestinationNewline => Some("destination = E'a\\r\\nb'"),
            C::StreamWhitespace => Some("stream = ' padded '"),
            C::UnknownExhausted => Some("on_exhausted = 'vanish'"),
            C::UnitMoved => Some("okey = 'another-unit'"),
            // UUID and TEXT columns refuse these.
            C::IdNotUuid | C::KeyNotUtf8 | C::StreamBlob => None,
        }
    },
}

/// LISTEN/NOTIFY: a relay in "another process" (its own pool, no in-process notification)
/// sleeping on a 120 s poll interval publishes within the deadline of a commit elsewhere.
/// No sleep: a first message, committed before the relay starts, comes out of its first
/// claim, which runs only once LISTEN is established; each later commit then needs NOTIFY.
/// Half-way, the LISTEN connection is killed and a commit lands while it is down: the
/// listener's reconnect must make the relay look (its NOTIFY went to nobody).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_a_relay_in_another_process() {
    use outbox_core::conformance::eventually;
    use outbox_core::{KeepOrder, RecordingPublisher, Relay};
    use std::time::Duration;

    let h = Pg;
    let writer = h.fresh().await;
    let relay_side = h.reopen(&writer).await;
    let broker = RecordingPublisher::new();
    let outbox = Outbox::builder(writer.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let commit = |i: usize| {
        let (h, writer, outbox) = (&h, writer.clone(), outbox.clone());
        async move {
            let msg = Message::new("d", i.to_string().into_bytes());
            // dropped: no in-process wake-up
            drop(h.transact(&writer, &outbox, vec![msg], true).await.unwrap());
        }
    };
    let published = |n: usize, what: &'static str| {
        let broker = broker.clone();
        async move {
            eventually(what, Duration::from_secs(15), || async {
                broker.count() == n
            })
            .await
        }
    };
    commit(0).await;
    let relay = Relay::builder(relay_side, broker.clone())
        .poll_interval(Duration::from_secs(120))
        .build()
        .unwrap();
    let running = outbox_core::conformance::RunningRelay::spawn(relay);
    published(1, "the first claim").await;
    for i in 1..3usize {
        commit(i).await;
        published(i + 1, "NOTIFY wakes the other relay").await;
    }
    // Kill the relay's LISTEN connection (the writer's pool never listens), then commit
    // before it can be back.
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE query ILIKE 'LISTEN%' AND query ILIKE $1",
    )
    .bind(format!("%{}%", writer.table()))
    .fetch_one(writer.pool())
    .await
    .unwrap();
    assert_eq!(killed, 1, "one LISTEN connection");
    commit(3).await;
    published(4, "the relay looks after LISTEN reconnects").await;
    commit(4).await;
    published(5, "NOTIFY heard again after the reconnect").await;
    running.stop().await;
}

/// `PgOptions::listen = false`: the relay polls, and holds no `LISTEN` connection (a store
/// behind PgBouncer in transaction mode, or one of many on one server). The same store
/// opened with the default listens: the count below tells them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_does_not_listen_polls_and_holds_no_listen_connection() {
    use outbox_core::conformance::eventually;
    use outbox_core::{RecordingPublisher, Relay};
    use std::time::Duration;

    let h = Pg;
    let writer = h.fresh().await;
    let url = std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let listeners = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%' AND query ILIKE $1",
        )
        .bind(format!("%{}%", writer.table()))
        .fetch_one(writer.pool())
        .await
        .unwrap();
        n
    };
    let outbox = Outbox::builder(writer.clone(), RecordingPublisher::new())
        .strategy(outbox_core::KeepOrder::default())
        .build()
        .unwrap();
    for listen in [false, true] {
        let store = PgStore::connect_with(
            &url,
            PgOptions {
                table: writer.table().to_owned(),
                listen,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let broker = RecordingPublisher::new();
        let relay = Relay::builder(store, broker.clone())
            .poll_interval(Duration::from_millis(100))
            .build()
            .unwrap();
        let running = outbox_core::conformance::RunningRelay::spawn(relay);
        for i in 0..3 {
            let msg = Message::new("d", i.to_string().into_bytes());
            // dropped: no in-process wake-up, no publish by the writer
            drop(h.transact(&writer, &outbox, vec![msg], true).await.unwrap());
        }
        eventually("the relay publishes", Duration::from_secs(15), || async {
            broker.count() == 3
        })
        .await;
        if listen {
            eventually("the default listens", Duration::from_secs(15), || async {
                listeners().await == 1
            })
            .await;
        } else {
            assert_eq!(
                listeners().await,
                0,
                "listen = false opened a LISTEN connection"
            );
        }
        running.stop().await;
    }
}

/// Locks that only roles with privileges on the outbox's tables can take: a role with no
/// privilege holding the advisory keys the store used to lock on stalls nothing, and cannot
/// take the unit locks; a privileged session holding row locks stalls no claim (claims skip
/// locked units and lock no keep-order row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_need_privileges_and_waits_are_bounded() {
    use outbox_core::{Claim, Store, StreamFilter};
    use sqlx::Connection;
    use std::time::Duration;

    let h = Pg;
    let store = h.fresh().await;
    let table = store.table().to_owned();
    let role = format!(
        "intruder_{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
        .execute(store.pool())
        .await
        .unwrap();
    let options: sqlx::postgres::PgConnectOptions = url().parse().unwrap();
    let mut intruder = sqlx::PgConnection::connect_with(&options.username(&role))
        .await
        .unwrap();
    for (a, b) in [
        ("outbox-claim", table.as_str()),
        (table.as_str(), "s\u{1f}k"),
    ] {
        sqlx::query("SELECT pg_advisory_lock(hashtext($1), hashtext($2))")
            .bind(a)
            .bind(b)
            .execute(&mut intruder)
            .await
            .unwrap();
    }
    for sql in [
        format!("SELECT next_at FROM {table}_due FOR UPDATE"),
        format!("INSERT INTO {table}_units (stream, okey) VALUES ('s', 'k')"),
    ] {
        let e = sqlx::query(&sql).execute(&mut intruder).await.unwrap_err();
        assert!(e.to_string().contains("permission denied"), "{sql}: {e}");
    }

    // Writers and relays are not held up by the intruder.
    let broker = RecordingPublisher::new();
    let outbox = Outbox::builder(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let msgs = (0..3)
        .map(|i| Message::new("d", vec![i]).stream("s").key("k"))
        .collect();
    let work = async {
        h.transact(&store, &outbox, msgs, true)
            .await
            .unwrap()
            .dispatch();
        Relay::builder(store.clone(), broker.clone())
            .build()
            .unwrap()
            .run_once()
            .await
            .unwrap()
    };
    let report = tokio::time::timeout(Duration::from_secs(20), work)
        .await
        .expect("stalled by a role without privileges");
    assert_eq!(report.published, 3);

    // A session that may lock rows and holds some (pending messages, one unit's row of
    // <table>_due): no claim waits for it. The unit it holds is skipped, the other claimed.
    let msgs = vec![
        Message::new("d", b"held".to_vec()).stream("s").key("k"),
        Message::new("d", b"free".to_vec()).stream("s").key("k2"),
    ];
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let mut holder = store.pool().begin().await.unwrap();
    for sql in [
        format!("SELECT seq FROM {table} WHERE status = 'pending' FOR UPDATE"),
        format!("SELECT next_at FROM {table}_due WHERE stream = 's' AND okey = 'k' FOR UPDATE"),
    ] {
        sqlx::query(&sql).execute(&mut *holder).await.unwrap();
    }
    let claim = Claim::new("r", StreamFilter::All, 10, Duration::from_secs(30));
    let got = tokio::time::timeout(Duration::from_secs(20), store.claim(&claim))
        .await
        .expect("a claim waited for another session's locks")
        .unwrap();
    let payloads: Vec<Vec<u8>> = got
        .into_iter()
        .map(|r| r.unwrap().envelope.message.payload)
        .collect();
    assert_eq!(payloads, vec![b"free".to_vec()]);
    holder.rollback().await.unwrap();
    let got = store.claim(&claim).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].as_ref().unwrap().envelope.message.payload, b"held");

    // Recording the batch waits for a session holding its unit's row at most `lock_timeout`,
    // then fails transiently; once the session is gone it goes through.
    let seq = got[0].as_ref().unwrap().seq;
    let impatient = PgStore::connect_with(
        &url(),
        PgOptions {
            table: table.clone(),
            lock_timeout: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut holder = store.pool().begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT next_at FROM {table}_due WHERE stream = 's' AND okey = 'k' FOR UPDATE"
    ))
    .execute(&mut *holder)
    .await
    .unwrap();
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        impatient.settle("r", &[seq], false, &[]),
    )
    .await
    .expect("recording a batch waited without a bound")
    .unwrap_err();
    assert!(e.is_transient(), "{e}");
    holder.rollback().await.unwrap();
    impatient.settle("r", &[seq], false, &[]).await.unwrap();
    assert_eq!(
        store.get(seq).await.unwrap().unwrap().status,
        outbox_core::Status::Sent
    );

    // Any role may take migrate's advisory lock: migrate waits for it at most
    // `lock_timeout`, then says who to look for; once the lock is gone it runs.
    sqlx::query("SELECT pg_advisory_lock(hashtext('outbox-migrate'), hashtext($1))")
        .bind(&table)
        .execute(&mut intruder)
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(20), impatient.migrate())
        .await
        .expect("migrate waited for an advisory lock without a bound")
        .unwrap_err();
    assert!(
        e.is_transient() && e.to_string().contains("migration lock"),
        "{e}"
    );
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut intruder)
        .await
        .unwrap();
    impatient.migrate().await.unwrap();

    // Adopting a unit the claims do not know (rows written by SQL) waits for a writer of
    // that unit at most `lock_timeout` too (a fresh store adopts on its first claim).
    h.transact(
        &store,
        &outbox,
        vec![Message::new("d", b"orphan".to_vec())
            .stream("s")
            .key("orphan")],
        true,
    )
    .await
    .unwrap()
    .dispatch();
    for sql in [
        format!("DELETE FROM {table}_due WHERE okey = 'orphan'"),
        format!("DELETE FROM {table}_units WHERE okey = 'orphan'"),
    ] {
        sqlx::query(&sql).execute(store.pool()).await.unwrap();
    }
    let mut writer = store.pool().begin().await.unwrap();
    sqlx::query(&format!(
        "INSERT INTO {table}_units (stream, okey) VALUES ('s', 'orphan')"
    ))
    .execute(&mut *writer)
    .await
    .unwrap();
    let adopting = PgStore::connect_with(
        &url(),
        PgOptions {
            table: table.clone(),
            lock_timeout: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(20), adopting.claim(&claim))
        .await
        .expect("adopting a unit waited for its writer without a bound")
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    writer.rollback().await.unwrap();
    let got = adopting.claim(&claim).await.unwrap();
    assert_eq!(got.len(), 1, "adopted once the writer is gone");

    drop(intruder);
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(store.pool())
        .await
        .unwrap();
}

/// A table made by 0.1 (claims serialized by `<table>_claim`, rows leased one by one) moves to
/// unit claims on `migrate` and loses nothing: pending, leased, sent and dead rows survive,
/// each unit publishes in order, a live lease is still respected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_a_0_1_table_to_unit_claims() {
    let table = format!("outbox_old{}", uuid::Uuid::now_v7().simple());
    let pool = sqlx::PgPool::connect(&url()).await.unwrap();
    for statement in include_str!("legacy/postgres-0.1.sql")
        .replace("{t}", &table)
        .split(';')
    {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let now = outbox_core::to_millis(std::time::SystemTime::now());
    for insert in
        outbox_core::conformance::legacy_rows(&table, |p| format!("convert_to('{p}', 'UTF8')"), now)
    {
        sqlx::query(&insert).execute(&pool).await.unwrap();
    }
    outbox_core::conformance::check_legacy_migration(Arc::new(connect(&table).await)).await;
}

/// JIT is off for the relay's statements: their estimates grow with the table, and JIT
/// compiled each for about a second on a million-row backlog (BENCHMARKS.md). The store's own
/// pool connects with `jit=off`; on an application's pool with JIT on, claims and settles
/// still work (they turn it off in their own transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_statements_run_without_jit() {
    use outbox_core::Store;

    let store = Pg.fresh().await;
    let jit: String = sqlx::query_scalar("SHOW jit")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(jit, "off");

    let options: sqlx::postgres::PgConnectOptions = url().parse().unwrap();
    let app_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.options([("jit", "on"), ("jit_above_cost", "0")]))
        .await
        .unwrap();
    let on: String = sqlx::query_scalar("SHOW jit")
        .fetch_one(&app_pool)
        .await
        .unwrap();
    assert_eq!(on, "on");
    let app_store = PgStore::from_pool(app_pool, store.table()).unwrap();
    let seqs = claim_three_keep_order_rows(&app_store).await;
    app_store.settle("r", &seqs, true, &[]).await.unwrap();
    assert_eq!(app_store.stats().await.unwrap().total().pending, 0);
}

/// `PgOptions::plan_refresh`: a connection taken from the pool once a period has ended since
/// it was released holds no prepared statement any more (the claim's is planned again, for
/// the table as it is now); with `None` it keeps them all session long. Without the refresh,
/// PostgreSQL keeps a generic plan made while the table was small, which reads the whole
/// table on every settle once a backlog has grown it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_are_planned_again_once_a_refresh_period_ends() {
    use outbox_core::{Claim, Store, StreamFilter};
    use std::time::Duration;

    let period = Duration::from_millis(200);
    for refresh in [None, Some(period), Some(Duration::ZERO)] {
        let (store, table) = one_connection_store(refresh).await;
        let claim = Claim::new("r", StreamFilter::All, 10, Duration::from_secs(30));
        store.claim(&claim).await.unwrap();
        if refresh == Some(period) {
            // Idle for longer than a period: one has ended, whatever the phase.
            tokio::time::sleep(period * 2).await;
        }
        let mut conn = store.pool().acquire().await.unwrap();
        let claims = prepared(&mut conn, &format!("FROM {table}_due d")).await;
        assert_eq!(
            claims.is_empty(),
            refresh.is_some(),
            "plan_refresh {refresh:?}"
        );
    }
}

/// Enqueue three keep-order rows of one unit on `store` and claim them for relay "r".
async fn claim_three_keep_order_rows(store: &PgStore) -> Vec<i64> {
    use outbox_core::{Claim, Store, StreamFilter};
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    let pending = outbox
        .enqueue(
            &mut tx,
            (0..3u8).map(|i| Message::new("d", vec![i]).key("k")),
        )
        .await
        .unwrap();
    outbox_sql::postgres::commit(tx, pending).await.unwrap();
    let claim = Claim::new(
        "r",
        StreamFilter::All,
        10,
        std::time::Duration::from_secs(30),
    );
    let rows = store.claim(&claim).await.unwrap();
    assert_eq!(rows.len(), 3);
    rows.iter().map(|r| r.as_ref().unwrap().seq).collect()
}

/// A store on a new table whose pool has one connection.
async fn one_connection_store(plan_refresh: Option<std::time::Duration>) -> (PgStore, String) {
    let table = format!("outbox_t{}", uuid::Uuid::now_v7().simple());
    let store = PgStore::connect_with(
        &url(),
        PgOptions {
            table: table.clone(),
            max_connections: 1,
            plan_refresh,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    outbox_core::Store::migrate(&store).await.unwrap();
    (store, table)
}

/// The names of `conn`'s prepared statements whose text contains `fragment`.
async fn prepared(conn: &mut sqlx::PgConnection, fragment: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT name FROM pg_prepared_statements WHERE statement LIKE '%' || $1 || '%'",
    )
    .bind(fragment)
    .fetch_all(conn)
    .await
    .unwrap()
}

/// A claim reads the outbox table through its indexes, and a settle by the batch's `seq`s
/// only, whatever PostgreSQL knows of the table's size. Their generic plans are made here on
/// a new table, as after a deploy and before any `ANALYZE`. A plan that read the table whole,
/// as the settle's once did, would cost O(table) per batch once a backlog grew it, until
/// the plan was made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_settles_never_read_the_whole_outbox_table() {
    use outbox_core::Store;

    let (store, table) = one_connection_store(None).await;
    let seqs = claim_three_keep_order_rows(&store).await;
    for delete in [false, true] {
        store.settle("r", &seqs, delete, &[]).await.unwrap();
    }
    let mut conn = store.pool().acquire().await.unwrap();
    let names = prepared(&mut conn, "done AS (").await;
    assert_eq!(
        names.len(),
        2,
        "the settle's statements, marking and deleting"
    );
    sqlx::Executor::execute(&mut *conn, "SET plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    for name in names {
        let plan: Vec<String> = sqlx::query_scalar(&format!(
            "EXPLAIN EXECUTE {name}('{{1,2}}', '{{3}}', '{{retry}}', '{{e}}', 'r', '{{10}}', '5000ms')"
        ))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains(&format!("{table}_pkey")), "{plan}");
        assert!(!plan.contains(&format!("Seq Scan on {table} ")), "{plan}");
        // The pending rows' index, probed by `seq` alone, would be read whole.
        assert!(!plan.contains(&format!("using {table}_unit on")), "{plan}");
    }
    let claims = prepared(&mut conn, "oc AS (").await;
    assert_eq!(claims.len(), 1, "the claim's statement");
    let plan: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN EXECUTE {}('r', 10, 30000, NULL, 1000000, 1000000, '5000ms', 1)",
        claims[0]
    ))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(!plan.contains(&format!("Seq Scan on {table} ")), "{plan}");
    sqlx::Executor::execute(&mut *conn, "RESET plan_cache_mode")
        .await
        .unwrap();
}

/// `<table>_due.head_seq` only lets claims skip deleted rows' index entries; if it ever points
/// past pending rows (a hand edit, a bug), the unit looks empty to a claim, which then finds
/// its rows again instead of stranding them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_whose_head_points_too_far_heals() {
    use outbox_core::{Claim, Store, StreamFilter};
    use std::time::Duration;

    let h = Pg;
    let store = h.fresh().await;
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let msgs = (0..3u8)
        .map(|i| Message::new("d", vec![i]).key("k"))
        .collect();
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    sqlx::query(&format!(
        "UPDATE {}_due SET head_seq = 1000000",
        store.table()
    ))
    .execute(store.pool())
    .await
    .unwrap();
    let claim = Claim::new("r", StreamFilter::All, 10, Duration::from_secs(30));
    let rows = store.claim(&claim).await.unwrap();
    let got: Vec<u8> = rows
        .iter()
        .map(|r| r.as_ref().unwrap().envelope.message.payload[0])
        .collect();
    assert_eq!(got, vec![0, 1, 2]);
}

/// Half-open connections: every connection the relay had to PostgreSQL stops forwarding
/// without closing (a NAT that lost its flows, a partition on the old route), while new
/// connections work. The relay's store calls have a deadline (`store_timeout`), so it drops
/// the dead connections, opens new ones and delivers everything; without the deadline its
/// claim would wait on a dead connection until the operating system gives up (minutes to
/// hours), and nothing would be published within this test's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_database_connections_are_given_up_within_store_timeout() {
    use outbox_core::conformance::{eventually, RunningRelay};
    use outbox_core::{KeepOrder, RecordingPublisher, Relay};
    use std::time::Duration;

    let h = Pg;
    let writer = h.fresh().await;
    let target: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = outbox_testkit::BlackholeProxy::start(target).await;
    let via_proxy = url().replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port), 1);
    assert_ne!(via_proxy, url(), "the test URL points at 127.0.0.1:5432");
    let relay_side = PgStore::connect_with(
        &via_proxy,
        PgOptions {
            table: writer.table().into(),
            acquire_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let outbox = Outbox::builder(writer.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let broker = RecordingPublisher::new();
    let relay = Relay::builder(relay_side, broker.clone())
        .poll_interval(Duration::from_millis(100))
        .store_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let running = RunningRelay::spawn(relay);
    let commit = |from: usize| {
        let (h, writer, outbox) = (&h, writer.clone(), outbox.clone());
        async move {
            let msgs = (from..from + 3)
                .map(|i| Message::new("d", i.to_string().into_bytes()).key(format!("k{i}")))
                .collect();
            drop(h.transact(&writer, &outbox, msgs, true).await.unwrap());
        }
    };
    commit(0).await;
    eventually(
        "published through the proxy",
        Duration::from_secs(20),
        || async { broker.count() == 3 },
    )
    .await;

    proxy.blackhole_existing();
    commit(3).await;
    eventually(
        "published on new connections after the old ones went half-open",
        Duration::from_secs(45),
        || async { broker.count() == 6 },
    )
    .await;
    running.stop().await;
}
