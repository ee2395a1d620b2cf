//! A RabbitMQ queue consumer for the inbox ([`outbox_core::Consumer`]): manual
//! acknowledgements, sent after the effects committed.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Acker;
use lapin::{Channel, Connection};
use outbox_core::{parse_id, Error, Incoming, Received, Source, Unreadable};

use crate::{endpoint, map_err, open_connection};

/// Acknowledges one delivery (on the channel it came from).
#[derive(Debug, Clone)]
pub struct AmqpToken {
    acker: Acker,
    generation: u64,
}

/// Consumes one queue with manual acknowledgements and a prefetch window. A batch is
/// acknowledged once (`multiple` up to its last delivery) after its effects committed; a
/// consumer that dies first leaves its deliveries unacknowledged, and RabbitMQ delivers them
/// again (to this consumer after a reconnect, or to another). A lost connection is reopened
/// on the next receive; acknowledgements of deliveries from the old channel are dropped
/// (RabbitMQ redelivers those).
pub struct AmqpSource {
    url: String,
    tls: lapin::tcp::OwnedTLSConfig,
    queue: String,
    prefetch: u16,
    state: Option<(Connection, Channel, lapin::Consumer)>,
    generation: u64,
}

impl std::fmt::Debug for AmqpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSource")
            .field("url", &outbox_core::redact_url(&self.url))
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl AmqpSource {
    /// Consume `queue` (it must exist) at `url` (same URL rules as the publisher, TLS
    /// included), with a prefetch window of 100.
    pub async fn connect(url: &str, queue: &str) -> outbox_core::Result<Self> {
        let (url, tls) = endpoint(url)?;
        let mut source = Self {
            url,
            tls,
            queue: queue.into(),
            prefetch: 100,
            state: None,
            generation: 0,
        };
        source.open().await?;
        Ok(source)
    }

    /// Unacknowledged deliveries RabbitMQ sends ahead (default 100; at least the consumer's
    /// batch size).
    pub async fn prefetch(mut self, n: u16) -> outbox_core::Result<Self> {
        self.prefetch = n.max(1);
        self.state = None;
        self.open().await?;
        Ok(self)
    }

    async fn open(&mut self) -> outbox_core::Result<()> {
        let conn = open_connection(&self.url, &self.tls).await?;
        let channel = conn.create_channel().await.map_err(map_err)?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(map_err)?;
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(map_err)?;
        self.generation += 1;
        self.state = Some((conn, channel, consumer));
        Ok(())
    }

    fn decode(&self, d: &Delivery) -> Result<Received, Unreadable> {
        let p = &d.properties;
        let mut headers = BTreeMap::new();
        let (mut stream, mut key) = (None, None);
        if let Some(table) = p.headers() {
            for (k, v) in table.inner() {
                let text = match v {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    AMQPValue::ShortString(s) => s.as_str().to_owned(),
                    _ => continue,
                };
                match k.as_str() {
                    "x-outbox-stream" => stream = Some(text),
                    "x-outbox-key" => key = Some(text),
                    other => {
                        headers.insert(other.to_owned(), text);
                    }
                }
            }
        }
        let id = p.message_id().as_ref().map(|s| s.as_str().as_bytes());
        match parse_id(id, "message_id property") {
            Ok(id) => Ok(Received {
                id,
                source: self.queue.clone(),
                stream,
                key,
                content_type: p.content_type().as_ref().map(|c| c.as_str().to_owned()),
                headers,
                payload: d.data.clone(),
            }),
            Err(reason) => Err(Unreadable {
                source: self.queue.clone(),
                reason,
                headers,
                payload: d.data.clone(),
            }),
        }
    }
}

#[async_trait]
impl Source for AmqpSource {
    type Token = AmqpToken;

    async fn receive(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> outbox_core::Result<Vec<Incoming<AmqpToken>>> {
        let healthy = self
            .state
            .as_ref()
            .is_some_and(|(c, ch, _)| c.status().connected() && ch.status().connected());
        if !healthy {
            self.state = None;
            self.open().await?;
        }
        let mut out = Vec::new();
        let mut deadline = wait;
        while out.len() < max {
            let (_, _, consumer) = self.state.as_mut().expect("opened above");
            let next = match tokio::time::timeout(deadline, consumer.next()).await {
                Err(_elapsed) => break,
                Ok(None) => {
                    self.state = None;
                    if out.is_empty() {
                        return Err(Error::transient("the RabbitMQ consumer was cancelled"));
                    }
                    break;
                }
                Ok(Some(Err(e))) => {
                    self.state = None;
                    if out.is_empty() {
                        return Err(map_err(e));
                    }
                    break;
                }
                Ok(Some(Ok(d))) => d,
            };
            out.push(Incoming {
                message: self.decode(&next),
                token: AmqpToken {
                    acker: next.acker.clone(),
                    generation: self.generation,
                },
            });
            deadline = Duration::from_millis(1);
        }
        Ok(out)
    }

    async fn ack(&mut self, tokens: Vec<AmqpToken>) -> outbox_core::Result<()> {
        let Some(last) = tokens
            .into_iter()
            .filter(|t| t.generation == self.generation)
            .last()
        else {
            return Ok(());
        };
        last.acker
            .ack(BasicAckOptions { multiple: true })
            .await
            .map_err(map_err)?;
        Ok(())
    }
}
