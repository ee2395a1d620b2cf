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
