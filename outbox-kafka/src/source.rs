//! A Kafka consumer-group member for the inbox ([`outbox_core::Consumer`]): offsets are
//! committed after the effects committed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{parse_id, Error, Incoming, Received, Source, Unreadable, ID_HEADER};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::{config_error, map_err};

/// Where a delivery came from: what its acknowledgement commits past.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaToken {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset of the message.
    pub offset: i64,
}

/// Reads topics as a member of a consumer group. Automatic commits are off: after a batch's
/// effects committed, [`Source::ack`] commits each partition's offset past its last message
/// (synchronously). A member that dies before that leaves the batch to be delivered again
/// (to itself after a restart, or to another member after the rebalance); the inbox
/// recognises what was done. Messages of a partition are handled in offset order.
pub struct KafkaSource {
    consumer: Arc<StreamConsumer>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource").finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// Join `group` at `bootstrap_servers` and subscribe to `topics`; a new group starts
    /// at the earliest offsets.
    pub fn new(bootstrap_servers: &str, group: &str, topics: &[&str]) -> outbox_core::Result<Self> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap_servers)
            .set("group.id", group);
        Self::from_config(config, topics)
    }

    /// From your own settings (security, session timeouts, ...). `enable.auto.commit` and
    /// `enable.auto.offset.store` are forced off (offsets are committed after the database
    /// commit, never before); `auto.offset.reset` defaults to `earliest`.
    pub fn from_config(config: ClientConfig, topics: &[&str]) -> outbox_core::Result<Self> {
        let consumer = create(config)?;
        consumer.subscribe(topics).map_err(map_err)?;
        Ok(Self {
            consumer: Arc::new(consumer),
        })
    }

    /// Read the given partitions of `topic` without group rebalancing (static assignment,
    /// for a fixed set of consumers each owning its partitions): each starts after the
    /// group's committed offset, and acknowledgements still commit to the group. A restarted
    /// consumer resumes at once, without waiting out a session timeout.
    pub fn assign(
        config: ClientConfig,
        topic: &str,
        partitions: &[i32],
    ) -> outbox_core::Result<Self> {
        let consumer = create(config)?;
        let mut list = TopicPartitionList::new();
        for p in partitions {
            list.add_partition_offset(topic, *p, Offset::Stored)
                .map_err(map_err)?;
        }
        consumer.assign(&list).map_err(map_err)?;
        Ok(Self {
            consumer: Arc::new(consumer),
        })
    }

    /// The underlying consumer.
    pub fn consumer(&self) -> &StreamConsumer {
        &self.consumer
    }
}

/// A consumer that never commits on its own: offsets only after the database commit.
fn create(mut config: ClientConfig) -> outbox_core::Result<StreamConsumer> {
    config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    if config.get("auto.offset.reset").is_none() {
        config.set("auto.offset.reset", "earliest");
    }
    config.create().map_err(config_error)
}

fn decode(m: &BorrowedMessage<'_>) -> Result<Received, Unreadable> {
    let mut id = None;
    let mut stream = None;
    let mut content_type = None;
    let mut headers = BTreeMap::new();
    if let Some(h) = m.headers() {
        for h in h.iter() {
            let value = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
            match h.key {
                ID_HEADER => id = h.value.map(<[u8]>::to_vec),
                "outbox-stream" => stream = value,
                "content-type" => content_type = value,
                other => {
                    if let Some(v) = value {
                        headers.insert(other.to_owned(), v);
                    }
                }
            }
        }
    }
    let payload = m.payload().map(<[u8]>::to_vec).unwrap_or_default();
    match parse_id(id.as_deref(), "outbox-id header") {
        Ok(id) => Ok(Received {
            id,
            source: m.topic().to_owned(),
            stream,
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            content_type,
            headers,
            payload,
        }),
        Err(reason) => Err(Unreadable {
            source: format!("{}/{}@{}", m.topic(), m.partition(), m.offset()),
            reason,
            headers,
            payload,
        }),
    }
}

#[async_trait]
impl Source for KafkaSource {
    type Token = KafkaToken;

    async fn receive(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> outbox_core::Result<Vec<Incoming<KafkaToken>>> {
        let mut out = Vec::new();
        let mut deadline = wait;
        while out.len() < max {
            let m = match tokio::time::timeout(deadline, self.consumer.recv()).await {
                Err(_elapsed) => break,
                Ok(Err(e)) if out.is_empty() => return Err(map_err(e)),
                Ok(Err(_)) => break, // hand over what we have; the error comes back
                Ok(Ok(m)) => m,
            };
            out.push(Incoming {
                message: decode(&m),
                token: KafkaToken {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                },
            });
            // After the first, take only what is already here.
            deadline = Duration::from_millis(1);
        }
        Ok(out)
    }

    async fn ack(&mut self, tokens: Vec<KafkaToken>) -> outbox_core::Result<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for t in tokens {
            let e = next.entry((t.topic, t.partition)).or_insert(t.offset + 1);
            *e = (*e).max(t.offset + 1);
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in &next {
            list.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                .map_err(map_err)?;
        }
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync))
            .await
            .map_err(|e| Error::transient("Kafka commit task failed").with_source(e))?
            .map_err(map_err)
    }
}
