//! Stores and publishers from URLs.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{Error, ErrorKind, Publisher, Result, Retry, StdoutPublisher, StoreAdmin};
use outbox_sql::redact_url;

/// The scheme of a URL (`postgres`, `mysql`, ...), lower case as given.
pub fn scheme(url: &str) -> &str {
    url.split_once("://").map_or("", |(s, _)| s)
}

/// The database a `mysql://user@host:port/DATABASE?...` URL names.
pub fn database_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let path = rest.split_once('/')?.1;
    let db = path.split(['?', '#']).next()?;
    (!db.is_empty()).then(|| outbox_core::tls::percent_decode(db))
}

/// The store a URL names: `outbox_sql::any::AnyStore`, shared with applications; what the
/// commands need of it besides is [`CliStore`].
pub use outbox_sql::any::AnyStore;

/// What the commands need of a store beyond [`AnyStore`]'s own methods.
#[allow(async_fn_in_trait)]
pub trait CliStore {
    /// `sqlite://PATH` (or `sqlite:PATH`), `postgres://…` / `postgresql://…`,
    /// `mysql://…` / `mariadb://…`.
    /// Only `create` (the `migrate` command) may create a SQLite database file.
    async fn open(url: &str, table: &str, create: bool) -> Result<AnyStore>;
    /// The store as the relay, the console and the commands take it.
    fn store(&self) -> Arc<dyn StoreAdmin>;
    /// The inbox table `table` in this store's database.
    fn inbox_table(&self, table: &str) -> Result<Arc<dyn outbox_core::InboxAdmin>>;
    /// Fail with a clear message when `outbox migrate` has not run.
    async fn require_table(&self) -> Result<()>;
    /// PostgreSQL: a NOTIFY on a channel of its own heard by a LISTEN connection, as relays
    /// hear commits. None for stores without cross-process wake-up.
    async fn notify_roundtrip(&self, within: Duration) -> Option<Result<Duration>>;
    /// How far this host's clock is from the database's; None for SQLite (same host).
    async fn clock_skew(&self) -> Option<Result<Duration>>;
}

impl CliStore for AnyStore {
    async fn open(url: &str, table: &str, create: bool) -> Result<AnyStore> {
        AnyStore::connect_with(
            url,
            outbox_sql::any::AnyOptions {
                table: table.into(),
                create,
                ..Default::default()
            },
        )
        .await
    }

    fn store(&self) -> Arc<dyn StoreAdmin> {
        Arc::new(self.clone())
    }

    fn inbox_table(&self, table: &str) -> Result<Arc<dyn outbox_core::InboxAdmin>> {
        Ok(match self {
            Self::Sqlite(s) => Arc::new(s.inbox_table(table)?),
            Self::Postgres(s) => Arc::new(s.inbox_table(table)?),
            Self::MySql(s) => Arc::new(s.inbox_table(table)?),
        })
    }

    async fn require_table(&self) -> Result<()> {
        if self.table_exists().await? {
            Ok(())
        } else {
            // Not a setting: the store is there, its table is not (exit 1, the migrate hint).
            Err(Error::new(
                ErrorKind::Store,
                Retry::Permanent,
                format!(
                    "table {:?} does not exist: run `outbox migrate` first",
                    self.table()
                ),
            ))
        }
    }

    async fn notify_roundtrip(&self, within: Duration) -> Option<Result<Duration>> {
        let Self::Postgres(s) = self else {
            return None;
        };
        use outbox_sql::sqlx;
        let attempt = async {
            let map = outbox_sql::postgres::map_err;
            let channel = format!("{}_doctor_{}", s.table(), std::process::id());
            let mut listener = sqlx::postgres::PgListener::connect_with(s.pool())
                .await
                .map_err(map)?;
            listener.listen(&channel).await.map_err(map)?;
            let started = std::time::Instant::now();
            sqlx::query("SELECT pg_notify($1, 'doctor')")
                .bind(&channel)
                .execute(s.pool())
                .await
                .map_err(map)?;
            listener.recv().await.map_err(map)?;
            Ok(started.elapsed())
        };
        Some(match tokio::time::timeout(within, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                Retry::Transient,
                format!("no NOTIFY heard within {within:?}"),
            )),
        })
    }

    async fn clock_skew(&self) -> Option<Result<Duration>> {
        use outbox_sql::sqlx;
        let before = std::time::SystemTime::now();
        let db_ms: Result<i64> = match self {
            Self::Sqlite(_) => return None,
            Self::Postgres(s) => {
                sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
                    .fetch_one(s.pool())
                    .await
                    .map_err(outbox_sql::postgres::map_err)
            }
            Self::MySql(s) => {
                sqlx::query_scalar("SELECT CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)")
                    .fetch_one(s.pool())
                    .await
                    .map_err(outbox_sql::mysql::map_err)
            }
        };
        let after = std::time::SystemTime::now();
        Some(db_ms.map(|db| {
            let mid = outbox_core::to_millis(before) / 2 + outbox_core::to_millis(after) / 2;
            Duration::from_millis(db.abs_diff(mid))
        }))
    }
}

/// Split `?k=v&k2=v2` off a URL (values as written).
fn split_query(url: &str) -> (&str, Vec<(String, String)>) {
    match url.split_once('?') {
        None => (url, Vec::new()),
        Some((base, query)) => {
            let pairs = query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (p.to_owned(), String::new()),
                })
                .collect();
            (base, pairs)
        }
    }
}

/// `stdout`, `null` (discards; for benchmarks), `kafka://host:9092[,host2:9092][?librdkafka.setting=value…]`
/// (values percent-decoded), `amqp[s]://user:pass@host:5672/vhost[?cacertfile=…]`,
/// `redis[s]://host:6379/db[?mode=pubsub|streams&maxlen=N&cacertfile=…]`.
pub async fn open_publisher(url: &str) -> Result<Arc<dyn Publisher>> {
    let scheme = url.split("://").next().unwrap_or("");
    match scheme {
        "stdout" => Ok(Arc::new(StdoutPublisher::default())),
        "null" => Ok(Arc::new(outbox_core::NullPublisher)),
        "kafka" => {
            let (base, settings) = split_query(url);
            let bootstrap = base.trim_start_matches("kafka://");
            if bootstrap.is_empty() {
                return Err(Error::config("kafka URL needs brokers: kafka://host:9092"));
            }
            let mut config = outbox_kafka::rdkafka::ClientConfig::new();
            config.set("bootstrap.servers", bootstrap);
            for (k, v) in settings {
                config.set(k, outbox_core::tls::percent_decode(&v));
            }
            Ok(Arc::new(outbox_kafka::KafkaPublisher::from_config(config)?))
        }
        "amqp" | "amqps" => Ok(Arc::new(outbox_amqp::AmqpPublisher::connect(url).await?)),
        "nats" => Ok(Arc::new(outbox_nats::NatsPublisher::connect(url).await?)),
        "http" | "https" => {
            // Signing secrets never come from the URL or a flag: OUTBOX_WEBHOOK_SECRETS (space or
            // comma separated, the signing one first), or the file OUTBOX_WEBHOOK_SECRETS_FILE.
            let text = match (
                std::env::var("OUTBOX_WEBHOOK_SECRETS").ok(),
                std::env::var_os("OUTBOX_WEBHOOK_SECRETS_FILE"),
            ) {
                (Some(t), _) => t,
                (None, Some(path)) => std::fs::read_to_string(&path).map_err(|e| {
                    Error::config(format!(
                        "cannot read OUTBOX_WEBHOOK_SECRETS_FILE {}",
                        std::path::Path::new(&path).display()
                    ))
                    .with_source(e)
                })?,
                (None, None) => String::new(),
            };
            let secrets = text
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(outbox_webhook::WebhookSecret::parse)
                .collect::<Result<Vec<_>>>()?;
            if secrets.is_empty() {
                tracing::warn!("webhook publisher without OUTBOX_WEBHOOK_SECRETS: requests are not signed");
            }
            Ok(Arc::new(outbox_webhook::WebhookPublisher::new(
                outbox_webhook::WebhookOptions {
                    base_url: Some(url.to_owned()),
                    secrets,
                    // Hosts a destination that is a full URL may name besides the base
                    // URL's (comma separated); they may be on private networks.
                    allowed_hosts: std::env::var("OUTBOX_WEBHOOK_ALLOWED_HOSTS")
                        .unwrap_or_default()
                        .split(',')
                        .map(|h| h.trim().to_owned())
                        .filter(|h| !h.is_empty())
                        .collect(),
                    ..Default::default()
                },
            )?))
        }
        "redis" | "rediss" => {
            let (base, params) = split_query(url);
            let mut mode_pubsub = false;
            let mut maxlen = None;
            let mut passthrough = Vec::new();
            for (k, v) in params {
                match k.as_str() {
                    "mode" if v == "pubsub" => mode_pubsub = true,
                    "mode" if v == "streams" => mode_pubsub = false,
                    "mode" => {
                        return Err(Error::config(format!(
                            "redis mode {v:?}: use streams or pubsub"
                        )))
                    }
                    "maxlen" => {
                        maxlen = Some(v.parse::<usize>().map_err(|_| {
                            Error::config(format!("redis maxlen {v:?} is not a number"))
                        })?)
                    }
                    _ => passthrough.push(format!("{k}={v}")),
                }
            }
            let url = if passthrough.is_empty() {
                base.to_owned()
            } else {
                format!("{base}?{}", passthrough.join("&"))
            };
            let p = outbox_redis::RedisPublisher::connect(&url).await?;
            Ok(Arc::new(if mode_pubsub {
                p.pubsub()
            } else {
                p.streams(maxlen)
            }))
        }
        _ => Err(Error::config(format!(
            "unsupported publisher {}: use stdout, null, kafka://, amqp://, redis://, nats:// or http(s):// (webhooks)",
            redact_url(url)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::split_query;

    #[test]
    fn queries() {
        let (base, q) = split_query("redis://h:6379/0?mode=pubsub&maxlen=5");
        assert_eq!(base, "redis://h:6379/0");
        assert_eq!(
            q,
            vec![
                ("mode".into(), "pubsub".into()),
                ("maxlen".into(), "5".into())
            ]
        );
        assert_eq!(split_query("kafka://a:1").1.len(), 0);
    }
}
