//! Least-privilege roles on a real PostgreSQL and MariaDB: the tables made by their owner,
//! then a writer, a relay and the console each under a role of its own with exactly the
//! grants `outbox_sql::roles` prints. Each does its whole part (writes in the application's
//! transaction; claims, publishes, dead-letters, cleans; lists, requeues, purges, parks,
//! resumes, skips), and each action outside its part is refused by the database.

use outbox_core::StoreAdmin;
use std::time::Duration;

use outbox_core::{
    Error, FaultyPublisher, KeepOrder, Message, Outbox, RecordingPublisher, RelayOnly, Selector,
    Status, Store,
};
use outbox_sql::roles::Roles;

fn suffix() -> String {
    uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
}

/// Keep-order messages to "orders" in units k0 and k1.
fn keep_order(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            Message::new("orders", format!("{{\"n\":{i}}}").into_bytes())
                .stream("roles")
                .key(format!("k{}", i % 2))
        })
        .collect()
}

/// Relay-only messages: one to "orders", two to "refused" (the broker refuses them).
fn unordered() -> Vec<Message> {
    ["orders", "refused", "refused"]
        .iter()
        .map(|d| Message::new(*d, b"plain".to_vec()).stream("roles"))
        .collect()
}

/// The relay's part: claim, publish, dead-letter (a destination the broker refuses), settle.
async fn relay_part(store: impl Store + Clone + 'static) -> RecordingPublisher {
    let broker = RecordingPublisher::new();
    let publisher = FaultyPublisher::new(broker.clone(), |e| {
        (e.message.destination == "refused").then(|| Error::permanent("refused by the broker"))
    });
    let relay = outbox_core::Relay::builder(store, publisher)
        .lease(Duration::from_secs(30))
        .build()
        .unwrap();
    for _ in 0..5 {
        relay.run_once().await.unwrap();
    }
    broker
}

/// The console's part: read, requeue, purge, park, skip, resume (unit k0 has two pending
/// rows: the skip dead-letters the first).
async fn admin_part(store: &(impl StoreAdmin + Clone)) {
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.total().dead, 2, "{stats:?}");
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert!(
        !dead[0].envelope.message.payload.is_empty(),
        "the console reads payloads"
    );
    let listed = store
        .messages(&outbox_core::MessageFilter {
            status: Some(Status::Dead),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    assert!(store.get(dead[0].seq).await.unwrap().is_some());
    assert_eq!(
        store
            .requeue(&Selector::Seqs(vec![dead[0].seq]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .purge_dead(&Selector::Seqs(vec![dead[1].seq]))
            .await
            .unwrap(),
        1
    );
    store.park_unit("roles", "k0", "by the test").await.unwrap();
    assert_eq!(store.parked_units(None, 10).await.unwrap().len(), 1);
    assert!(store.skip_head("roles", "k0").await.unwrap().is_some());
    store.park_unit("roles", "k0", "again").await.unwrap();
    store.resume_unit("roles", "k0").await.unwrap();
    assert!(store.parked_units(None, 10).await.unwrap().is_empty());
}

/// After the console: the requeued dead letter is refused again, the skipped head stays
/// dead, the row behind it is published; then the relay cleans the sent rows.
async fn relay_after_admin(store: impl StoreAdmin + Clone + 'static) {
    let again = relay_part(store.clone()).await;
    assert_eq!(again.count(), 1, "the row behind the skipped head");
    assert_eq!(store.stats().await.unwrap().total().dead, 2);
    let cleaned = store
        .clean(std::time::SystemTime::now(), 100, false)
        .await
        .unwrap();
    assert_eq!(cleaned, 6, "five sent first, one after the console");
}

/// Runs each statement and expects the database to refuse it for lack of privilege.
macro_rules! refused {
    ($who:expr, $pool:expr, [$($sql:expr),* $(,)?]) => {
        for sql in [$($sql),*] {
            let e = sqlx::query(&sql)
                .execute($pool)
                .await
                .expect_err(&format!("{} may not run: {sql}", $who));
            let text = e.to_string().to_lowercase();
            assert!(
                text.contains("permission denied")
                    || text.contains("must be owner")
                    || text.contains("command denied"),
                "{}: {sql}: {text}",
                $who
            );
        }
    };
}

/// The same test on each database: the tables made by their owner, a role (PostgreSQL) or
/// account (MariaDB) for each part with the grants `outbox_sql::roles` prints, each part's
/// work done under its role, and what lies outside it refused.
macro_rules! roles_test {
    (
        $name:ident,
        store: $store:ty,
        options: $options:ty,
        url_env: $env:literal,
        default_url: $default:literal,
        scheme: $scheme:literal,
        create: $create:expr,
        grants: $grants:expr,
        drop: $drop:expr,
        companions: $companions:literal,
        bytes: $bytes:literal,
        json: $json:literal,
        uuid: $uuid:literal $(,)?
    ) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let url = std::env::var($env).unwrap_or_else(|_| $default.into());
            let s = suffix();
            let table = format!("outbox_roles_{s}");
            type Options = $options;
            let options = || Options {
                table: table.clone(),
                ..Default::default()
            };
            let owner = <$store>::connect_with(&url, options()).await.unwrap();
            owner.migrate().await.unwrap();
            let roles = Roles {
                writer: Some(format!("w_{s}")),
                relay: Some(format!("r_{s}")),
                admin: Some(format!("a_{s}")),
            };
            let names = [&roles.writer, &roles.relay, &roles.admin].map(|r| r.clone().unwrap());
            let create: fn(&str) -> String = $create;
            for r in &names {
                sqlx::query(&create(r)).execute(owner.pool()).await.unwrap();
            }
            let grants: fn(&str, &str, &Roles) -> Vec<String> = $grants;
            for grant in grants(&url, &table, &roles) {
                sqlx::query(&grant).execute(owner.pool()).await.unwrap();
            }
            let as_role = |role: &str| {
                let rest = url.split_once('@').unwrap().1;
                format!("{}://{role}@{rest}", $scheme)
            };
            let t = &table;
            let forged = format!(
                "INSERT INTO {t} (id, stream, destination, okey, payload, content_type, headers, strategy, status, created_at, next_attempt_at)
                 VALUES ({}, 's', 'd', '', 'x'{}, 't', '{{}}'{}, 'relay', 'pending', 0, 0)",
                $uuid, $bytes, $json
            );

            // The writer: keep-order and relay-only rows in the application's transaction.
            let writer = <$store>::connect_with(&as_role(&names[0]), options())
                .await
                .unwrap();
            let keep = Outbox::writer(writer.clone())
                .strategy(KeepOrder::default())
                .build()
                .unwrap();
            let plain = Outbox::writer(writer.clone())
                .strategy(RelayOnly)
                .build()
                .unwrap();
            let mut tx = writer.pool().begin().await.unwrap();
            drop(keep.enqueue(&mut tx, keep_order(4)).await.unwrap());
            drop(plain.enqueue(&mut tx, unordered()).await.unwrap());
            tx.commit().await.unwrap();
            refused!(
                "the writer",
                writer.pool(),
                [
                    format!("SELECT payload FROM {t}"),
                    format!("SELECT destination, headers FROM {t}"),
                    format!("UPDATE {t} SET payload = 'x'{}", $bytes),
                    format!("UPDATE {t} SET status = 'sent'"),
                    format!("DELETE FROM {t}"),
                    format!("DELETE FROM {t}_due"),
                    format!("UPDATE {t}_due SET next_at = 0"),
                    format!("DROP TABLE {t}"),
                ]
            );

            // The relay: publishes, dead-letters; cannot forge or rewrite a message.
            let relay = <$store>::connect_with(&as_role(&names[1]), options())
                .await
                .unwrap();
            let broker = relay_part(relay.clone()).await;
            assert_eq!(broker.count(), 5, "four keep-order rows and the plain one");
            assert_eq!(relay.stats().await.unwrap().total().dead, 2);
            // Two more rows of unit k0 for the console to park and skip.
            let mut tx = writer.pool().begin().await.unwrap();
            let k0: Vec<_> = keep_order(3).into_iter().step_by(2).collect();
            drop(keep.enqueue(&mut tx, k0).await.unwrap());
            tx.commit().await.unwrap();
            refused!(
                "the relay",
                relay.pool(),
                [
                    forged.clone(),
                    format!("UPDATE {t} SET payload = 'forged'{}", $bytes),
                    format!("UPDATE {t} SET destination = 'elsewhere'"),
                    format!("UPDATE {t} SET signature = NULL"),
                    format!("DROP TABLE {t}_due"),
                    format!("ALTER TABLE {t} ADD COLUMN x INT"),
                ]
            );

            // The console.
            let admin = <$store>::connect_with(&as_role(&names[2]), options())
                .await
                .unwrap();
            admin_part(&admin).await;
            refused!(
                "the console",
                admin.pool(),
                [
                    forged.clone(),
                    format!("UPDATE {t} SET payload = 'forged'{}", $bytes),
                    format!("UPDATE {t} SET sent_at = 1"),
                    format!("TRUNCATE {t}"),
                ]
            );
            // What the console requeued, the relay publishes again (and dead-letters again).
            relay_after_admin(relay.clone()).await;

            drop((writer, relay, admin));
            let drop_role: fn(&str) -> String = $drop;
            for statement in [format!("DROP TABLE {t}, {t}_{}, {t}_due, {t}_schema", $companions)]
                .into_iter()
                .chain(names.iter().map(|r| drop_role(r)))
            {
                sqlx::query(&statement).execute(owner.pool()).await.unwrap();
            }
        }
    };
}

roles_test!(
    postgres_roles_do_their_part_and_nothing_more,
    store: outbox_sql::postgres::PgStore,
    options: outbox_sql::postgres::PgOptions,
    url_env: "OUTBOX_PG_URL",
    default_url: "postgres://postgres@127.0.0.1:5432/test",
    scheme: "postgres",
    create: |r| format!("CREATE ROLE \"{r}\" LOGIN"),
    grants: |_, table, roles| outbox_sql::roles::postgres(table, roles).unwrap(),
    drop: |r| format!("DROP ROLE \"{r}\""),
    companions: "units",
    bytes: "::bytea",
    json: "::jsonb",
    uuid: "gen_random_uuid()",
);

roles_test!(
    mariadb_roles_do_their_part_and_nothing_more,
    store: outbox_sql::mysql::MySqlStore,
    options: outbox_sql::mysql::MySqlOptions,
    url_env: "OUTBOX_MYSQL_URL",
    default_url: "mysql://root@127.0.0.1:3306/test",
    scheme: "mysql",
    create: |r| format!("CREATE USER '{r}'@'%'"),
    grants: |url, table, roles| {
        let database = url.rsplit('/').next().unwrap().split('?').next().unwrap();
        outbox_sql::roles::mysql(database, table, "%", roles).unwrap()
    },
    drop: |r| format!("DROP USER '{r}'@'%'"),
    companions: "locks",
    bytes: "",
    json: "",
    uuid: "UUID()",
);
