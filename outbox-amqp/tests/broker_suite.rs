//! The publisher and source suite (`outbox_core::conformance::broker`) on the real RabbitMQ
//! (OUTBOX_AMQP_URL, default amqp://guest:guest@127.0.0.1:5672/%2f): a queue per test, the
//! publisher on the default exchange, an `AmqpSource` on the queue.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use outbox_amqp::{AmqpPublisher, AmqpSource};
use outbox_core::async_trait;
use outbox_core::conformance::BrokerHarness;

fn url() -> String {
    std::env::var("OUTBOX_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

struct Rabbit;

#[async_trait]
impl BrokerHarness for Rabbit {
    type Publisher = AmqpPublisher;
    type Source = AmqpSource;

    async fn destination(&self) -> String {
        let name = format!("suite-{}", uuid::Uuid::now_v7().simple());
        let conn = Connection::connect(&url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ must be reachable");
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let _ = conn.close(200, "ok".into()).await;
        name
    }

    async fn publisher(&self) -> AmqpPublisher {
        AmqpPublisher::connect(&url()).await.unwrap()
    }

    async fn source(&self, destination: &str) -> AmqpSource {
        AmqpSource::connect(&url(), destination).await.unwrap()
    }
}

outbox_core::broker_tests!(Rabbit);
