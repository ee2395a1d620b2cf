//! Kafka publisher for the `outbox` framework (rdkafka `FutureProducer`).
//!
//! - **Durability**: `enable.idempotence=true` and `acks=all` by default; a publish succeeds
//!   only when the delivery report says the cluster has the message. Idempotence also keeps
//!   per-partition order through the producer's own retries.
//! - **Partitioning**: the message key is the Kafka key. A message without a key is sent
//!   with its stream name as the key (so a keep-order stream keeps its order across
//!   partitions); [`KafkaPublisher::unkeyed_by_stream`]`(false)` lets Kafka spread unkeyed
//!   messages instead.
//! - **Headers**: `outbox-id` (consumers de-duplicate on it), `outbox-stream`,
//!   `content-type`, and the message's own headers.
//! - **Batches**: every record is handed to librdkafka first, then all delivery reports are
//!   awaited: no round trip per message.
//! - **Errors** are classified from rdkafka's own codes: oversized or invalid records,
//!   authorization failures and unknown topics are permanent; the rest (timeouts, broker
//!   down, full queue, not leader, ...) transient.
//! - **Fatal producer errors** (an idempotent producer fenced, or its sequence lost: after a
//!   message timeout librdkafka asks the broker for a new epoch, and a broker that cannot
//!   give one answers `PRODUCER_FENCED`) make librdkafka refuse every later message. The
//!   publisher then replaces the producer with a new one (a new producer id) from the same
//!   settings; the failed messages are retried by the relay like any transient failure.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod source;
pub use source::{KafkaSource, KafkaToken};

use async_trait::async_trait;
use outbox_core::{Envelope, Error, ErrorKind, Publisher, Retry};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

pub use rdkafka;

/// Map an rdkafka error to a retry class.
pub fn map_err(e: KafkaError) -> Error {
    use RDKafkaErrorCode as C;
    let code = e.rdkafka_error_code();
    let (kind, retry) = match code {
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::InvalidTopic) => {
            (ErrorKind::Unroutable, Retry::Permanent)
        }
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::MessageBatchTooLarge
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::UnsupportedForMessageFormat
            | C::InvalidRequiredAcks,
        ) => (ErrorKind::Publish, Retry::Permanent),
        _ => match &e {
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => {
                (ErrorKind::Config, Retry::Permanent)
            }
            _ => (ErrorKind::Publish, Retry::Transient),
        },
    };
    Error::new(kind, retry, "kafka").with_source(e)
}

/// Errors after which an idempotent producer can send nothing more: its producer id was
/// fenced or its sequence state lost.
fn is_fatal_for_producer(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::Fatal
                | C::ProducerFenced
                | C::InvalidProducerEpoch
                | C::OutOfOrderSequenceNumber
                | C::UnknownProducerId
                | C::InvalidProducerIdMapping
        )
    )
}

/// A producer-creation error without the offending value: librdkafka's own text repeats it,
/// and the value may be a password (`sasl.password`, `ssl.key.password`).
fn config_error(e: KafkaError) -> Error {
    match e {
        KafkaError::ClientConfig(_, description, key, value) => {
            if outbox_core::is_secret_param(&key)
                || (!value.is_empty() && description.contains(&value))
            {
                Error::config(format!("invalid Kafka setting {key}"))
            } else {
                Error::config(format!("invalid Kafka setting {key}: {description}"))
            }
        }
        other => {
            let code = other
                .rdkafka_error_code()
                .map(|c| format!("{c:?}"))
                .unwrap_or_else(|| "no code".into());
            Error::config(format!(
                "cannot create the Kafka producer ({code}); check the settings"
            ))
        }
    }
}

/// `ssl.ca.location`, `ssl.certificate.location` and `ssl.key.location` are read and checked
/// at start-up, so a missing or malformed file is a `Config` error naming the setting.
fn check_tls_files(config: &ClientConfig) -> outbox_core::Result<()> {
    use outbox_core::tls::{read_pem, PemKind};
    let file = |key: &str| {
        config
            .get(key)
            .filter(|v| !v.is_empty() && *v != "probe")
            .map(std::path::PathBuf::from)
            .filter(|p| !p.is_dir())
    };
    if let Some(ca) = file("ssl.ca.location") {
        read_pem("ssl.ca.location", &ca, PemKind::Certificates)?;
    }
    if let Some(cert) = file("ssl.certificate.location") {
        read_pem("ssl.certificate.location", &cert, PemKind::Certificates)?;
    }
    if let Some(key) = file("ssl.key.location") {
        // An encrypted key is fine here: librdkafka decrypts it with ssl.key.password.
        if config.get("ssl.key.password").is_none() {
            read_pem("ssl.key.location", &key, PemKind::PrivateKey)?;
        } else {
            std::fs::metadata(&key).map_err(|e| {
                Error::config(format!(
                    "ssl.key.location: cannot read {}: {e}",
                    key.display()
                ))
            })?;
        }
    }
    Ok(())
}

/// Publishes to Kafka.
pub struct KafkaPublisher {
    config: ClientConfig,
    /// The producer and how many were replaced before it.
    producer: std::sync::RwLock<(FutureProducer, u64)>,
    unkeyed_by_stream: bool,
    /// `enable.idempotence` is on: librdkafka keeps a partition's order across retries.
    idempotent: bool,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("unkeyed_by_stream", &self.unkeyed_by_stream)
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// A producer for `bootstrap_servers` with the defaults: idempotence on, `acks=all`,
    /// `message.timeout.ms=30000`, `linger.ms=5`.
    pub fn new(bootstrap_servers: &str) -> outbox_core::Result<Self> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", bootstrap_servers);
        Self::from_config(config)
    }

    /// A producer from your own settings (security, compression, ...). Idempotence and
    /// `acks=all` are added unless you set them; `message.timeout.ms` and `linger.ms` get the
    /// defaults above unless set. An invalid setting is a `Config` error.
    pub fn from_config(mut config: ClientConfig) -> outbox_core::Result<Self> {
        for (key, value) in [
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("message.timeout.ms", "30000"),
            ("linger.ms", "5"),
        ] {
            if config.get(key).is_none() {
                config.set(key, value);
            }
        }
        check_tls_files(&config)?;
        let idempotent = config.get("enable.idempotence") == Some("true");
        let producer: FutureProducer = config.create().map_err(config_error)?;
        Ok(Self {
            config,
            producer: std::sync::RwLock::new((producer, 0)),
            unkeyed_by_stream: true,
            idempotent,
        })
    }

    /// Key messages without a key by their stream name (default true).
    pub fn unkeyed_by_stream(mut self, yes: bool) -> Self {
        self.unkeyed_by_stream = yes;
        self
    }

    /// The current producer (a handle: a producer that failed fatally is replaced).
    pub fn producer(&self) -> FutureProducer {
        self.current().0
    }

    /// Producers replaced after a fatal error so far.
    pub fn replaced_producers(&self) -> u64 {
        self.current().1
    }

    fn current(&self) -> (FutureProducer, u64) {
        let guard = self.producer.read().unwrap_or_else(|p| p.into_inner());
        (guard.0.clone(), guard.1)
    }

    /// Replace producer number `generation` if it has failed fatally or was `fenced`
    /// (once, whichever caller sees it first).
    fn replace_if_fatal(&self, producer: &FutureProducer, generation: u64, fenced: bool) {
        use rdkafka::producer::Producer;
        let (code, reason) = match producer.client().fatal_error() {
            Some(fatal) => fatal,
            None if fenced => (
                RDKafkaErrorCode::ProducerFenced,
                "the broker fenced the producer's id".to_owned(),
            ),
            None => return,
        };
        let mut guard = self.producer.write().unwrap_or_else(|p| p.into_inner());
        if guard.1 != generation {
            return; // another publish replaced it already
        }
        match self.config.create::<FutureProducer>() {
            Ok(fresh) => {
                tracing::warn!(?code, reason = %outbox_core::printable(&reason), "Kafka producer failed fatally; replaced by a new one");
                *guard = (fresh, generation + 1);
            }
            Err(e) => {
                tracing::error!(error = %map_err(e), "Kafka producer failed fatally and cannot be replaced")
            }
        }
    }

    fn headers(envelope: &Envelope) -> OwnedHeaders {
        let m = &envelope.message;
        let id = envelope.id.to_string();
        let mut h = OwnedHeaders::new_with_capacity(3 + m.headers.len())
            .insert(Header {
                key: "outbox-id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "outbox-stream",
                value: Some(m.stream.as_str()),
            })
            .insert(Header {
                key: "content-type",
                value: Some(m.content_type.as_str()),
            });
        for (name, value) in &m.headers {
            h = h.insert(Header {
                key: name,
                value: Some(value.as_str()),
            });
        }
        h
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, envelope: &Envelope) -> outbox_core::Result<()> {
        outbox_core::single_result(self.publish_batch(&[envelope]).await)
    }

    /// A metadata request to the cluster (no topic is created or written), within 10 s.
    async fn check(&self) -> outbox_core::Result<()> {
        use rdkafka::producer::Producer;
        let producer = self.producer();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, std::time::Duration::from_secs(10))
                .map(drop)
                .map_err(map_err)
        })
        .await
        .map_err(|e| Error::transient("Kafka metadata request failed").with_source(e))?
    }

    /// With idempotence on (the default), one producer keeps each partition's order, retries
    /// included; a unit's messages share a partition (its key, or its stream when unkeyed).
    fn ordered_batches(&self) -> bool {
        self.idempotent && self.unkeyed_by_stream
    }

    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<outbox_core::Result<()>> {
        // Hand every record to librdkafka, then await every delivery report.
        let (producer, generation) = self.current();
        self.replace_if_fatal(&producer, generation, false);
        let (producer, generation) = self.current();
        let mut reports = Vec::with_capacity(batch.len());
        // Records librdkafka refused before sending (a full queue, a record over its size
        // limit), by destination and key: a later record of the same key must not overtake
        // the refused one, so it is not handed over either.
        let mut refused: Vec<(&str, Option<&str>)> = Vec::new();
        for env in batch {
            let m = &env.message;
            let key = m
                .key
                .as_deref()
                .or(self.unkeyed_by_stream.then_some(m.stream.as_str()));
            if refused.contains(&(m.destination.as_str(), key)) {
                reports.push(Err(Error::transient(
                    "not sent: an earlier message of its key was refused in this batch",
                )));
                continue;
            }
            let timestamp = env
                .created_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default();
            let mut record = FutureRecord::<str, [u8]>::to(&m.destination)
                .payload(&m.payload[..])
                .headers(Self::headers(env))
                .timestamp(timestamp);
            if let Some(k) = key {
                record = record.key(k);
            }
            let report = producer.send_result(record).map_err(|(e, _)| map_err(e));
            if report.is_err() {
                refused.push((m.destination.as_str(), key));
            }
            reports.push(report);
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut fenced = false;
        for report in reports {
            results.push(match report {
                Err(e) => Err(e),
                Ok(future) => match future.await {
                    Ok(Ok(_delivery)) => Ok(()),
                    Ok(Err((e, _message))) => {
                        fenced |= is_fatal_for_producer(&e);
                        Err(map_err(e))
                    }
                    Err(_canceled) => Err(Error::transient(
                        "Kafka producer dropped the delivery report",
                    )),
                },
            });
        }
        if fenced || results.iter().any(Result::is_err) {
            self.replace_if_fatal(&producer, generation, fenced);
        }
        results
    }
}
