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
