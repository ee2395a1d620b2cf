//! amqps:// against RabbitMQ through a TLS endpoint of the test's own (a TLS-terminating proxy
//! in front of the loopback broker, with certificates made here): verification with the CA
//! file, a wrong CA, a wrong host name, a client certificate, and bad TLS settings.

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use outbox_amqp::AmqpPublisher;
use outbox_core::{Envelope, ErrorKind, Message, MessageId, Publisher};
use outbox_testkit::{Issued, Pki, Protocol, TlsProxy};

fn url() -> String {
    std::env::var("OUTBOX_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// user:password, host:port and vhost of the plain broker URL.
fn parts() -> (String, std::net::SocketAddr, String) {
    let rest = url().split_once("://").unwrap().1.to_owned();
    let (auth, rest) = rest.rsplit_once('@').unwrap();
    let (hostport, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let hostport = hostport.replace("localhost", "127.0.0.1");
    (auth.to_owned(), hostport.parse().unwrap(), vhost.to_owned())
}

async fn proxy(pki: &Pki, cert: &Issued, client_auth: bool) -> TlsProxy {
    TlsProxy::start(
        parts().1,
        Protocol::Tls,
        pki.server_config(cert, client_auth),
    )
    .await
}

fn amqps(host: &str, proxy: &TlsProxy, query: &str) -> String {
    let (auth, _, vhost) = parts();
    format!(
        "amqps://{auth}@{host}:{}/{vhost}?{query}",
        proxy.addr.port()
    )
}

fn env(dest: &str, payload: &str) -> Envelope {
    Envelope {
        id: MessageId::new(),
        created_at: std::time::SystemTime::now(),
        message: Message::new(dest, payload.as_bytes().to_vec()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_verifies_the_broker_and_presents_client_certificates() {
    let pki = Pki::new("outbox test CA");
    let cert = pki.server("rabbit", &["localhost", "127.0.0.1"], false);
    let ca = format!("cacertfile={}", pki.ca_path().display());
    let admin = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be reachable");
    let ch = admin.create_channel().await.unwrap();
    let q = format!("tls-{}", uuid::Uuid::now_v7().simple());
    let options = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    ch.queue_declare(q.as_str().into(), options, FieldTable::default())
        .await
        .unwrap();

    // The right CA: published over TLS, confirmed, and on the queue.
    let endpoint = proxy(&pki, &cert, false).await;
    let publisher = AmqpPublisher::connect(&amqps("localhost", &endpoint, &ca))
        .await
        .unwrap();
    publisher.publish(&env(&q, "over-tls")).await.unwrap();
    let got = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message is on the queue");
    assert_eq!(got.delivery.data, b"over-tls");

    // Another CA, or a name the certificate does not hold: refused, transient, says why.
    let stranger = Pki::new("some other CA");
    let wrong_ca = format!("cacertfile={}", stranger.ca_path().display());
    let other = pki.server("other", &["mq.example.com"], false);
    let elsewhere = proxy(&pki, &other, false).await;
    for url in [
        amqps("localhost", &endpoint, &wrong_ca),
        amqps("localhost", &elsewhere, &ca),
    ] {
        let e = AmqpPublisher::connect(&url).await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        let text = e.to_string();
        assert!(text.contains("cannot connect to RabbitMQ"), "{text}");
        assert!(
            !text.contains("guest:guest"),
            "password in the error: {text}"
        );
    }

    // A broker that requires a client certificate.
    let strict = proxy(&pki, &cert, true).await;
    assert!(AmqpPublisher::connect(&amqps("localhost", &strict, &ca))
        .await
        .is_err());
    let client = pki.client("client", "outbox-relay");
    let with_cert = format!(
        "{ca}&certfile={}&keyfile={}",
        client.cert.display(),
        client.key.display()
    );
    let p = AmqpPublisher::connect(&amqps("localhost", &strict, &with_cert))
        .await
        .unwrap();
    p.publish(&env(&q, "with-client-cert")).await.unwrap();

    // Bad TLS settings: configuration errors naming the parameter, before any connection.
    let (auth, _, _) = parts();
    for (url, says) in [
        (format!("amqp://{auth}@127.0.0.1:1/%2f?{ca}"), "amqps://"),
        (
            format!("amqps://{auth}@127.0.0.1:1/%2f?cacertfile=/nonexistent.pem"),
            "cacertfile",
        ),
        (
            format!(
                "amqps://{auth}@127.0.0.1:1/%2f?keyfile={}",
                client.key.display()
            ),
            "go together",
        ),
    ] {
        let e = AmqpPublisher::connect(&url).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{url}: {e}");
        assert!(e.to_string().contains(says), "{url}: {e}");
    }
}
