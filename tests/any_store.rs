//! `outbox::any`: one code path that enqueues on SQLite, PostgreSQL and MariaDB, chosen by
//! URL. On each database: the business row and its message commit together or not at all
//! (commit, rollback, drop), `execute` binds every value type, publish-on-commit messages go
//! out after the commit, a relay drains the rest, several writers at once keep each key's
//! order, and mistakes are typed errors that write nothing.

use std::collections::HashMap;
use std::time::Duration;

use outbox::any::{AnyOptions, AnyStore, AnyTransaction, AnyValue};
use outbox::conformance::eventually;
use outbox::{AfterCommit, ErrorKind, KeepOrder, Message, Outbox, RecordingPublisher, Store};

fn pg_url() -> String {
    std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn mysql_url() -> String {
    std::env::var("OUTBOX_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

fn fresh() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// An `AnyStore` on a fresh outbox table, and a fresh business table `orders_…` on the same
/// database (made through `execute`, as an application would).
async fn open(url: &str) -> (AnyStore, String) {
    let id = fresh();
    let store = AnyStore::connect_with(
        url,
        AnyOptions {
            table: format!("outbox_any{id}"),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let orders = format!("orders_{id}");
    let blob = if store.backend() == "postgres" {
        "BYTEA"
    } else {
        "BLOB"
    };
    let mut tx = store.begin().await.unwrap();
    tx.execute(
        &format!(
            "CREATE TABLE {orders} (id BIGINT PRIMARY KEY, note TEXT, total DOUBLE PRECISION, paid BOOLEAN, raw {blob})"
        ),
        &[],
    )
    .await
    .unwrap();
    tx.commit(AfterCommit::empty()).await.unwrap();
    (store, orders)
}

/// The ids in the business table, read with the database's own handle.
async fn order_ids(store: &AnyStore, orders: &str) -> Vec<i64> {
    let sql = format!("SELECT id FROM {orders} ORDER BY id");
    match store {
        AnyStore::Sqlite(s) => {
            let conn = s.connect().unwrap();
            let mut stmt = conn.prepare(&sql).unwrap();
            let ids = stmt
                .query_map([], |r| r.get::<_, i64>(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            ids
        }
        AnyStore::Postgres(s) => outbox::postgres::sqlx::query_scalar(&sql)
            .fetch_all(s.pool())
            .await
            .unwrap(),
        AnyStore::MySql(s) => outbox::mysql::sqlx::query_scalar(&sql)
            .fetch_all(s.pool())
            .await
            .unwrap(),
    }
}

/// One order as text: `id|note|total|paid|raw-hex`, read with the database's own handle.
async fn order_row(store: &AnyStore, orders: &str, id: i64) -> String {
    let sql = format!("SELECT note, total, paid, raw FROM {orders} WHERE id = {id}");
    let (note, total, paid, raw): (Option<String>, f64, bool, Vec<u8>) = match store {
        AnyStore::Sqlite(s) => {
            let conn = s.connect().unwrap();
            conn.query_row(&sql, [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .unwrap()
        }
        AnyStore::Postgres(s) => outbox::postgres::sqlx::query_as(&sql)
            .fetch_one(s.pool())
            .await
            .unwrap(),
        AnyStore::MySql(s) => outbox::mysql::sqlx::query_as(&sql)
            .fetch_one(s.pool())
            .await
            .unwrap(),
    };
    format!("{note:?}|{total}|{paid}|{raw:02x?}")
}

async fn contract(url: &str) {
    let (store, orders) = open(url).await;
    let insert =
        format!("INSERT INTO {orders} (id, note, total, paid, raw) VALUES (?, ?, ?, ?, ?)");
    let broker = RecordingPublisher::new();
    // Stream "later" is the relay's (keep-order); the rest is published on commit.
    let outbox = Outbox::builder(store.clone(), broker.clone())
        .stream_strategy("later", KeepOrder::default())
        .build()
        .unwrap();

    // Committed: the row with every value type, and its message, published after the commit.
    let mut tx = store.begin().await.unwrap();
    let n = tx
        .execute(
            &insert,
            &[
                1.into(),
                AnyValue::Null,
                9.5.into(),
                true.into(),
                vec![0u8, 255, 7].into(),
            ],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let after = outbox
        .enqueue(&mut tx, [Message::new("orders.placed", b"1".to_vec())])
        .await
        .unwrap();
    assert!(broker.published().is_empty(), "published before the commit");
    tx.commit(after).await.unwrap();
    eventually(
        "the on-commit message published",
        Duration::from_secs(10),
        || async { broker.count() == 1 },
    )
    .await;
    assert_eq!(
        order_row(&store, &orders, 1).await,
        "None|9.5|true|[00, ff, 07]"
    );

    // Rolled back, explicitly and by drop: neither row nor message.
    for explicit in [true, false] {
        let mut tx = store.begin().await.unwrap();
        let id = if explicit { 2 } else { 3 };
        tx.execute(
            &insert,
            &[
                id.into(),
                "gone".into(),
                1.0.into(),
                false.into(),
                b"x".as_slice().into(),
            ],
        )
        .await
        .unwrap();
        let _ = outbox
            .enqueue(&mut tx, [Message::new("orders.placed", b"gone".to_vec())])
            .await
            .unwrap();
        if explicit {
            tx.rollback().await.unwrap();
        } else {
            drop(tx);
        }
    }

    // Mistakes are typed errors that write nothing: a placeholder count that does not match,
    // and a transaction of another database.
    let mut tx = store.begin().await.unwrap();
    let e = tx.execute(&insert, &[4.into()]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(
        e.to_string()
            .contains("5 `?` placeholder(s) and 1 value(s)"),
        "{e}"
    );
    tx.rollback().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let other = AnyStore::connect(&format!(
        "sqlite://{}",
        dir.path().join("other.db").display()
    ))
    .await
    .unwrap();
    if store.backend() != "sqlite" {
        let mut foreign: AnyTransaction = other.begin().await.unwrap();
        let e = outbox
            .enqueue(
                &mut foreign,
                [Message::new("orders.placed", b"no".to_vec())],
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert!(
            e.to_string()
                .contains("a sqlite transaction cannot enqueue into a"),
            "{e}"
        );
    }

    // Several writers at once, one key each, relay-published: every message once, each
    // key's first deliveries in its writer's order.
    const WRITERS: usize = 4;
    const TXS: usize = 15;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, outbox, insert) = (store.clone(), outbox.clone(), insert.clone());
            tokio::spawn(async move {
                for i in 0..TXS {
                    let id = 100 + (w * TXS + i) as i64;
                    let mut tx = store.begin().await.unwrap();
                    tx.execute(
                        &insert,
                        &[
                            id.into(),
                            format!("w{w}").into(),
                            1.0.into(),
                            true.into(),
                            Vec::<u8>::new().into(),
                        ],
                    )
                    .await
                    .unwrap();
                    let m = Message::new("orders.placed", i.to_string().into_bytes())
                        .stream("later")
                        .key(format!("w{w}"));
                    let after = outbox.enqueue(&mut tx, [m]).await.unwrap();
                    tx.commit(after).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let relay = outbox.relay().build().unwrap();
    eventually(
        "the relay drains the writers' messages",
        Duration::from_secs(30),
        || async {
            relay.run_once().await.unwrap();
            broker.count() > WRITERS * TXS
        },
    )
    .await;
    let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for e in broker.published() {
        if e.message.stream != "later" || !seen.insert(e.id) {
            continue;
        }
        let i = String::from_utf8(e.message.payload.clone())
            .unwrap()
            .parse()
            .unwrap();
        by_key
            .entry(e.message.key.clone().unwrap())
            .or_default()
            .push(i);
    }
    for w in 0..WRITERS {
        assert_eq!(
            by_key[&format!("w{w}")],
            (0..TXS).collect::<Vec<_>>(),
            "key w{w}"
        );
    }
    assert_eq!(
        broker.count(),
        1 + WRITERS * TXS,
        "a message published twice or one too many"
    );
    let mut expected = vec![1];
    expected.extend(100..100 + (WRITERS * TXS) as i64);
    assert_eq!(order_ids(&store, &orders).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_store_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    contract(&format!(
        "sqlite://{}",
        dir.path().join("shop.db").display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_store_on_postgres() {
    contract(&pg_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_store_on_mariadb() {
    contract(&mysql_url()).await;
}

/// An unknown scheme names the URL without its password.
#[tokio::test]
async fn unknown_schemes_are_config_errors_without_the_password() {
    let e = AnyStore::connect("oracle://app:s3cret@db/shop")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(!e.to_string().contains("s3cret"), "{e}");
    assert!(
        e.to_string()
            .contains("use sqlite://, postgres:// or mysql://"),
        "{e}"
    );
}
