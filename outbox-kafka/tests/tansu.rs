//! Against a real Kafka-protocol broker a user could deploy: tansu (one node, in-memory
//! storage), a broker of the test's own per test on free ports (`scripts/setup.sh` installs
//! it). The mock-cluster tests (`kafka.rs`) stay the fast path; these prove the same promises
//! against a broker that is not librdkafka talking to itself: every id arrives, each key on
//! one partition in order over several partitions and several relays, an outage of the
//! network to the broker loses nothing, and a topic that does not exist (tansu does not
//! create topics on first use) dead-letters its messages without holding the others.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_core::conformance::RunningRelay;
use outbox_core::{
    KeepOrder, Message, MessageFilter, Outbox, Publisher as _, RetryPolicy, Store, MAX_PAGE,
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
