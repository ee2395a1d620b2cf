//! Cross-crate tests through the `outbox` facade on SQLite: graceful shutdown and deferred
//! function calls (jaiminho's `@save_to_outbox`).

use outbox::StoreAdmin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox::conformance::eventually;
use outbox::sqlite::SqliteStore;
use outbox::{
    async_trait, Envelope, Error, FunctionPublisher, KeepOrder, Message, Outbox, Publisher,
    RecordingPublisher,
};
use tokio::sync::{Notify, Semaphore};

fn store(dir: &tempfile::TempDir) -> SqliteStore {
    let s = SqliteStore::open(dir.path().join("t.db")).unwrap();
    s.migrate_now().unwrap();
    s
}

/// Holds every publish until the test lets it go.
struct Gate {
    inner: RecordingPublisher,
    started: Arc<Notify>,
    release: Arc<Semaphore>,
}

#[async_trait]
impl Publisher for Gate {
    async fn publish(&self, env: &Envelope) -> outbox::Result<()> {
        self.started.notify_one();
        self.release.acquire().await.unwrap().forget();
        self.inner.publish(env).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_batch_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let rec = RecordingPublisher::new();
    let gate = Gate {
        inner: rec.clone(),
        started: Arc::new(Notify::new()),
        release: Arc::new(Semaphore::new(0)),
    };
    let (started, release) = (gate.started.clone(), gate.release.clone());
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let mut conn = store.connect().unwrap();
    let mut tx = conn.transaction().unwrap();
    let msgs: Vec<Message> = (0..5)
        .map(|i| Message::new("d", vec![i]).key(format!("k{i}")))
        .collect();
    let after = outbox.enqueue_blocking(&mut tx, msgs).unwrap();
    tx.commit().unwrap();
    after.dispatch();

    let relay = outbox::Relay::builder(store.clone(), gate)
        .batch_size(10)
        .build()
        .unwrap();
    let stop = Arc::new(Notify::new());
    let stop2 = stop.clone();
    let run = tokio::spawn(async move { relay.run(async move { stop2.notified().await }).await });
    started.notified().await; // a batch is in flight
    stop.notify_one(); // ask to stop while it is
    release.add_permits(5);
    let report = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("relay stopped")
        .unwrap();
    assert_eq!(report.published, 5, "the batch in flight was finished");
    let t = store.stats().await.unwrap().total();
    assert_eq!(
        (t.sent, t.pending),
        (5, 0),
        "and recorded before the relay returned"
    );
    assert_eq!(rec.count(), 5);
}

/// Publish-on-commit with `persist_all = false` keeps a message only in the dispatched task
/// until it is published (or, failed, written for the relay). `Outbox::shutdown` waits for
/// those tasks, so a service that calls it before its runtime ends loses nothing; the
/// runtime here ends right after, and whatever it had cancelled would be gone.
#[test]
fn a_clean_shutdown_loses_no_on_commit_message() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let rec = RecordingPublisher::new();
    let gate = Gate {
        inner: rec.clone(),
        started: Arc::new(Notify::new()),
        release: Arc::new(Semaphore::new(0)),
    };
    let (started, release) = (gate.started.clone(), gate.release.clone());
    let outbox = Outbox::builder(store.clone(), gate)
        .persist_all(false)
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut conn = store.connect().unwrap();
        let mut tx = conn.transaction().unwrap();
        let msgs: Vec<Message> = (0..3).map(|i| Message::new("d", vec![i])).collect();
        let after = outbox.enqueue_blocking(&mut tx, msgs).unwrap();
        assert_eq!(after.len(), 3);
        tx.commit().unwrap();
        after.dispatch();
        started.notified().await; // the batch is at the broker, nowhere else
        assert_eq!(outbox.in_flight(), 1);
        assert_eq!(
            store.stats().await.unwrap().total().pending,
            0,
            "not persisted"
        );

        // Held at the broker: shutdown gives up at its deadline and says so.
        let err = outbox
            .shutdown(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), outbox::ErrorKind::Timeout);
        assert!(err.to_string().contains("1 publish-on-commit"), "{err}");

        let shutdown = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.shutdown(Duration::from_secs(30)).await }
        });
        release.add_permits(3);
        shutdown.await.unwrap().unwrap();
        assert_eq!(outbox.in_flight(), 0);
    });
    drop(rt);
    assert_eq!(rec.count(), 3, "every message reached the broker");
}

/// The same when the broker refuses: the failed messages are written for the relay before
/// `shutdown` returns.
#[test]
fn a_clean_shutdown_persists_failed_on_commit_messages() {
    struct Down;
    #[async_trait]
    impl Publisher for Down {
        async fn publish(&self, _: &Envelope) -> outbox::Result<()> {
            Err(Error::transient("broker down"))
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let outbox = Outbox::builder(store.clone(), Down)
        .persist_all(false)
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..4u8 {
            let mut conn = store.connect().unwrap();
            let mut tx = conn.transaction().unwrap();
            let after = outbox
                .enqueue_blocking(&mut tx, [Message::new("d", vec![i])])
                .unwrap();
            tx.commit().unwrap();
            after.dispatch();
        }
        outbox.shutdown(Duration::from_secs(30)).await.unwrap();
    });
    drop(rt);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = rt.block_on(store.stats()).unwrap().total();
    assert_eq!(t.pending, 4, "failed messages written for the relay: {t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_function_call_is_retried_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let functions = FunctionPublisher::new().register("charge_card", move |env: Envelope| {
        let c = c.clone();
        async move {
            let args: serde_json::Value = serde_json::from_slice(&env.message.payload)?;
            assert_eq!(args["cents"], 1250);
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(Error::transient("payment API timed out"));
            }
            Ok(())
        }
    });
    let outbox = Outbox::builder(store.clone(), functions)
        .retry(outbox::RetryPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(20),
            ..Default::default()
        })
        .build()
        .unwrap();
    let mut conn = store.connect().unwrap();
    let mut tx = conn.transaction().unwrap();
    let call = outbox
        .call("charge_card", &serde_json::json!({"cents": 1250}))
        .unwrap();
    let pending = outbox.enqueue_blocking(&mut tx, [call]).unwrap();
    tx.commit().unwrap();
    let report = pending.publish().await;
    assert_eq!(report.failed, 1, "the first call failed after the commit");
    let relay = outbox.relay().build().unwrap();
    eventually(
        "the relay retries the call",
        Duration::from_secs(30),
        || async {
            relay.run_once().await.unwrap();
            store.stats().await.unwrap().total().sent == 1
        },
    )
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "called once more, not more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_injector_adds_trace_context_on_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let broker = RecordingPublisher::new();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let outbox = Outbox::builder(store.clone(), broker.clone())
        .stream_strategy("ordered", KeepOrder::default())
        .header_injector(move |m| {
            m.headers.insert("traceparent".into(), traceparent.into());
        })
        .build()
        .unwrap();
    let mut conn = store.connect().unwrap();
    let mut tx = conn.transaction().unwrap();
    let msgs = [
        Message::new("d", b"now".to_vec()),
        Message::new("d", b"later".to_vec()).stream("ordered"),
    ];
    let pending = outbox.enqueue_blocking(&mut tx, msgs).unwrap();
    tx.commit().unwrap();
    assert_eq!(pending.publish().await.published, 1);
    outbox.relay().build().unwrap().run_once().await.unwrap();
    let got = broker.published();
    assert_eq!(got.len(), 2);
    for e in got {
        assert_eq!(
            e.message.headers.get("traceparent").map(String::as_str),
            Some(traceparent),
            "{e:?}"
        );
    }
}
