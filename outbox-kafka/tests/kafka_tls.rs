//! Kafka over TLS (`security.protocol=ssl`, librdkafka with OpenSSL) against librdkafka's mock
//! cluster behind a TLS endpoint of the test's own: the endpoint terminates TLS with
//! certificates made here and rewrites the advertised broker port, so every connection the
//! producer opens (bootstrap and broker) is TLS. Wrong CA and bad file settings are refused.

use std::time::Duration;

use outbox_core::{Envelope, ErrorKind, Message, MessageId, Publisher};
use outbox_kafka::rdkafka::config::ClientConfig;
use outbox_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use outbox_kafka::rdkafka::message::Message as _;
use outbox_kafka::rdkafka::mocking::MockCluster;
use outbox_kafka::KafkaPublisher;
use outbox_testkit::{Pki, Protocol, TlsProxy};

fn env(topic: &str, payload: &str) -> Envelope {
    Envelope {
        id: MessageId::new(),
        created_at: std::time::SystemTime::now(),
        message: Message::new(topic, payload.as_bytes().to_vec()),
    }
}

fn tls_config(bootstrap: &str, ca: &std::path::Path) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("security.protocol", "ssl")
        .set("ssl.ca.location", ca.display().to_string())
        .set("message.timeout.ms", "5000");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_over_tls_and_refuses_a_wrong_ca() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("secure", 1, 1).unwrap();
    let plain = cluster.bootstrap_servers();
    let upstream: std::net::SocketAddr = plain.parse().unwrap();
    let pki = Pki::new("outbox test CA");
    let cert = pki.server("kafka", &["127.0.0.1", "localhost"], false);
    let endpoint = TlsProxy::start(
        upstream,
        Protocol::Kafka {
            advertised_port: upstream.port(),
        },
        pki.server_config(&cert, false),
    )
    .await;
    let bootstrap = endpoint.addr.to_string();

    let publisher = KafkaPublisher::from_config(tls_config(&bootstrap, &pki.ca_path())).unwrap();
    let batch = [env("secure", "one"), env("secure", "two")];
    let refs: Vec<&Envelope> = batch.iter().collect();
    for r in publisher.publish_batch(&refs).await {
        r.unwrap();
    }
    // Read back on the plain listener: the records are in the log.
    let got = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &plain)
            .set("group.id", format!("tls-{}", uuid::Uuid::now_v7().simple()))
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        consumer.subscribe(&["secure"]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut payloads = Vec::new();
        while payloads.len() < 2 && std::time::Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                payloads.push(m.unwrap().payload().unwrap_or_default().to_vec());
            }
        }
        payloads
    })
    .await
    .unwrap();
    assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);

    // A CA that did not sign the broker's certificate: nothing is delivered.
    let stranger = Pki::new("some other CA");
    let publisher =
        KafkaPublisher::from_config(tls_config(&bootstrap, &stranger.ca_path())).unwrap();
    let e = publisher
        .publish(&env("secure", "never"))
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
}

#[test]
fn bad_tls_files_and_settings_are_config_errors_without_values() {
    let pki = Pki::new("outbox test CA");
    let junk = pki.dir().join("junk.pem");
    std::fs::write(&junk, "junk").unwrap();
    let client = pki.client("client", "c");
    let cases = [
        ("ssl.ca.location", "/nonexistent/ca.pem".to_owned()),
        ("ssl.ca.location", junk.display().to_string()),
        ("ssl.certificate.location", junk.display().to_string()),
        ("ssl.key.location", client.cert.display().to_string()),
    ];
    for (key, value) in cases {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", "127.0.0.1:1")
            .set("security.protocol", "ssl")
            .set(key, &value);
        let e = KafkaPublisher::from_config(c).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{key}: {e}");
        assert!(e.to_string().contains(key), "{key}: {e}");
    }
    // SASL over TLS is built in (SCRAM needs OpenSSL): the producer accepts the settings.
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", "127.0.0.1:1")
            .set("security.protocol", "sasl_ssl")
            .set("sasl.mechanisms", mechanism)
            .set("sasl.username", "svc")
            .set("sasl.password", "kafka-secret-pw");
        KafkaPublisher::from_config(c).unwrap();
    }
    // A bad value, or a misspelt secret setting, is reported by name, never by value.
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", "127.0.0.1:1")
        .set("security.protocol", "NOPE-kafka-secret-pw");
    let e = KafkaPublisher::from_config(c).unwrap_err().to_string();
    assert!(e.contains("security.protocol"), "{e}");
    assert!(!e.contains("kafka-secret-pw"), "{e}");
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", "127.0.0.1:1")
        .set("sasl.pasword", "kafka-secret-pw");
    let e = KafkaPublisher::from_config(c).unwrap_err().to_string();
    assert!(
        e.contains("sasl.pasword") && !e.contains("kafka-secret-pw"),
        "{e}"
    );
}
