//! A Redis Streams consumer for the inbox ([`outbox_core::Consumer`]): a consumer group,
//! `XACK` after the effects committed.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{parse_id, Error, ErrorKind, Incoming, Received, Retry, Source, Unreadable};
use redis::aio::MultiplexedConnection;
use redis::Value;

use crate::{client, map_err, redact};

/// Reads one Redis stream as one member of a consumer group.
///
/// - On start the group is created at the stream's beginning if it does not exist
///   (`XGROUP CREATE … 0 MKSTREAM`), so nothing written before the first consumer is missed.
/// - Entries this consumer had read but not acknowledged (it crashed, or its handler ran
///   and the `XACK` was lost) are read again first; entries other members left pending
///   longer than [`claim_idle`](Self::claim_idle) (a member that died) are claimed with
///   `XAUTOCLAIM`. The inbox recognises what was already processed.
/// - The message id is the entry's `id` field (written by `RedisPublisher`); an entry
///   without one is [`Unreadable`] (kept as a dead letter, then acknowledged).
pub struct RedisStreamSource {
    conn: MultiplexedConnection,
    stream: String,
    group: String,
    consumer: String,
    claim_idle: Duration,
    /// Still reading this consumer's own pending entries (from "0") before new ones (">").
    backlog: bool,
}

impl std::fmt::Debug for RedisStreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamSource")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl RedisStreamSource {
    /// Join (creating if needed) `group` on the stream key `stream` as member `consumer`.
    pub async fn connect(
        url: &str,
        stream: &str,
        group: &str,
        consumer: &str,
    ) -> outbox_core::Result<Self> {
        let client = client(url)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(Duration::from_secs(30));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Publish,
                    Retry::Transient,
                    format!("cannot connect to Redis at {}", redact(url)),
                )
                .with_source(e)
            })?;
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created {
            if e.code() != Some("BUSYGROUP") {
                return Err(map_err(e));
            }
        }
        Ok(Self {
            conn,
            stream: stream.into(),
            group: group.into(),
            consumer: consumer.into(),
            claim_idle: Duration::from_secs(60),
            backlog: true,
        })
    }

    /// How long another member's entry stays pending before this one takes it over
    /// (default 60 s; longer than a handler's retries take).
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    fn entries(&self, reply: &Value, out: &mut Vec<Incoming<String>>) {
        // [[id, [field, value, ...]], ...]
        let Value::Array(items) = reply else { return };
        for item in items {
            let Value::Array(pair) = item else { continue };
            let (Some(Value::BulkString(id)), Some(fields)) = (pair.first(), pair.get(1)) else {
                continue;
            };
            let token = String::from_utf8_lossy(id).into_owned();
            let fields = match fields {
                Value::Array(f) => f.as_slice(),
                _ => &[], // a deleted entry (XAUTOCLAIM reports those separately)
            };
            out.push(Incoming {
                message: self.decode(fields, &token),
                token,
            });
        }
    }

    fn decode(&self, fields: &[Value], entry: &str) -> Result<Received, Unreadable> {
        let mut map: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for pair in fields.chunks(2) {
            if let [Value::BulkString(k), Value::BulkString(v)] = pair {
                map.insert(String::from_utf8_lossy(k).into_owned(), v.clone());
            }
        }
        let text = |k: &str| map.get(k).map(|v| String::from_utf8_lossy(v).into_owned());
        let headers: BTreeMap<String, String> = map
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("h:")
                    .map(|name| (name.to_owned(), String::from_utf8_lossy(v).into_owned()))
            })
            .collect();
        match parse_id(map.get("id").map(Vec::as_slice), "`id` field") {
            Ok(id) => Ok(Received {
                id,
                source: self.stream.clone(),
                stream: text("stream"),
                key: text("key"),
                content_type: text("content-type"),
                headers,
                payload: map.get("payload").cloned().unwrap_or_default(),
            }),
            Err(reason) => Err(Unreadable {
                source: format!("{}@{entry}", self.stream),
                reason,
                headers,
                payload: map.get("payload").cloned().unwrap_or_default(),
            }),
        }
    }
}

#[async_trait]
impl Source for RedisStreamSource {
    type Token = String;

    async fn receive(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> outbox_core::Result<Vec<Incoming<String>>> {
        let mut out = Vec::new();
        if self.backlog {
            let reply: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(max)
                .arg("STREAMS")
                .arg(&self.stream)
                .arg("0")
                .query_async(&mut self.conn)
                .await
                .map_err(map_err)?;
            self.entries(&stream_entries(&reply), &mut out);
            if out.is_empty() {
                self.backlog = false;
            } else {
                return Ok(out);
            }
        }
        // Entries a dead member left pending.
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(self.claim_idle.as_millis() as u64)
            .arg("0")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut self.conn)
            .await
            .map_err(map_err)?;
        if let Value::Array(parts) = &reply {
            if let Some(entries) = parts.get(1) {
                self.entries(entries, &mut out);
            }
        }
        if !out.is_empty() {
            return Ok(out);
        }
        let block = wait.min(Duration::from_secs(10)).as_millis().max(1) as u64;
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(block)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(&mut self.conn)
            .await
            .map_err(map_err)?;
        self.entries(&stream_entries(&reply), &mut out);
        Ok(out)
    }

    async fn ack(&mut self, tokens: Vec<String>) -> outbox_core::Result<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        let _: i64 = redis::cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(tokens)
            .query_async(&mut self.conn)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

/// The entries of the only stream in an `XREADGROUP` reply (RESP2 array or RESP3 map).
fn stream_entries(reply: &Value) -> Value {
    match reply {
        Value::Array(streams) => streams
            .first()
            .and_then(|s| match s {
                Value::Array(pair) => pair.get(1).cloned(),
                _ => None,
            })
            .unwrap_or(Value::Nil),
        Value::Map(streams) => streams
            .first()
            .map(|(_, entries)| entries.clone())
            .unwrap_or(Value::Nil),
        _ => Value::Nil,
    }
}
