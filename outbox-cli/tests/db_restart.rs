//! PostgreSQL restarted under a running relay process: the relay recovers by itself and
//! publishes everything committed before and after the restart. The test makes a PostgreSQL
//! cluster of its own, on a free port (`pg_createcluster`), and restarts only that one, so the
//! server every other test uses is never disturbed; the cluster is dropped at the end.

use outbox_core::StoreAdmin;
use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_core::conformance::eventually;
use outbox_core::{KeepOrder, Message, Outbox, RecordingPublisher, Store};
use outbox_redis::redis::{self, AsyncCommands};
use outbox_sql::postgres::{PgOptions, PgStore};
use outbox_testkit::PgCluster as Cluster;

struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn commit_with_retry(store: &PgStore, outbox: &Outbox<PgStore>, msgs: Vec<Message>) -> usize {
    let mut failures = 0;
    loop {
        let attempt = async {
            let mut tx = store
                .pool()
                .begin()
                .await
                .map_err(outbox_sql::postgres::map_err)?;
            drop(outbox.enqueue(&mut tx, msgs.clone()).await?);
            tx.commit().await.map_err(outbox_sql::postgres::map_err)
        };
        match attempt.await {
            Ok(()) => return failures,
            Err(e) => {
                assert!(e.is_transient(), "a restart is a transient error: {e}");
                failures += 1;
                assert!(failures < 500, "database did not come back");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_recovers_from_a_postgres_restart() {
    let cluster = Cluster::create(&[]);
    let url = cluster.url();
    let redis_url =
        std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let table = format!("outbox_restart{}", uuid::Uuid::now_v7().simple());
    let store = PgStore::connect_with(
        &url,
        PgOptions {
            table: table.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let key = format!("restart-{}", uuid::Uuid::now_v7().simple());
    let relay = Relay(
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args([
                "--store",
                &url,
                "--table",
                &table,
                "relay",
                "--loop",
                "--publisher",
                &redis_url,
            ])
            .args(["--interval", "200ms", "--max-attempts", "100000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let batch = |from: usize| -> Vec<Message> {
        (from..from + 50)
            .map(|i| {
                Message::new(key.clone(), i.to_string().into_bytes()).key(format!("k{}", i % 3))
            })
            .collect()
    };
    commit_with_retry(&store, &outbox, batch(0)).await;
    eventually("first half published", Duration::from_secs(30), || async {
        store
            .stats()
            .await
            .map(|s| s.total().pending == 0)
            .unwrap_or(false)
    })
    .await;

    cluster.restart();
    let producer_failures = commit_with_retry(&store, &outbox, batch(50)).await;
    eventually(
        "second half published after the restart",
        Duration::from_secs(60),
        || async {
            store
                .stats()
                .await
                .map(|s| s.total().pending == 0 && s.total().sent == 100)
                .unwrap_or(false)
        },
    )
    .await;
    let mut relay = relay;
    assert!(
        relay.0.try_wait().unwrap().is_none(),
        "the relay process kept running through the restart"
    );

    let mut conn = redis::Client::open(redis_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(&key).await.unwrap();
    let _: () = conn.del(&key).await.unwrap();
    let ids: HashSet<String> = reply
        .ids
        .iter()
        .map(|e| e.get::<String>("id").unwrap())
        .collect();
    println!(
        "postgres restart: 100 committed, {} published entries, {} distinct, producer retried {producer_failures} times",
        reply.ids.len(),
        ids.len()
    );
    assert_eq!(ids.len(), 100);
}

/// PostgreSQL killed while a relay drains a backlog, then started again. A claim commits its
/// lease without waiting for the WAL flush, so leases taken just before the kill are lost in
/// recovery: their rows are claimed again. That may publish a message twice, never lose one,
/// and the first deliveries of each unit stay in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_under_the_relay_loses_nothing_and_keeps_first_deliveries_in_order() {
    const KEYS: usize = 3;
    const N: usize = 6_000;
    let cluster = Cluster::create(&[]);
    let url = cluster.url();
    let redis_url =
        std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let table = format!("outbox_crash{}", uuid::Uuid::now_v7().simple());
    let store = PgStore::connect_with(
        &url,
        PgOptions {
            table: table.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let stream = format!("crash-{}", uuid::Uuid::now_v7().simple());
    for from in (0..N).step_by(1_000) {
        let msgs = (from..from + 1_000)
            .map(|i| {
                Message::new(stream.clone(), i.to_string().into_bytes())
                    .key(format!("k{}", i % KEYS))
            })
            .collect();
        commit_with_retry(&store, &outbox, msgs).await;
    }
    // Small batches: many claims, so the kill lands among them.
    let relay = Relay(
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args([
                "--store",
                &url,
                "--table",
                &table,
                "relay",
                "--loop",
                "--publisher",
                &redis_url,
            ])
            .args([
                "--interval",
                "200ms",
                "--max-attempts",
                "100000",
                "--batch",
                "50",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut conn = redis::Client::open(redis_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    eventually("the relay publishing", Duration::from_secs(30), || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { conn.xlen::<_, usize>(&stream).await.unwrap_or(0) >= 300 }
    })
    .await;
    let published_before: usize = conn.xlen(&stream).await.unwrap();
    cluster.crash_and_start();
    eventually(
        "everything published after the crash",
        Duration::from_secs(120),
        || async {
            store
                .stats()
                .await
                .map(|s| s.total().pending == 0)
                .unwrap_or(false)
        },
    )
    .await;
    let mut relay = relay;
    assert!(
        relay.0.try_wait().unwrap().is_none(),
        "the relay process kept running through the crash"
    );
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(&stream).await.unwrap();
    let _: () = conn.del(&stream).await.unwrap();
    assert!(
        published_before < N,
        "the crash came before the relay had published everything ({published_before})"
    );
    let mut seen = std::collections::HashSet::new();
    let mut last: Vec<Option<usize>> = vec![None; KEYS];
    for entry in &reply.ids {
        let id = entry.get::<String>("id").unwrap();
        let i: usize = entry
            .get::<String>("payload")
            .expect("payload field")
            .parse()
            .unwrap();
        if !seen.insert(id) {
            continue; // a duplicate: a consumer that de-duplicates drops it
        }
        let unit = i % KEYS;
        assert!(
            last[unit].is_none_or(|prev| prev < i),
            "unit k{unit}: first delivery of {i} after {:?}",
            last[unit]
        );
        last[unit] = Some(i);
    }
    println!(
        "postgres crash: {N} committed, {published_before} published before the kill, {} entries after, {} distinct",
        reply.ids.len(),
        seen.len()
    );
    assert_eq!(seen.len(), N, "every committed message published");
}
