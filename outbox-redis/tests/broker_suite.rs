//! The publisher and source suite (`outbox_core::conformance::broker`) on the real Redis
//! (OUTBOX_REDIS_URL, default redis://127.0.0.1:6379/): a stream key per test, the Streams
//! publisher, a consumer group member on the key.

use outbox_core::async_trait;
use outbox_core::conformance::BrokerHarness;
use outbox_redis::{RedisPublisher, RedisStreamSource};

fn url() -> String {
    std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

struct Redis;

#[async_trait]
impl BrokerHarness for Redis {
    type Publisher = RedisPublisher;
    type Source = RedisStreamSource;

    async fn destination(&self) -> String {
        format!("suite-{}", uuid::Uuid::now_v7().simple())
    }

    async fn publisher(&self) -> RedisPublisher {
        RedisPublisher::connect(&url()).await.unwrap()
    }

    async fn source(&self, destination: &str) -> RedisStreamSource {
        RedisStreamSource::connect(&url(), destination, "suite", "member-1")
            .await
            .unwrap()
    }
}

outbox_core::broker_tests!(Redis);
