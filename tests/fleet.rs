//! One relay process for many databases (`outbox::Fleet`): 20 SQLite files, 5 PostgreSQL
//! databases and 3 MariaDB databases, plus a PostgreSQL server of the test's own that is
//! killed and started again, a SQLite store whose table is dropped and made again, and a
//! store added while the fleet runs. Writers commit on every store at once. Everything
//! committed on a healthy store is delivered once, in order per key; the broken ones are
//! reported as failing, recover, and deliver in order too.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use outbox::any::{AnyOptions, AnyStore};
use outbox::conformance::eventually;
use outbox::{
    Fleet, KeepOrder, MemberState, Message, Outbox, RecordingPublisher, RelayConfig, Store,
};
use outbox_testkit::PgCluster;

const TABLE: &str = "outbox_fleet";
const KEYS: usize = 3;

struct Db {
    name: String,
    store: AnyStore,
    outbox: Outbox<AnyStore>,
}

async fn open(name: &str, url: &str) -> Db {
    let store = AnyStore::connect_with(
        url,
        AnyOptions {
            table: TABLE.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    store.migrate().await.unwrap();
    let outbox = Outbox::writer(store.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    Db {
        name: name.to_owned(),
        store,
        outbox,
    }
}

/// Messages `range` on every key of `db`, one transaction per step (a message per key).
async fn write(db: &Db, range: std::ops::Range<usize>) {
    for i in range {
        let mut tx = db.store.begin().await.unwrap();
        let msgs = (0..KEYS).map(|k| {
            Message::new(db.name.clone(), i.to_string().into_bytes())
                .stream("fleet")
                .key(format!("k{k}"))
        });
        let after = db.outbox.enqueue(&mut tx, msgs).await.unwrap();
        tx.commit(after).await.unwrap();
    }
}

/// `url` with its database replaced by `db`.
fn with_db(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, ""), |(b, q)| (b, q));
    let (server, _) = base.rsplit_once('/').unwrap();
    if query.is_empty() {
        format!("{server}/{db}")
    } else {
        format!("{server}/{db}?{query}")
    }
}

/// First deliveries per (store, key), in delivery order, and how many copies there were.
fn deliveries(broker: &RecordingPublisher) -> (HashMap<(String, String), Vec<usize>>, usize) {
    let mut seen = HashSet::new();
    let mut out: HashMap<(String, String), Vec<usize>> = HashMap::new();
    let published = broker.published();
    for e in &published {
        if !seen.insert(e.id) {
            continue;
        }
        let i = String::from_utf8_lossy(&e.message.payload).parse().unwrap();
        out.entry((
            e.message.destination.clone(),
            e.message.key.clone().unwrap(),
        ))
        .or_default()
        .push(i);
    }
    (out, published.len() - seen.len())
}

/// Whether `name` has delivered at least `n` messages on every key.
fn delivered(broker: &RecordingPublisher, name: &str, n: usize) -> bool {
    let (d, _) = deliveries(broker);
    (0..KEYS).all(|k| {
        d.get(&(name.to_owned(), format!("k{k}")))
            .is_some_and(|v| v.len() >= n)
    })
}

fn state(fleet: &Fleet, name: &str) -> (MemberState, Option<String>) {
    let s = fleet.status().into_iter().find(|s| s.name == name).unwrap();
    (s.state, s.last_error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fleet_serves_sqlite_postgres_and_mariadb_stores_through_failures() {
    let id = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let pg_url = std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let my_url = std::env::var("OUTBOX_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let pg_admin = outbox::postgres::sqlx::PgPool::connect(&pg_url)
        .await
        .unwrap();
    let my_admin = outbox::mysql::sqlx::MySqlPool::connect(&my_url)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let own = PgCluster::create(&[]);

    let mut dbs = Vec::new();
    for i in 0..20 {
        let url = format!("sqlite://{}", dir.path().join(format!("s{i}.db")).display());
        dbs.push(open(&format!("sqlite-{i}"), &url).await);
    }
    let mut pg_dbs = Vec::new();
    for i in 0..5 {
        let db = format!("fleet_{id}_{i}");
        outbox::postgres::sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&pg_admin)
            .await
            .unwrap();
        dbs.push(open(&format!("pg-{i}"), &with_db(&pg_url, &db)).await);
        pg_dbs.push(db);
    }
    let mut my_dbs = Vec::new();
    for i in 0..3 {
        let db = format!("fleet_{id}_{i}");
        outbox::mysql::sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&my_admin)
            .await
            .unwrap();
        dbs.push(open(&format!("mariadb-{i}"), &with_db(&my_url, &db)).await);
        my_dbs.push(db);
    }
    dbs.push(open("pg-own", &own.url()).await);
    let late = open(
        "sqlite-late",
        &format!("sqlite://{}", dir.path().join("late.db").display()),
    )
    .await;

    let broker = RecordingPublisher::new();
    let fleet = Arc::new(
        Fleet::builder(broker.clone())
            .config(RelayConfig {
                poll_interval: Duration::from_millis(100),
                max_error_backoff: Duration::from_millis(500),
                store_timeout: Duration::from_secs(3),
                batch_size: 20,
                ..Default::default()
            })
            .max_batches(4)
            .build()
            .unwrap(),
    );
    for db in &dbs {
        fleet.add(&db.name, Arc::new(db.store.clone())).unwrap();
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let fleet = fleet.clone();
        tokio::spawn(async move {
            fleet
                .run(async {
                    let _ = stopped.await;
                })
                .await
        })
    };

    // Phase 1: every store's writers at once.
    futures_util::future::join_all(dbs.iter().map(|db| write(db, 0..10))).await;
    eventually(
        "sqlite-3 delivers phase 1",
        Duration::from_secs(60),
        || async { delivered(&broker, "sqlite-3", 10) },
    )
    .await;

    // Break two stores: a server killed, a table dropped.
    own.kill();
    let AnyStore::Sqlite(s3) = &dbs[3].store else {
        unreachable!()
    };
    s3.connect()
        .unwrap()
        .execute_batch(&format!("DROP TABLE {TABLE}"))
        .unwrap();
    eventually("both reported failing", Duration::from_secs(30), || async {
        state(&fleet, "pg-own").0 == MemberState::Failing
            && state(&fleet, "sqlite-3").0 == MemberState::Failing
    })
    .await;
    let why = state(&fleet, "sqlite-3").1.unwrap();
    assert!(why.contains("no such table"), "{why}");

    // The others go on: phase 2, and a store added while running.
    let healthy: Vec<&Db> = dbs
        .iter()
        .filter(|d| d.name != "pg-own" && d.name != "sqlite-3")
        .collect();
    fleet.add(&late.name, Arc::new(late.store.clone())).unwrap();
    futures_util::future::join_all(healthy.iter().map(|db| write(db, 10..20))).await;
    write(&late, 0..10).await;
    eventually(
        "the healthy stores deliver",
        Duration::from_secs(90),
        || async {
            healthy.iter().all(|d| delivered(&broker, &d.name, 20))
                && delivered(&broker, "sqlite-late", 10)
        },
    )
    .await;
    assert_eq!(state(&fleet, "pg-own").0, MemberState::Failing);

    // Repair both: they recover and deliver what was committed since, in order.
    own.start();
    dbs[3].store.migrate().await.unwrap();
    write(&dbs[3], 100..105).await;
    write(&dbs[dbs.len() - 1], 10..20).await;
    eventually(
        "the repaired stores deliver",
        Duration::from_secs(90),
        || async { delivered(&broker, "pg-own", 20) && delivered(&broker, "sqlite-3", 15) },
    )
    .await;
    eventually("every member running", Duration::from_secs(30), || async {
        fleet
            .status()
            .iter()
            .all(|s| s.state == MemberState::Running)
    })
    .await;

    let (d, duplicates) = deliveries(&broker);
    for db in dbs.iter().chain([&late]) {
        let expected: Vec<usize> = match db.name.as_str() {
            "sqlite-late" => (0..10).collect(),
            "sqlite-3" => (0..10).chain(100..105).collect(),
            _ => (0..20).collect(),
        };
        for k in 0..KEYS {
            assert_eq!(
                d[&(db.name.clone(), format!("k{k}"))],
                expected,
                "{} key k{k}: first deliveries",
                db.name
            );
        }
    }
    // Only the killed server's last batch may be published twice (its settle was lost).
    assert!(duplicates <= 20, "{duplicates} duplicates");
    let status = fleet.status();
    assert_eq!(status.len(), 30);
    let pg0 = status.iter().find(|s| s.name == "pg-0").unwrap();
    assert_eq!(pg0.published, (KEYS * 20) as u64);

    stop.send(()).unwrap();
    running.await.unwrap();
    assert!(fleet.names().is_empty());
    drop(dbs);
    drop(late);
    for db in pg_dbs {
        let _ = outbox::postgres::sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .execute(&pg_admin)
            .await;
    }
    for db in my_dbs {
        let _ = outbox::mysql::sqlx::query(&format!("DROP DATABASE {db}"))
            .execute(&my_admin)
            .await;
    }
}

/// Two fleets (as two relay processes: each opens the stores itself) over the same 50 stores
/// while writers commit on all of them: everything delivered once, in order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fleets_over_the_same_stores_share_the_work() {
    const STORES: usize = 50;
    const PER_STORE: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let url = |i: usize| format!("sqlite://{}", dir.path().join(format!("t{i}.db")).display());
    let mut dbs = Vec::new();
    for i in 0..STORES {
        dbs.push(open(&format!("t{i}"), &url(i)).await);
    }
    let broker = RecordingPublisher::new();
    let mut fleets = Vec::new();
    for _ in 0..2 {
        let fleet = Fleet::builder(broker.clone())
            .config(RelayConfig {
                poll_interval: Duration::from_millis(50),
                batch_size: 5,
                ..Default::default()
            })
            .max_batches(4)
            .build()
            .unwrap();
        for i in 0..STORES {
            // A store of its own per fleet: separate connections, as another process has.
            let store = AnyStore::connect_with(
                &url(i),
                AnyOptions {
                    table: TABLE.into(),
                    create: false,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            fleet.add(&format!("t{i}"), Arc::new(store)).unwrap();
        }
        fleets.push(fleet);
    }
    futures_util::future::join_all(dbs.iter().map(|db| write(db, 0..PER_STORE))).await;
    eventually("everything delivered", Duration::from_secs(120), || async {
        dbs.iter().all(|d| delivered(&broker, &d.name, PER_STORE))
    })
    .await;
    let (d, duplicates) = deliveries(&broker);
    for db in &dbs {
        for k in 0..KEYS {
            assert_eq!(
                d[&(db.name.clone(), format!("k{k}"))],
                (0..PER_STORE).collect::<Vec<_>>(),
                "{} key k{k}",
                db.name
            );
        }
    }
    assert_eq!(duplicates, 0, "a message published twice");
    // Both fleets did part of the work.
    let per_fleet: Vec<u64> = fleets
        .iter()
        .map(|f| f.status().iter().map(|s| s.published).sum())
        .collect();
    assert!(per_fleet.iter().all(|&n| n > 0), "{per_fleet:?}");
    assert_eq!(
        per_fleet.iter().sum::<u64>(),
        (STORES * PER_STORE * KEYS) as u64
    );
    for f in fleets {
        f.shutdown().await;
    }
}
