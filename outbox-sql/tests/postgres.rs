//! The delivery contract against a real PostgreSQL (OUTBOX_PG_URL, default
//! postgres://postgres@127.0.0.1:5432/test). No skip: an unreachable server fails the tests.

use std::sync::Arc;

use outbox_core::conformance::Harness;
use outbox_core::{async_trait, ErrorKind, Message, Outbox, Pending, Result};
use outbox_sql::postgres::{map_err, PgOptions, PgStore};

fn url() -> String {
    std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

struct Pg;

#[async_trait]
impl Harness for Pg {
    type Store = PgStore;

    async fn fresh(&self) -> Arc<PgStore> {
        let table = format!("outbox_t{}", uuid::Uuid::now_v7().simple());
        let store = PgStore::connect_with(
            &url(),
            PgOptions {
                table: table.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("PostgreSQL must be reachable (scripts/setup.sh starts it)");
        outbox_core::Store::migrate(&store).await.unwrap();
        sqlx::query(&format!(
            "CREATE TABLE {table}_business (id BIGSERIAL PRIMARY KEY)"
        ))
        .execute(store.pool())
        .await
        .unwrap();
        Arc::new(store)
    }

    async fn reopen(&self, store: &PgStore) -> Arc<PgStore> {
        Arc::new(store.reopen().await.unwrap())
    }

    async fn transact(
        &self,
        store: &PgStore,
        outbox: &Outbox,
        messages: Vec<Message>,
        commit: bool,
    ) -> Result<Pending> {
        let mut tx = store.pool().begin().await.map_err(map_err)?;
        sqlx::query(&format!(
            "INSERT INTO {}_business DEFAULT VALUES",
            store.table()
        ))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        match store.enqueue(&mut tx, outbox, messages).await {
            Ok(pending) if commit => {
                tx.commit().await.map_err(map_err)?;
                Ok(pending)
            }
            Ok(_) => {
                tx.rollback().await.map_err(map_err)?;
                Ok(Pending::empty())
            }
            Err(e) => {
                tx.commit().await.map_err(map_err)?;
                Err(e)
            }
        }
    }

    async fn business_rows(&self, store: &PgStore) -> i64 {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {}_business", store.table()))
            .fetch_one(store.pool())
            .await
            .unwrap()
    }

    async fn tamper(&self, store: &PgStore, seq: i64) {
        let r = sqlx::query(&format!(
            "UPDATE {} SET payload = 'tampered'::bytea WHERE seq = $1",
            store.table()
        ))
        .bind(seq)
        .execute(store.pool())
        .await
        .unwrap();
        assert_eq!(r.rows_affected(), 1);
    }
}

outbox_core::conformance_tests!(Pg);

#[tokio::test]
async fn bad_config_is_a_typed_error_and_never_leaks_the_password() {
    let e = PgStore::connect("not a url").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    let e = PgStore::connect_with(
        &url(),
        PgOptions {
            table: "x; drop table y".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidIdentifier);
    // Nothing listens on port 1.
    let e = PgStore::connect_with(
        "postgres://app:hunter2secret@127.0.0.1:1/db",
        PgOptions {
            acquire_timeout: std::time::Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Store);
    assert!(e.is_transient());
    let text = format!("{e} {e:?}");
    assert!(!text.contains("hunter2secret"), "{text}");
    assert!(text.contains("app:***@127.0.0.1:1"), "{text}");
}

/// LISTEN/NOTIFY: a relay in "another process" (its own pool, no in-process notification)
/// sleeping on a 120 s poll interval publishes within the deadline of a commit elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_a_relay_in_another_process() {
    use outbox_core::conformance::eventually;
    use outbox_core::{RecordingPublisher, Relay, Strategy};
    use std::time::Duration;

    let h = Pg;
    let writer = h.fresh().await;
    let relay_side = h.reopen(&writer).await;
    let broker = RecordingPublisher::new();
    let outbox = Outbox::builder(writer.clone(), RecordingPublisher::new())
        .strategy(Strategy::KeepOrder)
        .build()
        .unwrap();
    let relay = Relay::builder(relay_side, broker.clone())
        .poll_interval(Duration::from_secs(120))
        .build()
        .unwrap();
    let running = outbox_core::conformance::RunningRelay::spawn(relay);
    for i in 0..3usize {
        tokio::time::sleep(Duration::from_millis(200)).await; // let the relay reach its idle wait
        let msg = Message::new("d", i.to_string().into_bytes());
        drop(h.transact(&writer, &outbox, vec![msg], true).await.unwrap()); // no in-process wake-up
        eventually(
            "NOTIFY wakes the other relay",
            Duration::from_secs(10),
            || async { broker.count() == i + 1 },
        )
        .await;
    }
    running.stop().await;
}

/// Two transactions write the same key concurrently; the first to enqueue commits last. The
/// unit lock makes the second wait, so publish order is commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_of_one_key_publish_in_commit_order() {
    use outbox_core::{RecordingPublisher, Relay, Strategy};
    use std::time::Duration;

    let store = Pg.fresh().await;
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(Strategy::KeepOrder)
        .build()
        .unwrap();
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));

    let mut t1 = store.pool().begin().await.unwrap();
    drop(
        store
            .enqueue(
                &mut t1,
                &outbox,
                [Message::new("d", b"t1".to_vec()).key("k")],
            )
            .await
            .unwrap(),
    );
    let (s2, o2, order2) = (store.clone(), outbox.clone(), order.clone());
    let t2 = tokio::spawn(async move {
        let mut t2 = s2.pool().begin().await.unwrap();
        drop(
            s2.enqueue(&mut t2, &o2, [Message::new("d", b"t2".to_vec()).key("k")])
                .await
                .unwrap(),
        );
        t2.commit().await.unwrap();
        order2.lock().unwrap().push("t2");
    });
    tokio::time::sleep(Duration::from_millis(300)).await; // t2 is waiting (or, without the lock, done)
    t1.commit().await.unwrap();
    order.lock().unwrap().push("t1");
    t2.await.unwrap();

    let broker = RecordingPublisher::new();
    Relay::builder(store.clone(), broker.clone())
        .build()
        .unwrap()
        .run_once()
        .await
        .unwrap();
    let published: Vec<String> = broker
        .published()
        .into_iter()
        .map(|e| String::from_utf8(e.message.payload).unwrap())
        .collect();
    let committed = order.lock().unwrap().clone();
    assert_eq!(published, committed, "published in commit order");
    assert_eq!(
        committed,
        vec!["t1", "t2"],
        "the second writer waited for the first"
    );
}

/// Several processes may run `migrate` at once on a new table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_are_safe() {
    let first = Pg.fresh().await;
    let table = format!("{}_m", first.table());
    let mut handles = Vec::new();
    for _ in 0..4 {
        let table = table.clone();
        handles.push(tokio::spawn(async move {
            let store = PgStore::connect_with(
                &url(),
                PgOptions {
                    table: table.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            outbox_core::Store::migrate(&store).await
        }));
    }
    for h in handles {
        h.await.unwrap().expect("concurrent migrate");
    }
    let store = PgStore::connect_with(
        &url(),
        PgOptions {
            table: table.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(store.table_exists().await.unwrap());
}
