//! `outbox migrate --print-sql` and `outbox grants` through the binary, on PostgreSQL and
//! MariaDB: the printed DDL changes nothing until the owner runs it, and then makes tables
//! the binary works with; the printed grants let the writer write, the relay publish and
//! the console read under roles of their own, and the database refuses each of them what is
//! not its part.

use std::process::{Command, Output};

use outbox_core::{KeepOrder, Message, Outbox};
use outbox_sql::sqlx;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
    for (var, _) in std::env::vars() {
        if var.starts_with("OUTBOX_") || var == "RUST_LOG" {
            c.env_remove(var);
        }
    }
    c
}

fn run(store: &str, table: &str, args: &[&str]) -> Output {
    bin()
        .args(["--store", store, "--table", table])
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The command fails, and says the database refused it.
fn refused(out: Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(!out.status.success(), "{what} was allowed");
    assert!(
        err.contains("permission denied")
            || err.contains("must be owner")
            || err.contains("command denied"),
        "{what}: {err}"
    );
}

fn suffix() -> String {
    uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
}

fn keyed(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            Message::new("orders", vec![b'0' + i as u8])
                .stream("roles")
                .key("k")
        })
        .collect()
}

fn total(store: &str, table: &str) -> serde_json::Value {
    let doc: serde_json::Value =
        serde_json::from_str(&stdout(&run(store, table, &["--json", "stats"]))).unwrap();
    doc["total"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tables_and_roles_from_printed_sql() {
    use outbox_sql::postgres::{PgOptions, PgStore};
    let url = std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let s = suffix();
    let t = format!("outbox_cliroles_{s}");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();

    let ddl = stdout(&run(&url, &t, &["migrate", "--print-sql"]));
    let exists = |pool: sqlx::PgPool, t: String| async move {
        sqlx::query_scalar::<_, Option<String>>("SELECT to_regclass($1)::text")
            .bind(t)
            .fetch_one(&pool)
            .await
            .unwrap()
            .is_some()
    };
    assert!(
        !exists(pool.clone(), t.clone()).await,
        "--print-sql created the table"
    );
    sqlx::raw_sql(&ddl).execute(&pool).await.unwrap();
    assert!(exists(pool.clone(), t.clone()).await);

    let (w, r, a) = (format!("w_{s}"), format!("r_{s}"), format!("a_{s}"));
    for role in [&w, &r, &a] {
        sqlx::query(&format!("CREATE ROLE \"{role}\" LOGIN"))
            .execute(&pool)
            .await
            .unwrap();
    }
    let grants = stdout(&run(
        &url,
        &t,
        &["grants", "--writer", &w, "--relay", &r, "--admin", &a],
    ));
    assert!(grants.contains("GRANT"), "{grants}");
    sqlx::raw_sql(&grants).execute(&pool).await.unwrap();
    let as_role = |role: &str| format!("postgres://{role}@{}", url.split_once('@').unwrap().1);

    // The writer (the library, as the application runs it).
    let writer = PgStore::connect_with(
        &as_role(&w),
        PgOptions {
            table: t.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let outbox = Outbox::writer(writer.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let mut tx = writer.pool().begin().await.unwrap();
    drop(outbox.enqueue(&mut tx, keyed(3)).await.unwrap());
    tx.commit().await.unwrap();

    // The console reads; the relay publishes; each is refused the other's part and the
    // owner's, and the writer reads no counts.
    assert_eq!(total(&as_role(&a), &t)["pending"], 3);
    refused(run(&as_role(&w), &t, &["stats"]), "stats as the writer");
    stdout(&run(&as_role(&r), &t, &["relay", "--publisher", "null"]));
    assert_eq!(total(&as_role(&a), &t)["sent"], 3);
    let mut tx = writer.pool().begin().await.unwrap();
    drop(outbox.enqueue(&mut tx, keyed(1)).await.unwrap());
    tx.commit().await.unwrap();
    refused(
        run(&as_role(&a), &t, &["relay", "--publisher", "null"]),
        "relaying as the console",
    );
    refused(
        run(&as_role(&r), &t, &["migrate"]),
        "migrating as the relay",
    );
    refused(
        run(&as_role(&a), &t, &["migrate"]),
        "migrating as the console",
    );

    drop(writer);
    for statement in [
        format!("DROP TABLE {t}, {t}_units, {t}_due, {t}_schema"),
        format!("DROP ROLE \"{w}\", \"{r}\", \"{a}\""),
    ] {
        sqlx::query(&statement).execute(&pool).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_tables_and_roles_from_printed_sql() {
    use outbox_sql::mysql::{MySqlOptions, MySqlStore};
    let url = std::env::var("OUTBOX_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let s = suffix();
    let t = format!("outbox_cliroles_{s}");
    let pool = sqlx::MySqlPool::connect(&url).await.unwrap();
    let exists = |pool: sqlx::MySqlPool, t: String| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ?",
        )
        .bind(t)
        .fetch_one(&pool)
        .await
        .unwrap()
            == 1
    };

    let ddl = stdout(&run(&url, &t, &["migrate", "--print-sql"]));
    assert!(
        !exists(pool.clone(), t.clone()).await,
        "--print-sql created the table"
    );
    sqlx::raw_sql(&ddl).execute(&pool).await.unwrap();
    assert!(exists(pool.clone(), t.clone()).await);
    // What `migrate` would do next on these tables is nothing.
    stdout(&run(&url, &t, &["migrate"]));

    let (w, r, a) = (format!("w_{s}"), format!("r_{s}"), format!("a_{s}"));
    for user in [&w, &r, &a] {
        sqlx::query(&format!("CREATE USER '{user}'@'%'"))
            .execute(&pool)
            .await
            .unwrap();
    }
    let grants = stdout(&run(
        &url,
        &t,
        &["grants", "--writer", &w, "--relay", &r, "--admin", &a],
    ));
    sqlx::raw_sql(&grants).execute(&pool).await.unwrap();
    let as_user = |user: &str| format!("mysql://{user}@{}", url.split_once('@').unwrap().1);

    let writer = MySqlStore::connect_with(
        &as_user(&w),
        MySqlOptions {
            table: t.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let outbox = Outbox::writer(writer.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let mut tx = writer.pool().begin().await.unwrap();
    drop(outbox.enqueue(&mut tx, keyed(3)).await.unwrap());
    tx.commit().await.unwrap();

    assert_eq!(total(&as_user(&a), &t)["pending"], 3);
    refused(run(&as_user(&w), &t, &["stats"]), "stats as the writer");
    stdout(&run(&as_user(&r), &t, &["relay", "--publisher", "null"]));
    assert_eq!(total(&as_user(&a), &t)["sent"], 3);
    let mut tx = writer.pool().begin().await.unwrap();
    drop(outbox.enqueue(&mut tx, keyed(1)).await.unwrap());
    tx.commit().await.unwrap();
    refused(
        run(&as_user(&a), &t, &["relay", "--publisher", "null"]),
        "relaying as the console",
    );
    refused(
        run(&as_user(&r), &t, &["migrate"]),
        "migrating as the relay",
    );

    drop(writer);
    for statement in [
        format!("DROP TABLE {t}, {t}_locks, {t}_due, {t}_schema"),
        format!("DROP USER '{w}'@'%', '{r}'@'%', '{a}'@'%'"),
    ] {
        sqlx::query(&statement).execute(&pool).await.unwrap();
    }
}
