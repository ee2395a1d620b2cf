//! The delivery contract of the design, as tests every store runs (feature `testing`).
//!
//! A backend implements [`Harness`] and expands [`conformance_tests!`](crate::conformance_tests)
//! in a test file; each contract point becomes its own `#[tokio::test]`, running in parallel,
//! each on a fresh table.

use crate::StoreAdmin;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use crate::{
    AfterCommit, Claim, Cleaner, Envelope, Error, ErrorKind, Event, Exhausted, FaultyPublisher,
    KeepOrder, Message, MessageId, Order, Outbox, OutboxBuilder, PublishOnCommit, PublishedBy,
    RecordingPublisher, Relay, RetryPolicy, Selector, Signer, SigningKey, Status, Store,
    StreamFilter,
};

mod enqueue;
pub use enqueue::*;
mod ordering;
pub use ordering::*;
mod schema;
pub use schema::*;
mod relay;
pub use relay::*;
mod signing;
pub use signing::*;
mod streams;
pub use streams::*;
mod robustness;
pub use robustness::*;
mod operators;
pub use operators::*;
pub mod broker;
pub use broker::BrokerHarness;

/// What a backend provides to run the suite.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// The store under test.
    type Store: StoreAdmin + 'static;

    /// A store on a fresh, migrated table (and a fresh business table beside it).
    async fn fresh(&self) -> Arc<Self::Store>;

    /// A second, independent handle (its own connection) on the same table: stands for
    /// another process.
    async fn reopen(&self, store: &Self::Store) -> Arc<Self::Store>;

    /// In one database transaction: insert one business row, enqueue `messages` through
    /// `outbox`, then commit (`commit = true`) or roll back. If enqueueing fails, commit the
    /// business row anyway and return the error (so a test can see nothing was half-written).
    async fn transact(
        &self,
        store: &Self::Store,
        outbox: &Outbox<Arc<Self::Store>>,
        messages: Vec<Message>,
        commit: bool,
    ) -> crate::Result<AfterCommit>;

    /// Committed business rows.
    async fn business_rows(&self, store: &Self::Store) -> i64;

    /// Change a stored row's payload behind the outbox's back.
    async fn tamper(&self, store: &Self::Store, seq: i64);

    /// Break row `seq` the way `kind` says, with the store's own SQL (as another service or
    /// an operator would). Returns false when the store cannot hold such a row (a typed
    /// column refuses it). The default holds none.
    async fn corrupt(&self, store: &Self::Store, seq: i64, kind: Corruption) -> bool {
        let _ = (store, seq, kind);
        false
    }

    /// Run `sql` on the store's database, `{t}` replaced by the outbox table's name (to make a
    /// table as an earlier version left it). Returns false when the store has no SQL. The
    /// default has none.
    async fn execute_sql(&self, store: &Self::Store, sql: &str) -> bool {
        let _ = (store, sql);
        false
    }
}

/// Ways a row written around the outbox can be broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// `headers` holds JSON that is not an object of strings (`[1,2]`).
    HeadersNotAMap,
    /// `strategy` holds an unknown name.
    UnknownStrategy,
    /// `id` is not a UUID.
    IdNotUuid,
    /// `msg_key` holds bytes that are not UTF-8.
    KeyNotUtf8,
    /// `stream` holds a BLOB.
    StreamBlob,
    /// `attempts` is negative.
    NegativeAttempts,
    /// `destination` holds a CR LF (header injection in a text protocol).
    DestinationNewline,
    /// `stream` starts and ends with spaces.
    StreamWhitespace,
    /// `on_exhausted` holds an unknown policy.
    UnknownExhausted,
    /// The row moved to another ordering unit (`okey` changed). Not in [`Corruption::ALL`]:
    /// units are a strategy's answer, so any value decodes; a signature covers it.
    UnitMoved,
}

impl Corruption {
    /// Every kind.
    pub const ALL: [Corruption; 9] = [
        Corruption::HeadersNotAMap,
        Corruption::UnknownStrategy,
        Corruption::IdNotUuid,
        Corruption::KeyNotUtf8,
        Corruption::StreamBlob,
        Corruption::NegativeAttempts,
        Corruption::DestinationNewline,
        Corruption::StreamWhitespace,
        Corruption::UnknownExhausted,
    ];

    /// The column the quarantine reason must name.
    pub fn column(self) -> &'static str {
        match self {
            Corruption::HeadersNotAMap => "headers",
            Corruption::UnknownStrategy => "strategy",
            Corruption::IdNotUuid => "id",
            Corruption::KeyNotUtf8 => "msg_key",
            Corruption::StreamBlob | Corruption::StreamWhitespace => "stream",
            Corruption::NegativeAttempts => "attempts",
            Corruption::DestinationNewline => "destination",
            Corruption::UnknownExhausted => "on_exhausted",
            Corruption::UnitMoved => "okey",
        }
    }
}

/// Expand one `#[tokio::test]` per contract point for a harness expression.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@each $harness;
            atomic_enqueue, invalid_input_writes_nothing, publish_on_commit_persist_all,
            publish_on_commit_failure_left_for_relay, publish_on_commit_not_persisted,
            publish_on_commit_crash_recovered_by_relay, keep_order_per_key_under_failures,
            keep_order_failing_head_blocks_only_its_unit, stuck_unit_with_a_deep_backlog,
            backoff_delays_retries,
            dead_letter_after_max_attempts_and_requeue, lease_expiry_hands_over,
            concurrent_relays_publish_each_once, cleaner_respects_retention_and_status,
            signing_tamper_and_rotation, signature_policy, panicking_publisher_is_a_failure,
            names_are_exact, bad_rows_are_quarantined, oversized_rows_and_the_byte_budget, one_size_limit,
            a_failed_settle_is_retried_not_republished, ordered_refusals_keep_first_delivery_order,
            stream_filter, strategy_per_stream, wakeup_on_commit, custom_strategy_units_and_policies,
            scheduled_delivery, rows_of_an_earlier_schema_keep_working, park_resume_and_skip,
            operators_park_any_unit, crash_loops_are_broken, messages_are_listed_by_filter,
            the_schema_is_whole_after_migrate, a_newer_schema_is_refused,
            a_dropped_table_is_made_again_by_migrate, deep_claims_take_units_whole);
    };
    (@each $harness:expr; $($name:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $crate::conformance::$name(&$harness).await;
        }
    )*};
}

// ---------------------------------------------------------------- helpers

/// Poll `f` until it is true; panic with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const DEADLINE: Duration = Duration::from_secs(30);

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(50),
        multiplier: 2.0,
        jitter: 0.5,
        max_attempts,
    }
}

fn base<S: StoreAdmin + 'static>(
    store: Arc<S>,
    publisher: impl crate::Publisher + 'static,
) -> OutboxBuilder<Arc<S>> {
    Outbox::builder(store, publisher).retry(fast_retry(5))
}

fn msg(stream: &str, key: Option<&str>, n: usize) -> Message {
    let m = Message::new(format!("dest.{stream}"), format!("{n}").into_bytes()).stream(stream);
    match key {
        Some(k) => m.key(k),
        None => m,
    }
}

/// A relay running in a background task until [`stop`](Self::stop) (which lets the batches
/// in flight finish).
pub struct RunningRelay {
    stop: tokio::sync::watch::Sender<bool>,
    handle: tokio::task::JoinHandle<crate::BatchReport>,
}

impl RunningRelay {
    /// Start `relay.run` on the current runtime.
    pub fn spawn<S: Store + 'static, P: crate::Publisher + 'static>(relay: Relay<S, P>) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let handle = tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        Self { stop, handle }
    }

    /// Ask it to stop and wait; returns what it did.
    pub async fn stop(self) -> crate::BatchReport {
        let _ = self.stop.send(true);
        self.handle.await.expect("relay task panicked")
    }

    /// Drop it wherever it is (in a claim, a publish or a settle) and wait until it is gone,
    /// as a SIGKILL would leave things: its leases stay until they end.
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

/// What a consumer received, in delivery order: each message's outbox id, its ordering key,
/// and the number its producer gave it (increasing per key in commit order). At-least-once
/// delivery allows duplicates; consumers de-duplicate on the id, so order is checked on first
/// occurrences.
#[derive(Debug, Default)]
pub struct Deliveries {
    received: usize,
    seen: std::collections::HashSet<String>,
    per_key: HashMap<String, Vec<usize>>,
}

impl Deliveries {
    /// Record one received message.
    pub fn record(&mut self, id: impl Into<String>, key: impl Into<String>, n: usize) {
        self.received += 1;
        if self.seen.insert(id.into()) {
            self.per_key.entry(key.into()).or_default().push(n);
        }
    }

    /// Messages received, duplicates included.
    pub fn received(&self) -> usize {
        self.received
    }

    /// Distinct message ids received.
    pub fn distinct(&self) -> usize {
        self.seen.len()
    }

    /// Redeliveries of an id already received.
    pub fn duplicates(&self) -> usize {
        self.received - self.seen.len()
    }

    /// First occurrences that came after a later message of the same key.
    pub fn order_violations(&self) -> usize {
        self.per_key
            .values()
            .map(|ns| ns.windows(2).filter(|w| w[0] > w[1]).count())
            .sum()
    }
}

/// Records observer events as (kind, message id).
#[derive(Clone, Default)]
pub struct EventLog(Arc<Mutex<Vec<LoggedEvent>>>);

/// An event kind and the message it was about.
pub type LoggedEvent = (&'static str, Option<MessageId>);

impl EventLog {
    /// An observer closure that appends here.
    pub fn observer(&self) -> impl Fn(&Event<'_>) + Send + Sync + 'static {
        let log = self.0.clone();
        move |e: &Event<'_>| {
            let entry = match e {
                Event::Published { envelope, .. } => ("published", Some(envelope.id)),
                Event::Failed { envelope, .. } => ("failed", Some(envelope.id)),
                Event::DeadLettered { envelope, .. } => ("dead", Some(envelope.id)),
                Event::Stuck { envelope, .. } => ("stuck", Some(envelope.id)),
                Event::Tampered { id, .. } => ("tampered", Some(*id)),
                Event::Parked { envelope, .. } => ("parked", envelope.map(|e| e.id)),
                Event::Resumed { .. } => ("resumed", None),
                Event::Quarantined { id, .. } => ("quarantined", id.and_then(|i| i.parse().ok())),
            };
            log.lock().unwrap().push(entry);
        }
    }

    /// How many events of `kind`.
    pub fn count(&self, kind: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k == kind)
            .count()
    }
}

async fn total(store: &dyn StoreAdmin) -> crate::StreamStats {
    store.stats().await.expect("stats").total()
}

async fn all_rows<S: StoreAdmin + ?Sized>(store: &S, upto: i64) -> Vec<crate::StoredMessage> {
    let mut out = Vec::new();
    for seq in 1..=upto {
        if let Some(r) = store.get(seq).await.expect("get") {
            out.push(r);
        }
    }
    out
}

async fn find_by_payload<S: StoreAdmin + ?Sized>(
    store: &S,
    payload: &[u8],
) -> crate::StoredMessage {
    // seqs in a fresh table are small and nearly contiguous (a rollback may skip a few)
    let mut misses = 0;
    for seq in 1.. {
        match store.get(seq).await.expect("get") {
            Some(r) if r.envelope.message.payload == payload => return r,
            Some(_) => misses = 0,
            None => misses += 1,
        }
        assert!(misses < 64, "no row with payload {payload:?}");
    }
    unreachable!()
}

// ---------------------------------------------------------------- the contract

/// Hook run before a [`Hooked`] store's `settle`: an error fails the settle without reaching
/// the inner store.
pub type BeforeSettle = dyn Fn() -> Option<Error> + Send + Sync;
/// Hook run after a [`Hooked`] store's `settle` with its result.
pub type AfterSettle = dyn Fn(&crate::Result<()>) + Send + Sync;

/// A store that forwards every call to `inner` and runs hooks around the relay's claims and
/// settles: to fail settles (as a database breaking a deadlock by rolling one back), or to
/// record when they run and how they end.
pub struct Hooked<S> {
    inner: Arc<S>,
    on_claim: Box<dyn Fn() + Send + Sync>,
    before_settle: Box<BeforeSettle>,
    after_settle: Box<AfterSettle>,
}

impl<S> Hooked<S> {
    /// `inner` with no hooks.
    pub fn new(inner: Arc<S>) -> Self {
        Self {
            inner,
            on_claim: Box::new(|| {}),
            before_settle: Box::new(|| None),
            after_settle: Box::new(|_| {}),
        }
    }

    /// Fail the next `n` settles with a transient error, before they reach `inner`.
    pub fn failing_settles(inner: Arc<S>, n: usize) -> Self {
        let left = std::sync::atomic::AtomicUsize::new(n);
        Self::new(inner).before_settle(move || {
            left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
                .then(|| {
                    Error::new(
                        ErrorKind::Store,
                        crate::Retry::Transient,
                        "1213 (40001): Deadlock found when trying to get lock (injected)",
                    )
                })
        })
    }

    /// Run `f` as each claim starts.
    pub fn on_claim(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_claim = Box::new(f);
        self
    }

    /// Run `f` before each settle; an error it returns fails the settle.
    pub fn before_settle(mut self, f: impl Fn() -> Option<Error> + Send + Sync + 'static) -> Self {
        self.before_settle = Box::new(f);
        self
    }

    /// Run `f` after each settle that reached `inner`, with its result.
    pub fn after_settle(mut self, f: impl Fn(&crate::Result<()>) + Send + Sync + 'static) -> Self {
        self.after_settle = Box::new(f);
        self
    }
}

#[async_trait]
impl<S: Store> Store for Hooked<S> {
    async fn migrate(&self) -> crate::Result<()> {
        self.inner.migrate().await
    }
    async fn insert(&self, rows: &[crate::NewMessage]) -> crate::Result<Vec<i64>> {
        self.inner.insert(rows).await
    }
    async fn claim(&self, claim: &Claim) -> crate::Result<Vec<crate::Claimed>> {
        (self.on_claim)();
        self.inner.claim(claim).await
    }
    async fn complete(&self, seqs: &[i64], delete: bool) -> crate::Result<()> {
        self.inner.complete(seqs, delete).await
    }
    async fn fail(&self, owner: &str, failures: &[crate::Failure]) -> crate::Result<()> {
        self.inner.fail(owner, failures).await
    }
    async fn settle(
        &self,
        owner: &str,
        done: &[i64],
        delete: bool,
        failures: &[crate::Failure],
    ) -> crate::Result<()> {
        if let Some(e) = (self.before_settle)() {
            return Err(e);
        }
        let result = self.inner.settle(owner, done, delete, failures).await;
        (self.after_settle)(&result);
        result
    }
    async fn wait_for_work(&self, timeout: Duration) {
        self.inner.wait_for_work(timeout).await
    }
    async fn park_unit(&self, stream: &str, unit: &str, reason: &str) -> crate::Result<()> {
        self.inner.park_unit(stream, unit, reason).await
    }
    async fn start_listening(&self) -> crate::Result<()> {
        self.inner.start_listening().await
    }
    fn notify_committed(&self) {
        self.inner.notify_committed()
    }
    fn signing_scope(&self) -> String {
        self.inner.signing_scope()
    }
}

#[async_trait]
impl<S: StoreAdmin> StoreAdmin for Hooked<S> {
    async fn schema(&self) -> crate::Result<crate::SchemaReport> {
        self.inner.schema().await
    }

    async fn requeue(&self, selector: &Selector) -> crate::Result<u64> {
        self.inner.requeue(selector).await
    }

    async fn purge_dead(&self, selector: &Selector) -> crate::Result<u64> {
        self.inner.purge_dead(selector).await
    }

    async fn dead_letters(
        &self,
        stream: Option<&str>,
        limit: usize,
    ) -> crate::Result<Vec<crate::StoredMessage>> {
        self.inner.dead_letters(stream, limit).await
    }

    async fn clean(&self, before: SystemTime, limit: usize, dead: bool) -> crate::Result<u64> {
        self.inner.clean(before, limit, dead).await
    }

    async fn stats(&self) -> crate::Result<crate::Stats> {
        self.inner.stats().await
    }

    async fn get(&self, seq: i64) -> crate::Result<Option<crate::StoredMessage>> {
        self.inner.get(seq).await
    }

    async fn resume_unit(&self, stream: &str, unit: &str) -> crate::Result<()> {
        self.inner.resume_unit(stream, unit).await
    }

    async fn skip_head(&self, stream: &str, unit: &str) -> crate::Result<Option<i64>> {
        self.inner.skip_head(stream, unit).await
    }

    async fn parked_units(
        &self,
        stream: Option<&str>,
        limit: usize,
    ) -> crate::Result<Vec<crate::ParkedUnit>> {
        self.inner.parked_units(stream, limit).await
    }

    async fn messages(
        &self,
        filter: &crate::MessageFilter,
    ) -> crate::Result<Vec<crate::StoredMessage>> {
        self.inner.messages(filter).await
    }
}
