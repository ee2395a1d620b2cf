//! Schemas: tables made by earlier versions, and a whole schema after migrate.

use super::*;

/// Rows a table made by an earlier version holds, as `INSERT` statements for `migrate` tests
/// (`payload` turns text into the dialect's binary literal). Oldest first: a sent row, a
/// dead letter, then units `a` (head retried once, due), `b` (head leased by a relay that
/// died: expired), `h` (head leased by a live relay for an hour) and a publish-on-commit row
/// whose committer died, interleaved.
pub fn legacy_rows(table: &str, payload: impl Fn(&str) -> String, now_ms: i64) -> Vec<String> {
    let past = now_ms - 5_000;
    // (payload, key, strategy, status, attempts, lease (owner, until), next attempt)
    type Row<'a> = (
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        i32,
        Option<(&'a str, i64)>,
        i64,
    );
    let rows: [Row; 10] = [
        ("sent0", "a", "keep_order", "sent", 0, None, past),
        ("dead0", "d", "keep_order", "dead", 5, None, past),
        ("a0", "a", "keep_order", "pending", 1, None, past),
        (
            "b0",
            "b",
            "keep_order",
            "pending",
            0,
            Some(("gone-relay", past)),
            past,
        ),
        (
            "h0",
            "h",
            "keep_order",
            "pending",
            0,
            Some(("live-relay", now_ms + 3_600_000)),
            past,
        ),
        ("a1", "a", "keep_order", "pending", 0, None, past),
        (
            "o0",
            "",
            "on_commit",
            "pending",
            0,
            Some(("committer", past)),
            past,
        ),
        ("b1", "b", "keep_order", "pending", 0, None, past),
        ("a2", "a", "keep_order", "pending", 0, None, past),
        ("h1", "h", "keep_order", "pending", 0, None, past),
    ];
    rows.iter()
        .map(|(p, key, strategy, status, attempts, lease, next)| {
            let (stream, msg_key) = if *strategy == "on_commit" {
                ("loose", "NULL".to_string())
            } else {
                ("s", format!("'{key}'"))
            };
            let (by, until) = match lease {
                Some((by, until)) => (format!("'{by}'"), until.to_string()),
                None => ("NULL".into(), "NULL".into()),
            };
            let sent_at = if *status == "sent" { past.to_string() } else { "NULL".into() };
            format!(
                "INSERT INTO {table} (id, stream, destination, msg_key, okey, payload, content_type, headers,
                   strategy, status, attempts, created_at, next_attempt_at, locked_by, locked_until, last_error, sent_at)
                 VALUES ('{id}', '{stream}', 'dest', {msg_key}, '{key}', {payload}, 'text/plain', '{{}}',
                   '{strategy}', '{status}', {attempts}, {past}, {next}, {by}, {until}, NULL, {sent_at})",
                id = MessageId::new(),
                payload = payload(p),
            )
        })
        .collect()
}

/// After `migrate` on a table holding [`legacy_rows`]: every row survives with its status, the
/// relay publishes each unit in order (the dead relay's lease has expired, the live relay's
/// has not), and a requeued dead letter goes out too.
pub async fn check_legacy_migration<S: StoreAdmin + 'static>(store: Arc<S>) {
    store.migrate().await.unwrap();
    store.migrate().await.unwrap(); // idempotent
    let report = store.schema().await.unwrap();
    assert_eq!(
        report,
        crate::SchemaReport {
            version: Some(crate::SCHEMA_VERSION),
            ..Default::default()
        }
    );
    let broker = RecordingPublisher::new();
    let relay = Relay::builder(store.clone(), broker.clone())
        .build()
        .unwrap();
    relay.run_once().await.unwrap();
    let got: Vec<String> = broker
        .published()
        .into_iter()
        .map(|e| String::from_utf8(e.message.payload).unwrap())
        .collect();
    let pos = |p: &str| got.iter().position(|g| g == p);
    for p in ["a0", "a1", "a2", "b0", "b1", "o0"] {
        assert!(pos(p).is_some(), "{p} not published: {got:?}");
    }
    assert!(pos("a0") < pos("a1") && pos("a1") < pos("a2"), "{got:?}");
    assert!(pos("b0") < pos("b1"), "{got:?}");
    assert_eq!(got.len(), 6, "the live relay's unit waits: {got:?}");
    let t = total(store.as_ref()).await;
    assert_eq!((t.pending, t.sent, t.dead), (2, 7, 1));
    assert_eq!(store.requeue(&Selector::All).await.unwrap(), 1);
    relay.run_once().await.unwrap();
    assert_eq!(broker.count(), 7);
    assert_eq!(
        broker.published().last().unwrap().message.payload,
        b"dead0".to_vec()
    );
}

/// A migrated store reports its schema whole (nothing missing, nothing left of an older
/// version), and a second migrate keeps it so: `outbox doctor` asks the store, which knows
/// what its `migrate` makes.
pub async fn the_schema_is_whole_after_migrate<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let whole = crate::SchemaReport {
        version: Some(crate::SCHEMA_VERSION),
        ..Default::default()
    };
    let report = store.schema().await.expect("schema");
    assert_eq!(report, whole, "after migrate");
    store.migrate().await.expect("migrate again");
    assert_eq!(store.schema().await.expect("schema"), whole);
}

/// A table made before strategies were a trait, parking and crash-loop counts (no
/// `on_exhausted`, `claims`, `<table>_due.parked_at` ...) is upgraded by `migrate`; the rows already in it are claimed, published in order and read back with the
/// default answers.
pub async fn rows_of_an_earlier_schema_keep_working<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .stream_strategy("ordered", KeepOrder::default())
        .build()
        .unwrap();
    h.transact(
        &store,
        &outbox,
        vec![msg("ordered", Some("k"), 1), msg("ordered", Some("k"), 2)],
        true,
    )
    .await
    .unwrap()
    .dispatch();
    // As the table was before strategies, parking, crash-loop counts and schema versions.
    for sql in [
        "DROP TABLE {t}_schema",
        "DROP INDEX {t}_due_parked",
        "ALTER TABLE {t} DROP COLUMN on_exhausted",
        "ALTER TABLE {t} DROP COLUMN claims",
        "ALTER TABLE {t}_due DROP COLUMN parked_at",
        "ALTER TABLE {t}_due DROP COLUMN parked_reason",
        "ALTER TABLE {t}_due DROP COLUMN claims",
    ] {
        if !h.execute_sql(&store, sql).await {
            return; // a store without SQL
        }
    }
    assert_eq!(
        store.schema().await.unwrap().version,
        None,
        "no version recorded"
    );
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    assert_eq!(
        store.schema().await.unwrap().version,
        Some(crate::SCHEMA_VERSION),
        "migrate records the version it brought the table to"
    );
    let row = find_by_payload(store.as_ref(), b"1").await;
    assert_eq!(
        (row.order, row.unit.as_str(), row.exhausted),
        (Order::InUnit, "k", Exhausted::Default)
    );
    store
        .park_unit("ordered", "k", "upgrade check")
        .await
        .unwrap();
    assert_eq!(store.parked_units(None, 10).await.unwrap().len(), 1);
    store.resume_unit("ordered", "k").await.unwrap();
    h.transact(&store, &outbox, vec![msg("ordered", Some("k"), 3)], true)
        .await
        .unwrap()
        .dispatch();
    outbox.relay().build().unwrap().run_once().await.unwrap();
    let got: Vec<Vec<u8>> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    assert_eq!(got, vec![b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
}

/// An outbox table dropped by hand (its schema version still recorded) is made again by
/// `migrate`, whole, and a unit that had rows in it publishes its new rows in order.
pub async fn a_dropped_table_is_made_again_by_migrate<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .stream_strategy("ordered", KeepOrder::default())
        .build()
        .unwrap();
    let (store, outbox) = (&store, &outbox);
    let write = |n: usize| async move {
        h.transact(store, outbox, vec![msg("ordered", Some("k"), n)], true)
            .await
            .unwrap()
            .dispatch();
    };
    write(1).await;
    write(2).await;
    if !h.execute_sql(store, "DROP TABLE {t}").await {
        return; // a store without SQL
    }
    store.migrate().await.unwrap();
    let whole = crate::SchemaReport {
        version: Some(crate::SCHEMA_VERSION),
        ..Default::default()
    };
    assert_eq!(store.schema().await.unwrap(), whole, "after migrate");
    write(3).await;
    write(4).await;
    outbox.relay().build().unwrap().run_once().await.unwrap();
    let got: Vec<Vec<u8>> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    assert_eq!(got, vec![b"3".to_vec(), b"4".to_vec()]);
}

/// A table whose recorded schema version is newer than this build knows is refused by
/// `migrate` with a configuration error that says so (an older build must not change or run
/// against a schema it does not know), and reported with that version; nothing is changed.
pub async fn a_newer_schema_is_refused<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let newer = crate::SCHEMA_VERSION + 1;
    let record = format!(
        "INSERT INTO {{t}}_schema (version, name, applied_at) VALUES ({newer}, 'from a newer build', 0)"
    );
    if !h.execute_sql(&store, &record).await {
        return; // a store without SQL
    }
    assert_eq!(store.schema().await.unwrap().version, Some(newer));
    let e = store
        .migrate()
        .await
        .expect_err("a newer schema is refused");
    assert_eq!(e.kind(), crate::ErrorKind::Config, "{e}");
    assert!(
        e.to_string().contains(&format!("schema version {newer}")),
        "{e}"
    );
    assert_eq!(store.schema().await.unwrap().version, Some(newer));
    assert!(
        h.execute_sql(
            &store,
            &format!("DELETE FROM {{t}}_schema WHERE version = {newer}")
        )
        .await
    );
    store
        .migrate()
        .await
        .expect("migrate once the newer record is gone");
    assert_eq!(
        store.schema().await.unwrap().version,
        Some(crate::SCHEMA_VERSION)
    );
}
