//! The inbox on real PostgreSQL and MariaDB: the steps (attempts counted before the handler,
//! a second delivery under way is a duplicate), two consumers processing the same 40
//! messages at the same moment (one effect each, no error), dead letters, requeue,
//! retention, and a missing table.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{async_trait, BatchProcessed, Inbox, MessageId, Processed, Received, Seen};
use outbox_sql::inbox::{SqlHandler, SqlInboxTable};
use outbox_sql::mysql::MySqlStore;
use outbox_sql::postgres::PgStore;
use outbox_sql::sqlx::{self, MySql, Postgres};

fn pg_url() -> String {
    std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn mysql_url() -> String {
    std::env::var("OUTBOX_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

fn name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Inserts one effect row per message, holding its transaction open a little so that a
/// second delivery of the same id really runs at the same moment.
struct Record {
    effects: String,
    runs: Arc<AtomicUsize>,
}

#[async_trait]
impl SqlHandler<Postgres> for Record {
    async fn handle(&self, tx: &mut sqlx::PgConnection, m: &Received) -> outbox_core::Result<()> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        sqlx::query(&format!("INSERT INTO {} (msg) VALUES ($1)", self.effects))
            .bind(m.id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(outbox_sql::map_err)?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        if m.payload == b"fail" {
            // After its write: a rollback must take the write away.
            return Err(outbox_core::Error::transient("refused"));
        }
        Ok(())
    }
}

#[async_trait]
impl SqlHandler<MySql> for Record {
    async fn handle(
        &self,
        tx: &mut sqlx::MySqlConnection,
        m: &Received,
    ) -> outbox_core::Result<()> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        sqlx::query(&format!("INSERT INTO {} (msg) VALUES (?)", self.effects))
            .bind(m.id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(outbox_sql::map_err)?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        if m.payload == b"fail" {
            // After its write: a rollback must take the write away.
            return Err(outbox_core::Error::transient("refused"));
        }
        Ok(())
    }
}

/// The same checks on any store: `inbox(...)` makes a consumer's inbox.
async fn steps<I: Inbox>(a: I, b: I, audit: I, runs: &AtomicUsize) {
    let m = Received::new(MessageId::new(), "t", b"x".to_vec());
    assert_eq!(a.start(&[m.id]).await.unwrap(), [Seen::New { attempts: 1 }]);
    assert_eq!(b.start(&[m.id]).await.unwrap(), [Seen::New { attempts: 2 }]);
    assert_eq!(a.process(&m).await.unwrap(), Processed::Done);
    assert_eq!(b.process(&m).await.unwrap(), Processed::Duplicate);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        a.start(&[m.id, m.id]).await.unwrap(),
        [Seen::Done, Seen::Done]
    );
    assert_eq!(
        audit.start(&[m.id]).await.unwrap(),
        [Seen::New { attempts: 1 }]
    );
    // A dead letter is never written over a done mark.
    a.dead_letter(&m, "late failure").await.unwrap();
    assert_eq!(a.start(&[m.id]).await.unwrap(), [Seen::Done]);
}

/// Both consumers start and process the same 40 messages at once, in opposite orders.
async fn race<I: Inbox + 'static>(a: I, b: I, runs: Arc<AtomicUsize>) -> (usize, usize) {
    let msgs: Vec<Received> = (0..40)
        .map(|i| Received::new(MessageId::new(), "t", vec![i]))
        .collect();
    let ids: Vec<MessageId> = msgs.iter().map(|m| m.id).collect();
    let go = |inbox: I, mut msgs: Vec<Received>, reverse: bool| {
        let ids = ids.clone();
        tokio::spawn(async move {
            inbox.start(&ids).await.unwrap();
            if reverse {
                msgs.reverse();
            }
            let (mut done, mut dup) = (0, 0);
            for m in &msgs {
                match inbox.process(m).await.unwrap() {
                    Processed::Done => done += 1,
                    Processed::Duplicate => dup += 1,
                }
            }
            (done, dup)
        })
    };
    let ta = go(a, msgs.clone(), false);
    let tb = go(b, msgs, true);
    let (a, b) = (ta.await.unwrap(), tb.await.unwrap());
    assert_eq!(
        runs.load(Ordering::SeqCst),
        40,
        "one handler run per message"
    );
    (a.0 + b.0, a.1 + b.1)
}

/// Batched mode on any store: one transaction for a batch (a second copy of an id and an id
/// already done are duplicates), a failing handler rolls back its batch-mates' writes and
/// says which message failed, and two consumers processing the same 40 messages as batches
/// at once, in opposite orders, give one effect each. `effects()` counts effect rows.
async fn batches<I, F, Fut>(a: I, b: I, runs: Arc<AtomicUsize>, effects: F)
where
    I: Inbox + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let m: Vec<Received> = (0..4)
        .map(|i| Received::new(MessageId::new(), "t", vec![i]))
        .collect();
    let ids: Vec<MessageId> = m.iter().map(|m| m.id).collect();
    a.start(&ids).await.unwrap();
    assert_eq!(a.process(&m[3]).await.unwrap(), Processed::Done);
    let before = effects().await;
    match a
        .process_batch(&[&m[0], &m[1], &m[0], &m[3], &m[2]])
        .await
        .unwrap()
    {
        BatchProcessed::Committed(r) => assert_eq!(
            r,
            [
                Processed::Done,
                Processed::Done,
                Processed::Duplicate,
                Processed::Duplicate,
                Processed::Done
            ]
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(effects().await, before + 3);
    assert_eq!(a.start(&ids).await.unwrap(), [Seen::Done; 4]);

    let ok = Received::new(MessageId::new(), "t", b"ok".to_vec());
    let bad = Received::new(MessageId::new(), "t", b"fail".to_vec());
    let after = Received::new(MessageId::new(), "t", b"after".to_vec());
    a.start(&[ok.id, bad.id, after.id]).await.unwrap();
    let before = effects().await;
    match a.process_batch(&[&ok, &bad, &after]).await.unwrap() {
        BatchProcessed::Failed { index, error } => {
            assert_eq!(index, 1);
            assert!(error.to_string().contains("refused"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        effects().await,
        before,
        "the batch-mate's write rolled back"
    );
    assert_eq!(
        a.start(&[ok.id]).await.unwrap(),
        [Seen::New { attempts: 2 }],
        "not marked done"
    );

    runs.store(0, Ordering::SeqCst);
    let msgs: Vec<Received> = (0..40)
        .map(|i| Received::new(MessageId::new(), "t", vec![i]))
        .collect();
    let go = |inbox: I, mut msgs: Vec<Received>, reverse: bool| {
        tokio::spawn(async move {
            // As the consumer does: attempts counted first.
            let ids: Vec<MessageId> = msgs.iter().map(|m| m.id).collect();
            inbox.start(&ids).await.unwrap();
            if reverse {
                msgs.reverse();
            }
            let (mut done, mut dup) = (0, 0);
            for chunk in msgs.chunks(10) {
                let refs: Vec<&Received> = chunk.iter().collect();
                match inbox.process_batch(&refs).await.unwrap() {
                    BatchProcessed::Committed(r) => {
                        for p in r {
                            match p {
                                Processed::Done => done += 1,
                                Processed::Duplicate => dup += 1,
                            }
                        }
                    }
                    other => panic!("{other:?}"),
                }
            }
            (done, dup)
        })
    };
    let before = effects().await;
    let ta = go(a, msgs.clone(), false);
    let tb = go(b, msgs, true);
    let (x, y) = (ta.await.unwrap(), tb.await.unwrap());
    assert_eq!((x.0 + y.0, x.1 + y.1), (40, 40));
    assert_eq!(effects().await, before + 40, "one effect per message");
}

async fn pg() -> (PgStore, SqlInboxTable<Postgres>, String) {
    let store = PgStore::connect(&pg_url()).await.unwrap();
    let table = store.inbox_table(&name("inbox")).unwrap();
    table.migrate().await.unwrap();
    table.migrate().await.unwrap(); // idempotent
    let effects = name("effects");
    sqlx::query(&format!("CREATE TABLE {effects} (msg TEXT NOT NULL)"))
        .execute(store.pool())
        .await
        .unwrap();
    (store, table, effects)
}

async fn mysql() -> (MySqlStore, SqlInboxTable<MySql>, String) {
    let store = MySqlStore::connect(&mysql_url()).await.unwrap();
    let table = store.inbox_table(&name("inbox")).unwrap();
    table.migrate().await.unwrap();
    table.migrate().await.unwrap();
    let effects = name("effects");
    sqlx::query(&format!("CREATE TABLE {effects} (msg TEXT NOT NULL)"))
        .execute(store.pool())
        .await
        .unwrap();
    (store, table, effects)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_inbox_steps_and_a_race_of_two_consumers() {
    let (store, table, effects) = pg().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let rec = || Record {
        effects: effects.clone(),
        runs: runs.clone(),
    };
    steps(
        table.consumer("billing", rec()).unwrap(),
        table.consumer("billing", rec()).unwrap(),
        table.consumer("audit", rec()).unwrap(),
        &runs,
    )
    .await;
    runs.store(0, Ordering::SeqCst);
    // Two pools: two consumer processes.
    let other = PgStore::connect(&pg_url()).await.unwrap();
    let table_b = other.inbox_table(table.table()).unwrap();
    let (done, dup) = race(
        table.consumer("race", rec()).unwrap(),
        table_b.consumer("race", rec()).unwrap(),
        runs.clone(),
    )
    .await;
    assert_eq!((done, dup), (40, 40));
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(DISTINCT msg) - COUNT(*) FROM {effects}"
    ))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(n, 0, "no message has two effects");
    admin(&table).await;
    let count = || async {
        sqlx::query_scalar::<_, i64>(&format!("SELECT COUNT(*) FROM {effects}"))
            .fetch_one(store.pool())
            .await
            .unwrap()
    };
    batches(
        table.consumer("batched", rec()).unwrap(),
        table_b.consumer("batched", rec()).unwrap(),
        runs.clone(),
        count,
    )
    .await;
}

/// On a pool of one connection: duplicates and a failing handler each end their transaction,
/// so the next message still gets the connection (a transaction left open would block or
/// fail it); a session reset (`DEALLOCATE ALL`) costs nothing but a new `PREPARE` of the
/// mark; and a consumer name made to break out of an SQL literal (it is sent inside the
/// `EXECUTE`'s text) is stored as it is and runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_inbox_duplicates_leave_the_only_connection_clean_and_names_stay_data() {
    let (store, table, effects) = pg().await;
    let one = PgStore::connect_with(
        &pg_url(),
        outbox_sql::postgres::PgOptions {
            max_connections: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let table_1 = one.inbox_table(table.table()).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let consumer = format!("o'brien\\'); DROP TABLE {effects}; -- \u{e9}$$ \"x\"");
    let inbox = table_1
        .consumer(
            &consumer,
            Record {
                effects: effects.clone(),
                runs: runs.clone(),
            },
        )
        .unwrap();
    let m = Received::new(MessageId::new(), "t", b"x".to_vec());
    assert_eq!(inbox.process(&m).await.unwrap(), Processed::Done);
    for _ in 0..3 {
        assert_eq!(inbox.process(&m).await.unwrap(), Processed::Duplicate);
    }
    // The mark is a statement the connection prepared; a session reset drops it, and the
    // next message prepares it again.
    let forget = || async {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM pg_prepared_statements WHERE name LIKE 'outbox_inbox_mark_%'",
        )
        .fetch_all(one.pool())
        .await
        .unwrap();
        assert_eq!(
            names.len(),
            1,
            "the mark is prepared on the connection: {names:?}"
        );
        sqlx::raw_sql(&format!("DEALLOCATE {}", names[0]))
            .execute(one.pool())
            .await
            .unwrap();
    };
    forget().await;
    assert_eq!(inbox.process(&m).await.unwrap(), Processed::Duplicate);
    let after_reset = Received::new(MessageId::new(), "t", b"z".to_vec());
    forget().await;
    assert_eq!(inbox.process(&after_reset).await.unwrap(), Processed::Done);
    // A failing handler after a duplicate: rolled back, and the connection still serves.
    let f = Received::new(MessageId::new(), "t", b"fail".to_vec());
    assert!(inbox.process(&f).await.is_err());
    let n = Received::new(MessageId::new(), "t", b"y".to_vec());
    assert_eq!(inbox.process(&n).await.unwrap(), Processed::Done);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        4,
        "m once, after_reset once, f once (rolled back), n once"
    );
    let stored: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT DISTINCT consumer FROM {} WHERE id = $1::uuid OR id = $2::uuid",
        table.table()
    ))
    .bind(m.id.to_string())
    .bind(n.id.to_string())
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(stored, [consumer]);
    let effects_left: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {effects}"))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(
        effects_left, 3,
        "the effects table is intact: the effects of m, after_reset and n"
    );
    assert_eq!(
        inbox
            .start(&[m.id, f.id, n.id, after_reset.id])
            .await
            .unwrap(),
        [
            Seen::Done,
            Seen::New { attempts: 1 },
            Seen::Done,
            Seen::Done
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_inbox_steps_and_a_race_of_two_consumers() {
    let (store, table, effects) = mysql().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let rec = || Record {
        effects: effects.clone(),
        runs: runs.clone(),
    };
    steps(
        table.consumer("billing", rec()).unwrap(),
        table.consumer("billing", rec()).unwrap(),
        table.consumer("audit", rec()).unwrap(),
        &runs,
    )
    .await;
    runs.store(0, Ordering::SeqCst);
    let other = MySqlStore::connect(&mysql_url()).await.unwrap();
    let table_b = other.inbox_table(table.table()).unwrap();
    let (done, dup) = race(
        table.consumer("race", rec()).unwrap(),
        table_b.consumer("race", rec()).unwrap(),
        runs.clone(),
    )
    .await;
    assert_eq!((done, dup), (40, 40));
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT CAST(COUNT(DISTINCT msg) - COUNT(*) AS SIGNED) FROM {effects}"
    ))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(n, 0, "no message has two effects");
    admin_mysql(&table).await;
    let count = || async {
        sqlx::query_scalar::<_, i64>(&format!("SELECT COUNT(*) FROM {effects}"))
            .fetch_one(store.pool())
            .await
            .unwrap()
    };
    batches(
        table.consumer("batched", rec()).unwrap(),
        table_b.consumer("batched", rec()).unwrap(),
        runs.clone(),
        count,
    )
    .await;
}

macro_rules! admin_checks {
    ($name:ident, $db:ty) => {
        /// Dead letters, requeue, retention, on a consumer whose handler writes nothing.
        async fn $name(table: &SqlInboxTable<$db>) {
            let noop = outbox_sql::inbox::handler_fn::<$db, _>(|_, _| Box::pin(async { Ok(()) }));
            let inbox = table.consumer("ops", noop).unwrap();
            let mut m = Received::new(MessageId::new(), "orders", b"{\"n\":1}".to_vec());
            m.key = Some("k".into());
            m.headers.insert("tenant".into(), "acme".into());
            inbox.start(&[m.id]).await.unwrap();
            assert_eq!(inbox.failed(m.id, "boom").await.unwrap(), 1);
            inbox.dead_letter(&m, "boom").await.unwrap();
            let dead = table.dead_letters(Some("ops"), 10).await.unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!(dead[0].message, m);
            assert_eq!(dead[0].error.as_deref(), Some("boom"));
            assert_eq!(inbox.start(&[m.id]).await.unwrap(), [Seen::Dead]);
            table.requeue("ops", m.id).await.unwrap();
            assert_eq!(
                table.requeue("ops", m.id).await.unwrap_err().kind(),
                outbox_core::ErrorKind::NotFound
            );
            let back = inbox.requeued(10).await.unwrap();
            assert_eq!(back, [m.clone()]);
            assert_eq!(
                inbox.start(&[m.id]).await.unwrap(),
                [Seen::New { attempts: 1 }]
            );
            assert_eq!(inbox.process(&m).await.unwrap(), Processed::Done);
            assert!(table
                .dead_letters(Some("ops"), 10)
                .await
                .unwrap()
                .is_empty());
            assert_eq!(
                table.clean(Duration::from_secs(3600), 100).await.unwrap(),
                0
            );
            assert!(table.clean(Duration::ZERO, 1000).await.unwrap() >= 1);
            assert_eq!(
                inbox.start(&[m.id]).await.unwrap(),
                [Seen::New { attempts: 1 }],
                "forgotten after clean"
            );
        }
    };
}

admin_checks!(admin, Postgres);
admin_checks!(admin_mysql, MySql);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_inbox_table_is_one_clear_error() {
    let store = PgStore::connect(&pg_url()).await.unwrap();
    let table = store.inbox_table(&name("never")).unwrap();
    let noop = outbox_sql::inbox::handler_fn::<Postgres, _>(|_, _| Box::pin(async { Ok(()) }));
    let e = table
        .consumer("c", noop)
        .unwrap()
        .start(&[MessageId::new()])
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("does not exist: run its migration"),
        "{e}"
    );
    let store = MySqlStore::connect(&mysql_url()).await.unwrap();
    let table = store.inbox_table(&name("never")).unwrap();
    let noop = outbox_sql::inbox::handler_fn::<MySql, _>(|_, _| Box::pin(async { Ok(()) }));
    let e = table
        .consumer("c", noop)
        .unwrap()
        .start(&[MessageId::new()])
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("does not exist: run its migration"),
        "{e}"
    );
}
