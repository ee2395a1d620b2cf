//! The publisher and source suite (`outbox_core::conformance::broker`) on a real
//! Kafka-protocol broker: tansu, one of the test's own; a topic per test (two partitions),
//! a consumer group per topic.

use std::time::Duration;

use outbox_core::async_trait;
use outbox_core::conformance::BrokerHarness;
use outbox_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use outbox_kafka::rdkafka::client::DefaultClientContext;
use outbox_kafka::rdkafka::config::ClientConfig;
use outbox_kafka::{KafkaPublisher, KafkaSource};
use outbox_testkit::Tansu;

struct Kafka(Tansu);

#[async_trait]
impl BrokerHarness for Kafka {
    type Publisher = KafkaPublisher;
    type Source = KafkaSource;

    async fn destination(&self) -> String {
        let topic = format!("suite-{}", uuid::Uuid::now_v7().simple());
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.0.bootstrap())
            .create()
            .unwrap();
        let results = admin
            .create_topics(
                &[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap();
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e:?}"));
        }
        topic
    }

    async fn publisher(&self) -> KafkaPublisher {
        KafkaPublisher::new(&self.0.bootstrap()).unwrap()
    }

    async fn source(&self, destination: &str) -> KafkaSource {
        KafkaSource::new(
            &self.0.bootstrap(),
            &format!("group-{destination}"),
            &[destination],
        )
        .unwrap()
    }
}

outbox_core::broker_tests!(Kafka(Tansu::start()));
