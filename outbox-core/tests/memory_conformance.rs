//! The delivery contract against the in-memory store (engine unit tests).

use outbox_core::StoreAdmin;
use std::sync::{Arc, Mutex};

use outbox_core::conformance::{Corruption, Harness};
use outbox_core::{async_trait, AfterCommit, MemoryStore, Message, Outbox, Result};

/// Memory store plus a business "table" that shares its transactions.
#[derive(Default)]
struct Mem {
    business: Mutex<i64>,
}

#[async_trait]
impl Harness for Mem {
    type Store = MemoryStore;

    async fn fresh(&self) -> Arc<MemoryStore> {
        Arc::new(MemoryStore::new())
    }

    async fn reopen(&self, store: &MemoryStore) -> Arc<MemoryStore> {
        Arc::new(store.clone())
    }

    async fn transact(
        &self,
        store: &MemoryStore,
        outbox: &Outbox<Arc<MemoryStore>>,
        messages: Vec<Message>,
        commit: bool,
    ) -> Result<AfterCommit> {
        let mut tx = store.begin();
        let enqueued = outbox.enqueue_blocking(&mut tx, messages);
        if enqueued.is_err() || commit {
            // the business row commits with the transaction
            *self.business.lock().unwrap() += 1;
            tx.commit();
            enqueued
        } else {
            tx.rollback();
            Ok(AfterCommit::empty())
        }
    }

    async fn business_rows(&self, _store: &MemoryStore) -> i64 {
        *self.business.lock().unwrap()
    }

    async fn tamper(&self, store: &MemoryStore, seq: i64) {
        store.tamper(seq, b"tampered".to_vec());
    }

    async fn corrupt(&self, store: &MemoryStore, seq: i64, kind: Corruption) -> bool {
        // Typed fields: only what a String can hold.
        match kind {
            Corruption::DestinationNewline => {
                store.alter(seq, |m| m.envelope.message.destination = "a\r\nb".into())
            }
            Corruption::StreamWhitespace => {
                store.alter(seq, |m| m.envelope.message.stream = " padded ".into())
            }
            Corruption::UnitMoved => store.alter(seq, |m| m.unit = "another-unit".into()),
            _ => return false,
        }
        true
    }
}

outbox_core::conformance_tests!(Mem::default());

/// A relay that is running out of lease mid-batch gives the rest of the batch back instead of
/// publishing after its lease could have expired; the rest follows in order.
#[tokio::test]
async fn a_batch_running_out_of_lease_gives_the_rest_back() {
    use outbox_core::{async_trait, Envelope, KeepOrder, Publisher, RecordingPublisher, Relay};
    use std::time::Duration;

    struct Slow(RecordingPublisher);
    #[async_trait]
    impl Publisher for Slow {
        async fn publish(&self, e: &Envelope) -> Result<()> {
            tokio::time::sleep(Duration::from_millis(150)).await;
            self.0.publish(e).await
        }
    }

    let store = MemoryStore::new();
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let mut tx = store.begin();
    let after = outbox
        .enqueue_blocking(
            &mut tx,
            (0..8u8).map(|i| Message::new("d", vec![i]).key("k")),
        )
        .unwrap();
    tx.commit();
    after.dispatch();

    let broker = RecordingPublisher::new();
    // One unit of 8: 8 waves of 150 ms, but the lease allows ~2 before 0.9 x lease is reached.
    let relay = Relay::builder(store.clone(), Slow(broker.clone()))
        .lease(Duration::from_millis(700))
        .publish_timeout(Duration::from_millis(300))
        .batch_size(8)
        .build()
        .unwrap();
    let first = relay.step().await.unwrap();
    assert_eq!(first.claimed, 8);
    assert!(
        first.published < 8 && first.released == 8 - first.published,
        "{first:?}"
    );
    // A batch that ran out of lease halves the next claim.
    let second = relay.step().await.unwrap();
    assert_eq!(second.claimed, 4, "{second:?}");
    let rest = relay.run_once().await.unwrap();
    assert_eq!(first.published + second.published + rest.published, 8);
    let order: Vec<u8> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload[0])
        .collect();
    assert_eq!(order, (0..8).collect::<Vec<u8>>());
}

/// `dispatch` outside a Tokio runtime does not panic; the persisted row is left to the relay.
#[test]
fn dispatch_outside_a_runtime_leaves_the_row_to_the_relay() {
    use outbox_core::RecordingPublisher;
    let store = MemoryStore::new();
    let broker = RecordingPublisher::new();
    let outbox = Outbox::builder(store.clone(), broker.clone())
        .build()
        .unwrap();
    let mut tx = store.begin();
    let after = outbox
        .enqueue_blocking(&mut tx, [Message::new("d", b"x".to_vec())])
        .unwrap();
    tx.commit();
    after.dispatch(); // no runtime here
    assert_eq!(broker.count(), 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pending = rt.block_on(store.stats()).unwrap().total().pending;
    assert_eq!(pending, 1, "still there for the relay");
}

/// `OutboxBuilder::encoder` replaces the default JSON encoder (jaiminho's DEFAULT_ENCODER).
#[test]
fn a_custom_encoder_encodes_payloads() {
    use outbox_core::{Encoder, RecordingPublisher};

    /// JSON with a trailing newline and its own content type (NDJSON).
    struct Ndjson;
    impl Encoder for Ndjson {
        fn content_type(&self) -> &str {
            "application/x-ndjson"
        }
        fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>> {
            let mut out = serde_json::to_vec(value)?;
            out.push(b'\n');
            Ok(out)
        }
    }

    let outbox = Outbox::builder(MemoryStore::new(), RecordingPublisher::new())
        .encoder(Ndjson)
        .build()
        .unwrap();
    let m = outbox.message("d", &serde_json::json!({"a": 1})).unwrap();
    assert_eq!(m.payload, b"{\"a\":1}\n");
    assert_eq!(m.content_type, "application/x-ndjson");
    let call = outbox.call("f", &[1, 2]).unwrap();
    assert_eq!(call.payload, b"[1,2]\n");
    let default = Outbox::builder(MemoryStore::new(), RecordingPublisher::new())
        .build()
        .unwrap();
    assert_eq!(
        default.message("d", &1).unwrap().content_type,
        "application/json"
    );
}

/// Publish-on-commit runs at most `on_commit_concurrency` batches at once, however many
/// transactions commit together; the rest wait their turn and are all published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_commit_publishing_is_bounded() {
    use outbox_core::conformance::eventually;
    use outbox_core::{async_trait, Config, Envelope, Publisher};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[derive(Default)]
    struct Gauge {
        now: AtomicUsize,
        max: AtomicUsize,
        done: AtomicUsize,
    }
    struct Slow(Arc<Gauge>);
    #[async_trait]
    impl Publisher for Slow {
        async fn publish(&self, _e: &Envelope) -> Result<()> {
            let n = self.0.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.0.max.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.0.now.fetch_sub(1, Ordering::SeqCst);
            self.0.done.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    let gauge = Arc::new(Gauge::default());
    let store = MemoryStore::new();
    let outbox = Outbox::builder(store.clone(), Slow(gauge.clone()))
        .config(Config {
            on_commit_concurrency: 3,
            ..Default::default()
        })
        .build()
        .unwrap();
    for i in 0..20u8 {
        let mut tx = store.begin();
        let after = outbox
            .enqueue_blocking(&mut tx, [Message::new("d", vec![i])])
            .unwrap();
        tx.commit();
        after.dispatch();
    }
    eventually("all 20 published", Duration::from_secs(30), || async {
        gauge.done.load(Ordering::SeqCst) == 20
    })
    .await;
    let max = gauge.max.load(Ordering::SeqCst);
    assert!(
        (2..=3).contains(&max),
        "{max} publishes in flight at once; the bound is 3"
    );
}

/// A publisher that keeps a batch's order gets a keep-order unit's whole claimed run in one
/// batch; when message i of the run fails, i and everything after it wait for the retry (even
/// what the broker took), so the last copy of each message arrives in order; the failed head
/// is then retried alone before the rest goes as a run. One that does not keep order gets one
/// message of the unit per batch.
#[tokio::test]
async fn an_ordered_publisher_takes_a_units_run_in_one_batch() {
    use outbox_core::{
        async_trait, Envelope, Error, KeepOrder, Publisher, RecordingPublisher, Relay,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counted {
        broker: RecordingPublisher,
        batches: AtomicUsize,
        largest: AtomicUsize,
        ordered: bool,
        /// Fail the first publish of this payload byte.
        fail_once: Mutex<Option<u8>>,
    }
    #[async_trait]
    impl Publisher for Counted {
        async fn publish(&self, e: &Envelope) -> Result<()> {
            self.publish_batch(&[e]).await.pop().unwrap()
        }
        async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<Result<()>> {
            self.batches.fetch_add(1, Ordering::SeqCst);
            self.largest.fetch_max(batch.len(), Ordering::SeqCst);
            let mut out = Vec::new();
            for e in batch {
                let failing = {
                    let mut fail = self.fail_once.lock().unwrap();
                    let hit = *fail == Some(e.message.payload[0]);
                    if hit {
                        *fail = None;
                    }
                    hit
                };
                if failing {
                    out.push(Err(Error::transient("broker hiccup")));
                } else {
                    out.push(self.broker.publish(e).await);
                }
            }
            out
        }
        fn ordered_batches(&self) -> bool {
            self.ordered
        }
    }

    for ordered in [true, false] {
        let store = MemoryStore::new();
        let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
            .strategy(KeepOrder::default())
            .build()
            .unwrap();
        let mut tx = store.begin();
        let after = outbox
            .enqueue_blocking(
                &mut tx,
                (0..50u8).map(|i| Message::new("d", vec![i]).key("k")),
            )
            .unwrap();
        tx.commit();
        after.dispatch();
        let publisher = Arc::new(Counted {
            broker: RecordingPublisher::new(),
            batches: AtomicUsize::new(0),
            largest: AtomicUsize::new(0),
            ordered,
            fail_once: Mutex::new(Some(20)),
        });
        let relay = Relay::builder(store.clone(), publisher.clone())
            .retry(outbox_core::RetryPolicy {
                initial: std::time::Duration::from_millis(1),
                max: std::time::Duration::from_millis(1),
                multiplier: 1.0,
                jitter: 0.0,
                max_attempts: 10,
            })
            .batch_size(50)
            .build()
            .unwrap();
        let first = relay.step().await.unwrap();
        assert_eq!(first.published, 20, "ordered {ordered}: {first:?}");
        assert_eq!((first.failed, first.released), (1, 29), "{first:?}");
        if ordered {
            assert_eq!(publisher.batches.load(Ordering::SeqCst), 1);
            assert_eq!(publisher.largest.load(Ordering::SeqCst), 50);
        } else {
            assert_eq!(publisher.batches.load(Ordering::SeqCst), 21);
            assert_eq!(publisher.largest.load(Ordering::SeqCst), 1);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store_pending(&store).await > 0 {
            assert!(std::time::Instant::now() < deadline, "not drained");
            relay.run_once().await.unwrap();
        }
        // Last copy of each message, in publish order: 0..50.
        let mut last: Vec<u8> = Vec::new();
        for e in publisher.broker.published().into_iter().rev() {
            if !last.contains(&e.message.payload[0]) {
                last.push(e.message.payload[0]);
            }
        }
        last.reverse();
        assert_eq!(last, (0..50).collect::<Vec<u8>>(), "ordered {ordered}");
        let copies = publisher.broker.count();
        if ordered {
            // 21..50 went out in the failed batch and again after the retry; the head that
            // had failed went alone, then the rest as one run.
            assert_eq!(copies, 50 + 29);
            assert_eq!(publisher.batches.load(Ordering::SeqCst), 3);
        } else {
            assert_eq!(copies, 50);
        }
    }
}

async fn store_pending(store: &MemoryStore) -> u64 {
    outbox_core::StoreAdmin::stats(store)
        .await
        .unwrap()
        .total()
        .pending
}

/// A process that only writes relay-published messages needs no publisher: a message whose
/// strategy is publish-on-commit is written for the relay (no lease, woken at once), and the
/// writer's relay needs a publisher given.
#[tokio::test]
async fn a_writer_only_outbox_needs_no_publisher() {
    use outbox_core::{ErrorKind, KeepOrder, Order, RecordingPublisher};
    let store = MemoryStore::new();
    let loose = Outbox::writer(store.clone()).build().unwrap();
    let mut tx = store.begin();
    let after = loose
        .enqueue_blocking(&mut tx, [Message::new("d", b"loose".to_vec())])
        .unwrap();
    tx.commit();
    assert_eq!(after.len(), 0, "nothing for this process to publish");
    after.dispatch();
    let row = store.get(1).await.unwrap().unwrap();
    assert_eq!(row.order, Order::Unordered);
    let broker = RecordingPublisher::new();
    let report = loose
        .relay_with(broker.clone())
        .build()
        .unwrap()
        .run_once()
        .await;
    assert_eq!(
        report.unwrap().published,
        1,
        "due at once, not leased to anybody"
    );
    let store = MemoryStore::new();

    let outbox = Outbox::writer(store.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let mut tx = store.begin();
    let after = outbox
        .enqueue_blocking(&mut tx, [Message::new("d", b"x".to_vec()).key("k")])
        .unwrap();
    tx.commit();
    after.dispatch();

    let err = outbox
        .relay()
        .build()
        .err()
        .expect("no publisher to relay with");
    assert_eq!(err.kind(), ErrorKind::Config);
    let broker = RecordingPublisher::new();
    let relay = outbox.relay_with(broker.clone()).build().unwrap();
    assert_eq!(relay.run_once().await.unwrap().published, 1);
    assert_eq!(broker.count(), 1);
}

/// A transaction of one store cannot write into another store's outbox.
#[test]
fn a_transaction_of_another_store_is_refused() {
    use outbox_core::RecordingPublisher;
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let outbox = Outbox::builder(a.clone(), RecordingPublisher::new())
        .build()
        .unwrap();
    let mut tx = b.begin();
    let err = outbox
        .enqueue_blocking(&mut tx, [Message::new("d", b"x".to_vec())])
        .err()
        .unwrap();
    assert_eq!(err.kind(), outbox_core::ErrorKind::Config);
    tx.commit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(a.stats()).unwrap().total().pending, 0);
    assert_eq!(rt.block_on(b.stats()).unwrap().total().pending, 0);
}
