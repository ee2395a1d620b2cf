//! `outbox relay --stores FILE` through the real binary: SQLite files and a PostgreSQL table
//! (its URL, with a password, in a url_file) served by one process into Redis; a store that
//! does not exist yet is reported and served once it is migrated; a store added to the file
//! is served without a restart, one removed is let go; `stats --stores` reads them all.
//! No password appears in any output.

use std::collections::HashSet;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_core::conformance::eventually;
use outbox_core::{KeepOrder, Message, Outbox};
use outbox_redis::redis::{self, AsyncCommands};
use outbox_sql::any::{AnyOptions, AnyStore};

const SECRET: &str = "s3cret-fleet-pw";

struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
    for (var, _) in std::env::vars() {
        if var.starts_with("OUTBOX_") || var == "RUST_LOG" {
            c.env_remove(var);
        }
    }
    c
}

/// Open `url`'s outbox table (migrated) and commit `n` keep-order messages, a transaction
/// each, on two keys, to the Redis stream `dest`.
async fn write(url: &str, dest: &str, from: usize, n: usize) {
    let store = AnyStore::connect_with(
        url,
        AnyOptions {
            table: "outbox".into(),
            create: false,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let outbox = Outbox::writer(store.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    for i in from..from + n {
        let mut tx = store.begin().await.unwrap();
        let m = Message::new(dest, i.to_string().into_bytes()).key(format!("k{}", i % 2));
        let after = outbox.enqueue(&mut tx, [m]).await.unwrap();
        tx.commit(after).await.unwrap();
    }
}

/// First deliveries on `dest`, per key, in order; every message id once counted.
async fn delivered(conn: &mut redis::aio::MultiplexedConnection, dest: &str) -> [Vec<usize>; 2] {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(dest).await.unwrap();
    let mut seen = HashSet::new();
    let mut out = [Vec::new(), Vec::new()];
    for e in &reply.ids {
        if !seen.insert(e.get::<String>("id").unwrap()) {
            continue;
        }
        let i: usize = e.get::<String>("payload").unwrap().parse().unwrap();
        out[i % 2].push(i);
    }
    out
}

fn in_order(d: &[Vec<usize>; 2], n: usize) -> bool {
    d[0].len() + d[1].len() == n && d.iter().all(|v| v.windows(2).all(|w| w[0] < w[1]))
}

fn migrate(url: &str) {
    let out = bin().args(["--store", url, "migrate"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_process_serves_a_list_of_stores() {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let dir = tempfile::tempdir().unwrap();
    let redis_url =
        std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let pg = std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    // The same server with a password in the URL (trust auth ignores it): it must never show.
    let pg_url = pg.replacen("postgres@", &format!("postgres:{SECRET}@"), 1);
    let sqlite = |n: &str| format!("sqlite://{}", dir.path().join(format!("{n}.db")).display());
    for s in ["s0", "s1", "s2"] {
        migrate(&sqlite(s));
    }
    // A PostgreSQL outbox of its own: a schema named for this test.
    let schema = format!("fleet{}", &id[20..]);
    let admin = outbox_sql::postgres::sqlx::PgPool::connect(&pg)
        .await
        .unwrap();
    outbox_sql::postgres::sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    let pg_url = if pg_url.contains('?') {
        format!("{pg_url}&options=-csearch_path%3D{schema}")
    } else {
        format!("{pg_url}?options=-csearch_path%3D{schema}")
    };
    migrate(&pg_url);
    let url_file = dir.path().join("pg-url");
    std::fs::write(&url_file, format!("{pg_url}\n")).unwrap();
    let list = dir.path().join("stores.toml");
    let entry =
        |name: &str, url: &str| format!("[[store]]\nname = \"{name}\"\nurl = \"{url}\"\n\n");
    let mut text = String::new();
    for s in ["s0", "s1", "s2"] {
        text += &entry(s, &sqlite(s));
    }
    // A pool of one connection is enough for a store's relay.
    text += &format!(
        "[[store]]\nname = \"pg\"\nurl_file = \"{}\"\nmax_connections = 1\n\n",
        url_file.display()
    );
    text += &entry("broken", &sqlite("broken")); // no such database yet
    std::fs::write(&list, &text).unwrap();
    let dest = |s: &str| format!("fleetcli-{id}-{s}");

    let log = dir.path().join("relay.log");
    let metrics = format!("127.0.0.1:{}", outbox_testkit::free_port());
    let relay = Relay(
        bin()
            .args(["relay", "--stores"])
            .arg(&list)
            .args(["--stores-refresh", "300ms", "--interval", "100ms"])
            .args(["--publisher", &redis_url, "--metrics-addr", &metrics])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut conn = redis::Client::open(redis_url.clone())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for s in ["s0", "s1", "s2"] {
        write(&sqlite(s), &dest(s), 0, 20).await;
    }
    write(&pg_url, &dest("pg"), 0, 20).await;
    eventually(
        "every store's messages in Redis",
        Duration::from_secs(60),
        || {
            let mut conn = conn.clone();
            async move {
                for s in ["s0", "s1", "s2", "pg"] {
                    if !in_order(&delivered(&mut conn, &dest(s)).await, 20) {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;

    // `stats --stores`: a line per store; the missing one says why; exit 1.
    let stats = |json: bool| {
        let mut c = bin();
        c.args(["stats", "--stores"]).arg(&list);
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };
    let out = stats(true);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stores = doc["stores"].as_array().unwrap();
    assert_eq!(stores.len(), 5);
    let by = |n: &str| stores.iter().find(|s| s["name"] == n).unwrap().clone();
    assert_eq!(by("s1")["total"]["sent"], 20);
    assert_eq!(by("pg")["total"]["sent"], 20);
    assert!(
        by("broken")["error"]
            .as_str()
            .unwrap()
            .contains("run `outbox migrate` first"),
        "{doc}"
    );
    let text_out = stats(false);
    let shown = String::from_utf8_lossy(&text_out.stdout);
    assert!(
        shown.contains("broken") && shown.contains("error:"),
        "{shown}"
    );
    assert!(!shown.contains(SECRET) && !String::from_utf8_lossy(&out.stdout).contains(SECRET));

    // A bad list is a configuration error that names the store, not its URL.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!("[[store]]\nname = \"zero\"\nurl = \"{pg_url}\"\nmax_connections = 0\n"),
    )
    .unwrap();
    let out = bin()
        .args(["stats", "--stores"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("store \"zero\"") && err.contains("max_connections must be 1 to 100"),
        "{err}"
    );
    assert!(!err.contains(SECRET), "{err}");

    // `doctor --stores`: every store's checks, named; the missing one fails.
    let out = bin()
        .args(["doctor", "--json", "--stores"])
        .arg(&list)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(SECRET));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks = doc["checks"].as_array().unwrap();
    let status = |store: &str, check: &str| {
        checks
            .iter()
            .find(|c| c["store"] == store && c["check"] == check)
            .map(|c| c["status"].as_str().unwrap().to_owned())
    };
    assert_eq!(status("broken", "store").as_deref(), Some("FAIL"), "{doc}");
    assert_eq!(status("pg", "schema").as_deref(), Some("OK"), "{doc}");
    assert_eq!(status("pg", "notify").as_deref(), Some("OK"), "{doc}");
    assert_eq!(status("s1", "table").as_deref(), Some("OK"), "{doc}");

    // The broken store, once migrated, is served.
    migrate(&sqlite("broken"));
    write(&sqlite("broken"), &dest("broken"), 0, 10).await;
    // A store added to the list, and one removed.
    migrate(&sqlite("added"));
    let text2 = text.replace(&entry("s2", &sqlite("s2")), "") + &entry("added", &sqlite("added"));
    let mut f = std::fs::File::create(&list).unwrap();
    f.write_all(text2.as_bytes()).unwrap();
    drop(f);
    write(&sqlite("added"), &dest("added"), 0, 10).await;
    eventually(
        "the repaired and the added store delivered",
        Duration::from_secs(60),
        || {
            let mut conn = conn.clone();
            async move {
                in_order(&delivered(&mut conn, &dest("broken")).await, 10)
                    && in_order(&delivered(&mut conn, &dest("added")).await, 10)
            }
        },
    )
    .await;
    eventually("s2 let go", Duration::from_secs(30), || async {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .any(|l| l.contains("store left the list") && l.contains("s2"))
    })
    .await;
    // Two messages of s1 due in an hour: its backlog, as a gauge of its own and in the sum.
    {
        let store = AnyStore::connect_with(
            &sqlite("s1"),
            AnyOptions {
                create: false,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let outbox = Outbox::writer(store.clone()).build().unwrap();
        let mut tx = store.begin().await.unwrap();
        let later = (0..2)
            .map(|i| Message::new(dest("s1"), vec![b'0' + i]).delay(Duration::from_secs(3600)));
        let after = outbox.enqueue(&mut tx, later).await.unwrap();
        tx.commit(after).await.unwrap();
    }
    // Per-store metrics: up, what each published, and each one's backlog.
    let scrape = || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&metrics).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    eventually("per-store metrics", Duration::from_secs(10), || async {
        let m = scrape();
        m.contains("outbox_store_up{store=\"s0\"} 1")
            && m.contains("outbox_store_published_total{store=\"s0\"} 20")
            && m.contains("outbox_store_published_total{store=\"broken\"} 10")
            && m.contains("outbox_store_backlog{store=\"s1\"} 2")
            && m.contains("outbox_store_backlog{store=\"s0\"} 0")
            && m.contains("outbox_store_backlog{store=\"*\"} 2")
            && m.contains("outbox_store_oldest_pending_seconds{store=\"s1\"}")
    })
    .await;
    // A list that no longer reads keeps the last good one: s0 is still served.
    std::fs::write(&list, "[[store]]\nname = ").unwrap();
    eventually("the bad read reported", Duration::from_secs(30), || async {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("cannot read the list of stores again")
    })
    .await;
    write(&sqlite("s0"), &dest("s0"), 20, 10).await;
    eventually("s0 still served", Duration::from_secs(30), || {
        let mut conn = conn.clone();
        async move { in_order(&delivered(&mut conn, &dest("s0")).await, 30) }
    })
    .await;
    drop(relay);
    let logged = std::fs::read_to_string(&log).unwrap();
    // The missing store was reported with its reason, retried, then served.
    let broken: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("store=broken"))
        .collect();
    assert!(
        broken.iter().any(
            |l| l.contains("cannot open the store") && l.contains("run `outbox migrate` first")
        ),
        "{logged}"
    );
    assert!(
        broken.iter().any(|l| l.contains("serving the store")),
        "{logged}"
    );
    assert!(!logged.contains(SECRET), "a password in the log");
    for s in ["s0", "s1", "s2", "pg", "broken", "added"] {
        let _: () = conn.del(dest(s)).await.unwrap();
    }
    let _ = outbox_sql::postgres::sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await;
}

/// The list from a catalog database (`--stores-catalog` + `--stores-query`), read again while
/// the relay runs: a tenant inserted into the catalog is served without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_listed_by_a_catalog_query_are_picked_up_while_running() {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let dir = tempfile::tempdir().unwrap();
    let redis_url =
        std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let sqlite = |n: &str| format!("sqlite://{}", dir.path().join(format!("{n}.db")).display());
    let catalog = dir.path().join("catalog.db");
    let cat = rusqlite::Connection::open(&catalog).unwrap();
    cat.execute_batch("CREATE TABLE tenants (name TEXT, db TEXT, active INTEGER)")
        .unwrap();
    for t in ["a", "b"] {
        migrate(&sqlite(t));
    }
    cat.execute(
        "INSERT INTO tenants VALUES ('a', ?1, 1), ('old', 'sqlite:///nowhere.db', 0)",
        [sqlite("a")],
    )
    .unwrap();
    let catalog_url = format!("sqlite://{}", catalog.display());
    let query = "SELECT name, db FROM tenants WHERE active = 1";
    let _relay = Relay(
        bin()
            .args([
                "relay",
                "--stores-catalog",
                &catalog_url,
                "--stores-query",
                query,
            ])
            .args(["--stores-refresh", "300ms", "--interval", "100ms"])
            .args(["--publisher", &redis_url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let dest = |s: &str| format!("fleetcat-{id}-{s}");
    let mut conn = redis::Client::open(redis_url.clone())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    write(&sqlite("a"), &dest("a"), 0, 10).await;
    write(&sqlite("b"), &dest("b"), 0, 10).await;
    eventually("tenant a delivered", Duration::from_secs(30), || {
        let mut conn = conn.clone();
        async move { in_order(&delivered(&mut conn, &dest("a")).await, 10) }
    })
    .await;
    // b is not in the catalog yet: its rows wait. Then it is added.
    let out = bin()
        .args([
            "stats",
            "--stores-catalog",
            &catalog_url,
            "--stores-query",
            query,
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["stores"].as_array().unwrap().len(), 1, "{doc}");
    assert_eq!(doc["stores"][0]["total"]["sent"], 10);
    assert_eq!(
        delivered(&mut conn, &dest("b")).await,
        [Vec::<usize>::new(), Vec::new()]
    );
    cat.execute("INSERT INTO tenants VALUES ('b', ?1, 1)", [sqlite("b")])
        .unwrap();
    eventually(
        "tenant b delivered once listed",
        Duration::from_secs(30),
        || {
            let mut conn = conn.clone();
            async move { in_order(&delivered(&mut conn, &dest("b")).await, 10) }
        },
    )
    .await;
    for s in ["a", "b"] {
        let _: () = conn.del(dest(s)).await.unwrap();
    }
}
