//! The delivery contract against a real SQLite file (WAL), each test on its own file.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use outbox_core::conformance::{Corruption, Harness};
use outbox_core::{async_trait, AfterCommit, Message, Outbox, Result};
use outbox_sqlite::{map_err, SqliteOptions, SqliteStore};

struct Sqlite {
    dir: tempfile::TempDir,
    n: AtomicUsize,
}

impl Sqlite {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            n: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl Harness for Sqlite {
    type Store = SqliteStore;

    async fn fresh(&self) -> Arc<SqliteStore> {
        let n = self.n.fetch_add(1, Ordering::SeqCst);
        let table = format!("outbox_{n}");
        let store = SqliteStore::open_with(
            self.dir.path().join("test.db"),
            SqliteOptions {
                table: table.clone(),
                ..Default::default()
            },
        )
        .unwrap();
        outbox_core::Store::migrate(&store).await.unwrap();
        store
            .connect()
            .unwrap()
            .execute_batch(&format!(
                "CREATE TABLE {table}_business (id INTEGER PRIMARY KEY)"
            ))
            .unwrap();
        Arc::new(store)
    }

    async fn reopen(&self, store: &SqliteStore) -> Arc<SqliteStore> {
        Arc::new(store.reopen().unwrap())
    }

    async fn transact(
        &self,
        store: &SqliteStore,
        outbox: &Outbox<Arc<SqliteStore>>,
        messages: Vec<Message>,
        commit: bool,
    ) -> Result<AfterCommit> {
        let mut conn = store.connect()?;
        let mut tx = conn.transaction().map_err(map_err)?;
        tx.execute(
            &format!("INSERT INTO {}_business DEFAULT VALUES", store.table()),
            [],
        )
        .map_err(map_err)?;
        match outbox.enqueue_blocking(&mut tx, messages) {
            Ok(pending) if commit => {
                tx.commit().map_err(map_err)?;
                Ok(pending)
            }
            Ok(_) => {
                tx.rollback().map_err(map_err)?;
                Ok(AfterCommit::empty())
            }
            Err(e) => {
                tx.commit().map_err(map_err)?;
                Err(e)
            }
        }
    }

    async fn business_rows(&self, store: &SqliteStore) -> i64 {
        let conn = store.connect().unwrap();
        conn.query_row(
            &format!("SELECT COUNT(*) FROM {}_business", store.table()),
            [],
            |r| r.get(0),
        )
        .unwrap()
    }

    async fn tamper(&self, store: &SqliteStore, seq: i64) {
        let conn = store.connect().unwrap();
        let n = conn
            .execute(
                &format!(
                    "UPDATE {} SET payload = X'74616d7065726564' WHERE seq = ?1",
                    store.table()
                ),
                [seq],
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    async fn corrupt(&self, store: &SqliteStore, seq: i64, kind: Corruption) -> bool {
        let set = match kind {
            Corruption::HeadersNotAMap => "headers = '[1,2]'",
            Corruption::UnknownStrategy => "strategy = 'teleport'",
            Corruption::IdNotUuid => "id = 'not-a-uuid-' || seq",
            Corruption::KeyNotUtf8 => "msg_key = CAST(X'FFFE41' AS TEXT)",
            Corruption::StreamBlob => "stream = X'00FF'",
            Corruption::NegativeAttempts => "attempts = -5",
            Corruption::DestinationNewline => "destination = 'a' || char(13) || char(10) || 'b'",
            Corruption::StreamWhitespace => "stream = ' padded '",
            Corruption::UnknownExhausted => "on_exhausted = 'vanish'",
            Corruption::UnitMoved => "okey = 'another-unit'",
        };
        let conn = store.connect().unwrap();
        let sql = format!("UPDATE {} SET {set} WHERE seq = ?1", store.table());
        assert_eq!(conn.execute(&sql, [seq]).unwrap(), 1);
        true
    }

    async fn execute_sql(&self, store: &SqliteStore, sql: &str) -> bool {
        let sql = sql.replace("{t}", store.table());
        store.connect().unwrap().execute_batch(&sql).unwrap();
        true
    }
}

outbox_core::conformance_tests!(Sqlite::new());

#[test]
fn invalid_table_name_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["outbox; DROP TABLE x", "1x", "a-b", ""] {
        let e = SqliteStore::open_with(
            dir.path().join("x.db"),
            SqliteOptions {
                table: bad.into(),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), outbox_core::ErrorKind::InvalidIdentifier, "{bad}");
    }
}

#[test]
fn unopenable_database_is_a_typed_error() {
    // A folder that does not exist is a configuration error that says so.
    let e = SqliteStore::open("/nonexistent-dir/x/y.db").unwrap_err();
    assert_eq!(e.kind(), outbox_core::ErrorKind::Config);
    assert!(
        e.to_string()
            .contains("the folder /nonexistent-dir/x does not exist"),
        "{e}"
    );
    // A file that cannot be opened as a database is a store error.
    let dir = tempfile::tempdir().unwrap();
    let e = SqliteStore::open(dir.path()).unwrap_err();
    assert_eq!(e.kind(), outbox_core::ErrorKind::Store, "{e}");
}

/// A table made by 0.1 (rows leased one by one) moves to unit claims on `migrate` and loses
/// nothing: pending, leased, sent and dead rows survive, each unit publishes in order, a live
/// lease is still respected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_a_0_1_table_to_unit_claims() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(&include_str!("legacy/sqlite-0.1.sql").replace("{t}", "outbox"))
        .unwrap();
    let now = outbox_core::to_millis(std::time::SystemTime::now());
    for insert in
        outbox_core::conformance::legacy_rows("outbox", |p| format!("CAST('{p}' AS BLOB)"), now)
    {
        conn.execute(&insert, []).unwrap();
    }
    drop(conn);
    let store = SqliteStore::open(&path).unwrap();
    outbox_core::conformance::check_legacy_migration(Arc::new(store)).await;
}

/// Several processes may open a new database file and run `migrate` at once: none fails
/// (opening turns the file to WAL, which SQLite refuses at once to all but one), each step is
/// applied and recorded once, and the schema is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_are_safe() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let mut handles = Vec::new();
    for _ in 0..4 {
        let path = path.clone();
        handles.push(tokio::spawn(async move {
            let store = SqliteStore::open(&path)?;
            outbox_core::Store::migrate(&store).await
        }));
    }
    for h in handles {
        h.await.unwrap().expect("concurrent migrate");
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        outbox_core::StoreAdmin::schema(&store).await.unwrap(),
        outbox_core::SchemaReport {
            version: Some(outbox_core::SCHEMA_VERSION),
            ..Default::default()
        }
    );
    let steps: i64 = store
        .connect()
        .unwrap()
        .query_row("SELECT count(*) FROM outbox_schema", [], |r| r.get(0))
        .unwrap();
    assert_eq!(steps, outbox_core::SCHEMA_STEPS.len() as i64);
}
