//! Consumer processes killed (SIGKILL) over and over, many of them right between their
//! database commit and their acknowledgement, while the broker redelivers: the effects table
//! ends with exactly one effect per message id. One scenario per broker, each on a real
//! database: Redis Streams → PostgreSQL, RabbitMQ → MariaDB, Kafka (mock cluster) → SQLite, NATS
//! JetStream → SQLite; and the consumer's batched mode (one transaction per batch) on
//! Redis Streams → PostgreSQL, RabbitMQ → MariaDB and Kafka → SQLite.
//!
//! A test binary without the libtest harness: run plainly, it is the test; run with
//! `OUTBOX_INBOX_CHILD` set, it is one consumer process of a scenario (the test starts it,
//! kills it, starts it again).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox::sql_inbox::{SqlHandler, SqlInboxTable};
use outbox::sqlite::rusqlite::Transaction;
use outbox::sqlite::SqliteStore;
use outbox::{
    async_trait, Consumer, Envelope, Inbox, Incoming, Message, MessageId, Publisher, Received,
    RetryPolicy, Source,
};
use rand::Rng;

const MESSAGES: usize = 1000;
/// What each handler takes (in its transaction), so that kills land while work is under way.
const WORK: Duration = Duration::from_millis(3);
/// Consumer processes killed per scenario before the last one drains the rest.
const KILLS: usize = 16;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

fn pg_url() -> String {
    std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}
fn mysql_url() -> String {
    std::env::var("OUTBOX_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}
fn redis_url() -> String {
    std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}
fn amqp_url() -> String {
    std::env::var("OUTBOX_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Ok(scenario) = std::env::var("OUTBOX_INBOX_CHILD") {
        rt.block_on(child(&scenario));
        return;
    }
    rt.block_on(async {
        for scenario in [
            "redis-postgres",
            "amqp-mariadb",
            "kafka-sqlite",
            "nats-sqlite",
            "redis-postgres-batched",
            "amqp-mariadb-batched",
            "kafka-sqlite-batched",
        ] {
            let only = std::env::var("OUTBOX_INBOX_SCENARIOS").unwrap_or_default();
            if only.is_empty() || only.split(',').any(|s| s == scenario) {
                parent(scenario).await;
            }
        }
    });
    println!("inbox kill test: ok");
}

// ----------------------------------------------------------------------------- the parent

/// (effects, distinct message ids among them), read from the scenario's database.
type Counter = Box<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = (i64, i64)>>>>;

/// Where a scenario's broker and database are, handed to its consumer processes.
struct Setup {
    vars: Vec<(&'static str, String)>,
    _keep: Vec<Box<dyn std::any::Any>>,
}

async fn parent(scenario: &str) {
    let started = Instant::now();
    let name = format!("inbox_kill_{}", uuid::Uuid::now_v7().simple());
    let envelopes: Vec<Envelope> = (0..MESSAGES)
        .map(|i| Envelope {
            id: MessageId::new(),
            created_at: std::time::SystemTime::now(),
            message: Message::new(name.clone(), i.to_string().into_bytes())
                .key(format!("k{}", i % 4)),
        })
        .collect();
    let batch: Vec<&Envelope> = envelopes.iter().collect();
    let (broker, db, _) = parse(scenario);
    let mut setup = Setup {
        vars: vec![("OUTBOX_INBOX_NAME", name.clone())],
        _keep: Vec::new(),
    };

    // The broker, with every message published once.
    match broker {
        "redis" => {
            setup.vars.push(("OUTBOX_INBOX_BROKER", redis_url()));
            let p = outbox::redis::RedisPublisher::connect(&redis_url())
                .await
                .unwrap();
            assert!(p.publish_batch(&batch).await.iter().all(Result::is_ok));
        }
        "amqp" => {
            setup.vars.push(("OUTBOX_INBOX_BROKER", amqp_url()));
            let conn = outbox::amqp::lapin::Connection::connect(&amqp_url(), Default::default())
                .await
                .unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.queue_declare(
                name.as_str().into(),
                outbox::amqp::lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .unwrap();
            let p = outbox::amqp::AmqpPublisher::connect(&amqp_url())
                .await
                .unwrap();
            assert!(p.publish_batch(&batch).await.iter().all(Result::is_ok));
            setup._keep.push(Box::new(conn));
        }
        "kafka" => {
            // librdkafka's mock cluster, in this process; the consumer processes reach it
            // over TCP. (On tansu 0.6, consumers restarted after one was SIGKILLed received
            // nothing more: see the README.)
            let cluster = outbox::kafka::rdkafka::mocking::MockCluster::new(1).unwrap();
            let bootstrap = cluster.bootstrap_servers();
            cluster.create_topic(&name, 2, 1).unwrap();
            setup.vars.push(("OUTBOX_INBOX_BROKER", bootstrap.clone()));
            let p = outbox::kafka::KafkaPublisher::new(&bootstrap).unwrap();
            let out = p.publish_batch(&batch).await;
            assert!(out.iter().all(Result::is_ok), "{out:?}");
            setup._keep.push(Box::new(cluster));
        }
        "nats" => {
            let server = outbox_testkit::NatsServer::start();
            setup.vars.push(("OUTBOX_INBOX_BROKER", server.url()));
            let p = outbox::nats::NatsPublisher::connect(&server.url())
                .await
                .unwrap();
            p.jetstream()
                .create_stream(outbox::nats::async_nats::jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![name.clone()],
                    ..Default::default()
                })
                .await
                .unwrap();
            assert!(p.publish_batch(&batch).await.iter().all(Result::is_ok));
            setup._keep.push(Box::new(server));
        }
        other => panic!("unknown broker {other}"),
    }

    // The database: the inbox table and an effects table without a unique key (so a second
    // effect would show).
    let dir = tempfile::tempdir().unwrap();
    let count: Counter = match db {
        "postgres" => {
            setup.vars.push(("OUTBOX_INBOX_DB", pg_url()));
            let store = outbox::postgres::PgStore::connect(&pg_url()).await.unwrap();
            store.inbox_table(&name).unwrap().migrate().await.unwrap();
            let pool = store.pool().clone();
            sqlx_pg::query(&format!("CREATE TABLE {name}_effects (msg TEXT NOT NULL)"))
                .execute(&pool)
                .await
                .unwrap();
            let q = format!("SELECT COUNT(*), COUNT(DISTINCT msg) FROM {name}_effects");
            Box::new(move || {
                let (pool, q) = (pool.clone(), q.clone());
                Box::pin(async move {
                    sqlx_pg::query_as::<_, (i64, i64)>(&q)
                        .fetch_one(&pool)
                        .await
                        .unwrap()
                })
            })
        }
        "mariadb" => {
            setup.vars.push(("OUTBOX_INBOX_DB", mysql_url()));
            let store = outbox::mysql::MySqlStore::connect(&mysql_url())
                .await
                .unwrap();
            store.inbox_table(&name).unwrap().migrate().await.unwrap();
            let pool = store.pool().clone();
            sqlx_my::query(&format!("CREATE TABLE {name}_effects (msg TEXT NOT NULL)"))
                .execute(&pool)
                .await
                .unwrap();
            let q = format!("SELECT CAST(COUNT(*) AS SIGNED), CAST(COUNT(DISTINCT msg) AS SIGNED) FROM {name}_effects");
            Box::new(move || {
                let (pool, q) = (pool.clone(), q.clone());
                Box::pin(async move {
                    sqlx_my::query_as::<_, (i64, i64)>(&q)
                        .fetch_one(&pool)
                        .await
                        .unwrap()
                })
            })
        }
        "sqlite" => {
            let path = dir.path().join("app.db");
            setup
                .vars
                .push(("OUTBOX_INBOX_DB", path.display().to_string()));
            let store = SqliteStore::open(&path).unwrap();
            store.inbox_table(&name).unwrap().migrate_now().unwrap();
            store
                .connect()
                .unwrap()
                .execute_batch(&format!("CREATE TABLE {name}_effects (msg TEXT NOT NULL)"))
                .unwrap();
            let q = format!("SELECT COUNT(*), COUNT(DISTINCT msg) FROM {name}_effects");
            Box::new(move || {
                let (store, q) = (store.clone(), q.clone());
                Box::pin(async move {
                    store
                        .connect()
                        .unwrap()
                        .query_row(&q, [], |r| Ok((r.get(0)?, r.get(1)?)))
                        .unwrap()
                })
            })
        }
        other => panic!("unknown database {other}"),
    };

    // Kill consumer processes, by turns: one SIGKILLs itself right after a commit, before
    // its acknowledgement (at its 1st to 3rd batch); the next is SIGKILLed at a random moment.
    let (mut killed, mut self_killed) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    for round in 0..KILLS {
        assert!(
            Instant::now() < deadline,
            "{scenario}: stalled after {round} kills"
        );
        if count().await.1 as usize >= MESSAGES {
            break;
        }
        let die_at_ack = if round % 2 == 0 {
            rand::thread_rng().gen_range(1..=3)
        } else {
            0
        };
        let mut c = spawn(scenario, &setup, die_at_ack);
        // Kafka and NATS consumers take longer to start (metadata, offsets, the consumer).
        let range = if matches!(broker, "kafka" | "nats") {
            400..1500
        } else {
            100..800
        };
        let life = if die_at_ack > 0 {
            Duration::from_secs(20)
        } else {
            Duration::from_millis(rand::thread_rng().gen_range(range))
        };
        let until = Instant::now() + life;
        let exited = loop {
            if c.try_wait().unwrap().is_some() {
                break true;
            }
            if Instant::now() >= until {
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if exited {
            self_killed += 1;
        } else {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
            killed += 1;
        }
    }
    let mid = count().await;
    // One last consumer, not killed, drains the rest.
    let mut last = spawn(scenario, &setup, 0);
    let deadline = Instant::now() + Duration::from_secs(90);
    let (total, distinct) = loop {
        let (total, distinct) = count().await;
        if distinct as usize >= MESSAGES {
            break (total, distinct);
        }
        assert!(
            Instant::now() < deadline,
            "{scenario}: {distinct} of {MESSAGES} processed"
        );
        assert!(
            last.try_wait().unwrap().is_none(),
            "{scenario}: the last consumer exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Whatever was redelivered meanwhile has been recognised: give it a moment, then check.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (total_after, _) = count().await;
    last.kill().unwrap();
    last.wait().unwrap();
    println!(
        "{scenario}: {MESSAGES} messages, {killed} consumers SIGKILLed at random, {self_killed} killed between commit and ack; {} effects when the kills ended; {total} effects at the end, {distinct} distinct, in {:.1} s",
        mid.1,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        distinct as usize, MESSAGES,
        "{scenario}: every message had its effect"
    );
    assert_eq!(
        total as usize, MESSAGES,
        "{scenario}: no message had two effects"
    );
    assert_eq!(total_after, total, "{scenario}: no late second effect");
    assert!(
        self_killed > 0 && killed > 0,
        "{scenario}: both kinds of kill happened"
    );
}

fn spawn(scenario: &str, setup: &Setup, die_at_ack: u32) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("OUTBOX_INBOX_CHILD", scenario)
        .env("OUTBOX_INBOX_DIE_AT_ACK", die_at_ack.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in &setup.vars {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

use outbox::mysql::sqlx as sqlx_my;
use outbox::postgres::sqlx as sqlx_pg;

// ------------------------------------------------------------------------------ the child

/// Acknowledges like the source it wraps, except that at its `n`-th acknowledgement (when
/// `n` > 0) the process SIGKILLs itself first: the batch's effects are committed, its
/// acknowledgement never sent.
struct DieBeforeAck<S>(S, u32);

#[async_trait]
impl<S: Source> Source for DieBeforeAck<S> {
    type Token = S::Token;
    async fn receive(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> outbox::Result<Vec<Incoming<S::Token>>> {
        self.0.receive(max, wait).await
    }
    async fn ack(&mut self, tokens: Vec<S::Token>) -> outbox::Result<()> {
        if std::env::var("OUTBOX_INBOX_DEBUG").is_ok() {
            eprintln!(
                "[child {}] ack {} (die at {})",
                std::process::id(),
                tokens.len(),
                self.1
            );
        }
        if self.1 == 1 {
            let _ = Command::new("kill")
                .arg("-9")
                .arg(std::process::id().to_string())
                .status();
            std::thread::sleep(Duration::from_secs(10)); // never reached
        }
        self.1 = self.1.saturating_sub(1);
        self.0.ack(tokens).await
    }
}

struct PgEffects(String);

#[async_trait]
impl SqlHandler<sqlx_pg::Postgres> for PgEffects {
    async fn handle(&self, tx: &mut sqlx_pg::PgConnection, m: &Received) -> outbox::Result<()> {
        sqlx_pg::query(&format!("INSERT INTO {} (msg) VALUES ($1)", self.0))
            .bind(m.id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(outbox_sql_err)?;
        tokio::time::sleep(WORK).await;
        Ok(())
    }
}

struct MyEffects(String);

#[async_trait]
impl SqlHandler<sqlx_my::MySql> for MyEffects {
    async fn handle(&self, tx: &mut sqlx_my::MySqlConnection, m: &Received) -> outbox::Result<()> {
        sqlx_my::query(&format!("INSERT INTO {} (msg) VALUES (?)", self.0))
            .bind(m.id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(outbox_sql_err)?;
        tokio::time::sleep(WORK).await;
        Ok(())
    }
}

fn outbox_sql_err(e: impl std::error::Error + Send + Sync + 'static) -> outbox::Error {
    outbox::Error::handler(outbox::Retry::Transient, "effects insert failed").with_source(e)
}

async fn child(scenario: &str) {
    let (broker, db, batched) = parse(scenario);
    let name = env("OUTBOX_INBOX_NAME");
    let target = env("OUTBOX_INBOX_BROKER");
    let db_url = env("OUTBOX_INBOX_DB");
    let self_kill: u32 = env("OUTBOX_INBOX_DIE_AT_ACK").parse().unwrap();
    let effects = format!("{name}_effects");
    let inbox: Box<dyn Inbox> = match db {
        "postgres" => {
            let store = outbox::postgres::PgStore::connect(&db_url).await.unwrap();
            let t: SqlInboxTable<_> = store.inbox_table(&name).unwrap();
            Box::new(t.consumer("effects", PgEffects(effects)).unwrap())
        }
        "mariadb" => {
            let store = outbox::mysql::MySqlStore::connect(&db_url).await.unwrap();
            let t: SqlInboxTable<_> = store.inbox_table(&name).unwrap();
            Box::new(t.consumer("effects", MyEffects(effects)).unwrap())
        }
        _ => {
            let store = SqliteStore::open(&db_url).unwrap();
            let t = store.inbox_table(&name).unwrap();
            Box::new(
                t.consumer("effects", move |tx: &Transaction<'_>, m: &Received| {
                    tx.execute(
                        &format!("INSERT INTO {effects} (msg) VALUES (?1)"),
                        [m.id.to_string()],
                    )
                    .map_err(outbox::sqlite::map_err)?;
                    std::thread::sleep(WORK);
                    Ok(())
                })
                .unwrap(),
            )
        }
    };
    match broker {
        "redis" => {
            let s = outbox::redis::RedisStreamSource::connect(&target, &name, "g", "member")
                .await
                .unwrap();
            run(DieBeforeAck(s, self_kill), inbox, batched).await
        }
        "amqp" => {
            let s = outbox::amqp::AmqpSource::connect(&target, &name)
                .await
                .unwrap();
            run(DieBeforeAck(s, self_kill), inbox, batched).await
        }
        "kafka" => {
            let mut config = outbox::kafka::rdkafka::config::ClientConfig::new();
            config
                .set("bootstrap.servers", &target)
                .set("group.id", "g");
            let s = outbox::kafka::KafkaSource::assign(config, &name, &[0, 1]).unwrap();
            run(DieBeforeAck(s, self_kill), inbox, batched).await
        }
        "nats" => {
            let p = outbox::nats::NatsPublisher::connect(&target).await.unwrap();
            let s = outbox::nats::NatsSource::with_ack_wait(&p, &name, "g", Duration::from_secs(1))
                .await
                .unwrap();
            run(DieBeforeAck(s, self_kill), inbox, batched).await
        }
        other => panic!("unknown broker {other}"),
    }
}

/// (broker, database, batched mode) of a scenario named `broker-database[-batched]`.
fn parse(scenario: &str) -> (&str, &str, bool) {
    let (broker, rest) = scenario.split_once('-').unwrap();
    match rest.strip_suffix("-batched") {
        Some(db) => (broker, db, true),
        None => (broker, rest, false),
    }
}

async fn run<S: Source>(source: S, inbox: Box<dyn Inbox>, batched: bool) {
    let mut consumer = Consumer::new(source, inbox)
        .batched(batched)
        .batch_size(10)
        .unwrap()
        .wait(Duration::from_millis(100))
        .retry(RetryPolicy {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            ..Default::default()
        })
        .unwrap();
    consumer.run(std::future::pending()).await;
}
