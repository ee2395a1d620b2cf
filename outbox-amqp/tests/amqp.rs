//! Against the real RabbitMQ on loopback (OUTBOX_AMQP_URL, default
//! amqp://guest:guest@127.0.0.1:5672/%2f), each test with its own queues and exchanges.

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use outbox_amqp::AmqpPublisher;
use outbox_core::{Envelope, ErrorKind, Message, MessageId, Publisher};

fn url() -> String {
    std::env::var("OUTBOX_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

fn env(dest: &str, payload: &str) -> Envelope {
    Envelope {
        id: MessageId::new(),
        created_at: std::time::SystemTime::now(),
        message: Message::new(dest, payload.as_bytes().to_vec()),
    }
}

async fn admin() -> (Connection, Channel) {
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be reachable");
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

async fn queue(ch: &Channel, name: &str) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            auto_delete: false,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

async fn get(ch: &Channel, q: &str) -> Option<lapin::message::BasicGetMessage> {
    ch.basic_get(q.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
}

fn header(props: &lapin::BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

#[tokio::test]
async fn default_exchange_carries_id_headers_and_persistence() {
    let (_c, ch) = admin().await;
    let q = unique("orders");
    queue(&ch, &q).await;
    let publisher = AmqpPublisher::connect(&url()).await.unwrap();
    let mut a = env(&q, r#"{"n":1}"#);
    a.message = a
        .message
        .clone()
        .stream("orders")
        .key("customer-7")
        .header("trace", "abc")
        .content_type("application/json");
    let b = env(&q, "second");
    let out = publisher.publish_batch(&[&a, &b]).await;
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");

    let m = get(&ch, &q).await.expect("first message");
    let p = &m.delivery.properties;
    assert_eq!(m.delivery.data, br#"{"n":1}"#.to_vec());
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), a.id.to_string());
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(header(p, "trace").as_deref(), Some("abc"));
    assert_eq!(header(p, "x-outbox-stream").as_deref(), Some("orders"));
    assert_eq!(header(p, "x-outbox-key").as_deref(), Some("customer-7"));
    let m2 = get(&ch, &q).await.expect("second message, in order");
    assert_eq!(m2.delivery.data, b"second".to_vec());
    assert!(header(&m2.delivery.properties, "x-outbox-key").is_none());
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn exchange_and_routing_key_from_the_destination() {
    let (_c, ch) = admin().await;
    let (ex, q) = (unique("events"), unique("placed"));
    ch.exchange_declare(
        ex.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    queue(&ch, &q).await;
    ch.queue_bind(
        q.as_str().into(),
        ex.as_str().into(),
        "orders.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let publisher = AmqpPublisher::connect(&url()).await.unwrap();
    publisher
        .publish(&env(&format!("{ex}/orders.placed"), "x"))
        .await
        .unwrap();
    let m = get(&ch, &q).await.expect("routed through the exchange");
    assert_eq!(m.delivery.routing_key.as_str(), "orders.placed");
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unroutable_message_is_a_permanent_error_not_a_silent_drop() {
    let publisher = AmqpPublisher::connect(&url()).await.unwrap();
    let e = publisher
        .publish(&env(&unique("no-such-queue"), "x"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unroutable, "{e}");
    assert!(!e.is_transient());
}

#[tokio::test]
async fn a_missing_exchange_fails_and_the_publisher_recovers() {
    let (_c, ch) = admin().await;
    let q = unique("after");
    queue(&ch, &q).await;
    let publisher = AmqpPublisher::connect(&url()).await.unwrap();
    let e = publisher
        .publish(&env(&format!("{}/rk", unique("no-such-exchange")), "x"))
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "NOT_FOUND is permanent: {e}");
    // The broker closed the channel; the next publish reopens it.
    let mut ok = false;
    for _ in 0..50 {
        if publisher.publish(&env(&q, "y")).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "publisher did not recover");
    assert!(get(&ch, &q).await.is_some());
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_url_and_unreachable_broker_are_typed_errors() {
    assert_eq!(
        AmqpPublisher::connect("amqp://[bad")
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Config
    );
    let e = AmqpPublisher::connect("amqp://u:sekrit@127.0.0.1:1/%2f")
        .await
        .unwrap_err();
    assert!(e.is_transient());
    assert!(!format!("{e} {e:?}").contains("sekrit"));
}

/// Headers RabbitMQ would answer by closing the channel (CC / BCC) or the connection (a header
/// table over a frame) fail their own message, permanently, before anything is sent: the
/// other messages of the batch are delivered.
#[tokio::test]
async fn hostile_headers_fail_only_their_own_message() {
    let (_conn, ch) = admin().await;
    let q = unique("hdr");
    queue(&ch, &q).await;
    let publisher = AmqpPublisher::connect(&url()).await.unwrap();
    let mut cc = env(&q, "cc");
    cc.message.headers.insert("CC".into(), "other-queue".into());
    let mut bcc = env(&q, "bcc");
    bcc.message
        .headers
        .insert("bcc".into(), "other-queue".into());
    let mut big = env(&q, "big");
    for i in 0..9 {
        big.message
            .headers
            .insert(format!("h{i}"), "v".repeat(8 * 1024));
    }
    let batch = [
        env(&q, "one"),
        cc,
        env(&q, "two"),
        bcc,
        big,
        env(&q, "three"),
    ];
    let refs: Vec<&Envelope> = batch.iter().collect();
    let results = publisher.publish_batch(&refs).await;
    let ok: Vec<bool> = results.iter().map(|r| r.is_ok()).collect();
    assert_eq!(ok, [true, false, true, false, false, true], "{results:?}");
    for r in results.iter().filter(|r| r.is_err()) {
        assert!(!r.as_ref().unwrap_err().is_transient());
    }
    let mut got = Vec::new();
    while let Some(m) = get(&ch, &q).await {
        got.push(String::from_utf8(m.delivery.data).unwrap());
    }
    // "one" may arrive twice: the broker took it before the close, but its confirm reported
    // the culprit's error, so it was sent again (consumers de-duplicate on message_id).
    let distinct: std::collections::BTreeSet<&str> = got.iter().map(String::as_str).collect();
    assert_eq!(distinct, ["one", "three", "two"].into(), "{got:?}");
    assert!(got.len() <= 4, "{got:?}");
}

/// A message to a missing exchange makes RabbitMQ close the channel, and lapin then reports
/// its permanent error for every message pending on the channel: each failed message is sent
/// again on its own, so the innocent ones are delivered and only the culprit fails.
#[tokio::test]
async fn a_channel_closed_by_one_message_does_not_fail_the_others() {
    let (_conn, ch) = admin().await;
    let q = unique("innocent");
    queue(&ch, &q).await;
    let publisher = AmqpPublisher::connect(&url()).await.unwrap();
    let missing = format!("{}/rk", unique("no-such-exchange"));
    let batch = [
        env(&q, "one"),
        env(&missing, "culprit"),
        env(&q, "two"),
        env(&q, "three"),
    ];
    let refs: Vec<&Envelope> = batch.iter().collect();
    let results = publisher.publish_batch(&refs).await;
    assert!(
        results[0].is_ok() && results[2].is_ok() && results[3].is_ok(),
        "{results:?}"
    );
    assert!(!results[1].as_ref().unwrap_err().is_transient());
    let mut got = Vec::new();
    while let Some(m) = get(&ch, &q).await {
        got.push(String::from_utf8(m.delivery.data).unwrap());
    }
    // "one" may arrive twice: the broker took it before the close, but its confirm reported
    // the culprit's error, so it was sent again (consumers de-duplicate on message_id).
    let distinct: std::collections::BTreeSet<&str> = got.iter().map(String::as_str).collect();
    assert_eq!(distinct, ["one", "three", "two"].into(), "{got:?}");
    assert!(got.len() <= 4, "{got:?}");
}

/// Half-open broker connection: the publisher's connection to RabbitMQ stops forwarding
/// without closing (a partition, a NAT that lost its flow) while new connections work. The
/// relay gives up each publish at its deadline (here 500 ms, as `publish_timeout` does);
/// the publisher must then stop waiting on the dead connection and open a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_is_replaced() {
    let target: std::net::SocketAddr = "127.0.0.1:5672".parse().unwrap();
    assert!(
        url().contains("127.0.0.1:5672"),
        "the test URL points at 127.0.0.1:5672"
    );
    let proxy = outbox_testkit::BlackholeProxy::start(target).await;
    let via_proxy = url().replacen("127.0.0.1:5672", &format!("127.0.0.1:{}", proxy.port), 1);
    let p = AmqpPublisher::connect(&via_proxy).await.unwrap();
    let (_conn, ch) = admin().await;
    let q = unique("outbox-halfopen");
    queue(&ch, &q).await;
    p.publish(&env(&q, "before")).await.unwrap();

    proxy.blackhole_existing();
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let e = env(&q, "after");
        let sent = tokio::time::timeout(Duration::from_millis(500), p.publish(&e)).await;
        if matches!(sent, Ok(Ok(()))) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still no publish after {attempts} attempts: the publisher keeps the dead connection"
        );
    }
    let mut bodies = Vec::new();
    while let Some(m) = get(&ch, &q).await {
        bodies.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    assert!(
        bodies.contains(&"before".to_owned()) && bodies.contains(&"after".to_owned()),
        "{bodies:?}"
    );
    println!("half-open RabbitMQ connection replaced after {attempts} attempts");
}

/// Contract point 17 through a relay: a unit's head that RabbitMQ would refuse (a `CC`
/// header) is refused before sending, and its follower, in the same claimed run, is not sent
/// in that batch: the queue sees the follower only after the head has its outcome (here a
/// dead letter), never before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_head_keeps_its_follower_out_of_the_batch() {
    use outbox_core::{KeepOrder, Outbox, RecordingPublisher, Relay};
    let (_conn, ch) = admin().await;
    let q = unique("ordered");
    queue(&ch, &q).await;
    let dir = tempfile::tempdir().unwrap();
    let store = outbox_sqlite::SqliteStore::open(dir.path().join("o.db")).unwrap();
    store.migrate_now().unwrap();
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::dead_letter())
        .build()
        .unwrap();
    let mut conn = store.connect().unwrap();
    let mut tx = conn.transaction().unwrap();
    let head = Message::new(q.as_str(), b"head".to_vec())
        .key("k")
        .header("CC", "elsewhere");
    let follower = Message::new(q.as_str(), b"follower".to_vec()).key("k");
    let after = outbox.enqueue_blocking(&mut tx, [head, follower]).unwrap();
    tx.commit().unwrap();
    after.dispatch();
    let publisher = AmqpPublisher::connect(&url()).await.unwrap();
    assert!(publisher.ordered_batches());
    let relay = Relay::builder(store.clone(), publisher).build().unwrap();
    let first = relay.step().await.unwrap();
    assert_eq!(
        (first.claimed, first.published, first.dead),
        (2, 0, 1),
        "the head is refused and its follower is not sent in the same batch: {first:?}"
    );
    assert!(get(&ch, &q).await.is_none(), "nothing reached the queue");
    relay.run_once().await.unwrap();
    let got = get(&ch, &q)
        .await
        .expect("the follower, after the head's outcome");
    assert_eq!(got.delivery.data, b"follower");
    assert!(get(&ch, &q).await.is_none());
}
