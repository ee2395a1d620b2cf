//! `outbox admin` through the real binary and real HTTP, on SQLite and PostgreSQL: every page
//! and API call, bad input (a 4xx with a clear message, nothing changed), the actions with
//! their confirmation and CSRF token, read-only, hidden payloads, the token, escaping.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use outbox_core::{Error, FaultyPublisher, KeepOrder, Message, Outbox, RecordingPublisher, Store};
use serde_json::Value;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
    for (var, _) in std::env::vars() {
        if var.starts_with("OUTBOX_") || var == "RUST_LOG" {
            c.env_remove(var);
        }
    }
    c
}

/// A running console; killed on drop.
struct Console {
    child: Child,
    addr: String,
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn console(store: &str, extra: &[&str]) -> Console {
    console_with_env(store, extra, &[])
}

/// A console with environment variables of its own.
fn console_with_env(store: &str, extra: &[&str], env: &[(&str, &std::path::Path)]) -> Console {
    spawn_console(&["--store", store], extra, env)
}

/// `outbox <before> admin --listen 127.0.0.1:0 … <extra>`, once it listens.
fn spawn_console(before: &[&str], extra: &[&str], env: &[(&str, &std::path::Path)]) -> Console {
    let mut child = bin()
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .args(before)
        .args([
            "admin",
            "--listen",
            "127.0.0.1:0",
            "--sample-every",
            "200ms",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("admin console on http://")
        .and_then(|a| a.strip_suffix('/'))
        .unwrap_or_else(|| panic!("no address line: {line:?}"))
        .to_owned();
    Console { child, addr }
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn http(c: &Console, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut s = TcpStream::connect(&c.addr).unwrap();
    // The console's own address as `Host`, unless the test names another.
    let host = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map_or(c.addr.as_str(), |(_, v)| v);
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
    {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

fn get(c: &Console, path: &str) -> Reply {
    http(c, "GET", path, &[], "")
}

fn form(c: &Console, fields: &[(&str, &str)]) -> Reply {
    let body = fields
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace(' ', "+")))
        .collect::<Vec<_>>()
        .join("&");
    http(
        c,
        "POST",
        "/actions",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &body,
    )
}

fn csrf(c: &Console) -> String {
    get(c, "/api/csrf").json()["csrf"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn total(c: &Console) -> Value {
    get(c, "/api/stats").json()["total"].clone()
}

/// Three keep-order messages (JSON, a `<script>` payload, bytes) and two dead letters,
/// written through the library.
mod rows {
    use super::*;

    pub async fn sqlite(dir: &tempfile::TempDir) -> String {
        let db = dir.path().join("app.db");
        let url = format!("sqlite://{}", db.display());
        assert!(bin()
            .args(["--store", &url, "migrate"])
            .status()
            .unwrap()
            .success());
        let store = outbox_sqlite::SqliteStore::open(&db).unwrap();
        let keep = Outbox::writer(store.clone())
            .strategy(KeepOrder::default())
            .build()
            .unwrap();
        let failing = FaultyPublisher::new(RecordingPublisher::new(), |_| {
            Some(Error::permanent("rejected"))
        });
        let dead = Outbox::builder(store.clone(), failing).build().unwrap();
        let mut conn = store.connect().unwrap();
        let mut tx = conn.transaction().unwrap();
        drop(keep.enqueue_blocking(&mut tx, messages()).unwrap());
        let after = dead
            .enqueue_blocking(
                &mut tx,
                (0..2).map(|i| Message::new("mail", vec![b'0' + i]).stream("emails")),
            )
            .unwrap();
        tx.commit().unwrap();
        assert_eq!(after.publish().await.failed, 2);
        url
    }

    pub async fn postgres(table: &str) -> String {
        let base = std::env::var("OUTBOX_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        // A password in the URL (trust auth ignores it): it must never reach a page.
        let url = base.replacen("postgres://postgres@", "postgres://postgres:s3cret-pw@", 1);
        let store = outbox_sql::postgres::PgStore::connect_with(
            &base,
            outbox_sql::postgres::PgOptions {
                table: table.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        store.migrate().await.unwrap();
        let keep = Outbox::writer(store.clone())
            .strategy(KeepOrder::default())
            .build()
            .unwrap();
        let failing = FaultyPublisher::new(RecordingPublisher::new(), |_| {
            Some(Error::permanent("rejected"))
        });
        let dead = Outbox::builder(store.clone(), failing).build().unwrap();
        let mut tx = store.pool().begin().await.unwrap();
        drop(keep.enqueue(&mut tx, messages()).await.unwrap());
        let after = dead
            .enqueue(
                &mut tx,
                (0..2).map(|i| Message::new("mail", vec![b'0' + i]).stream("emails")),
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(after.publish().await.failed, 2);
        url
    }

    /// `n` more dead letters to `destination` in stream "emails" (keys k0, k1, ...).
    pub async fn dead(dir: &tempfile::TempDir, destination: &str, n: usize) {
        let store = outbox_sqlite::SqliteStore::open(dir.path().join("app.db")).unwrap();
        let failing = FaultyPublisher::new(RecordingPublisher::new(), |_| {
            Some(Error::permanent("rejected"))
        });
        let dead = Outbox::builder(store.clone(), failing).build().unwrap();
        let mut conn = store.connect().unwrap();
        let mut tx = conn.transaction().unwrap();
        let after = dead
            .enqueue_blocking(
                &mut tx,
                (0..n).map(|i| {
                    Message::new(destination, vec![b'0'])
                        .stream("emails")
                        .key(format!("k{i}"))
                }),
            )
            .unwrap();
        tx.commit().unwrap();
        assert_eq!(after.publish().await.failed, n);
    }

    fn messages() -> Vec<Message> {
        vec![
            Message::new("orders.placed", br#"{"id":7,"items":[1,2]}"#.to_vec())
                .stream("orders")
                .key("k"),
            Message::new(
                "orders.note",
                b"<script>document.title='owned'</script>".to_vec(),
            )
            .stream("orders")
            .key("k")
            .header("x-note", "<b>bold</b>"),
            Message::new("orders.bin", vec![0, 159, 146, 150])
                .stream("orders")
                .key("k"),
        ]
    }
}

async fn exercise(store_url: &str, table: Option<&str>) {
    let table_args: Vec<&str> = table.map(|t| vec!["--table", t]).unwrap_or_default();
    let c = console(store_url, &table_args);

    // Overview: counts, parked units, the chart; security headers on every page.
    let o = get(&c, "/");
    assert_eq!(o.status, 200);
    assert!(
        o.body.contains("id=\"streams\"") && o.body.contains("orders"),
        "{}",
        o.body
    );
    assert!(o
        .headers
        .contains("content-security-policy: default-src 'none'"));
    assert!(o.headers.contains("x-frame-options: deny"));
    assert!(
        !o.body.contains("s3cret-pw"),
        "the store password is on the page"
    );
    assert!(get(&c, "/chart.svg").body.starts_with("<svg"));
    assert_eq!(get(&c, "/style.css").status, 200);
    assert_eq!(total(&c)["pending"], 3);
    assert_eq!(total(&c)["dead"], 2);

    // Messages: filters, pages, the message page; escaping.
    let page = get(&c, "/messages?stream=orders&limit=2");
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("id=\"next\""),
        "two of three: a next page"
    );
    let api = get(&c, "/api/messages?stream=orders&limit=2").json();
    let next = api["next_before"].as_i64().unwrap();
    let rest = get(
        &c,
        &format!("/api/messages?stream=orders&limit=2&before={next}"),
    )
    .json();
    assert_eq!(rest["messages"].as_array().unwrap().len(), 1);
    let all = get(&c, "/api/messages?stream=orders").json();
    let seq_of = |dest: &str| {
        all["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == dest)
            .unwrap()["seq"]
            .as_i64()
            .unwrap()
    };
    let json_page = get(&c, &format!("/messages/{}", seq_of("orders.placed")));
    assert!(
        json_page.body.contains("&quot;items&quot;: ["),
        "pretty JSON: {}",
        json_page.body
    );
    let script = get(&c, &format!("/messages/{}", seq_of("orders.note")));
    assert!(script.body.contains("&lt;script&gt;document.title"));
    assert!(!script.body.contains("<script>"), "a payload became markup");
    assert!(script.body.contains("&lt;b&gt;bold&lt;/b&gt;"));
    let bin = get(&c, &format!("/messages/{}", seq_of("orders.bin")));
    assert!(bin.body.contains("shown as hex") && bin.body.contains(" 00 9f 92 96"));
    let one = get(&c, &format!("/api/messages/{}", seq_of("orders.placed"))).json();
    assert_eq!(one["payload"]["text"], r#"{"id":7,"items":[1,2]}"#);
    let dead = get(&c, "/api/messages?status=dead").json();
    let dead: Vec<i64> = dead["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(dead.len(), 2);

    // One JSON shape per figure: the command and the API print the same documents.
    let cli = |args: &[&str]| -> Value {
        let out = self::bin()
            .args(["--store", store_url])
            .args(&table_args)
            .args(["--json"])
            .args(args)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    assert_eq!(
        cli(&["dead", "list"]),
        get(&c, "/api/messages?status=dead").json(),
        "dead letters"
    );
    let (from_cli, from_api) = (cli(&["stats"]), get(&c, "/api/stats").json());
    for doc in [&from_cli, &from_api] {
        assert!(
            doc["total"]["oldest_pending_seconds"].as_f64().unwrap() >= 0.0,
            "{doc}"
        );
    }
    assert_eq!(
        from_cli["total"]["oldest_pending_at_ms"],
        from_api["total"]["oldest_pending_at_ms"]
    );
    let keys = |d: &Value| {
        d["total"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&from_cli), keys(&from_api));

    // Bad input: a 4xx saying what is wrong.
    for (path, status, says) in [
        ("/messages?status=lost", 400, "use pending, sent or dead"),
        (
            "/api/messages?status=lost",
            400,
            "use pending, sent or dead",
        ),
        ("/api/messages?id=nope", 400, "is not a UUID"),
        ("/api/messages?limit=100000", 400, "use 1 to 500"),
        ("/api/messages?before=abc", 400, "is not a row number"),
        ("/api/messages/99999", 404, "no row 99999"),
        ("/messages/abc", 400, "is not a row number"),
    ] {
        let r = get(&c, path);
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(r.body.contains(says), "{path}: {}", r.body);
    }

    // Actions: token, confirmation, the count.
    let token = csrf(&c);
    let seq = dead[0].to_string();
    let r = form(&c, &[("action", "requeue"), ("seq", &seq)]);
    assert_eq!(r.status, 403, "no CSRF token");
    let r = form(
        &c,
        &[("csrf", &token), ("action", "requeue"), ("seq", &seq)],
    );
    assert!(r.body.contains("id=\"question\""), "asks first: {}", r.body);
    assert_eq!(
        total(&c)["dead"],
        2,
        "nothing changed before the confirmation"
    );
    let r = form(
        &c,
        &[
            ("csrf", &token),
            ("action", "requeue"),
            ("seq", &seq),
            ("confirm", "yes"),
        ],
    );
    assert!(r.body.contains("Requeued 1 dead letter"), "{}", r.body);
    assert_eq!(total(&c)["dead"], 1);
    // The requeued row keeps its last error, shown (hidden below with --hide-payloads).
    assert!(get(&c, "/messages?stream=emails").body.contains("rejected"));
    assert_eq!(
        get(&c, "/api/messages?stream=emails").json()["messages"][0]["last_error"],
        "Publish (Permanent): rejected"
    );
    for (body, says) in [
        (r#"{"action":"explode","all":true}"#, "unknown action"),
        (r#"{"action":"purge"}"#, "choose the dead letters"),
        (
            r#"{"action":"resume","stream":"orders","unit":"nope"}"#,
            "not parked",
        ),
        ("not json", "not JSON"),
    ] {
        let r = http(
            &c,
            "POST",
            "/api/actions",
            &[
                ("X-CSRF-Token", &token),
                ("Content-Type", "application/json"),
            ],
            body,
        );
        assert!((400..500).contains(&r.status), "{body}: {}", r.status);
        assert!(r.body.contains(says), "{body}: {}", r.body);
    }
    assert_eq!(total(&c)["dead"], 1, "bad input changed nothing");
    let api_action = |body: &str| {
        http(
            &c,
            "POST",
            "/api/actions",
            &[
                ("X-CSRF-Token", &token),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    };
    let r = api_action(r#"{"action":"purge","stream":"emails"}"#);
    assert_eq!(r.json()["changed"], 1, "{}", r.body);
    assert_eq!(r.json()["action"], "purge", "{}", r.body);
    let r = http(
        &c,
        "POST",
        "/api/actions",
        &[],
        r#"{"action":"purge","all":true}"#,
    );
    assert_eq!(r.status, 403, "the API needs the CSRF header too");
    // Units: park, list, resume.
    assert_eq!(
        api_action(r#"{"action":"park","stream":"orders","unit":"k"}"#).status,
        200
    );
    let parked = get(&c, "/api/parked").json();
    assert_eq!(parked["parked"][0]["pending"], 3);
    assert_eq!(cli(&["parked"]), parked, "parked units");
    assert!(get(&c, "/").body.contains("value=\"resume\""));
    let r = form(
        &c,
        &[
            ("csrf", &token),
            ("action", "resume"),
            ("stream", "orders"),
            ("unit", "k"),
            ("confirm", "yes"),
        ],
    );
    assert!(r.body.contains("Resumed unit"), "{}", r.body);
    assert!(get(&c, "/api/parked").json()["parked"]
        .as_array()
        .unwrap()
        .is_empty());
    drop(c);

    // Read-only and hidden payloads.
    let mut args = table_args.clone();
    args.extend(["--read-only", "--hide-payloads"]);
    let c = console(store_url, &args);
    let page = get(&c, &format!("/messages/{}", seq_of("orders.note")));
    assert!(page.body.contains("Hidden (--hide-payloads)"));
    assert!(!page.body.contains("document.title"), "payload shown");
    assert!(get(&c, "/api/messages?stream=orders").json()["messages"][0]["payload"].is_null());
    // Header values and last errors (which can quote a payload) are hidden too.
    assert!(!page.body.contains("&lt;b&gt;bold"), "a header value shown");
    let note = get(&c, "/api/messages?stream=orders").json();
    let note = note["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == "orders.note")
        .unwrap()
        .clone();
    assert!(note["headers"]["x-note"].is_null(), "{note}");
    let emails = get(&c, "/messages?stream=emails");
    assert!(!emails.body.contains("rejected"), "a last error shown");
    assert!(get(&c, "/api/messages?stream=emails").json()["messages"][0]["last_error"].is_null());
    assert!(!get(&c, "/messages?status=dead")
        .body
        .contains("<form method=\"post\""));
    let r = form(
        &c,
        &[
            ("csrf", &csrf(&c)),
            ("action", "purge"),
            ("all", "1"),
            ("confirm", "yes"),
        ],
    );
    assert_eq!(r.status, 403);
    assert!(r.body.contains("read-only"));
}

#[tokio::test]
async fn console_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = rows::sqlite(&dir).await;
    exercise(&url, None).await;
}

#[tokio::test]
async fn console_on_postgres() {
    let table = format!("admin_{}", uuid::Uuid::now_v7().simple());
    let url = rows::postgres(&table).await;
    exercise(&url, Some(&table)).await;
}

/// Beyond loopback a token is required; with one, requests without it get 401.
#[tokio::test]
async fn the_token_guards_the_console() {
    let dir = tempfile::tempdir().unwrap();
    let url = rows::sqlite(&dir).await;
    let out = bin()
        .args(["--store", &url, "admin", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs --auth-token"), "{err}");

    let token = "a-long-enough-token-0123";
    let c = console(&url, &["--auth-token", token]);
    let r = get(&c, "/");
    assert_eq!(r.status, 401);
    assert!(!r.body.contains("orders"));
    assert_eq!(get(&c, "/api/stats").status, 401);
    let bearer = format!("Bearer {token}");
    assert_eq!(
        http(&c, "GET", "/", &[("Authorization", &bearer)], "").status,
        200
    );
    assert_eq!(
        http(
            &c,
            "GET",
            "/",
            &[("Authorization", "Bearer wrong-token-0123456")],
            ""
        )
        .status,
        401
    );
    // Login is a POST (the token never goes in a URL) that hands out a session id: the
    // cookie is not the token.
    assert_eq!(get(&c, "/login").status, 200);
    let urlencoded = [("Content-Type", "application/x-www-form-urlencoded")];
    let login = http(&c, "POST", "/login", &urlencoded, &format!("token={token}"));
    assert_eq!(login.status, 303, "{}", login.body);
    assert!(login.headers.contains("httponly") && login.headers.contains("samesite=strict"));
    assert!(!login.headers.contains(token), "the cookie is the token");
    let session = login
        .headers
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_owned();
    assert!(session.starts_with("outbox_session="), "{session}");
    assert_eq!(
        http(&c, "GET", "/messages", &[("Cookie", &session)], "").status,
        200
    );
    let token_as_cookie = format!("outbox_session={token}");
    assert_eq!(
        http(&c, "GET", "/messages", &[("Cookie", &token_as_cookie)], "").status,
        401
    );
    let behind_tls = http(
        &c,
        "POST",
        "/login",
        &[urlencoded[0], ("X-Forwarded-Proto", "https")],
        &format!("token={token}"),
    );
    assert!(
        behind_tls.headers.contains("; secure"),
        "{}",
        behind_tls.headers
    );
    assert_eq!(
        http(
            &c,
            "POST",
            "/login",
            &urlencoded,
            "token=wrong-token-0123456"
        )
        .status,
        401
    );
    // Wrong tokens are answered one at a time, slowly: eight guesses at once take at least
    // eight delays (250 ms each), so guessing a token is hopeless.
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for i in 0..8 {
            let c = &c;
            scope.spawn(move || {
                let wrong = format!("Bearer wrong-token-{i:06}");
                assert_eq!(
                    http(c, "GET", "/api/stats", &[("Authorization", &wrong)], "").status,
                    401
                );
            });
        }
    });
    assert!(started.elapsed() >= std::time::Duration::from_millis(8 * 250));
    // A token may come from a file (not the command line, where `ps` shows it).
    let file = dir.path().join("admin-token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let from_file = console_with_env(&url, &[], &[("OUTBOX_ADMIN_TOKEN_FILE", &file)]);
    assert_eq!(get(&from_file, "/api/stats").status, 401);
    assert_eq!(
        http(
            &from_file,
            "GET",
            "/api/stats",
            &[("Authorization", &bearer)],
            ""
        )
        .status,
        200
    );
}

/// DNS rebinding: a page on a name re-bound to 127.0.0.1 is same-origin with the console, so
/// without a token only the loopback names with the console's port are answered; and a
/// change must come from the console's own origin.
#[tokio::test]
async fn only_its_own_host_and_origin_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let url = rows::sqlite(&dir).await;
    let c = console(&url, &[]);
    let port = c.addr.rsplit_once(':').unwrap().1.to_owned();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
    ] {
        let r = http(&c, "GET", "/api/stats", &[("Host", &host)], "");
        assert_eq!(r.status, 200, "{host}: {}", r.body);
    }
    for host in [
        format!("rebound.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
        "127.0.0.1:1".to_owned(),
        "localhost".to_owned(),
        String::new(),
    ] {
        let r = http(&c, "GET", "/api/csrf", &[("Host", &host)], "");
        assert_eq!(r.status, 421, "{host:?}: {}", r.body);
        assert!(
            !r.body.contains("csrf\""),
            "{host:?}: the CSRF token leaked"
        );
    }
    // A POST from another origin is refused even with the CSRF token; nothing changes.
    let token = csrf(&c);
    let purge_all = format!("csrf={token}&action=purge&all=1&confirm=yes");
    let form_type = ("Content-Type", "application/x-www-form-urlencoded");
    for (name, value) in [
        ("Origin", "http://rebound.example".to_owned()),
        ("Origin", "null".to_owned()),
        ("Origin", format!("http://127.0.0.1:{port}.evil")),
        ("Sec-Fetch-Site", "cross-site".to_owned()),
        ("Sec-Fetch-Site", "same-site".to_owned()),
    ] {
        let r = http(
            &c,
            "POST",
            "/actions",
            &[form_type, (name, &value)],
            &purge_all,
        );
        assert_eq!(r.status, 403, "{name}: {value}: {}", r.body);
        let api = http(
            &c,
            "POST",
            "/api/actions",
            &[("X-CSRF-Token", &token), (name, &value)],
            r#"{"action":"purge","all":true}"#,
        );
        assert_eq!(api.status, 403, "{name}: {value}: {}", api.body);
    }
    assert_eq!(
        total(&c)["dead"],
        2,
        "a cross-origin POST changed something"
    );
    // The console's own pages may.
    let own = format!("http://{}", c.addr);
    let r = http(
        &c,
        "POST",
        "/actions",
        &[
            form_type,
            ("Origin", &own),
            ("Sec-Fetch-Site", "same-origin"),
        ],
        &format!("csrf={token}&action=requeue&all=1&stream=emails&confirm=yes"),
    );
    assert!(r.body.contains("Requeued 2 dead letter(s)"), "{}", r.body);
}

/// "All" on a filtered page means every dead letter matching every filter of the page (not
/// the whole stream); the confirmation says how many and shows them; the API takes the same
/// filters.
#[tokio::test]
async fn all_means_all_that_match_the_filters() {
    let dir = tempfile::tempdir().unwrap();
    let url = rows::sqlite(&dir).await; // two dead letters to "mail" in stream "emails"
    rows::dead(&dir, "email.bounce", 3).await;
    rows::dead(&dir, "email.welcome", 2).await;
    let c = console(&url, &[]);
    assert_eq!(total(&c)["dead"], 7);
    let page = get(
        &c,
        "/messages?status=dead&stream=emails&destination=email.bounce",
    );
    // The "all of them" form carries every filter of the page.
    let all_form = page.body.rsplit("<form method=\"post\"").next().unwrap();
    assert!(all_form.contains("Purge all of them"), "{all_form}");
    let mut fields: Vec<(String, String)> = all_form
        .split("<input type=\"hidden\" ")
        .skip(1)
        .map(|i| {
            let attr = |a: &str| {
                i.split(&format!("{a}=\""))
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
                    .to_owned()
            };
            (attr("name"), attr("value"))
        })
        .collect();
    assert!(
        fields.contains(&("destination".into(), "email.bounce".into())),
        "{fields:?}"
    );
    fields.push(("action".into(), "purge".into()));
    let body = |fields: &[(String, String)]| {
        fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    };
    let form_type = [("Content-Type", "application/x-www-form-urlencoded")];
    let ask = http(&c, "POST", "/actions", &form_type, &body(&fields));
    assert!(
        ask.body.contains("Delete for good 3 dead letter(s) (stream &quot;emails&quot;, destination &quot;email.bounce&quot;)?"),
        "{}",
        ask.body
    );
    let listed = ask.body.split("id=\"affected\"").nth(1).unwrap();
    assert_eq!(
        listed.matches("<td>email.bounce</td>").count(),
        3,
        "{listed}"
    );
    assert!(!listed.contains("email.welcome") && !listed.contains("<td>mail</td>"));
    assert_eq!(
        total(&c)["dead"],
        7,
        "nothing changed before the confirmation"
    );
    fields.push(("confirm".into(), "yes".into()));
    let done = http(&c, "POST", "/actions", &form_type, &body(&fields));
    assert!(
        done.body.contains("Purged 3 dead letter(s)"),
        "{}",
        done.body
    );
    assert_eq!(total(&c)["dead"], 4, "only the filtered dead letters went");
    let left = get(&c, "/api/messages?status=dead").json();
    let dests: Vec<&str> = left["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["destination"].as_str().unwrap())
        .collect();
    assert!(!dests.contains(&"email.bounce"), "{dests:?}");
    // The API: the same filters, key included.
    let token = csrf(&c);
    let r = http(
        &c,
        "POST",
        "/api/actions",
        &[("X-CSRF-Token", &token)],
        r#"{"action":"requeue","all":true,"destination":"email.welcome","key":"k1"}"#,
    );
    assert_eq!(r.json()["changed"], 1, "{}", r.body);
    assert_eq!(total(&c)["dead"], 3);
    let r = http(
        &c,
        "POST",
        "/api/actions",
        &[("X-CSRF-Token", &token)],
        r#"{"action":"purge","seqs":[1],"destination":"x"}"#,
    );
    assert_eq!(r.status, 400, "seq and filters together: {}", r.body);
}

/// Finding one message and reading a backlog: a stream drop-down, how many match, the
/// dead letters grouped by error, and a large payload shown in part with a download link.
#[tokio::test]
async fn finding_messages_and_reading_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let url = rows::sqlite(&dir).await; // two dead letters in "emails"
    rows::dead(&dir, "email.bounce", 3).await;
    // A 600 KB JSON payload (the report had a 507 KB one make a 42 000-line page).
    let big: Vec<serde_json::Value> = (0..20000)
        .map(|i| serde_json::json!({ "line": i, "text": "padding" }))
        .collect();
    let big = serde_json::to_vec(&big).unwrap();
    {
        let store = outbox_sqlite::SqliteStore::open(dir.path().join("app.db")).unwrap();
        let writer = Outbox::writer(store.clone()).build().unwrap();
        let mut conn = store.connect().unwrap();
        let mut tx = conn.transaction().unwrap();
        drop(
            writer
                .enqueue_blocking(
                    &mut tx,
                    [Message::new("big.one", big.clone()).stream("bulk")],
                )
                .unwrap(),
        );
        tx.commit().unwrap();
    }
    let c = console(&url, &[]);

    let overview = get(&c, "/").body;
    let errors = overview
        .split("id=\"errors\"")
        .nth(1)
        .expect("dead letters by error");
    assert!(
        errors.contains("<td class=\"n\">5</td><td>Publish (Permanent): rejected</td>"),
        "{errors}"
    );
    let page = get(&c, "/messages?status=dead&stream=emails");
    for stream in ["emails", "orders", "bulk"] {
        assert!(
            page.body.contains(&format!("<option value=\"{stream}\"")),
            "{stream} missing from the drop-down"
        );
    }
    assert!(page.body.contains("<option value=\"emails\" selected>"));
    assert!(
        page.body
            .contains("5 shown of 5 dead messages in stream emails"),
        "{}",
        page.body
    );
    let one = get(&c, "/messages?status=dead&stream=emails&limit=2").body;
    assert!(one.contains("2 shown of 5 dead messages"), "{one}");

    let listed = get(&c, "/api/messages?stream=bulk").json();
    let seq = listed["messages"][0]["seq"].as_i64().unwrap();
    let page = get(&c, &format!("/messages/{seq}"));
    assert!(page.body.contains("cut short") && page.body.contains("id=\"download\""));
    assert!(
        page.body.len() < 200_000,
        "the page holds {} bytes of a {}-byte payload",
        page.body.len(),
        big.len()
    );
    let download = get(&c, &format!("/messages/{seq}/payload"));
    assert_eq!(download.status, 200);
    assert!(download.headers.contains("content-disposition: attachment"));
    assert_eq!(download.body.len(), big.len());
    drop(c);
    let hidden = console(&url, &["--hide-payloads"]);
    assert_eq!(
        get(&hidden, &format!("/messages/{seq}/payload")).status,
        403
    );
}

/// A free port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chromedriver on a port of its own; killed on drop.
struct Driver(Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chromedriver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (apt chromium-driver; scripts/setup.sh installs it)");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "chromedriver did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Driver(child, port)
}

async fn browser(driver: &Driver) -> fantoccini::Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,800"],
        }),
    );
    fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.1))
        .await
        .expect("a WebDriver session with headless Chromium")
}

/// Wait (at most 10 s) for an element to be on the page.
async fn wait_for(b: &fantoccini::Client, css: &str) -> fantoccini::elements::Element {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Ok(e) = b.find(fantoccini::Locator::Css(css)).await {
            return e;
        }
        let url = b.current_url().await.unwrap();
        assert!(std::time::Instant::now() < deadline, "no {css} at {url}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Where the screenshots go: OUTBOX_SCREENSHOTS, else the test's temporary folder. The ones in
/// docs/ were made with `OUTBOX_SCREENSHOTS=docs cargo test -p outbox-cli --test admin browser`.
fn screenshot_dir() -> std::path::PathBuf {
    match std::env::var_os("OUTBOX_SCREENSHOTS") {
        Some(d) => {
            let d = std::path::PathBuf::from(d);
            if d.is_relative() {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("..")
                    .join(d)
            } else {
                d
            }
        }
        None => std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    }
}

/// The console in a real browser (headless Chromium through WebDriver): the overview, a
/// filter down to one message, its page (a `<script>` payload shown, not run), a dead letter
/// requeued through the confirmation with the counts changing, and 401 without the token.
#[tokio::test]
async fn in_a_real_browser() {
    use fantoccini::Locator;
    let dir = tempfile::tempdir().unwrap();
    let url = rows::sqlite(&dir).await;
    let c = console(&url, &[]);
    let driver = chromedriver();
    let b = browser(&driver).await;
    let base = format!("http://{}", c.addr);
    let shots = screenshot_dir();
    std::fs::create_dir_all(&shots).unwrap();

    // The chart draws once it has two samples (every 200 ms here).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while get(&c, "/chart.svg").body.contains("Collecting samples") {
        assert!(std::time::Instant::now() < deadline, "no second sample");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    b.goto(&format!("{base}/")).await.unwrap();
    let streams = b
        .find(Locator::Css("#streams"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        streams.contains("orders") && streams.contains("emails"),
        "{streams}"
    );
    std::fs::write(
        shots.join("admin-overview.png"),
        b.screenshot().await.unwrap(),
    )
    .unwrap();

    // Filter down to one message and open it.
    b.goto(&format!("{base}/messages")).await.unwrap();
    b.find(Locator::Css("input[name=destination]"))
        .await
        .unwrap()
        .send_keys("orders.note")
        .await
        .unwrap();
    b.find(Locator::Id("filter"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The filtered page: one message matches (the old page may linger a moment).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let rows = loop {
        let url = b.current_url().await.unwrap();
        let rows = b.find_all(Locator::Css("#messages tr td a")).await.unwrap();
        if url.as_str().contains("destination=orders.note") && rows.len() == 1 {
            break rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} rows at {url}",
            rows.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    rows[0].click().await.unwrap();
    wait_for(&b, "#payload").await;
    let payload = b
        .find(Locator::Id("payload"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        payload.contains("<script>document.title='owned'</script>"),
        "{payload}"
    );
    let title = b.title().await.unwrap();
    assert!(
        title.starts_with("Message "),
        "the payload's script ran: title {title:?}"
    );
    std::fs::write(
        shots.join("admin-message.png"),
        b.screenshot().await.unwrap(),
    )
    .unwrap();

    // Requeue a dead letter: its page, the confirmation, the result, the counts.
    let dead_before = total(&c)["dead"].as_u64().unwrap();
    b.goto(&format!("{base}/messages?status=dead"))
        .await
        .unwrap();
    let first = b.find(Locator::Css("#messages tr td a")).await.unwrap();
    first.click().await.unwrap();
    wait_for(&b, "#requeue").await;
    b.find(Locator::Id("requeue"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let question = wait_for(&b, "#question").await.text().await.unwrap();
    assert!(question.starts_with("Requeue 1 dead letter"), "{question}");
    b.find(Locator::Id("confirm"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let result = wait_for(&b, "#result").await.text().await.unwrap();
    assert!(
        result.starts_with("Requeued 1 dead letter(s) (seq "),
        "{result}"
    );
    assert_eq!(total(&c)["dead"].as_u64().unwrap(), dead_before - 1);
    b.goto(&format!("{base}/")).await.unwrap();
    let streams = b
        .find(Locator::Css("#streams"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        streams.contains(&format!("emails {} 0 {}", 1, dead_before - 1)),
        "{streams}"
    );

    // "Purge all of them" on a page filtered by destination: the confirmation counts and
    // lists those dead letters, and only they go.
    rows::dead(&dir, "email.bounce", 2).await;
    let dead_now = total(&c)["dead"].as_u64().unwrap();
    b.goto(&format!(
        "{base}/messages?status=dead&destination=email.bounce"
    ))
    .await
    .unwrap();
    wait_for(&b, "#purge-all").await.click().await.unwrap();
    let question = wait_for(&b, "#question").await.text().await.unwrap();
    assert_eq!(
        question,
        "Delete for good 2 dead letter(s) (destination \"email.bounce\")?"
    );
    let listed = b
        .find(Locator::Id("affected"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(listed.matches("email.bounce").count(), 2, "{listed}");
    std::fs::write(
        shots.join("admin-confirm.png"),
        b.screenshot().await.unwrap(),
    )
    .unwrap();
    b.find(Locator::Id("confirm"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let result = wait_for(&b, "#result").await.text().await.unwrap();
    assert!(result.starts_with("Purged 2 dead letter(s)"), "{result}");
    assert_eq!(total(&c)["dead"].as_u64().unwrap(), dead_now - 2);

    // With a token, the browser gets 401 until it logs in.
    let guarded = console(&url, &["--auth-token", "browser-token-0123456789"]);
    let gbase = format!("http://{}", guarded.addr);
    b.goto(&format!("{gbase}/")).await.unwrap();
    let body = b
        .find(Locator::Css("body"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.starts_with("401"), "{body}");
    b.goto(&format!("{gbase}/login")).await.unwrap();
    wait_for(&b, "#token")
        .await
        .send_keys("browser-token-0123456789")
        .await
        .unwrap();
    b.find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(&b, "#streams").await; // logged in by the session cookie
    b.close().await.unwrap();
}

/// `admin --stores FILE`: a totals page over every store (the sum, and a store that cannot be
/// opened shown with its reason), a picker, each store's pages and API under `/s/<name>/`
/// with links that stay there, and an action on one store that changes no other. One token
/// guards them all; no password of a store's URL reaches any page.
#[tokio::test]
async fn one_console_over_several_stores() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url_a = rows::sqlite(&a).await;
    let url_b = rows::sqlite(&b).await;
    let table = format!("admin_{}", uuid::Uuid::now_v7().simple());
    let url_pg = rows::postgres(&table).await;
    let missing = a.path().join("nothing-here.db");
    let list = a.path().join("stores.toml");
    std::fs::write(
        &list,
        format!(
            "[[store]]\nname = \"a\"\nurl = \"{url_a}\"\n\n\
             [[store]]\nname = \"tenant b/2\"\nurl = \"{url_b}\"\n\n\
             [[store]]\nname = \"pg\"\nurl = \"{url_pg}\"\ntable = \"{table}\"\n\n\
             [[store]]\nname = \"gone\"\nurl = \"sqlite://{}\"\n",
            missing.display()
        ),
    )
    .unwrap();
    let token = "a-long-enough-token-0123";
    let c = spawn_console(
        &[],
        &["--stores", list.to_str().unwrap(), "--auth-token", token],
        &[],
    );
    let auth = format!("Bearer {token}");
    let get = |path: &str| http(&c, "GET", path, &[("Authorization", &auth)], "");

    // One token for every page: without it, neither the totals nor a store's pages.
    assert_eq!(http(&c, "GET", "/", &[], "").status, 401);
    assert_eq!(http(&c, "GET", "/s/a/api/stats", &[], "").status, 401);

    // The totals: three stores of 3 pending and 2 dead each, and one that cannot be opened.
    let totals = get("/api/stores").json();
    assert_eq!(totals["total"]["pending"], 9, "{totals}");
    assert_eq!(totals["total"]["dead"], 6, "{totals}");
    assert_eq!(totals["failing"], 1, "{totals}");
    let stores = totals["stores"].as_array().unwrap();
    let names: Vec<&str> = stores.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "gone", "pg", "tenant b/2"]);
    assert_eq!(stores[2]["table"], table.as_str());
    assert_eq!(stores[2]["total"]["dead"], 2);
    let gone = stores[1]["error"].as_str().unwrap();
    assert!(
        gone.contains("no SQLite database at") && gone.contains("migrate"),
        "{gone}"
    );
    let page = get("/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("id=\"stores\""), "{}", page.body);
    assert!(
        page.body.contains("href=\"/s/tenant%20b%2F2/\""),
        "{}",
        page.body
    );
    assert!(page.body.contains("1 cannot be read"), "{}", page.body);
    // The picker lists every store.
    for name in ["a", "gone", "pg", "tenant b/2"] {
        assert!(
            page.body.contains(&format!("<option value=\"{name}\"")),
            "{name}: {}",
            page.body
        );
    }

    // The picker's form leads to a store's pages; a name not in the list is a 404.
    let r = get("/pick?store=tenant+b%2F2");
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(
        r.headers.contains("location: /s/tenant%20b%2f2/"),
        "{}",
        r.headers
    );
    assert_eq!(get("/pick?store=nobody").status, 404);
    assert_eq!(get("/s/nobody/").status, 404);
    let r = get("/s/gone/");
    assert_eq!(r.status, 503);
    assert!(r.body.contains("could not be opened"), "{}", r.body);

    // A store's pages: its overview, its links under its path, the picker on it.
    let r = get("/s/tenant%20b%2F2/");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("<option value=\"tenant b/2\" selected"),
        "{}",
        r.body
    );
    assert!(
        r.body
            .contains("href=\"/s/tenant%20b%2F2/messages?stream=emails&amp;status=dead\""),
        "{}",
        r.body
    );
    assert!(
        !r.body.contains("href=\"/messages"),
        "a link leaves the store: {}",
        r.body
    );
    let dead = get("/s/tenant%20b%2F2/messages?status=dead");
    assert_eq!(dead.status, 200);
    assert!(
        dead.body.contains("action=\"/s/tenant%20b%2F2/actions\""),
        "{}",
        dead.body
    );
    assert!(
        dead.body.contains("href=\"/s/tenant%20b%2F2/messages/"),
        "{}",
        dead.body
    );
    assert_eq!(get("/s/pg/api/stats").json()["total"]["pending"], 3);

    // An action on one store changes that store only.
    let csrf = get("/s/tenant%20b%2F2/api/csrf").json()["csrf"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        get("/s/a/api/csrf").json()["csrf"],
        csrf.as_str(),
        "one console, one CSRF token"
    );
    let r = http(
        &c,
        "POST",
        "/s/tenant%20b%2F2/actions",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        &format!("csrf={csrf}&action=requeue&all=1&confirm=yes"),
    );
    assert!(r.body.contains("Requeued 2 dead letter(s)"), "{}", r.body);
    assert!(r.body.contains("href=\"/s/tenant%20b%2F2/\""), "{}", r.body);
    assert_eq!(
        get("/s/tenant%20b%2F2/api/stats").json()["total"]["dead"],
        0
    );
    assert_eq!(get("/s/a/api/stats").json()["total"]["dead"], 2);
    assert_eq!(get("/s/pg/api/stats").json()["total"]["dead"], 2);
    assert_eq!(get("/api/stores").json()["total"]["dead"], 4);

    // No store's password on any page or answer.
    for path in ["/", "/api/stores", "/s/pg/", "/s/pg/api/stats", "/s/gone/"] {
        let r = get(path);
        assert!(!r.body.contains("s3cret-pw"), "{path}: {}", r.body);
    }
}
