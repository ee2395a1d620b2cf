//! The publisher and source suite (`outbox_core::conformance::broker`) on a real nats-server
//! of the test's own (JetStream on): a stream per test capturing its subjects, a durable pull
//! consumer on it.

use std::time::Duration;

use async_nats::jetstream::stream::Config;
use outbox_core::async_trait;
use outbox_core::conformance::BrokerHarness;
use outbox_nats::{NatsPublisher, NatsSource};
use outbox_testkit::NatsServer;

struct Nats(NatsServer);

#[async_trait]
impl BrokerHarness for Nats {
    type Publisher = NatsPublisher;
    type Source = NatsSource;

    async fn destination(&self) -> String {
        let stream = format!("suite{}", uuid::Uuid::now_v7().simple());
        self.publisher()
            .await
            .jetstream()
            .create_stream(Config {
                name: stream.clone(),
                subjects: vec![format!("{stream}.>")],
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .unwrap();
        format!("{stream}.events")
    }

    async fn publisher(&self) -> NatsPublisher {
        NatsPublisher::connect(&self.0.url()).await.unwrap()
    }

    async fn source(&self, destination: &str) -> NatsSource {
        let stream = destination.split('.').next().unwrap();
        NatsSource::connect(&self.publisher().await, stream, "suite")
            .await
            .unwrap()
    }
}

outbox_core::broker_tests!(Nats(NatsServer::start()));
