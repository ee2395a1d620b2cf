//! MariaDB under a running relay process, on a server of the test's own (never the one the
//! other tests use): restarted mid-run, and not there yet when the relay starts.

use outbox_core::StoreAdmin;
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_core::conformance::eventually;
use outbox_core::{KeepOrder, Message, Outbox, Store};
use outbox_redis::redis::{self, AsyncCommands};
use outbox_sql::mysql::{MySqlOptions, MySqlStore};
use outbox_testkit::MariaDb;

struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_url() -> String {
    std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

fn relay_process(url: &str, table: &str, stderr: Stdio) -> Relay {
    Relay(
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["--store", url, "--table", table, "relay", "--loop"])
            .args(["--publisher", &redis_url()])
            .args(["--interval", "200ms", "--max-attempts", "100000"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    )
}

async fn store(url: &str, table: &str) -> MySqlStore {
    MySqlStore::connect_with(
        url,
        MySqlOptions {
            table: table.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// Commit `n` keep-order messages from `from`, retrying while the server is away.
async fn commit(url: &str, table: &str, key: &str, from: usize, n: usize) -> usize {
    let msgs: Vec<Message> = (from..from + n)
        .map(|i| Message::new(key, i.to_string().into_bytes()).key(format!("k{}", i % 3)))
        .collect();
    let mut failures = 0;
    loop {
        let attempt = async {
            let s = MySqlStore::connect_with(
                url,
                MySqlOptions {
                    table: table.into(),
                    ..Default::default()
                },
            )
            .await?;
            let outbox = Outbox::writer(s.clone())
                .strategy(KeepOrder::default())
                .build()?;
            let mut tx = s.pool().begin().await.map_err(outbox_sql::mysql::map_err)?;
            drop(outbox.enqueue(&mut tx, msgs.clone()).await?);
            tx.commit().await.map_err(outbox_sql::mysql::map_err)
        };
        match attempt.await {
            Ok(()) => return failures,
            Err(e) => {
                assert!(e.is_transient(), "a restart is a transient error: {e}");
                failures += 1;
                assert!(failures < 500, "MariaDB did not come back");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The Redis stream's distinct message ids (deleting it).
async fn published_ids(key: &str) -> (usize, HashSet<String>) {
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(key).await.unwrap();
    let _: () = conn.del(key).await.unwrap();
    let ids = reply
        .ids
        .iter()
        .map(|e| e.get::<String>("id").unwrap())
        .collect();
    (reply.ids.len(), ids)
}

/// MariaDB restarted under a running relay process: the relay recovers by itself and
/// publishes everything committed before and after the restart, each message at least once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_recovers_from_a_mariadb_restart() {
    let mut db = MariaDb::start();
    let url = db.url();
    let table = "outbox_restart";
    let s = store(&url, table).await;
    s.migrate().await.unwrap();
    let key = format!("restart-my-{}", uuid::Uuid::now_v7().simple());
    let mut relay = relay_process(&url, table, Stdio::null());
    commit(&url, table, &key, 0, 50).await;
    eventually("first half published", Duration::from_secs(30), || async {
        s.stats()
            .await
            .map(|s| s.total().pending == 0)
            .unwrap_or(false)
    })
    .await;

    db.restart();
    let producer_failures = commit(&url, table, &key, 50, 50).await;
    eventually(
        "second half published after the restart",
        Duration::from_secs(60),
        || async {
            s.stats()
                .await
                .map(|s| s.total().pending == 0 && s.total().sent == 100)
                .unwrap_or(false)
        },
    )
    .await;
    assert!(
        relay.0.try_wait().unwrap().is_none(),
        "the relay process kept running through the restart"
    );
    let (entries, ids) = published_ids(&key).await;
    println!(
        "mariadb restart: 100 committed, {entries} published entries, {} distinct, producer retried {producer_failures} times",
        ids.len()
    );
    assert_eq!(ids.len(), 100);
}

/// A relay started with `--loop` before its database is up (or before `migrate` ran) keeps
/// retrying, says so in its log, and publishes once the database and table are there.
/// Without `--loop` it exits at once with one error line (exit 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_relay_waits_for_its_database() {
    let port = outbox_testkit::free_port();
    let url = format!("mysql://root@127.0.0.1:{port}/test");
    let table = "outbox_late";

    let once = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "--store",
            &url,
            "--table",
            table,
            "relay",
            "--publisher",
            "null",
        ])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&once.stderr);
    assert_eq!(once.status.code(), Some(3), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{stderr}"
    );

    let mut relay = relay_process(&url, table, Stdio::piped());
    let lines = BufReader::new(relay.0.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // Two warnings while nothing listens on the port: it is retrying, not exiting.
    let mut warnings = 0;
    while warnings < 2 {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the relay logs while it waits");
        if line.contains("cannot use the store yet") {
            warnings += 1;
        }
    }
    assert!(relay.0.try_wait().unwrap().is_none(), "still running");

    // The database comes up; then the table.
    let _db = MariaDb::start_on(port, &[]);
    let mut saw_table_wait = false;
    while !saw_table_wait {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the relay logs while it waits for the table");
        saw_table_wait = line.contains("does not exist yet");
    }
    let s = store(&url, table).await;
    s.migrate().await.unwrap();
    let key = format!("late-my-{}", uuid::Uuid::now_v7().simple());
    commit(&url, table, &key, 0, 10).await;
    eventually(
        "published once the database is there",
        Duration::from_secs(60),
        || async {
            s.stats()
                .await
                .map(|s| s.total().sent == 10)
                .unwrap_or(false)
        },
    )
    .await;
    assert!(relay.0.try_wait().unwrap().is_none());
    let (_, ids) = published_ids(&key).await;
    assert_eq!(ids.len(), 10);
}
