//! Integrity through the `outbox` binary: signed rows that were changed in the database, signed
//! with an unknown key, or signed while the relay has no key are never published; key rotation
//! works; `--require-signatures` refuses unsigned rows. On SQLite and on the real PostgreSQL.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;

use outbox_core::{
    KeepOrder, Message, Outbox, RecordingPublisher, Signer, SigningKey, Store, StoreAdmin,
};
use outbox_sql::postgres::{sqlx, PgOptions, PgStore};
use outbox_sqlite::SqliteStore;

const K1: &str = "k1:first-secret-0123456789";
const K2: &str = "k2:second-secret-0123456789";
const K9: &str = "k9:someone-elses-secret-0123456789";
const SECRETS: [&str; 3] = [
    "first-secret-0123456789",
    "second-secret-0123456789",
    "someone-elses-secret-0123456789",
];

/// Where the rows live: a SQLite file or a fresh PostgreSQL table.
enum Target {
    // The directory lives as long as the target.
    Sqlite(#[allow(dead_code)] tempfile::TempDir, PathBuf),
    Pg { url: String, table: String },
}

impl Target {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        Target::Sqlite(dir, db)
    }

    fn pg() -> Self {
        Target::Pg {
            url: std::env::var("OUTBOX_PG_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
            table: format!("outbox_sig{}", uuid::Uuid::now_v7().simple()),
        }
    }

    fn store_args(&self) -> Vec<String> {
        match self {
            Target::Sqlite(_, db) => vec!["--store".into(), format!("sqlite://{}", db.display())],
            Target::Pg { url, table } => {
                vec![
                    "--store".into(),
                    url.clone(),
                    "--table".into(),
                    table.clone(),
                ]
            }
        }
    }

    fn table(&self) -> &str {
        match self {
            Target::Sqlite(..) => "outbox",
            Target::Pg { table, .. } => table,
        }
    }

    async fn pg_store(url: &str, table: &str) -> PgStore {
        let options = PgOptions {
            table: table.into(),
            ..Default::default()
        };
        PgStore::connect_with(url, options).await.unwrap()
    }

    async fn store(&self) -> Arc<dyn StoreAdmin> {
        match self {
            Target::Sqlite(_, db) => Arc::new(SqliteStore::open(db).unwrap()),
            Target::Pg { url, table } => Arc::new(Self::pg_store(url, table).await),
        }
    }

    /// Commit `msgs` through an outbox that signs with `key` (or does not sign).
    async fn enqueue(&self, key: Option<&str>, msgs: Vec<Message>) {
        fn outbox<S: Store + Clone + 'static>(store: S, key: Option<&str>) -> Outbox<S> {
            let mut builder =
                Outbox::builder(store, RecordingPublisher::new()).strategy(KeepOrder::default());
            if let Some(k) = key {
                builder = builder.signer(Signer::new(SigningKey::parse(k).unwrap()));
            }
            builder.build().unwrap()
        }
        match self {
            Target::Sqlite(_, db) => {
                let store = SqliteStore::open(db).unwrap();
                let outbox = outbox(store.clone(), key);
                let mut conn = store.connect().unwrap();
                let mut tx = conn.transaction().unwrap();
                drop(outbox.enqueue_blocking(&mut tx, msgs).unwrap());
                tx.commit().unwrap();
            }
            Target::Pg { url, table } => {
                let store = Self::pg_store(url, table).await;
                let outbox = outbox(store.clone(), key);
                let mut tx = store.pool().begin().await.unwrap();
                drop(outbox.enqueue(&mut tx, msgs).await.unwrap());
                tx.commit().await.unwrap();
            }
        }
    }

    /// Change the row whose payload is `payload` behind the outbox's back: `set` is an SQL
    /// assignment in which `{bytes:TEXT}` becomes a byte-string literal of TEXT.
    async fn tamper(&self, payload: &str, set: &str) {
        let bytes = |s: &str| match self {
            Target::Sqlite(..) => format!("CAST('{s}' AS BLOB)"),
            Target::Pg { .. } => format!("convert_to('{s}', 'UTF8')"),
        };
        let set = match set.split_once("{bytes:") {
            Some((head, rest)) => {
                let (text, tail) = rest.split_once('}').unwrap();
                format!("{head}{}{tail}", bytes(text))
            }
            None => set.to_owned(),
        };
        let sql = format!(
            "UPDATE {} SET {set} WHERE payload = {}",
            self.table(),
            bytes(payload)
        );
        let changed = match self {
            Target::Sqlite(_, db) => rusqlite::Connection::open(db)
                .unwrap()
                .execute(&sql, [])
                .unwrap() as u64,
            Target::Pg { url, table } => sqlx::query(&sql)
                .execute(Self::pg_store(url, table).await.pool())
                .await
                .unwrap()
                .rows_affected(),
        };
        assert_eq!(changed, 1, "{sql}");
    }

    /// Message id of the row written with `payload` (its key, which nobody changed).
    async fn id_of(&self, payload: &str) -> String {
        let store = self.store().await;
        for seq in 1..64 {
            if let Some(r) = store.get(seq).await.unwrap() {
                if r.envelope.message.key.as_deref() == Some(payload) {
                    return r.envelope.id.to_string();
                }
            }
        }
        panic!("no row with payload {payload}")
    }
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
    for (var, _) in std::env::vars() {
        if var.starts_with("OUTBOX_") && var != "OUTBOX_PG_URL" || var == "RUST_LOG" {
            c.env_remove(var);
        }
    }
    c
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes the rows every scenario starts from, on keys of their own (a refused keep-order
/// row blocks only its key): two good rows signed with the old and the new key, four rows
/// changed or signed by a stranger, one whose signature was removed, one never signed.
async fn setup(t: &Target) {
    let out = bin().args(t.store_args()).arg("migrate").output().unwrap();
    assert!(out.status.success(), "{}", text(&out).1);
    let m = |payload: &str| {
        Message::new("orders.placed", payload.as_bytes().to_vec())
            .stream("orders")
            .key(payload)
            .header("x", "ok")
    };
    t.enqueue(
        Some(K1),
        vec![m("old"), m("pay"), m("dest"), m("hdr"), m("stripped")],
    )
    .await;
    t.enqueue(Some(K2), vec![m("new")]).await;
    t.enqueue(Some(K9), vec![m("unknown")]).await;
    t.enqueue(None, vec![m("plain")]).await;
    t.tamper("pay", "payload = {bytes:pay-changed}").await;
    t.tamper("dest", "destination = 'attacker.topic'").await;
    t.tamper("hdr", r#"headers = '{"x":"evil"}'"#).await;
    t.tamper("stripped", "signature = NULL").await;
}

/// Runs `outbox relay --publisher stdout` with `extra`, and checks what was published, that
/// every refused row was reported with its id, and that no secret was printed.
async fn relay(t: &Target, extra: &[&str], env: &[(&str, &str)], published: &[&str]) {
    let mut cmd = bin();
    cmd.args(t.store_args())
        .args(["relay", "--publisher", "stdout"])
        .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let (stdout, stderr) = text(&out);
    // Refused rows make the run partial (exit 4), and the log says so.
    let partial = out.status.code() == Some(4);
    assert!(out.status.success() || partial, "{stderr}");
    assert_eq!(partial, stderr.contains("partly done"), "{stderr}");
    let got: BTreeSet<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("published "))
        .map(|l| l.rsplit("payload=").next().unwrap())
        .collect();
    let want: BTreeSet<&str> = published.iter().copied().collect();
    assert_eq!(got, want, "{extra:?} {env:?}\n{stderr}");
    assert!(!stdout.contains("changed") && !stdout.contains("attacker"));

    let all = [
        "old", "new", "pay", "dest", "hdr", "unknown", "stripped", "plain",
    ];
    let refused: Vec<&str> = all.into_iter().filter(|p| !want.contains(p)).collect();
    let reports = stderr
        .lines()
        .filter(|l| l.contains("signature does not verify"))
        .count();
    assert_eq!(
        reports,
        refused.len(),
        "one report per refused row:\n{stderr}"
    );
    for p in &refused {
        let id = t.id_of(p).await;
        assert!(
            stderr.contains(&id),
            "refused row {p} ({id}) not named:\n{stderr}"
        );
    }
    for secret in SECRETS {
        assert!(
            !stderr.contains(secret) && !stdout.contains(secret),
            "secret printed"
        );
    }
    let stats = bin().args(t.store_args()).arg("stats").output().unwrap();
    let total = text(&stats).0;
    let pending: usize = total
        .lines()
        .find(|l| l.starts_with("orders"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(pending, refused.len(), "refused rows are kept: {total}");
}

async fn scenarios(new: fn() -> Target) {
    let dir = tempfile::tempdir().unwrap();

    // No key configured: every signed row is unverifiable; the unsigned ones go out.
    let t = new();
    setup(&t).await;
    relay(&t, &[], &[], &["stripped", "plain"]).await;

    // Rotation from a keys file: k2 active, k1 still accepted. With keys loaded, unsigned
    // rows are refused by default: a stripped signature is no way around verification.
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("# active first\n{K2}\n{K1}\n")).unwrap();
    let t = new();
    setup(&t).await;
    let file = keys.to_str().unwrap();
    relay(&t, &["--signing-keys-file", file], &[], &["old", "new"]).await;

    // Unsigned rows allowed on purpose (writers being moved to signing).
    let t = new();
    setup(&t).await;
    relay(
        &t,
        &["--signing-keys-file", file, "--allow-unsigned"],
        &[],
        &["old", "new", "stripped", "plain"],
    )
    .await;

    // Keys from the environment, unsigned rows refused.
    let t = new();
    setup(&t).await;
    let env_keys = format!("{K2},{K1}");
    relay(
        &t,
        &["--require-signatures"],
        &[("OUTBOX_SIGNING_KEYS", &env_keys)],
        &["old", "new"],
    )
    .await;

    // Keys and the requirement from the config file.
    let cfg = dir.path().join("outbox.toml");
    std::fs::write(
        &cfg,
        format!("[relay]\nsigning_keys = [\"{K2}\", \"{K1}\"]\nrequire_signatures = true\n"),
    )
    .unwrap();
    let t = new();
    setup(&t).await;
    relay(
        &t,
        &["--config", cfg.to_str().unwrap()],
        &[],
        &["old", "new"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_relay_refuses_what_does_not_verify() {
    scenarios(Target::sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_relay_refuses_what_does_not_verify() {
    scenarios(Target::pg).await;
}

#[test]
fn key_errors_are_clear_and_secrets_stay_out_of_help() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("x.db").display());
    assert!(bin()
        .args(["--store", &db, "migrate"])
        .status()
        .unwrap()
        .success());
    let relay = |extra: &[&str], env: &[(&str, &str)]| {
        let mut c = bin();
        c.args(["--store", &db, "relay", "--publisher", "stdout"])
            .args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        let (_, stderr) = text(&c.output().unwrap());
        stderr
    };
    let e = relay(&["--require-signatures"], &[]);
    assert!(
        e.contains("error:") && e.contains("needs verification keys"),
        "{e}"
    );
    let e = relay(&[], &[("OUTBOX_SIGNING_KEYS", "k1:tooshort")]);
    assert!(
        e.contains("OUTBOX_SIGNING_KEYS entry 1") && !e.contains("tooshort"),
        "{e}"
    );
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "k1:fine-secret-0123456789\nbroken-line\n").unwrap();
    let e = relay(&["--signing-keys-file", keys.to_str().unwrap()], &[]);
    assert!(e.contains("line 2") && !e.contains("fine-secret"), "{e}");
    // A keys file other users can read draws a warning; a private one does not.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let warning = "readable by other users";
        std::fs::write(&keys, "k1:fine-secret-0123456789\n").unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
        let log = relay(&["--signing-keys-file", keys.to_str().unwrap()], &[]);
        assert!(log.contains(warning), "{log}");
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
        let log = relay(&["--signing-keys-file", keys.to_str().unwrap()], &[]);
        assert!(!log.contains(warning) && !log.contains("error:"), "{log}");
    }

    let help = bin()
        .args(["relay", "--help"])
        .env("OUTBOX_STORE", "postgres://app:hunter2@db/shop")
        .env("OUTBOX_PUBLISHER", "amqp://u:rabbit-pw@mq/%2f")
        .env("OUTBOX_SIGNING_KEYS", K1)
        .output()
        .unwrap();
    let (out, _) = text(&help);
    assert!(out.contains("--signing-keys-file") && out.contains("--require-signatures"));
    for secret in ["hunter2", "rabbit-pw", SECRETS[0]] {
        assert!(!out.contains(secret), "--help printed a secret: {out}");
    }
}

/// Signatures bind the writers' deployment label: a relay without the label (or with another)
/// refuses the row; with `--signing-label` it publishes it. Each case on a database of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployment_label_is_bound() {
    for (label, published) in [
        (None, false),
        (Some("billing-staging"), false),
        (Some("billing-prod"), true),
    ] {
        let t = Target::sqlite();
        let out = bin().args(t.store_args()).arg("migrate").output().unwrap();
        assert!(out.status.success());
        let Target::Sqlite(_, db) = &t else {
            unreachable!()
        };
        let sqlite = SqliteStore::open(db).unwrap();
        let signer = Signer::new(SigningKey::parse(K1).unwrap()).label("billing-prod");
        let outbox = Outbox::builder(sqlite.clone(), RecordingPublisher::new())
            .strategy(KeepOrder::default())
            .signer(signer)
            .build()
            .unwrap();
        let mut conn = sqlite.connect().unwrap();
        let mut tx = conn.transaction().unwrap();
        let msgs = vec![Message::new("d", b"labelled".to_vec()).stream("orders")];
        drop(outbox.enqueue_blocking(&mut tx, msgs).unwrap());
        tx.commit().unwrap();

        let mut cmd = bin();
        cmd.args(t.store_args())
            .args(["relay", "--publisher", "stdout"])
            .env("OUTBOX_SIGNING_KEYS", K1);
        if let Some(l) = label {
            cmd.args(["--signing-label", l]);
        }
        let out = cmd.output().unwrap();
        let (stdout, stderr) = text(&out);
        assert_eq!(
            stdout.contains("payload=labelled"),
            published,
            "label {label:?}: {stdout}"
        );
        assert_eq!(
            stderr.contains("signature does not verify"),
            !published,
            "label {label:?}: {stderr}"
        );
    }
}
