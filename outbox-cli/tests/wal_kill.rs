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
use outbox_sql::postgres::sqlx;
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

/// `outbox admin --wal` on a free port; killed on drop.
struct Console(Child, String);

impl Console {
    fn start(url: &str, table: &str) -> Console {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args([
                "--store",
                url,
                "--table",
                table,
                "admin",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--wal", "--slot", "wal_kill"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("admin console on http://")
            .and_then(|a| a.strip_suffix('/'))
            .unwrap_or_else(|| panic!("no address line: {line:?}"))
            .to_owned();
        Console(child, addr)
    }

    /// The whole HTTP answer to a GET.
    fn get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.1).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.1
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

impl Drop for Console {
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
    // While the second relay reads, `stats --wal` shows the lag PostgreSQL measures for it
    // (commits with another prefix keep the slot moving).
    eventually(
        "stats --wal shows the relay's lag",
        Duration::from_secs(30),
        || {
            let (pool, url, table) = (store.table().pool().clone(), url.clone(), table.clone());
            async move {
                sqlx::query("SELECT pg_logical_emit_message(true, 'not-outbox', 'x')")
                    .execute(&pool)
                    .await
                    .unwrap();
                let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
                    .args(["--store", &url, "--table", &table, "stats", "--wal"])
                    .args(["--slot", "wal_kill", "--json"])
                    .output()
                    .unwrap();
                let json: serde_json::Value =
                    serde_json::from_slice(&out.stdout).unwrap_or_default();
                json["wal"]["active"] == true && json["wal"]["lag_seconds"].is_f64()
            }
        },
    )
    .await;
    // The console shows the slot on its overview and in `/api/stats`.
    let console = Console::start(&url, &table);
    let page = console.get("/");
    assert!(
        page.contains("WAL slot wal_kill: keeps") && page.contains("a relay is reading it"),
        "{page}"
    );
    let api: serde_json::Value =
        serde_json::from_str(console.get("/api/stats").split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(api["wal"]["slot"], "wal_kill");
    assert_eq!(api["wal"]["active"], true);
    drop(console);
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
    // Table mode needs `<table>_wal` in the publication, which `migrate --wal` (table-less)
    // did not put there.
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "--store",
            &url,
            "--table",
            &table,
            "doctor",
            "--wal",
            "--wal-rows",
        ])
        .args(["--slot", "wal_kill", "--publication", "wal_kill"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "publication wal_kill does not publish {table}_wal (table mode, --wal-rows)"
        )),
        "{text}"
    );
    // A stream filter cannot apply to the WAL relay: refused, not ignored.
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["--store", &url, "--table", &table, "relay", "--wal"])
        .args(["--slot", "wal_kill", "--publication", "wal_kill"])
        .args(["--publisher", &redis_url, "--stream", "a"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--stream does not apply to --wal"), "{err}");
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
