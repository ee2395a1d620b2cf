//! A JetStream pull consumer for the inbox ([`outbox_core::Consumer`]): explicit
//! acknowledgements, sent after the effects committed.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::Message;
use async_trait::async_trait;
use futures_util::StreamExt;
use outbox_core::{parse_id, Error, ErrorKind, Incoming, Received, Retry, Source, Unreadable};

use crate::NatsPublisher;

/// Reads a JetStream stream through a durable pull consumer shared by every member (each
/// message goes to one of them). Acknowledgements are explicit, one per message, after the
/// effects committed; a member that dies first leaves its messages to be redelivered after
/// the consumer's `ack_wait` (default 30 s here). The message id is the `outbox-id` header
/// (or `Nats-Msg-Id`).
pub struct NatsSource {
    consumer: PullConsumer,
    stream: String,
}

impl std::fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSource")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

fn nats_err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(
        ErrorKind::Publish,
        Retry::Transient,
        format!("NATS: {what}"),
    )
    .with_source(e)
}

impl NatsSource {
    /// The durable pull consumer `durable` on JetStream stream `stream` (created if
    /// missing, with explicit acks and `ack_wait` 30 s), through `client`'s connection.
    pub async fn connect(
        client: &NatsPublisher,
        stream: &str,
        durable: &str,
    ) -> outbox_core::Result<Self> {
        Self::with_ack_wait(client, stream, durable, Duration::from_secs(30)).await
    }

    /// The same with its own `ack_wait`: how long a delivery stays with a member that does
    /// not acknowledge it (longer than a handler's retries take).
    pub async fn with_ack_wait(
        client: &NatsPublisher,
        stream: &str,
        durable: &str,
        ack_wait: Duration,
    ) -> outbox_core::Result<Self> {
        let s = client
            .jetstream()
            .get_stream(stream)
            .await
            .map_err(|e| nats_err(&format!("no stream {stream:?}"), e))?;
        let consumer: PullConsumer = s
            .get_or_create_consumer(
                durable,
                pull::Config {
                    durable_name: Some(durable.into()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| nats_err(&format!("cannot create consumer {durable:?}"), e))?;
        Ok(Self {
            consumer,
            stream: stream.into(),
        })
    }

    fn decode(&self, m: &Message) -> Result<Received, Unreadable> {
        let mut headers = BTreeMap::new();
        let (mut id, mut stream, mut key, mut content_type) = (None, None, None, None);
        if let Some(h) = &m.headers {
            for (name, values) in h.iter() {
                let Some(value) = values.last().map(|v| v.as_str().to_owned()) else {
                    continue;
                };
                match name.as_ref() {
                    "outbox-id" => id = Some(value),
                    "Nats-Msg-Id" => {
                        id.get_or_insert(value);
                    }
                    "outbox-stream" => stream = Some(value),
                    "outbox-key" => key = Some(value),
                    "content-type" => content_type = Some(value),
                    other => {
                        headers.insert(other.to_owned(), value);
                    }
                }
            }
        }
        let payload = m.payload.to_vec();
        match parse_id(id.as_deref().map(str::as_bytes), "outbox-id header") {
            Ok(id) => Ok(Received {
                id,
                source: m.subject.to_string(),
                stream,
                key,
                content_type,
                headers,
                payload,
            }),
            Err(reason) => Err(Unreadable {
                source: match m.info() {
                    Ok(info) => format!("{}@{}", info.stream, info.stream_sequence),
                    Err(_) => m.subject.to_string(),
                },
                reason,
                headers,
                payload,
            }),
        }
    }
}

#[async_trait]
impl Source for NatsSource {
    type Token = Message;

    async fn receive(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> outbox_core::Result<Vec<Incoming<Message>>> {
        // What is there now; when nothing is, wait for the first (the next round takes the
        // rest without waiting).
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(max)
            .messages()
            .await
            .map_err(|e| nats_err("fetch failed", e))?;
        let mut out = Vec::new();
        while let Some(m) = batch.next().await {
            let m =
                m.map_err(|e| nats_err("fetch failed", std::io::Error::other(e.to_string())))?;
            out.push(Incoming {
                message: self.decode(&m),
                token: m,
            });
        }
        if out.is_empty() {
            let mut batch = self
                .consumer
                .batch()
                .max_messages(1)
                .expires(wait.max(Duration::from_millis(10)))
                .messages()
                .await
                .map_err(|e| nats_err("fetch failed", e))?;
            while let Some(m) = batch.next().await {
                let m =
                    m.map_err(|e| nats_err("fetch failed", std::io::Error::other(e.to_string())))?;
                out.push(Incoming {
                    message: self.decode(&m),
                    token: m,
                });
            }
        }
        Ok(out)
    }

    async fn ack(&mut self, tokens: Vec<Message>) -> outbox_core::Result<()> {
        for m in tokens {
            m.ack().await.map_err(|e| {
                Error::new(ErrorKind::Publish, Retry::Transient, "NATS: ack failed")
                    .with_source(std::io::Error::other(e.to_string()))
            })?;
        }
        Ok(())
    }
}
