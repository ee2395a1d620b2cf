//! Redis publisher for the `outbox` framework: Redis Streams (`XADD`, the default) or
//! Pub/Sub (`PUBLISH`).
//!
//! **Streams** keep everything a consumer needs: each entry has the fields `id` (the outbox
//! message id, for de-duplication), `stream`, `key` (when set), `content-type`, `payload`,
//! and one `h:<name>` field per header. The destination is the Redis stream key. An optional
//! `MAXLEN ~ n` caps the stream. A batch is one pipeline: one round trip.
//!
//! **Pub/Sub** publishes the raw payload to the channel named by the destination; Redis
//! Pub/Sub carries no headers or id, and a message with no subscriber is dropped by Redis
//! itself. With [`RedisPublisher::require_subscribers`] a publish that reached nobody is a
//! transient error, so the relay retries it.
//!
//! The connection is a [`redis::aio::ConnectionManager`]: after a Redis restart it reconnects
//! by itself; publishes that failed meanwhile are transient errors, retried by the relay.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod source;
pub use source::RedisStreamSource;

use async_trait::async_trait;
use outbox_core::{Envelope, Error, ErrorKind, Publisher, Retry};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use redis::aio::ConnectionManager;

/// The redis crate this publisher is built with.
pub use redis;

/// How messages are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `XADD destination [MAXLEN ~ n] * field value ...`
    Streams {
        /// Approximate cap on the stream length. Default: none.
        maxlen: Option<usize>,
    },
    /// `PUBLISH destination payload`
    PubSub,
}

/// Publishes to Redis. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct RedisPublisher {
    conn: Arc<Conn>,
    mode: Mode,
    require_subscribers: bool,
}

/// The connection, and what it takes to replace it. The manager reconnects by itself when
/// the connection breaks (a reset, an EOF), but not when it merely stops answering (a
/// half-open connection after a partition): replies time out forever. A request that timed
/// out, or that the relay gave up on (its publish deadline dropped the call), marks the
/// connection suspect, and the next request opens a new one.
struct Conn {
    client: redis::Client,
    config: redis::aio::ConnectionManagerConfig,
    current: std::sync::Mutex<ConnectionManager>,
    suspect: AtomicBool,
}

impl Conn {
    async fn get(&self) -> outbox_core::Result<ConnectionManager> {
        if self.suspect.swap(false, Ordering::SeqCst) {
            tracing::warn!("a Redis request was abandoned or timed out; opening a new connection");
            match self
                .client
                .get_connection_manager_with_config(self.config.clone())
                .await
            {
                Ok(fresh) => {
                    *self.current.lock().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
                    return Ok(fresh);
                }
                Err(e) => {
                    self.suspect.store(true, Ordering::SeqCst);
                    return Err(map_err(e));
                }
            }
        }
        Ok(self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }
}

/// Marks the connection suspect unless disarmed: dropped mid-request (the caller's deadline)
/// or after a timeout.
struct Watch<'a>(&'a AtomicBool, bool);

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

impl std::fmt::Debug for RedisPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPublisher")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Map a redis error: connection, timeout, loading, failover and cluster-state errors are
/// transient; command errors (wrong type, bad arguments) permanent.
pub fn map_err(e: redis::RedisError) -> Error {
    use redis::ErrorKind as K;
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            K::BusyLoadingError | K::TryAgain | K::ClusterDown | K::MasterDown | K::ReadOnly
        );
    let retry = if transient {
        Retry::Transient
    } else {
        Retry::Permanent
    };
    Error::new(ErrorKind::Publish, retry, "redis").with_source(e)
}

use outbox_core::redact_url as redact;
use outbox_core::tls::TlsFiles;

/// A redis client for `url` with the same rules as [`RedisPublisher::connect`] (`rediss://`,
/// and the `cacertfile`, `certfile`, `keyfile` query parameters): for a consumer, or a check,
/// that must reach the same server the same way.
pub fn client(url: &str) -> outbox_core::Result<redis::Client> {
    let (url, files) = TlsFiles::from_url(url);
    let invalid = |e: redis::RedisError| {
        Error::config(format!("invalid Redis URL {}", redact(&url))).with_source(e)
    };
    let tls = url.starts_with("rediss://");
    if !files.is_empty() && !tls {
        return Err(Error::config(format!(
            "{} are TLS settings: use a rediss:// URL",
            TlsFiles::PARAMS.join(", ")
        )));
    }
    #[cfg(feature = "tls")]
    if tls {
        let material = files.load()?;
        return redis::Client::build_with_tls(
            url.as_str(),
            redis::TlsCertificates {
                client_tls: material.identity.map(|(client_cert, client_key)| {
                    redis::ClientTlsConfig {
                        client_cert,
                        client_key,
                    }
                }),
                root_cert: material.ca,
            },
        )
        .map_err(invalid);
    }
    if tls {
        return Err(Error::config(
            "rediss:// needs outbox-redis's `tls` feature (on by default)",
        ));
    }
    redis::Client::open(url.as_str()).map_err(invalid)
}

impl RedisPublisher {
    /// Connect to `url` (`redis://[[user]:password@]host:port/db`) in Streams mode. An invalid
    /// URL or TLS file is a `Config` error; an unreachable server or a failed TLS handshake a
    /// transient `Publish` error.
    ///
    /// TLS: `rediss://host:6380/0` (feature `tls`) verifies the server against the system's
    /// roots, or against the PEM bundle named by `?cacertfile=PATH`; `&certfile=PATH&keyfile=PATH`
    /// add a client certificate (for `tls-auth-clients yes`). The files are read and checked
    /// here.
    pub async fn connect(url: &str) -> outbox_core::Result<Self> {
        let client = client(url)?;
        // Fail fast and let the relay's own backoff do the retrying: a couple of quick
        // reconnect attempts per failed request, bounded connect and response times.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(2)
            .set_factor(10)
            .set_max_delay(1_000)
            .set_connection_timeout(std::time::Duration::from_secs(5))
            .set_response_timeout(std::time::Duration::from_secs(30));
        let conn = client
            .get_connection_manager_with_config(config.clone())
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Publish,
                    Retry::Transient,
                    format!("cannot connect to Redis at {}", redact(url)),
                )
                .with_source(e)
            })?;
        Ok(Self {
            conn: Arc::new(Conn {
                client,
                config,
                current: std::sync::Mutex::new(conn),
                suspect: AtomicBool::new(false),
            }),
            mode: Mode::Streams { maxlen: None },
            require_subscribers: false,
        })
    }

    /// Write with `XADD` (the default); `maxlen` caps each stream approximately.
    pub fn streams(mut self, maxlen: Option<usize>) -> Self {
        self.mode = Mode::Streams { maxlen };
        self
    }

    /// Write with `PUBLISH` instead.
    pub fn pubsub(mut self) -> Self {
        self.mode = Mode::PubSub;
        self
    }

    /// Pub/Sub: treat a message that reached no subscriber as a transient failure.
    pub fn require_subscribers(mut self, yes: bool) -> Self {
        self.require_subscribers = yes;
        self
    }

    fn add(&self, pipe: &mut redis::Pipeline, env: &Envelope) {
        let m = &env.message;
        match self.mode {
            Mode::Streams { maxlen } => {
                let cmd = pipe.cmd("XADD").arg(&m.destination);
                if let Some(n) = maxlen {
                    cmd.arg("MAXLEN").arg("~").arg(n);
                }
                cmd.arg("*")
                    .arg("id")
                    .arg(env.id.to_string())
                    .arg("stream")
                    .arg(&m.stream);
                if let Some(k) = &m.key {
                    cmd.arg("key").arg(k);
                }
                cmd.arg("content-type")
                    .arg(&m.content_type)
                    .arg("payload")
                    .arg(&m.payload[..]);
                for (name, value) in &m.headers {
                    cmd.arg(format!("h:{name}")).arg(value);
                }
            }
            Mode::PubSub => {
                pipe.cmd("PUBLISH").arg(&m.destination).arg(&m.payload[..]);
            }
        }
    }

    fn check(&self, reply: redis::Value) -> outbox_core::Result<()> {
        match (self.mode, reply) {
            (_, redis::Value::ServerError(e)) => Err(map_err(e.into())),
            (Mode::PubSub, redis::Value::Int(0)) if self.require_subscribers => Err(
                Error::transient("published to a Redis channel with no subscriber"),
            ),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Publisher for RedisPublisher {
    async fn publish(&self, envelope: &Envelope) -> outbox_core::Result<()> {
        outbox_core::single_result(self.publish_batch(&[envelope]).await)
    }

    /// `PING`.
    async fn check(&self) -> outbox_core::Result<()> {
        let mut conn = self.conn.get().await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    /// One pipeline for the whole batch; each command's reply is checked on its own.
    /// A batch is one pipeline on one connection: Redis runs its commands in order.
    fn ordered_batches(&self) -> bool {
        true
    }

    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<outbox_core::Result<()>> {
        let mut pipe = redis::pipe();
        for env in batch {
            self.add(&mut pipe, env);
        }
        let mut conn = match self.conn.get().await {
            Ok(c) => c,
            Err(e) => {
                let retry = e.retry();
                return batch
                    .iter()
                    .map(|_| {
                        Err(Error::new(
                            ErrorKind::Publish,
                            retry,
                            "cannot reconnect to Redis",
                        ))
                    })
                    .collect();
            }
        };
        let mut watch = Watch(&self.conn.suspect, true);
        // req_packed_commands keeps each command's reply (a WRONGTYPE on one stream fails
        // that message only, not the batch).
        let result =
            redis::aio::ConnectionLike::req_packed_commands(&mut conn, &pipe, 0, batch.len()).await;
        // Answered in time: the connection works (a timeout keeps it suspect).
        watch.1 = matches!(&result, Err(e) if e.is_timeout());
        drop(watch);
        match result {
            Ok(replies) if replies.len() == batch.len() => {
                replies.into_iter().map(|r| self.check(r)).collect()
            }
            Ok(replies) => {
                let n = replies.len();
                batch
                    .iter()
                    .map(|_| {
                        Err(Error::transient(format!(
                            "redis returned {n} replies for {}",
                            batch.len()
                        )))
                    })
                    .collect()
            }
            Err(e) => {
                let retry = map_err(e).retry();
                batch
                    .iter()
                    .map(|_| {
                        Err(Error::new(
                            ErrorKind::Publish,
                            retry,
                            "redis pipeline failed",
                        ))
                    })
                    .collect()
            }
        }
    }
}
