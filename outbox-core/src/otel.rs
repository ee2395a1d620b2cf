//! Trace context from the writer to the consumer (feature `otel`), W3C Trace Context in the
//! message headers (`traceparent`, `tracestate`), on the OpenTelemetry API:
//!
//! - **Enqueue**: [`inject_current`] (give it to
//!   [`OutboxBuilder::header_injector`](crate::OutboxBuilder::header_injector)) writes the
//!   current OpenTelemetry context into every message's headers.
//! - **Publish**: the relay (and the publish-on-commit path) records a `publish` span per
//!   message, kind Producer, a child of the writer's context, with the messaging attributes
//!   (`messaging.system` = `outbox`, `messaging.destination.name`, `messaging.message.id`,
//!   `messaging.operation.type` = `send`), and the message goes out with the publish span's
//!   context in its `traceparent`.
//! - **Consume**: [`Consumer`](crate::Consumer) records a `process` span, kind Consumer, a
//!   child of the message's context, and runs the inbox and its handler inside it: the
//!   handler's own spans are its children.
//!
//! Spans go to the global tracer provider (`opentelemetry::global::set_tracer_provider`);
//! without one they cost next to nothing. Without the feature no OpenTelemetry crate is built;
//! a malformed `traceparent` on a delivery is refused either way (see [`valid_traceparent`](crate::valid_traceparent)).

use std::collections::BTreeMap;

use opentelemetry::trace::{
    Span, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceState, Tracer,
};
use opentelemetry::{global, Context, KeyValue, SpanId, TraceId};

use crate::message::{Envelope, Message};

/// The tracer's name.
pub const TRACER: &str = "outbox";

/// Write `cx`'s span context into `headers` (nothing when it has no valid span).
pub fn inject(cx: &Context, headers: &mut BTreeMap<String, String>) {
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return;
    }
    headers.insert(
        "traceparent".into(),
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ),
    );
    let state = sc.trace_state().header();
    if state.is_empty() {
        headers.remove("tracestate");
    } else {
        headers.insert("tracestate".into(), state);
    }
}

/// The current OpenTelemetry context into the message's headers: for
/// [`OutboxBuilder::header_injector`](crate::OutboxBuilder::header_injector).
pub fn inject_current(message: &mut Message) {
    inject(&Context::current(), &mut message.headers);
}

/// The remote context `headers` carry; `Ok(None)` without a `traceparent`, `Err` with one
/// that is malformed.
pub fn extract(headers: &BTreeMap<String, String>) -> Result<Option<Context>, String> {
    let Some(tp) = headers.get("traceparent") else {
        return Ok(None);
    };
    if !crate::trace::valid_traceparent(tp) {
        return Err("malformed traceparent header".into());
    }
    let parts: Vec<&str> = tp.split('-').collect();
    let trace_id = TraceId::from_hex(parts[1]).map_err(|_| "bad trace id")?;
    let span_id = SpanId::from_hex(parts[2]).map_err(|_| "bad span id")?;
    let flags = u8::from_str_radix(parts[3], 16).map_err(|_| "bad trace flags")?;
    let state = headers
        .get("tracestate")
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let sc = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
    Ok(Some(Context::new().with_remote_span_context(sc)))
}

/// Publish spans of a batch, and the envelopes with each span's context in their headers.
pub(crate) struct PublishSpans {
    spans: Vec<global::BoxedSpan>,
    /// The envelopes as they go out (their `traceparent` is their publish span's).
    pub envelopes: Vec<Envelope>,
}

pub(crate) fn start_publish(envs: &[&Envelope]) -> PublishSpans {
    let tracer = global::tracer(TRACER);
    let mut spans = Vec::with_capacity(envs.len());
    let mut envelopes = Vec::with_capacity(envs.len());
    for env in envs {
        let parent = extract(&env.message.headers)
            .ok()
            .flatten()
            .unwrap_or_default();
        let span = tracer
            .span_builder(format!("publish {}", env.message.destination))
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("messaging.system", "outbox"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new(
                    "messaging.destination.name",
                    env.message.destination.clone(),
                ),
                KeyValue::new("messaging.message.id", env.id.to_string()),
                KeyValue::new("outbox.stream", env.message.stream.clone()),
            ])
            .start_with_context(&tracer, &parent);
        let mut out = (*env).clone();
        let cx = parent.with_remote_span_context(span.span_context().clone());
        inject(&cx, &mut out.message.headers);
        spans.push(span);
        envelopes.push(out);
    }
    PublishSpans { spans, envelopes }
}

pub(crate) fn end_publish(spans: PublishSpans, results: &[crate::Result<()>]) {
    for (mut span, result) in spans.spans.into_iter().zip(results) {
        if let Err(e) = result {
            span.set_status(Status::error(e.to_string()));
        }
        span.end();
    }
}

/// The consumer's `process` span for one message, and the context to run its work in.
pub(crate) fn start_process(
    consumer: &str,
    source: &str,
    id: crate::MessageId,
    headers: &BTreeMap<String, String>,
) -> Context {
    let tracer = global::tracer(TRACER);
    let parent = extract(headers).ok().flatten().unwrap_or_default();
    let span = tracer
        .span_builder(format!("process {source}"))
        .with_kind(SpanKind::Consumer)
        .with_attributes([
            KeyValue::new("messaging.system", "outbox"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", source.to_owned()),
            KeyValue::new("messaging.message.id", id.to_string()),
            KeyValue::new("messaging.consumer.group.name", consumer.to_owned()),
        ])
        .start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// End the `process` span in `cx` with the outcome.
pub(crate) fn end_process(cx: &Context, error: Option<&crate::Error>) {
    let span = cx.span();
    if let Some(e) = error {
        span.set_status(Status::error(e.to_string()));
    }
    span.end();
}
