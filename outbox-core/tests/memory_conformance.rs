//! The delivery contract against the in-memory store (engine unit tests).

use std::sync::{Arc, Mutex};

use outbox_core::conformance::Harness;
use outbox_core::{async_trait, MemoryStore, Message, Outbox, Pending, Result};

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
        outbox: &Outbox,
        messages: Vec<Message>,
        commit: bool,
    ) -> Result<Pending> {
        let mut tx = store.begin();
        let enqueued = tx.enqueue(outbox, messages);
        if enqueued.is_err() || commit {
            // the business row commits with the transaction
            *self.business.lock().unwrap() += 1;
            let pending = tx.commit()?;
            enqueued?;
            Ok(pending)
        } else {
            tx.rollback();
            Ok(Pending::empty())
        }
    }

    async fn business_rows(&self, _store: &MemoryStore) -> i64 {
        *self.business.lock().unwrap()
    }

    async fn tamper(&self, store: &MemoryStore, seq: i64) {
        store.tamper(seq, b"tampered".to_vec());
    }
}

outbox_core::conformance_tests!(Mem::default());

/// A relay that is running out of lease mid-batch gives the rest of the batch back instead of
/// publishing after its lease could have expired; the rest follows in order.
#[tokio::test]
async fn a_batch_running_out_of_lease_gives_the_rest_back() {
    use outbox_core::{async_trait, Envelope, Publisher, RecordingPublisher, Relay, Strategy};
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
        .strategy(Strategy::KeepOrder)
        .build()
        .unwrap();
    let mut tx = store.begin();
    tx.enqueue(
        &outbox,
        (0..8u8).map(|i| Message::new("d", vec![i]).key("k")),
    )
    .unwrap();
    tx.commit().unwrap().dispatch();

    let broker = RecordingPublisher::new();
    // One unit of 8: 8 waves of 150 ms, but the lease allows ~2 before 0.9 x lease is reached.
    let relay = Relay::builder(store.clone(), Slow(broker.clone()))
        .lease(Duration::from_millis(700))
        .publish_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let first = relay.step().await.unwrap();
    assert_eq!(first.claimed, 8);
    assert!(
        first.published < 8 && first.released == 8 - first.published,
        "{first:?}"
    );
    let rest = relay.run_once().await.unwrap();
    assert_eq!(first.published + rest.published, 8);
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
    use outbox_core::{RecordingPublisher, Store};
    let store = MemoryStore::new();
    let broker = RecordingPublisher::new();
    let outbox = Outbox::builder(store.clone(), broker.clone())
        .build()
        .unwrap();
    let mut tx = store.begin();
    tx.enqueue(&outbox, [Message::new("d", b"x".to_vec())])
        .unwrap();
    tx.commit().unwrap().dispatch(); // no runtime here
    assert_eq!(broker.count(), 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pending = rt.block_on(store.stats()).unwrap().total().pending;
    assert_eq!(pending, 1, "still there for the relay");
}
