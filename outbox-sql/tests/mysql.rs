//! The delivery contract against a real MariaDB / MySQL (OUTBOX_MYSQL_URL, default
//! mysql://root@127.0.0.1:3306/test). No skip: an unreachable server fails the tests.

use outbox_core::StoreAdmin;

#[macro_use]
mod common;

sql_store_tests! {
    harness: My,
    store: MySqlStore,
    options: MySqlOptions,
    module: mysql,
    url_env: "OUTBOX_MYSQL_URL",
    default_url: "mysql://root@127.0.0.1:3306/test",
    unreachable_url: "mysql://app:hunter2secret@127.0.0.1:1/db",
    business_ddl: "id BIGINT AUTO_INCREMENT PRIMARY KEY",
    business_insert: "INSERT INTO {}_business () VALUES ()",
    tamper: "UPDATE {} SET payload = 'tampered' WHERE seq = ?",
    session_id: "SELECT CAST(CONNECTION_ID() AS SIGNED)",
    // MariaDB can wait for the row lock inside the optimizer's read of a constant row (state
    // "Statistics"), where INNODB_TRX does not list the transaction yet: an INSERT of this
    // test's one row still running after 200 ms is waiting too.
    lock_wait: "SELECT COUNT(*) FROM (SELECT CAST(? AS UNSIGNED) AS id) s
                WHERE EXISTS (SELECT 1 FROM information_schema.INNODB_TRX t
                              WHERE t.trx_mysql_thread_id = s.id AND t.trx_state = 'LOCK WAIT')
                   OR EXISTS (SELECT 1 FROM information_schema.PROCESSLIST p
                              WHERE p.ID = s.id AND p.INFO LIKE 'INSERT%' AND p.TIME_MS > 200)",
    relay_poll: std::time::Duration::from_millis(50),
    corrupt: |kind| {
        use outbox_core::conformance::Corruption as C;
        Some(match kind {
            C::HeadersNotAMap => "headers = '[1,2]'",
            C::UnknownStrategy => "strategy = 'teleport'",
            C::IdNotUuid => "id = CONCAT('not-a-uuid-', seq)",
            C::KeyNotUtf8 => "msg_key = X'FFFE41'",
            C::StreamBlob => "stream = X'00FF'",
            C::NegativeAttempts => "attempts = -5",
            C::DestinationNewline => "destination = CONCAT('a', CHAR(13), CHAR(10), 'b')",
            C::StreamWhitespace => "stream = ' padded '",
            C::UnknownExhausted => "on_exhausted = 'vanish'",
            C::UnitMoved => "okey = 'another-unit'",
        })
    },
}

/// A table created before names were exact (`utf8mb4_bin`, PAD SPACE: `a` = `a `) is
/// converted by `migrate`: rows keep their names, statuses and `seq` order, and streams that
/// differed only by a trailing space are separate again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_makes_names_exact_on_an_old_table() {
    use outbox_core::{
        Envelope, Exhausted, MessageId, NewMessage, Order, PublishedBy, Status, Store,
    };
    use std::time::{Duration, SystemTime};

    let table = format!("outbox_old{}", uuid::Uuid::now_v7().simple());
    let store = connect(&table).await;
    store.migrate().await.unwrap();
    for statement in [
        format!(
            "ALTER TABLE {table} MODIFY stream VARCHAR(255) COLLATE utf8mb4_bin NOT NULL,
             MODIFY msg_key VARCHAR(255) COLLATE utf8mb4_bin NULL,
             MODIFY okey VARCHAR(255) COLLATE utf8mb4_bin NOT NULL,
             MODIFY locked_by VARCHAR(64) NULL"
        ),
        format!("ALTER TABLE {table}_locks CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"),
        // Tables of that time recorded no schema version.
        format!("DROP TABLE {table}_schema"),
    ] {
        sqlx::query(&statement).execute(store.pool()).await.unwrap();
    }
    let row = |stream: &str, payload: &str, status: Status| NewMessage {
        envelope: Envelope {
            id: MessageId::new(),
            created_at: SystemTime::now(),
            message: Message::new("d", payload.as_bytes().to_vec())
                .stream(stream)
                .key("k"),
        },
        order: Order::InUnit,
        unit: "k".into(),
        exhausted: Exhausted::Default,
        published_by: PublishedBy::Relay,
        signature: None,
        status,
        attempts: 0,
        retry_after: Duration::ZERO,
        not_before: None,
        last_error: None,
        lease: None,
    };
    store
        .insert(&[
            row("a", "a1", Status::Pending),
            row("a ", "s1", Status::Pending),
            row("a", "a2", Status::Pending),
            row("a ", "s2", Status::Pending),
            row("a ", "dead", Status::Dead),
        ])
        .await
        .unwrap();
    let count_a = || async {
        sqlx::query_scalar::<_, i64>(&format!("SELECT COUNT(*) FROM {table} WHERE stream = 'a'"))
            .fetch_one(store.pool())
            .await
            .unwrap()
    };
    assert_eq!(
        count_a().await,
        5,
        "the old collation merges \"a\" and \"a \""
    );

    store.migrate().await.unwrap();
    assert_eq!(
        count_a().await,
        2,
        "after migrate, \"a \" is its own stream"
    );
    let stats = store.stats().await.unwrap().total();
    assert_eq!((stats.pending, stats.dead), (4, 1), "every row survived");

    let broker = RecordingPublisher::new();
    let relay = |stream: &str| {
        Relay::builder(store.clone(), broker.clone())
            .streams([stream])
            .build()
            .unwrap()
    };
    relay("a").run_once().await.unwrap();
    let got: Vec<String> = broker
        .published()
        .iter()
        .map(|e| String::from_utf8(e.message.payload.clone()).unwrap())
        .collect();
    assert_eq!(
        got,
        ["a1", "a2"],
        "stream \"a\": its own rows, in seq order"
    );
    // Stream "a " breaks today's enqueue rules: its rows are quarantined under their own name,
    // never published as "a".
    let report = relay("a ").run_once().await.unwrap();
    assert_eq!((report.quarantined, report.published), (2, 0));
    let dead = store.dead_letters(Some("a "), 10).await.unwrap();
    assert_eq!(dead.len(), 3);
    assert!(dead.iter().all(|m| m.envelope.message.stream == "a "));
    store.migrate().await.unwrap(); // idempotent once converted
}

/// Claims take no lock that enqueues hold: a business transaction holding any unit lock (the
/// old claim row included) never stalls a claim, and a session holding row locks stalls no
/// claim either (claims skip locked units and lock no keep-order row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_never_wait_and_settles_wait_a_bounded_time() {
    use outbox_core::{Claim, Store, StreamFilter};
    use std::time::Duration;

    let h = My;
    let store = h.fresh().await;
    let table = store.table().to_owned();
    let claim = Claim::new("r", StreamFilter::All, 10, Duration::from_secs(30));
    // The row that used to serialize claims, held by a long business transaction.
    let mut business = store.pool().begin().await.unwrap();
    sqlx::query(&format!(
        "INSERT INTO {table}_locks (stream, okey) VALUES ('', 'claim')
         ON DUPLICATE KEY UPDATE okey = okey"
    ))
    .execute(&mut *business)
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(20), store.claim(&claim))
        .await
        .expect("a claim waited on a row that enqueues write")
        .unwrap();
    business.rollback().await.unwrap();

    // A session holding row locks (pending messages, one unit's row of <table>_due): no
    // claim waits for it. The unit it holds is skipped, the other claimed.
    let outbox =
        outbox_core::Outbox::builder(store.clone(), outbox_core::RecordingPublisher::new())
            .strategy(outbox_core::KeepOrder::default())
            .build()
            .unwrap();
    let msgs = vec![
        outbox_core::Message::new("d", b"held".to_vec())
            .stream("s")
            .key("k"),
        outbox_core::Message::new("d", b"free".to_vec())
            .stream("s")
            .key("k2"),
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
    let impatient = MySqlStore::connect_with(
        &url(),
        MySqlOptions {
            table: table.clone(),
            lock_timeout: Duration::from_secs(1),
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

    // Adopting a unit the claims do not know (rows written by SQL) waits for a session
    // holding that unit's lock row at most `lock_timeout`, not the server's 50 s (a fresh
    // store adopts on its first claim).
    h.transact(
        &store,
        &outbox,
        vec![outbox_core::Message::new("d", b"orphan".to_vec())
            .stream("s")
            .key("orphan")],
        true,
    )
    .await
    .unwrap()
    .dispatch();
    sqlx::query(&format!("DELETE FROM {table}_due WHERE okey = 'orphan'"))
        .execute(store.pool())
        .await
        .unwrap();
    let mut holder = store.pool().begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT writes FROM {table}_locks WHERE stream = 's' AND okey = 'orphan' FOR UPDATE"
    ))
    .execute(&mut *holder)
    .await
    .unwrap();
    let adopting = MySqlStore::connect_with(
        &url(),
        MySqlOptions {
            table: table.clone(),
            lock_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(20), adopting.claim(&claim))
        .await
        .expect("adopting a unit waited for its lock row without a bound")
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    holder.rollback().await.unwrap();
    let got = adopting.claim(&claim).await.unwrap();
    assert_eq!(got.len(), 1, "adopted once the session is gone");
}

/// A table made by 0.1 (claims serialized by `<table>_claim`, rows leased one by one) moves to
/// unit claims on `migrate` and loses nothing: pending, leased, sent and dead rows survive,
/// each unit publishes in order, a live lease is still respected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_a_0_1_table_to_unit_claims() {
    let table = format!(
        "outbox_old{}",
        &uuid::Uuid::now_v7().simple().to_string()[16..]
    );
    let store = connect(&table).await;
    let mariadb: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let ddl = include_str!("legacy/mysql-0.1.sql").replace("{t}", &table);
    let ddl = if mariadb.to_ascii_lowercase().contains("mariadb") {
        ddl
    } else {
        ddl.replace("utf8mb4_nopad_bin", "utf8mb4_0900_bin")
    };
    for statement in ddl.split(';') {
        sqlx::query(statement).execute(store.pool()).await.unwrap();
    }
    let now = outbox_core::to_millis(std::time::SystemTime::now());
    for insert in outbox_core::conformance::legacy_rows(&table, |p| format!("'{p}'"), now) {
        sqlx::query(&insert).execute(store.pool()).await.unwrap();
    }
    outbox_core::conformance::check_legacy_migration(Arc::new(store)).await;
}
