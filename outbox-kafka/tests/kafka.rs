//! Against a real Kafka-protocol broker: librdkafka's mock cluster (in-process, on
//! loopback), one cluster per test.

use std::collections::HashMap;

use outbox_core::{Envelope, ErrorKind, Message, MessageId, Publisher};
use outbox_kafka::rdkafka::config::ClientConfig;
use outbox_kafka::rdkafka::message::Message as _;
use outbox_kafka::rdkafka::mocking::MockCluster;
use outbox_kafka::KafkaPublisher;

mod common;
use common::{consume, header};

fn env(topic: &str, payload: &str) -> Envelope {
    Envelope {
        id: MessageId::new(),
        created_at: std::time::SystemTime::now(),
        message: Message::new(topic, payload.as_bytes().to_vec()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_carry_id_key_and_headers_and_keys_stay_on_one_partition() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("orders", 3, 1).unwrap();
    let publisher = KafkaPublisher::new(&cluster.bootstrap_servers()).unwrap();
    let mut batch = Vec::new();
    for i in 0..30 {
        let mut e = env("orders", &i.to_string());
        e.message = e
            .message
            .clone()
            .stream("orders")
            .header("schema", "v1")
            .content_type("text/plain");
        if i % 3 != 0 {
            e.message = e.message.clone().key(format!("k{}", i % 3));
        }
        batch.push(e);
    }
    let out = publisher
        .publish_batch(&batch.iter().collect::<Vec<_>>())
        .await;
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");

    let got = consume(cluster.bootstrap_servers(), "orders".into(), 30).await;
    let ids: HashMap<String, &Envelope> = batch.iter().map(|e| (e.id.to_string(), e)).collect();
    let mut partitions: HashMap<String, std::collections::HashSet<i32>> = HashMap::new();
    let mut order: HashMap<String, Vec<(i32, i64, usize)>> = HashMap::new();
    for m in &got {
        let id = header(m, "outbox-id").expect("outbox-id header");
        let sent = ids[&id];
        assert_eq!(m.payload().unwrap(), &sent.message.payload[..]);
        assert_eq!(header(m, "schema").as_deref(), Some("v1"));
        assert_eq!(header(m, "content-type").as_deref(), Some("text/plain"));
        assert_eq!(header(m, "outbox-stream").as_deref(), Some("orders"));
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        assert_eq!(
            key,
            sent.message.key.clone().unwrap_or_else(|| "orders".into()),
            "unkeyed: keyed by stream"
        );
        partitions
            .entry(key.clone())
            .or_default()
            .insert(m.partition());
        let n: usize = std::str::from_utf8(m.payload().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        order
            .entry(key)
            .or_default()
            .push((m.partition(), m.offset(), n));
    }
    for (key, p) in &partitions {
        assert_eq!(p.len(), 1, "key {key} spread over partitions {p:?}");
    }
    for (key, mut v) in order {
        v.sort();
        let ns: Vec<usize> = v.iter().map(|x| x.2).collect();
        let mut sorted = ns.clone();
        sorted.sort();
        assert_eq!(ns, sorted, "key {key}: offsets not in publish order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_records_fail_permanently_and_bad_settings_are_config_errors() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 1, 1).unwrap();
    let publisher = KafkaPublisher::new(&cluster.bootstrap_servers()).unwrap();
    let big = "x".repeat(2 * 1024 * 1024);
    let e = publisher.publish(&env("t", &big)).await.unwrap_err();
    assert!(!e.is_transient(), "oversized is permanent: {e}");
    publisher.publish(&env("t", "small")).await.unwrap();

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("no.such.setting", "1");
    assert_eq!(
        KafkaPublisher::from_config(config).unwrap_err().kind(),
        ErrorKind::Config
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_in_the_middle_of_a_relay_run_loses_nothing() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("events", 4, 1).unwrap();
    let report = common::relay_through_an_outage(
        &cluster.bootstrap_servers(),
        "events",
        || cluster.broker_down(1).unwrap(),
        || cluster.broker_up(1).unwrap(),
    )
    .await;
    println!("kafka outage (mock cluster): {report}");
    report.assert_nothing_lost();
}
