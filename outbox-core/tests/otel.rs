//! One trace from the writer's span through the relay's publish to the consumer's handler,
//! seen by the OpenTelemetry SDK's in-memory exporter (feature `otel`). The broker between
//! the relay and the consumer is the recording publisher handing its envelopes to the
//! consumer; the brokers' own header transport is tested with each broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
use opentelemetry::{global, Context};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use outbox_core::{
    async_trait, Consumer, Inbox, Incoming, KeepOrder, MemoryStore, Message, MessageId, Outbox,
    Processed, Received, RecordingPublisher, Seen, Source,
};

/// Deliveries handed out once (what a broker consumer would receive).
struct Queue(Vec<Received>);

#[async_trait]
impl Source for Queue {
    type Token = ();
    async fn receive(
        &mut self,
        _max: usize,
        _wait: Duration,
    ) -> outbox_core::Result<Vec<Incoming<()>>> {
        Ok(self
            .0
            .drain(..)
            .map(|m| Incoming {
                message: Ok(m),
                token: (),
            })
            .collect())
    }
    async fn ack(&mut self, _: Vec<()>) -> outbox_core::Result<()> {
        Ok(())
    }
}

/// An inbox whose handler records a span of its own; dead letters are kept by id.
#[derive(Default, Clone)]
struct Traced {
    dead: Arc<Mutex<Vec<(MessageId, String)>>>,
}

#[async_trait]
impl Inbox for Traced {
    fn consumer(&self) -> &str {
        "billing"
    }
    async fn start(&self, ids: &[MessageId]) -> outbox_core::Result<Vec<Seen>> {
        Ok(ids.iter().map(|_| Seen::New { attempts: 1 }).collect())
    }
    async fn process(&self, _m: &Received) -> outbox_core::Result<Processed> {
        // The handler's span: a child of whatever context the consumer runs it in.
        global::tracer("app").in_span("charge card", |_| ());
        Ok(Processed::Done)
    }
    async fn failed(&self, _: MessageId, _: &str) -> outbox_core::Result<u32> {
        Ok(1)
    }
    async fn dead_letter(&self, m: &Received, e: &str) -> outbox_core::Result<()> {
        self.dead.lock().unwrap().push((m.id, e.to_owned()));
        Ok(())
    }
    async fn requeued(&self, _: usize) -> outbox_core::Result<Vec<Received>> {
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn one_trace_from_the_writer_through_the_relay_to_the_handler() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    global::set_tracer_provider(provider.clone());

    let store = MemoryStore::new();
    let broker = RecordingPublisher::new();
    let outbox = Outbox::builder(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .header_injector(outbox_core::otel::inject_current)
        .build()
        .unwrap();

    // The writer's transaction runs in its span.
    let checkout = global::tracer("app").start("checkout");
    let cx = Context::current_with_span(checkout);
    {
        let _guard = cx.clone().attach();
        let mut tx = store.begin();
        let after = outbox
            .enqueue_blocking(
                &mut tx,
                [Message::new("payments", b"{}".to_vec()).key("order-1")],
            )
            .unwrap();
        tx.commit();
        after.dispatch();
    }
    cx.span().end();

    let relay = outbox.relay().build().unwrap();
    assert_eq!(relay.run_once().await.unwrap().published, 1);
    let sent = broker.published();
    assert_eq!(sent.len(), 1);
    let tp = sent[0].message.headers.get("traceparent").cloned().unwrap();

    // The consumer side: the delivery as published, and one with a broken traceparent.
    let mut delivered = Received::new(sent[0].id, "payments", sent[0].message.payload.clone());
    delivered.headers = sent[0].message.headers.clone();
    let mut broken = Received::new(MessageId::new(), "payments", b"{}".to_vec());
    broken
        .headers
        .insert("traceparent".into(), "00-not-a-trace-01".into());
    let inbox = Traced::default();
    let mut consumer = Consumer::new(Queue(vec![delivered, broken.clone()]), inbox.clone());
    let report = consumer.run_once().await.unwrap();
    assert_eq!(
        (report.processed, report.dead_lettered),
        (1, 1),
        "{report:?}"
    );
    let dead = inbox.dead.lock().unwrap().clone();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].1.contains("malformed traceparent"), "{dead:?}");

    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let by_name: HashMap<String, _> = spans
        .iter()
        .map(|s| (s.name.to_string(), s.clone()))
        .collect();
    let names: Vec<&String> = by_name.keys().collect();
    let checkout = &by_name["checkout"];
    let publish = &by_name["publish payments"];
    let process = &by_name["process payments"];
    let charge = by_name
        .get("charge card")
        .unwrap_or_else(|| panic!("spans: {names:?}"));
    let trace = checkout.span_context.trace_id();
    for s in [publish, process, charge] {
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "{} in the writer's trace",
            s.name
        );
    }
    assert_eq!(publish.parent_span_id, checkout.span_context.span_id());
    assert_eq!(publish.span_kind, SpanKind::Producer);
    assert_eq!(process.parent_span_id, publish.span_context.span_id());
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(charge.parent_span_id, process.span_context.span_id());
    assert!(
        tp.contains(&publish.span_context.span_id().to_string()),
        "the message carries the publish span's context: {tp}"
    );
    let attr = |s: &opentelemetry_sdk::trace::SpanData, k: &str| {
        s.attributes
            .iter()
            .find(|a| a.key.as_str() == k)
            .map(|a| a.value.to_string())
    };
    assert_eq!(
        attr(publish, "messaging.message.id"),
        Some(sent[0].id.to_string())
    );
    assert_eq!(
        attr(publish, "messaging.destination.name").as_deref(),
        Some("payments")
    );
    assert_eq!(attr(process, "messaging.system").as_deref(), Some("outbox"));
}

#[test]
fn traceparent_validation() {
    use outbox_core::valid_traceparent as ok;
    assert!(ok(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ));
    assert!(ok(
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
    ));
    for bad in [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00-not-a-trace-01",
    ] {
        assert!(!ok(bad), "{bad:?}");
    }
}
