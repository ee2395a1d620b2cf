//! Against a real Kafka-protocol broker a user could deploy: tansu (one node, in-memory
//! storage), a broker of the test's own per test on free ports (`scripts/setup.sh` installs
//! it). The mock-cluster tests (`kafka.rs`) stay the fast path; these prove the same promises
//! against a broker that is not librdkafka talking to itself: every id arrives, each key on
//! one partition in order over several partitions and several relays, an outage of the
//! network to the broker loses nothing, and a topic that does not exist (tansu does not
//! create topics on first use) dead-letters its messages without holding the others.

use outbox_core::StoreAdmin;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_core::conformance::RunningRelay;
use outbox_core::{
    KeepOrder, Message, MessageFilter, Outbox, Publisher as _, RetryPolicy, MAX_PAGE,
};
use outbox_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use outbox_kafka::rdkafka::client::DefaultClientContext;
use outbox_kafka::rdkafka::config::ClientConfig;
use outbox_kafka::rdkafka::message::Message as _;
use outbox_kafka::KafkaPublisher;
use outbox_sqlite::SqliteStore;
use outbox_testkit::{free_port, BlackholeProxy, Tansu};

mod common;
use common::{consume, deliveries, header};

/// Create `topic` with `partitions` on the broker (tansu creates none on first use).
async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_deliver_every_id_with_each_key_in_order_on_one_partition() {
    let broker = Tansu::start();
    create_topic(&broker.bootstrap(), "orders", 4).await;

    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("o.db")).unwrap();
    store.migrate_now().unwrap();
    // The publisher's defaults: idempotent producer, acks=all.
    let publisher = KafkaPublisher::new(&broker.bootstrap()).unwrap();
    publisher.check().await.unwrap();
    let outbox = Outbox::builder(store.clone(), publisher)
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let n = 1200usize;
    let mut conn = store.connect().unwrap();
    for chunk in 0..12 {
        let mut tx = conn.transaction().unwrap();
        let msgs: Vec<Message> = (0..n / 12)
            .map(|i| {
                let i = chunk * (n / 12) + i;
                Message::new("orders", i.to_string().into_bytes())
                    .stream("orders")
                    .key(format!("customer-{}", i % 16))
                    .header("schema", "v1")
            })
            .collect();
        let after = outbox.enqueue_blocking(&mut tx, msgs).unwrap();
        tx.commit().unwrap();
        after.dispatch();
    }
    let relays: Vec<RunningRelay> = (0..2)
        .map(|_| {
            RunningRelay::spawn(
                outbox
                    .relay()
                    .batch_size(50)
                    .poll_interval(Duration::from_millis(20))
                    .build()
                    .unwrap(),
            )
        })
        .collect();
    outbox_core::conformance::eventually("all sent", Duration::from_secs(60), || async {
        store.stats().await.unwrap().total().pending == 0
    })
    .await;
    for r in relays {
        r.stop().await;
    }

    // Every id the store holds, from a real consumer group reading the topic.
    let mut ids = HashSet::new();
    let mut before = None;
    loop {
        let page = store
            .messages(&MessageFilter {
                before,
                limit: MAX_PAGE,
                ..Default::default()
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        before = Some(last.seq);
        ids.extend(page.iter().map(|m| m.envelope.id.to_string()));
    }
    assert_eq!(ids.len(), n);
    let got = consume(broker.bootstrap(), "orders".into(), n).await;
    let d = deliveries(&got);
    let mut partitions: HashMap<String, HashSet<i32>> = HashMap::new();
    for m in &got {
        assert!(ids.contains(&header(m, "outbox-id").unwrap()));
        assert_eq!(header(m, "schema").as_deref(), Some("v1"));
        assert_eq!(header(m, "outbox-stream").as_deref(), Some("orders"));
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        partitions.entry(key).or_default().insert(m.partition());
    }
    let used: HashSet<i32> = partitions.values().flatten().copied().collect();
    println!(
        "tansu, 2 relays: {n} messages, {} consumed, {} duplicates, partitions used {used:?}",
        got.len(),
        d.duplicates()
    );
    assert_eq!(d.distinct(), n, "every id arrived");
    assert_eq!(d.order_violations(), 0, "each key in order");
    for (key, p) in &partitions {
        assert_eq!(p.len(), 1, "key {key} spread over partitions {p:?}");
    }
    assert!(
        used.len() > 1,
        "16 keys over 4 partitions used more than one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_the_network_to_the_broker_loses_nothing() {
    // The broker advertises the proxy, so every connection (bootstrap and partition leader)
    // goes through it; the outage holds every connection, old and new, without a reset.
    let listen = free_port();
    let proxy = BlackholeProxy::start(([127, 0, 0, 1], listen).into()).await;
    let broker = Tansu::start_advertising(listen, proxy.port);
    let bootstrap = format!("127.0.0.1:{}", proxy.port);
    create_topic(&bootstrap, "events", 4).await;
    let report = common::relay_through_an_outage(
        &bootstrap,
        "events",
        || proxy.blackhole(true),
        || proxy.blackhole(false),
    )
    .await;
    println!("kafka outage (tansu behind a black hole): {report}");
    report.assert_nothing_lost();
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_does_not_exist_dead_letters_its_messages_and_holds_no_others() {
    let broker = Tansu::start();
    create_topic(&broker.bootstrap(), "exists", 2).await;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("o.db")).unwrap();
    store.migrate_now().unwrap();
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", broker.bootstrap())
        // How long librdkafka waits for a topic to appear before failing its messages.
        .set("topic.metadata.propagation.max.ms", "1000");
    let outbox = Outbox::builder(store.clone(), KafkaPublisher::from_config(config).unwrap())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let mut conn = store.connect().unwrap();
    let mut tx = conn.transaction().unwrap();
    let mut msgs: Vec<Message> = (0..20)
        .map(|i| {
            Message::new("exists", i.to_string().into_bytes())
                .stream("good")
                .key(format!("k{}", i % 2))
        })
        .collect();
    msgs.push(
        Message::new("no-such-topic", b"0".to_vec())
            .stream("lost")
            .key("x"),
    );
    drop(outbox.enqueue_blocking(&mut tx, msgs).unwrap());
    tx.commit().unwrap();
    let relay = outbox
        .relay()
        .dead_letter_keep_order(true)
        .retry(RetryPolicy {
            initial: Duration::from_millis(50),
            max_attempts: 3,
            ..Default::default()
        })
        .build()
        .unwrap();
    let running = RunningRelay::spawn(relay);
    outbox_core::conformance::eventually("settled", Duration::from_secs(60), || async {
        let s = store.stats().await.unwrap().total();
        s.pending == 0
    })
    .await;
    running.stop().await;
    let stats = store.stats().await.unwrap();
    let by_stream = |name: &str| stats.streams.iter().find(|s| s.stream == name).unwrap();
    assert_eq!(by_stream("good").sent, 20);
    assert_eq!(by_stream("lost").dead, 1, "unknown topic is permanent");
    let got = consume(broker.bootstrap(), "exists".into(), 20).await;
    assert_eq!(deliveries(&got).distinct(), 20);
    assert!(
        !broker.log().contains("panicked"),
        "the broker stayed up: {}",
        broker.log()
    );
}

/// The consumer side on the same broker: a consumer group member and a statically assigned
/// consumer feed an inbox; every message has one effect, a delivery without an id is kept as
/// a dead letter, and a consumer restarted before committing gets its batch again and does
/// nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_consumers_in_a_group_and_by_assignment() {
    use outbox_core::{Consumer, ConsumerReport, Envelope, MessageId, Received};
    use outbox_kafka::KafkaSource;
    use outbox_sqlite::rusqlite::Transaction;

    let broker = Tansu::start();
    create_topic(&broker.bootstrap(), "payments", 2).await;
    let publisher = KafkaPublisher::new(&broker.bootstrap()).unwrap();
    let batch: Vec<Envelope> = (0..40)
        .map(|i| Envelope {
            id: MessageId::new(),
            created_at: std::time::SystemTime::now(),
            message: Message::new("payments", i.to_string().into_bytes())
                .stream("payments")
                .key(format!("k{}", i % 4))
                .header("tenant", "acme"),
        })
        .collect();
    let out = publisher
        .publish_batch(&batch.iter().collect::<Vec<_>>())
        .await;
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    // A record no outbox wrote: no outbox-id header.
    {
        use outbox_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .create()
            .unwrap();
        p.send(
            FutureRecord::<str, str>::to("payments")
                .payload("stray")
                .key("k0"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("app.db")).unwrap();
    store
        .connect()
        .unwrap()
        .execute_batch("CREATE TABLE effects (msg TEXT NOT NULL, tenant TEXT)")
        .unwrap();
    let table = store.inbox_table("inbox").unwrap();
    table.migrate_now().unwrap();
    let handler = |tx: &Transaction<'_>, m: &Received| {
        tx.execute(
            "INSERT INTO effects VALUES (?1, ?2)",
            (m.id.to_string(), m.headers.get("tenant")),
        )
        .map_err(outbox_sqlite::map_err)?;
        Ok(())
    };
    let effects = |store: &SqliteStore| -> (i64, i64) {
        store
            .connect()
            .unwrap()
            .query_row(
                "SELECT COUNT(*), COUNT(DISTINCT msg) FROM effects WHERE tenant = 'acme'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    };

    // A group member takes everything; it "dies" before its first commit of offsets.
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", "billing");
    let source = KafkaSource::from_config(config.clone(), &["payments"]).unwrap();
    let mut consumer = Consumer::new(
        NoCommit(source),
        table.consumer("billing", handler).unwrap(),
    )
    .wait(Duration::from_secs(5));
    let mut first = ConsumerReport::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while first.processed + first.dead_lettered < 41 {
        assert!(std::time::Instant::now() < deadline, "{first:?}");
        first += consumer.run_once().await.unwrap();
    }
    drop(consumer); // offsets never committed

    // Statically assigned, same group: starts from the committed offsets (none), so every
    // record comes again; what was done is recognised.
    let source = KafkaSource::assign(config, "payments", &[0, 1]).unwrap();
    let mut consumer = Consumer::new(source, table.consumer("billing", handler).unwrap())
        .wait(Duration::from_millis(500));
    let mut total = ConsumerReport::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while total.processed + total.duplicates + total.dead_lettered < 41 {
        assert!(std::time::Instant::now() < deadline, "{total:?}");
        total += consumer.run_once().await.unwrap();
    }
    println!("kafka inbox: first run {first:?}, then {total:?}");
    assert_eq!((first.processed, first.dead_lettered), (40, 1));
    assert_eq!(total.duplicates, 40, "{total:?}");
    assert_eq!(total.processed, 0);
    assert_eq!(effects(&store), (40, 40));
    let dead = table.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.payload, b"stray");
    assert!(dead[0]
        .error
        .as_deref()
        .unwrap()
        .contains("no outbox-id header"));
}

/// A source whose acknowledgements never reach the broker (its process dies first, as far as
/// Kafka can tell).
struct NoCommit<S>(S);

#[outbox_core::async_trait]
impl<S: outbox_core::Source> outbox_core::Source for NoCommit<S> {
    type Token = S::Token;
    async fn receive(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> outbox_core::Result<Vec<outbox_core::Incoming<S::Token>>> {
        self.0.receive(max, wait).await
    }
    async fn ack(&mut self, _tokens: Vec<S::Token>) -> outbox_core::Result<()> {
        Ok(())
    }
}
