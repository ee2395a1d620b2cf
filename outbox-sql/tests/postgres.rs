//! The delivery contract against a real PostgreSQL (OUTBOX_PG_URL, default
//! postgres://postgres@127.0.0.1:5432/test). No skip: an unreachable server fails the tests.

#[macro_use]
mod common;

sql_store_tests! {
    harness: Pg,
    store: PgStore,
    options: PgOptions,
    module: postgres,
    url_env: "OUTBOX_PG_URL",
    default_url: "postgres://postgres@127.0.0.1:5432/test",
    unreachable_url: "postgres://app:hunter2secret@127.0.0.1:1/db",
    business_ddl: "id BIGSERIAL PRIMARY KEY",
    business_insert: "INSERT INTO {}_business DEFAULT VALUES",
    tamper: "UPDATE {} SET payload = 'tampered'::bytea WHERE seq = $1",
    corrupt: |kind| {
        use outbox_core::conformance::Corruption as C;
        match kind {
            C::HeadersNotAMap => Some("headers = '[1,2]'::jsonb"),
            C::UnknownStrategy => Some("strategy = 'teleport'"),
            C::NegativeAttempts => Some("attempts = -5"),
            C::DestinationNewline => Some("destination = E'a\\r\\nb'"),
            C::StreamWhitespace => Some("stream = ' padded '"),
            // UUID and TEXT columns refuse these.
            C::IdNotUuid | C::KeyNotUtf8 | C::StreamBlob => None,
        }
    },
}

/// LISTEN/NOTIFY: a relay in "another process" (its own pool, no in-process notification)
/// sleeping on a 120 s poll interval publishes within the deadline of a commit elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_a_relay_in_another_process() {
    use outbox_core::conformance::eventually;
    use outbox_core::{RecordingPublisher, Relay, Strategy};
    use std::time::Duration;

    let h = Pg;
    let writer = h.fresh().await;
    let relay_side = h.reopen(&writer).await;
    let broker = RecordingPublisher::new();
    let outbox = Outbox::builder(writer.clone(), RecordingPublisher::new())
        .strategy(Strategy::KeepOrder)
        .build()
        .unwrap();
    let relay = Relay::builder(relay_side, broker.clone())
        .poll_interval(Duration::from_secs(120))
        .build()
        .unwrap();
    let running = outbox_core::conformance::RunningRelay::spawn(relay);
    for i in 0..3usize {
        tokio::time::sleep(Duration::from_millis(200)).await; // let the relay reach its idle wait
        let msg = Message::new("d", i.to_string().into_bytes());
        drop(h.transact(&writer, &outbox, vec![msg], true).await.unwrap()); // no in-process wake-up
        eventually(
            "NOTIFY wakes the other relay",
            Duration::from_secs(10),
            || async { broker.count() == i + 1 },
        )
        .await;
    }
    running.stop().await;
}
