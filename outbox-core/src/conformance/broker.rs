//! The publisher and source suite: what a broker crate's [`Publisher`] and
//! [`Source`] promise together, run by every broker crate against its real
//! broker (and by yours: implement [`BrokerHarness`], then `broker_tests!(harness)`).
//!
//! A message published is received with its id, payload bytes, stream, key, content type and
//! headers as they were; one key's messages come in the order they were published, across
//! batches; an acknowledged delivery does not come again to the same consumer.

use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use crate::{Envelope, Message, MessageId, Publisher, Received, Source};

/// A broker under test: fresh destinations, a publisher, and consumers of a destination.
#[async_trait]
pub trait BrokerHarness: Send + Sync {
    /// The broker crate's publisher.
    type Publisher: Publisher;
    /// The broker crate's consumer source.
    type Source: Source;
    /// A destination (topic, queue, stream key, subject) no other test uses, ready to take
    /// messages.
    async fn destination(&self) -> String;
    /// A publisher.
    async fn publisher(&self) -> Self::Publisher;
    /// A consumer of `destination` that gets what was published to it before or after this
    /// call; called again for the same destination, it is the same consumer (group, durable
    /// name, queue) as before.
    async fn source(&self, destination: &str) -> Self::Source;
}

/// Expand one `#[tokio::test]` per point of the broker suite for a harness expression.
#[macro_export]
macro_rules! broker_tests {
    ($harness:expr) => {
        $crate::broker_tests!(@each $harness;
            a_message_arrives_as_it_was_published, one_keys_order_is_kept_across_batches,
            an_acknowledged_delivery_does_not_come_again);
    };
    (@each $harness:expr; $($name:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $crate::conformance::broker::$name(&$harness).await;
        }
    )*};
}

fn envelope(message: Message) -> Envelope {
    Envelope {
        id: MessageId::new(),
        created_at: SystemTime::now(),
        message,
    }
}

async fn publish<P: Publisher>(publisher: &P, batch: &[Envelope]) {
    let refs: Vec<&Envelope> = batch.iter().collect();
    let results = publisher.publish_batch(&refs).await;
    assert_eq!(results.len(), batch.len());
    for (e, r) in batch.iter().zip(&results) {
        assert!(r.is_ok(), "message {} was refused: {r:?}", e.id);
    }
}

/// Receives and acknowledges until `count` messages came, within 60 s.
async fn receive<S: Source>(source: &mut S, count: usize) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    while got.len() < count {
        assert!(
            Instant::now() < deadline,
            "{} of {count} messages received within 60 s",
            got.len()
        );
        let batch = source
            .receive(count - got.len(), Duration::from_millis(500))
            .await
            .expect("receive");
        let mut tokens = Vec::new();
        for incoming in batch {
            tokens.push(incoming.token);
            got.push(incoming.message.expect("an outbox message"));
        }
        if !tokens.is_empty() {
            source.ack(tokens).await.expect("ack");
        }
    }
    got
}

/// Id, payload bytes (JSON, binary, text), stream, key, content type and headers arrive as
/// they were published, and the publisher's own headers are not among the application's.
pub async fn a_message_arrives_as_it_was_published<H: BrokerHarness>(h: &H) {
    let destination = h.destination().await;
    let mut source = h.source(&destination).await;
    let publisher = h.publisher().await;
    let sent = vec![
        envelope(
            Message::new(destination.clone(), br#"{"order":7}"#.to_vec())
                .stream("orders")
                .key("customer-7")
                .header("trace", "abc")
                .content_type("application/json"),
        ),
        envelope(
            Message::new(destination.clone(), vec![0u8, 159, 146, 150, 255, 10])
                .stream("orders")
                .key("customer-7")
                .content_type("application/octet-stream"),
        ),
        envelope(
            Message::new(destination.clone(), "é ✓ text".as_bytes().to_vec())
                .stream("orders")
                .key("customer-7")
                .header("x-note", "é ✓")
                .content_type("text/plain"),
        ),
    ];
    publish(&publisher, &sent).await;
    let got = receive(&mut source, sent.len()).await;
    for (s, r) in sent.iter().zip(&got) {
        let m = &s.message;
        assert_eq!(r.id, s.id, "ids in the order published");
        assert_eq!(r.payload, m.payload, "payload of {}", s.id);
        assert_eq!(r.stream.as_deref(), Some(m.stream.as_str()), "{}", s.id);
        assert_eq!(r.key, m.key, "{}", s.id);
        assert_eq!(
            r.content_type.as_deref(),
            Some(m.content_type.as_str()),
            "{}",
            s.id
        );
        for (k, v) in &m.headers {
            assert_eq!(r.headers.get(k), Some(v), "header {k} of {}", s.id);
        }
        assert!(
            !r.headers.keys().any(|k| k.starts_with("outbox-")),
            "the publisher's own headers are not the application's: {:?}",
            r.headers
        );
    }
}

/// Thirty messages of one key, published in three batches, are received in that order.
pub async fn one_keys_order_is_kept_across_batches<H: BrokerHarness>(h: &H) {
    let destination = h.destination().await;
    let mut source = h.source(&destination).await;
    let publisher = h.publisher().await;
    let sent: Vec<Envelope> = (0..30)
        .map(|i| {
            envelope(
                Message::new(destination.clone(), i.to_string().into_bytes())
                    .stream("orders")
                    .key("k"),
            )
        })
        .collect();
    for batch in sent.chunks(10) {
        publish(&publisher, batch).await;
    }
    let got: Vec<MessageId> = receive(&mut source, sent.len())
        .await
        .iter()
        .map(|r| r.id)
        .collect();
    let want: Vec<MessageId> = sent.iter().map(|e| e.id).collect();
    assert_eq!(got, want, "first deliveries in the order published");
}

/// Deliveries acknowledged do not come again to the same consumer, connected anew.
pub async fn an_acknowledged_delivery_does_not_come_again<H: BrokerHarness>(h: &H) {
    let destination = h.destination().await;
    let mut source = h.source(&destination).await;
    let publisher = h.publisher().await;
    let sent: Vec<Envelope> = (0..3)
        .map(|i| {
            envelope(Message::new(destination.clone(), i.to_string().into_bytes()).stream("orders"))
        })
        .collect();
    publish(&publisher, &sent).await;
    assert_eq!(receive(&mut source, sent.len()).await.len(), 3);
    drop(source);
    let mut again = h.source(&destination).await;
    let extra = again
        .receive(10, Duration::from_secs(2))
        .await
        .expect("receive");
    let ids: Vec<String> = extra
        .iter()
        .map(|i| match &i.message {
            Ok(m) => m.id.to_string(),
            Err(u) => format!("unreadable from {}", u.source),
        })
        .collect();
    assert!(
        ids.is_empty(),
        "acknowledged deliveries came again: {ids:?}"
    );
}
