//! The delivery contract against a real MariaDB (OUTBOX_MYSQL_URL, default
//! mysql://root@127.0.0.1:3306/test). No skip: an unreachable server fails the tests.

use std::sync::Arc;

use outbox_core::conformance::Harness;
use outbox_core::{async_trait, ErrorKind, Message, Outbox, Pending, Result};
use outbox_sql::mysql::{map_err, MySqlOptions, MySqlStore};

fn url() -> String {
    std::env::var("OUTBOX_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

struct My;

#[async_trait]
impl Harness for My {
    type Store = MySqlStore;

    async fn fresh(&self) -> Arc<MySqlStore> {
        let table = format!("outbox_t{}", uuid::Uuid::now_v7().simple());
        let store = MySqlStore::connect_with(
            &url(),
            MySqlOptions {
                table: table.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("MariaDB must be reachable (scripts/setup.sh starts it)");
        outbox_core::Store::migrate(&store).await.unwrap();
        sqlx::query(&format!(
            "CREATE TABLE {table}_business (id BIGINT AUTO_INCREMENT PRIMARY KEY)"
        ))
        .execute(store.pool())
        .await
        .unwrap();
        Arc::new(store)
    }

    async fn reopen(&self, store: &MySqlStore) -> Arc<MySqlStore> {
        Arc::new(store.reopen().await.unwrap())
    }

    async fn transact(
        &self,
        store: &MySqlStore,
        outbox: &Outbox,
        messages: Vec<Message>,
        commit: bool,
    ) -> Result<Pending> {
        let mut tx = store.pool().begin().await.map_err(map_err)?;
        sqlx::query(&format!(
            "INSERT INTO {}_business () VALUES ()",
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

    async fn business_rows(&self, store: &MySqlStore) -> i64 {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {}_business", store.table()))
            .fetch_one(store.pool())
            .await
            .unwrap()
    }

    async fn tamper(&self, store: &MySqlStore, seq: i64) {
        let r = sqlx::query(&format!(
            "UPDATE {} SET payload = 'tampered' WHERE seq = ?",
            store.table()
        ))
        .bind(seq)
        .execute(store.pool())
        .await
        .unwrap();
        assert_eq!(r.rows_affected(), 1);
    }
}

outbox_core::conformance_tests!(My);

#[tokio::test]
async fn bad_config_is_a_typed_error_and_never_leaks_the_password() {
    let e = MySqlStore::connect("not a url").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    let e = MySqlStore::connect_with(
        &url(),
        MySqlOptions {
            table: "x; drop table y".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidIdentifier);
    // Nothing listens on port 1.
    let e = MySqlStore::connect_with(
        "mysql://app:hunter2secret@127.0.0.1:1/db",
        MySqlOptions {
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

/// Two transactions write the same key concurrently; the first to enqueue commits last. The
/// unit lock makes the second wait, so publish order is commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_of_one_key_publish_in_commit_order() {
    use outbox_core::{RecordingPublisher, Relay, Strategy};
    use std::time::Duration;

    let store = My.fresh().await;
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
    let first = My.fresh().await;
    let table = format!("{}_m", first.table());
    let mut handles = Vec::new();
    for _ in 0..4 {
        let table = table.clone();
        handles.push(tokio::spawn(async move {
            let store = MySqlStore::connect_with(
                &url(),
                MySqlOptions {
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
    let store = MySqlStore::connect_with(
        &url(),
        MySqlOptions {
            table: table.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(store.table_exists().await.unwrap());
}
