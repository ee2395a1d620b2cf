//! Stores and publishers from URLs.

use std::sync::Arc;

use outbox_core::{Error, ErrorKind, Publisher, Result, Retry, StdoutPublisher, Store};
use outbox_sql::mysql::{MySqlOptions, MySqlStore};
use outbox_sql::postgres::{PgOptions, PgStore};
use outbox_sql::redact_url;
use outbox_sqlite::{SqliteOptions, SqliteStore};

/// One of the stores, chosen by URL scheme.
pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PgStore),
    MySql(MySqlStore),
}

impl AnyStore {
    /// `sqlite://PATH` (or `sqlite:PATH`), `postgres://…` / `postgresql://…`,
    /// `mysql://…` / `mariadb://…`.
    /// Only `create` (the `migrate` command) may create a SQLite database file.
    pub async fn open(url: &str, table: &str, create: bool) -> Result<Self> {
        let scheme = url.split(':').next().unwrap_or("");
        match scheme {
            "sqlite" => {
                let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
                if path.is_empty() {
                    return Err(Error::config(
                        "sqlite URL needs a path: sqlite://path/to/file.db",
                    ));
                }
                Ok(Self::Sqlite(SqliteStore::open_with(
                    path,
                    SqliteOptions {
                        table: table.into(),
                        create,
                        ..Default::default()
                    },
                )?))
            }
            "postgres" | "postgresql" => Ok(Self::Postgres(
                PgStore::connect_with(
                    url,
                    PgOptions {
                        table: table.into(),
                        ..Default::default()
                    },
                )
                .await?,
            )),
            "mysql" | "mariadb" => {
                let url = url.replacen("mariadb://", "mysql://", 1);
                Ok(Self::MySql(
                    MySqlStore::connect_with(
                        &url,
                        MySqlOptions {
                            table: table.into(),
                            ..Default::default()
                        },
                    )
                    .await?,
                ))
            }
            _ => Err(Error::config(format!(
                "unsupported store URL {}: use sqlite://, postgres:// or mysql://",
                redact_url(url)
            ))),
        }
    }

    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Self::Sqlite(s) => Arc::new(s.clone()),
            Self::Postgres(s) => Arc::new(s.clone()),
            Self::MySql(s) => Arc::new(s.clone()),
        }
    }

    pub fn table(&self) -> &str {
        match self {
            Self::Sqlite(s) => s.table(),
            Self::Postgres(s) => s.table(),
            Self::MySql(s) => s.table(),
        }
    }

    async fn table_exists(&self) -> Result<bool> {
        match self {
            Self::Sqlite(s) => s.table_exists(),
            Self::Postgres(s) => s.table_exists().await,
            Self::MySql(s) => s.table_exists().await,
        }
    }

    /// Fail with a clear message when `outbox migrate` has not run.
    pub async fn require_table(&self) -> Result<()> {
        if self.table_exists().await? {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Config,
                Retry::Permanent,
                format!(
                    "table {:?} does not exist: run `outbox migrate` first",
                    self.table()
                ),
            ))
        }
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
            "unsupported publisher {}: use stdout, kafka://, amqp:// or redis://",
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
