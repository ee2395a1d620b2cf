//! `outbox relay --wal` SIGKILLed mid-stream while writers keep committing, on a PostgreSQL
//! cluster of the test's own with `wal_level = logical`: a second relay process resumes from
//! the slot, nothing committed is lost, first deliveries stay in commit order per key, and
//! duplicates stay within one unconfirmed window. `outbox migrate --wal` makes the slot and
//! the publication.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_core::conformance::eventually;
use outbox_core::{KeepOrder, Message, Outbox};
use outbox_redis::redis::{self, AsyncCommands};
use outbox_sql::postgres::wal::WalStore;
use outbox_sql::postgres::{PgOptions, PgStore};
use outbox_testkit::PgCluster;

struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn relay(url: &str, table: &str, redis_url: &str) -> Relay {
    Relay(
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["--store", url, "--table", table, "relay", "--wal"])
            .args([
                "--slot",
                "wal_kill",
                "--publication",
                "wal_kill",
                "--publisher",
                redis_url,
            ])
            .args(["--batch", "20"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_relay_killed_mid_stream_loses_nothing_and_keeps_first_deliveries_in_order() {
    const KEYS: usize = 5;
    const TXS: usize = 400;
    const PER_TX: usize = 20;
    let cluster = PgCluster::create(&[
        "wal_level=logical",
        "max_wal_senders=10",
        "max_replication_slots=10",
    ]);
    let url = cluster.url();
    let redis_url =
        std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let table = format!("outbox_walkill{}", uuid::Uuid::now_v7().simple());
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["--store", &url, "--table", &table, "migrate", "--wal"])
        .args(["--slot", "wal_kill", "--publication", "wal_kill"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("slot wal_kill"));
    let pg = PgStore::connect_with(
        &url,
        PgOptions {
            table: table.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let store = WalStore::new(pg, "outbox").unwrap();
    let outbox = Outbox::writer(store.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let stream = format!("walkill-{}", uuid::Uuid::now_v7().simple());

    let first = relay(&url, &table, &redis_url);
    let writer = {
        let (store, outbox, stream) = (store.clone(), outbox.clone(), stream.clone());
        tokio::spawn(async move {
            for t in 0..TXS {
                let msgs: Vec<Message> = (0..PER_TX)
                    .map(|j| {
                        let i = t * PER_TX + j;
                        Message::new(stream.clone(), i.to_string().into_bytes())
                            .key(format!("k{}", i % KEYS))
                    })
                    .collect();
                let mut tx = store.table().pool().begin().await.unwrap();
                let _ = outbox.enqueue(&mut tx, msgs).await.unwrap();
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut conn = redis::Client::open(redis_url.clone())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    eventually(
        "the first relay publishing",
        Duration::from_secs(30),
        || {
            let mut conn = conn.clone();
            let stream = stream.clone();
            async move { conn.xlen::<_, usize>(&stream).await.unwrap_or(0) >= 500 }
        },
    )
    .await;
    drop(first); // SIGKILL
    let published_before: usize = conn.xlen(&stream).await.unwrap();
    let _second = relay(&url, &table, &redis_url);
    writer.await.unwrap();
    let total = TXS * PER_TX;
    assert!(
        published_before < total,
        "the kill came after everything was published"
    );
    eventually(
        "everything published by the second relay",
        Duration::from_secs(60),
        || {
            let mut conn = conn.clone();
            let stream = stream.clone();
            async move {
                let reply: redis::streams::StreamRangeReply =
                    conn.xrange_all(&stream).await.unwrap();
                let ids: HashSet<String> = reply
                    .ids
                    .iter()
                    .map(|e| e.get::<String>("id").unwrap())
                    .collect();
                ids.len() == total
            }
        },
    )
    .await;
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(&stream).await.unwrap();
    let _: () = conn.del(&stream).await.unwrap();
    let mut seen = HashSet::new();
    let mut last: Vec<Option<usize>> = vec![None; KEYS];
    for entry in &reply.ids {
        if !seen.insert(entry.get::<String>("id").unwrap()) {
            continue; // a duplicate: a consumer that de-duplicates drops it
        }
        let i: usize = entry.get::<String>("payload").unwrap().parse().unwrap();
        let unit = i % KEYS;
        assert!(
            last[unit].is_none_or(|prev| prev < i),
            "unit {unit}: first delivery of {i} after {:?}",
            last[unit]
        );
        last[unit] = Some(i);
    }
    assert_eq!(seen.len(), total);
    let duplicates = reply.ids.len() - total;
    // `doctor --wal` sees the set-up, and says what is missing.
    let doctor = |slot: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["--store", &url, "--table", &table, "doctor", "--wal"])
            .args(["--slot", slot, "--publication", "wal_kill"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = doctor("wal_kill");
    assert!(ok, "{text}");
    assert!(
        text.contains("OK    wal        wal_level logical, publication wal_kill, slot wal_kill"),
        "{text}"
    );
    // `stats --wal`: the slot's WAL, in text and JSON.
    let stats = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args([
                "--store", &url, "--table", &table, "stats", "--wal", "--slot", "wal_kill",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        stats(&[]).contains("WAL slot wal_kill: keeps"),
        "{}",
        stats(&[])
    );
    let json: serde_json::Value = serde_json::from_str(&stats(&["--json"])).unwrap();
    assert_eq!(json["wal"]["slot"], "wal_kill");
    assert!(json["wal"]["retained_bytes"].is_u64());
    let (ok, text) = doctor("no_such_slot");
    assert!(!ok, "{text}");
    assert!(
        text.contains("slot no_such_slot does not exist: run `outbox migrate --wal`"),
        "{text}"
    );
    assert!(
        duplicates <= 10_000,
        "{duplicates} duplicates: more than one unconfirmed window"
    );
}
