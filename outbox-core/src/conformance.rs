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
            the_schema_is_whole_after_migrate);
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

/// Contract point 1: Rollback writes nothing and publishes nothing; commit makes the rows durable.
pub async fn atomic_enqueue<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();

    let msgs = vec![msg("s", None, 1), msg("s", None, 2)];
    let pending = h
        .transact(&store, &outbox, msgs.clone(), false)
        .await
        .unwrap();
    pending.publish().await;
    assert_eq!(h.business_rows(&store).await, 0, "rolled-back business row");
    assert_eq!(
        total(store.as_ref()).await.pending,
        0,
        "rolled-back outbox rows"
    );
    let relay = outbox.relay().build().unwrap();
    assert_eq!(relay.run_once().await.unwrap().published, 0);
    assert_eq!(broker.count(), 0, "nothing published for a rollback");

    let pending = h.transact(&store, &outbox, msgs, true).await.unwrap();
    drop(pending);
    assert_eq!(h.business_rows(&store).await, 1);
    // Durable: another connection sees the rows and relays them.
    let other = h.reopen(&store).await;
    assert_eq!(total(other.as_ref()).await.pending, 2);
    let relay = Relay::builder(other, broker.clone()).build().unwrap();
    assert_eq!(relay.run_once().await.unwrap().published, 2);
    let payloads: Vec<_> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    assert_eq!(payloads, vec![b"1".to_vec(), b"2".to_vec()]);
}

/// Contract point 11: Bad input: a typed error, and nothing of the batch is written.
pub async fn invalid_input_writes_nothing<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let outbox = base(store.clone(), RecordingPublisher::new())
        .config(crate::Config {
            delivery: crate::Delivery {
                max_payload_bytes: 16,
                retry: fast_retry(5),
                ..Default::default()
            },
            ..Default::default()
        })
        .build()
        .unwrap();
    let bad_batches = vec![
        vec![msg("s", None, 1), Message::new("d", vec![0u8; 17])],
        vec![msg("s", None, 1), Message::new("", b"x".to_vec())],
        vec![
            msg("s", None, 1),
            Message::new("d", b"x".to_vec()).header("bad:name", "v"),
        ],
        vec![
            msg("s", None, 1),
            Message::new("d", b"x".to_vec()).stream(""),
        ],
        // Headers: counted in the size limit, capped in number, reserved names refused.
        vec![Message::new("d", b"0123456789".to_vec()).header("h", "0123456")],
        vec![
            (0..=crate::MAX_HEADERS).fold(Message::new("d", Vec::new()), |m, i| {
                m.header(format!("h{i}"), "")
            }),
        ],
        vec![Message::new("d", b"x".to_vec()).header("OUTBOX-ID", "forged")],
        vec![Message::new("d", b"x".to_vec()).header("Content-Type", "text/html")],
    ];
    for (i, batch) in bad_batches.into_iter().enumerate() {
        let err = match h.transact(&store, &outbox, batch, true).await {
            Err(e) => e,
            Ok(_) => panic!("bad batch {i} was accepted"),
        };
        assert_eq!(err.kind(), ErrorKind::InvalidMessage, "batch {i}: {err}");
        assert!(!err.is_transient());
        assert_eq!(
            h.business_rows(&store).await,
            i as i64 + 1,
            "the caller's transaction still works"
        );
        let t = total(store.as_ref()).await;
        assert_eq!(t.pending + t.sent + t.dead, 0, "batch {i} was half-written");
    }
}

/// Contract point 3: Publish-on-commit with persist_all: published by the committer, then marked sent or
/// deleted; never published twice by a relay.
pub async fn publish_on_commit_persist_all<H: Harness>(h: &H) {
    for delete in [false, true] {
        let store = h.fresh().await;
        let broker = RecordingPublisher::new();
        let outbox = base(store.clone(), broker.clone())
            .delete_after_send(delete)
            .build()
            .unwrap();
        let pending = h
            .transact(
                &store,
                &outbox,
                vec![msg("s", None, 1), msg("s", None, 2)],
                true,
            )
            .await
            .unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!(
            total(store.as_ref()).await.pending,
            2,
            "written in the transaction"
        );
        // Leased to the committer: a relay cannot race it.
        let relay = outbox.relay().build().unwrap();
        assert_eq!(relay.step().await.unwrap().claimed, 0);

        let report = pending.publish().await;
        assert_eq!((report.published, report.failed), (2, 0));
        assert_eq!(broker.count(), 2);
        let t = total(store.as_ref()).await;
        assert_eq!(
            (t.pending, t.sent),
            (0, if delete { 0 } else { 2 }),
            "delete_after_send={delete}"
        );
        assert_eq!(relay.run_once().await.unwrap().published, 0);
        assert_eq!(broker.count(), 2, "no duplicate from the relay");
    }
}

/// Contract point 3: A failed on-commit publish stays for the relay, which publishes it after the backoff.
pub async fn publish_on_commit_failure_left_for_relay<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let publisher = FaultyPublisher::new(broker.clone(), move |_| {
        d.load(Ordering::SeqCst)
            .then(|| Error::transient("broker down"))
    });
    let events = EventLog::default();
    let outbox = base(store.clone(), publisher)
        .observer(events.observer())
        .build()
        .unwrap();
    let pending = h
        .transact(&store, &outbox, vec![msg("s", None, 1)], true)
        .await
        .unwrap();
    let report = pending.publish().await;
    assert_eq!((report.published, report.failed), (0, 1));
    assert_eq!(events.count("failed"), 1);
    let row = find_by_payload(store.as_ref(), b"1").await;
    assert_eq!((row.status, row.attempts), (Status::Pending, 1));
    assert!(row
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("broker down"));

    down.store(false, Ordering::SeqCst);
    let relay = outbox.relay().build().unwrap();
    eventually("relay publishes the failed message", DEADLINE, || async {
        relay.run_once().await.unwrap();
        broker.count() == 1
    })
    .await;
    assert_eq!(events.count("published"), 1);
    assert_eq!(total(store.as_ref()).await.sent, 1);
}

/// Contract point 3: persist_all = false: a success writes no row; a failure writes one after the fact
/// (pending for transient errors, dead for permanent ones), which the relay delivers.
pub async fn publish_on_commit_not_persisted<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let down = Arc::new(AtomicBool::new(false));
    let d = down.clone();
    let publisher = FaultyPublisher::new(broker.clone(), move |e: &Envelope| {
        if e.message.destination == "poison" {
            return Some(Error::permanent("unroutable"));
        }
        d.load(Ordering::SeqCst)
            .then(|| Error::transient("broker down"))
    });
    let outbox = base(store.clone(), publisher)
        .persist_all(false)
        .build()
        .unwrap();

    let pending = h
        .transact(&store, &outbox, vec![msg("s", None, 1)], true)
        .await
        .unwrap();
    let t = total(store.as_ref()).await;
    assert_eq!(t.pending + t.sent, 0, "nothing written in the transaction");
    assert_eq!(pending.publish().await.published, 1);
    let t = total(store.as_ref()).await;
    assert_eq!(t.pending + t.sent + t.dead, 0, "a success leaves no row");

    down.store(true, Ordering::SeqCst);
    let pending = h
        .transact(
            &store,
            &outbox,
            vec![msg("s", None, 2), Message::new("poison", b"p".to_vec())],
            true,
        )
        .await
        .unwrap();
    let r = pending.publish().await;
    assert_eq!((r.failed, r.lost), (2, 0));
    let t = total(store.as_ref()).await;
    assert_eq!(
        (t.pending, t.dead),
        (1, 1),
        "failures written after the fact"
    );
    let row = find_by_payload(store.as_ref(), b"2").await;
    assert_eq!(row.attempts, 1);

    down.store(false, Ordering::SeqCst);
    let relay = outbox.relay().build().unwrap();
    eventually("relay delivers the failed message", DEADLINE, || async {
        relay.run_once().await.unwrap();
        broker.count() == 2
    })
    .await;
}

/// Contract point 2/6: The committer dies between commit and publish: the relay publishes once the
/// committer's lease expires, not before.
pub async fn publish_on_commit_crash_recovered_by_relay<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .config(crate::Config {
            on_commit_lease: Duration::from_millis(400),
            delivery: crate::Delivery {
                publish_timeout: Duration::from_millis(100),
                retry: fast_retry(5),
                ..Default::default()
            },
            ..Default::default()
        })
        .build()
        .unwrap();
    let pending = h
        .transact(&store, &outbox, vec![msg("s", None, 1)], true)
        .await
        .unwrap();
    drop(pending); // the process "dies" here
    let relay = Relay::builder(h.reopen(&store).await, broker.clone())
        .build()
        .unwrap();
    assert_eq!(
        relay.step().await.unwrap().claimed,
        0,
        "lease still held by the committer"
    );
    eventually("relay publishes after the lease", DEADLINE, || async {
        relay.run_once().await.unwrap();
        broker.count() == 1
    })
    .await;
}

/// Contract point 4: Keep-order: commit order per (stream, key) under random transient
/// failures, with four relays (each its own connection) at once; nothing published twice.
pub async fn keep_order_per_key_under_failures<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .retry(fast_retry(1_000))
        .build()
        .unwrap();
    let keys = ["a", "b", "c", "d", "e"];
    let per_key = 24;
    for round in 0..per_key / 4 {
        let mut batch = Vec::new();
        for i in 0..4 {
            for k in keys {
                batch.push(msg("s", Some(k), round * 4 + i));
            }
        }
        // and a keyless unit on another stream
        batch.push(msg("t", None, round));
        h.transact(&store, &outbox, batch, true)
            .await
            .unwrap()
            .dispatch();
    }
    let expected = keys.len() * per_key + per_key / 4;

    let mut running = Vec::new();
    let mut relays = vec![store.clone()];
    for _ in 0..3 {
        relays.push(h.reopen(&store).await);
    }
    assert_eq!(relays.len(), 4);
    for (i, s) in relays.into_iter().enumerate() {
        let relay = Relay::builder(
            s,
            FaultyPublisher::random(broker.clone(), 0.25, 7 + i as u64),
        )
        .retry(fast_retry(1_000))
        .batch_size(5)
        .concurrency(2)
        .poll_interval(Duration::from_millis(20))
        .build()
        .unwrap();
        running.push(RunningRelay::spawn(relay));
    }
    eventually("all keep-order messages published", DEADLINE, || async {
        broker.count() >= expected
    })
    .await;
    for r in running {
        r.stop().await;
    }
    let mut seen: HashMap<(String, Option<String>), Vec<usize>> = HashMap::new();
    for e in broker.published() {
        let n: usize = String::from_utf8(e.message.payload)
            .unwrap()
            .parse()
            .unwrap();
        seen.entry((e.message.stream, e.message.key))
            .or_default()
            .push(n);
    }
    for (unit, ns) in &seen {
        let expect: Vec<usize> = (0..ns.len()).collect();
        assert_eq!(ns, &expect, "unit {unit:?} published out of order or twice");
    }
    assert_eq!(broker.count(), expected);
}

/// Contract point 4/5: A failing keep-order head blocks its own unit only and is reported stuck; with
/// dead-lettering opted in, it is dead-lettered and its unit moves on.
pub async fn keep_order_failing_head_blocks_only_its_unit<H: Harness>(h: &H) {
    for dead_letter in [false, true] {
        let store = h.fresh().await;
        let broker = RecordingPublisher::new();
        let publisher = FaultyPublisher::new(broker.clone(), |e: &Envelope| {
            (e.message.destination == "poison").then(|| Error::permanent("rejected"))
        });
        let events = EventLog::default();
        let outbox = base(store.clone(), publisher)
            .strategy(KeepOrder::default())
            .config(crate::Config {
                default_strategy: Arc::new(KeepOrder::default()),
                delivery: crate::Delivery {
                    dead_letter_keep_order: dead_letter,
                    retry: fast_retry(3),
                    ..Default::default()
                },
                ..Default::default()
            })
            .observer(events.observer())
            .build()
            .unwrap();
        let batch = vec![
            Message::new("poison", b"a1".to_vec()).stream("s").key("A"),
            Message::new("ok", b"a2".to_vec()).stream("s").key("A"),
            Message::new("ok", b"b1".to_vec()).stream("s").key("B"),
            Message::new("ok", b"b2".to_vec()).stream("s").key("B"),
            Message::new("ok", b"t1".to_vec()).stream("t"),
        ];
        h.transact(&store, &outbox, batch, true)
            .await
            .unwrap()
            .dispatch();
        let relay = outbox.relay().build().unwrap();
        relay.run_once().await.unwrap();
        let got: Vec<_> = broker
            .published()
            .into_iter()
            .map(|e| e.message.payload)
            .collect();
        let a1 = find_by_payload(store.as_ref(), b"a1").await;
        if dead_letter {
            eventually("a2 follows the dead-lettered head", DEADLINE, || async {
                relay.run_once().await.unwrap();
                broker.count() == 4
            })
            .await;
            assert_eq!(
                find_by_payload(store.as_ref(), b"a1").await.status,
                Status::Dead
            );
            assert_eq!(events.count("dead"), 1);
            assert_eq!(events.count("stuck"), 0);
        } else {
            assert_eq!(got.len(), 3, "B and t flow: {got:?}");
            assert!(!got.contains(&b"a2".to_vec()), "a2 must wait behind a1");
            // At least one attempt: the head's short backoff may end within run_once.
            assert_eq!(a1.status, Status::Pending);
            assert!(a1.attempts >= 1);
            assert_eq!(find_by_payload(store.as_ref(), b"a2").await.attempts, 0);
            let reported = events.count("stuck");
            assert!(reported >= 1, "the blocked head is reported");
            assert_eq!(events.count("dead"), 0, "nothing dead-lettered by default");
            // Still blocked later, still reported.
            eventually(
                "stuck head retried and reported again",
                DEADLINE,
                || async {
                    relay.run_once().await.unwrap();
                    events.count("stuck") > reported
                },
            )
            .await;
            assert_eq!(broker.count(), 3);
        }
    }
}

/// Contract point 4 at depth: a unit whose head keeps failing, with thousands of rows queued
/// behind it, holds back none of the other units, in any claim; its own rows stay pending and
/// unpublished, in order, and nothing of it is claimed while its head backs off.
pub async fn stuck_unit_with_a_deep_backlog<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let publisher = FaultyPublisher::new(broker.clone(), |e: &Envelope| {
        (e.message.destination == "poison").then(|| Error::transient("consumer down"))
    });
    let slow = RetryPolicy {
        initial: Duration::from_secs(600),
        max: Duration::from_secs(600),
        multiplier: 2.0,
        jitter: 0.0,
        max_attempts: 100,
    };
    let outbox = base(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let behind = 3_000;
    let mut head = vec![Message::new("poison", b"stuck-head".to_vec())
        .stream("s")
        .key("stuck")];
    head.extend((0..499).map(|i| msg("s", Some("stuck"), i)));
    h.transact(&store, &outbox, head, true)
        .await
        .unwrap()
        .dispatch();
    for chunk in 1..behind / 500 {
        let rows = (0..500)
            .map(|i| msg("s", Some("stuck"), chunk * 500 + i))
            .collect();
        h.transact(&store, &outbox, rows, true)
            .await
            .unwrap()
            .dispatch();
    }
    // The stuck unit fails once before the others are even written: its head now backs off.
    let relay = Relay::builder(store.clone(), publisher)
        .retry(slow)
        .batch_size(20)
        .build()
        .unwrap();
    let first = relay.step().await.unwrap();
    assert_eq!(first.published, 0, "{first:?}");
    assert!(first.failed == 1, "the head was tried: {first:?}");

    let keys = ["k1", "k2", "k3", "k4", "k5"];
    let per_key = 40;
    for round in 0..per_key / 10 {
        let rows = keys
            .iter()
            .flat_map(|k| (0..10).map(move |i| msg("s", Some(k), round * 10 + i)))
            .collect();
        h.transact(&store, &outbox, rows, true)
            .await
            .unwrap()
            .dispatch();
    }
    let expected = keys.len() * per_key;
    let claims_with_stuck_rows = std::sync::atomic::AtomicUsize::new(0);
    eventually("every other unit published", DEADLINE, || async {
        let r = relay.step().await.unwrap();
        if r.failed > 0 || r.released > 0 {
            claims_with_stuck_rows.fetch_add(1, Ordering::SeqCst);
        }
        broker.count() >= expected
    })
    .await;
    assert_eq!(
        claims_with_stuck_rows.load(Ordering::SeqCst),
        0,
        "a claim took rows of the backing-off unit"
    );
    assert_eq!(broker.count(), expected);
    let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
    for e in broker.published() {
        let key = e.message.key.clone().unwrap_or_default();
        assert_ne!(key, "stuck", "a row behind the stuck head was published");
        let n: usize = String::from_utf8(e.message.payload)
            .unwrap()
            .parse()
            .unwrap();
        seen.entry(key).or_default().push(n);
    }
    for (key, ns) in &seen {
        assert_eq!(
            ns,
            &(0..per_key).collect::<Vec<_>>(),
            "unit {key} out of order"
        );
    }
    let stuck = find_by_payload(store.as_ref(), b"stuck-head").await;
    assert_eq!((stuck.status, stuck.attempts), (Status::Pending, 1));
    assert_eq!(total(store.as_ref()).await.pending, behind as u64);
}

/// Rows a table made by an earlier version holds, as `INSERT` statements for `migrate` tests
/// (`payload` turns text into the dialect's binary literal). Oldest first: a sent row, a
/// dead letter, then units `a` (head retried once, due), `b` (head leased by a relay that
/// died: expired), `h` (head leased by a live relay for an hour) and a publish-on-commit row
/// whose committer died, interleaved.
pub fn legacy_rows(table: &str, payload: impl Fn(&str) -> String, now_ms: i64) -> Vec<String> {
    let past = now_ms - 5_000;
    // (payload, key, strategy, status, attempts, lease (owner, until), next attempt)
    type Row<'a> = (
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        i32,
        Option<(&'a str, i64)>,
        i64,
    );
    let rows: [Row; 10] = [
        ("sent0", "a", "keep_order", "sent", 0, None, past),
        ("dead0", "d", "keep_order", "dead", 5, None, past),
        ("a0", "a", "keep_order", "pending", 1, None, past),
        (
            "b0",
            "b",
            "keep_order",
            "pending",
            0,
            Some(("gone-relay", past)),
            past,
        ),
        (
            "h0",
            "h",
            "keep_order",
            "pending",
            0,
            Some(("live-relay", now_ms + 3_600_000)),
            past,
        ),
        ("a1", "a", "keep_order", "pending", 0, None, past),
        (
            "o0",
            "",
            "on_commit",
            "pending",
            0,
            Some(("committer", past)),
            past,
        ),
        ("b1", "b", "keep_order", "pending", 0, None, past),
        ("a2", "a", "keep_order", "pending", 0, None, past),
        ("h1", "h", "keep_order", "pending", 0, None, past),
    ];
    rows.iter()
        .map(|(p, key, strategy, status, attempts, lease, next)| {
            let (stream, msg_key) = if *strategy == "on_commit" {
                ("loose", "NULL".to_string())
            } else {
                ("s", format!("'{key}'"))
            };
            let (by, until) = match lease {
                Some((by, until)) => (format!("'{by}'"), until.to_string()),
                None => ("NULL".into(), "NULL".into()),
            };
            let sent_at = if *status == "sent" { past.to_string() } else { "NULL".into() };
            format!(
                "INSERT INTO {table} (id, stream, destination, msg_key, okey, payload, content_type, headers,
                   strategy, status, attempts, created_at, next_attempt_at, locked_by, locked_until, last_error, sent_at)
                 VALUES ('{id}', '{stream}', 'dest', {msg_key}, '{key}', {payload}, 'text/plain', '{{}}',
                   '{strategy}', '{status}', {attempts}, {past}, {next}, {by}, {until}, NULL, {sent_at})",
                id = MessageId::new(),
                payload = payload(p),
            )
        })
        .collect()
}

/// After `migrate` on a table holding [`legacy_rows`]: every row survives with its status, the
/// relay publishes each unit in order (the dead relay's lease has expired, the live relay's
/// has not), and a requeued dead letter goes out too.
pub async fn check_legacy_migration<S: StoreAdmin + 'static>(store: Arc<S>) {
    store.migrate().await.unwrap();
    store.migrate().await.unwrap(); // idempotent
    let broker = RecordingPublisher::new();
    let relay = Relay::builder(store.clone(), broker.clone())
        .build()
        .unwrap();
    relay.run_once().await.unwrap();
    let got: Vec<String> = broker
        .published()
        .into_iter()
        .map(|e| String::from_utf8(e.message.payload).unwrap())
        .collect();
    let pos = |p: &str| got.iter().position(|g| g == p);
    for p in ["a0", "a1", "a2", "b0", "b1", "o0"] {
        assert!(pos(p).is_some(), "{p} not published: {got:?}");
    }
    assert!(pos("a0") < pos("a1") && pos("a1") < pos("a2"), "{got:?}");
    assert!(pos("b0") < pos("b1"), "{got:?}");
    assert_eq!(got.len(), 6, "the live relay's unit waits: {got:?}");
    let t = total(store.as_ref()).await;
    assert_eq!((t.pending, t.sent, t.dead), (2, 7, 1));
    assert_eq!(store.requeue(&Selector::All).await.unwrap(), 1);
    relay.run_once().await.unwrap();
    assert_eq!(broker.count(), 7);
    assert_eq!(
        broker.published().last().unwrap().message.payload,
        b"dead0".to_vec()
    );
}

/// Contract point 5: Exponential backoff: a failed message is not due before its delay.
pub async fn backoff_delays_retries<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let publisher = FaultyPublisher::new(RecordingPublisher::new(), |_| {
        Some(Error::transient("down"))
    });
    let retry = RetryPolicy {
        initial: Duration::from_millis(400),
        max: Duration::from_secs(60),
        multiplier: 2.0,
        jitter: 0.0,
        max_attempts: 10,
    };
    let outbox = base(store.clone(), publisher)
        .strategy(KeepOrder::default())
        .retry(retry)
        .build()
        .unwrap();
    h.transact(&store, &outbox, vec![msg("s", None, 1)], true)
        .await
        .unwrap()
        .dispatch();
    let relay = outbox.relay().build().unwrap();
    for (attempt, nominal_ms) in [(1u32, 400u64), (2, 800)] {
        let before = SystemTime::now();
        let r = relay.step().await.unwrap();
        assert_eq!((r.claimed, r.failed), (1, 1), "attempt {attempt}");
        let row = find_by_payload(store.as_ref(), b"1").await;
        assert_eq!(row.attempts, attempt);
        let delay = row
            .next_attempt_at
            .duration_since(before)
            .unwrap_or_default();
        assert!(
            delay >= Duration::from_millis(nominal_ms - 50)
                && delay <= Duration::from_millis(nominal_ms + 1_000),
            "attempt {attempt}: next attempt in {delay:?}, expected about {nominal_ms} ms"
        );
        assert_eq!(
            relay.step().await.unwrap().claimed,
            0,
            "not due during the backoff"
        );
        eventually("due again after the backoff", DEADLINE, || async {
            SystemTime::now() >= row.next_attempt_at
        })
        .await;
    }
}

/// Contract point 5: After max_attempts a publish-on-commit message is dead-lettered (kept, listed,
/// requeueable); a permanent error dead-letters at once.
pub async fn dead_letter_after_max_attempts_and_requeue<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let publisher = FaultyPublisher::new(broker.clone(), move |e: &Envelope| {
        if e.message.destination == "poison" {
            return Some(Error::permanent("unroutable"));
        }
        d.load(Ordering::SeqCst).then(|| Error::transient("down"))
    });
    let events = EventLog::default();
    let outbox = base(store.clone(), publisher)
        .retry(fast_retry(3))
        .observer(events.observer())
        .build()
        .unwrap();
    let pending = h
        .transact(
            &store,
            &outbox,
            vec![
                msg("s", None, 1),
                Message::new("poison", b"p".to_vec()).stream("s"),
            ],
            true,
        )
        .await
        .unwrap();
    pending.publish().await;
    let poison = find_by_payload(store.as_ref(), b"p").await;
    assert_eq!(
        (poison.status, poison.attempts),
        (Status::Dead, 1),
        "permanent: dead at once"
    );

    let relay = outbox.relay().build().unwrap();
    eventually("dead-lettered after 3 attempts", DEADLINE, || async {
        relay.run_once().await.unwrap();
        find_by_payload(store.as_ref(), b"1").await.status == Status::Dead
    })
    .await;
    let row = find_by_payload(store.as_ref(), b"1").await;
    assert_eq!(row.attempts, 3);
    assert!(row.last_error.is_some());
    assert_eq!(events.count("dead"), 2);
    let dead = store.dead_letters(Some("s"), 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(total(store.as_ref()).await.dead, 2);

    down.store(false, Ordering::SeqCst);
    assert_eq!(
        store.requeue(&Selector::Seqs(vec![row.seq])).await.unwrap(),
        1
    );
    let requeued = store.get(row.seq).await.unwrap().unwrap();
    assert_eq!((requeued.status, requeued.attempts), (Status::Pending, 0));
    relay.run_once().await.unwrap();
    assert_eq!(broker.count(), 1);
    assert_eq!(
        store
            .purge_dead(&Selector::Stream("s".into()))
            .await
            .unwrap(),
        1
    );
    let t = total(store.as_ref()).await;
    assert_eq!((t.sent, t.dead, t.pending), (1, 0, 0));
}

/// Contract point 6: A relay that dies mid-batch loses its claim when the lease expires; a stale owner's
/// late failure report changes nothing.
pub async fn lease_expiry_hands_over<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let msgs = (0..3).map(|i| msg("s", Some("k"), i)).collect();
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let claim = Claim::new(
        "relay-that-dies",
        StreamFilter::All,
        10,
        Duration::from_millis(300),
    );
    let taken: Vec<crate::StoredMessage> = store
        .claim(&claim)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.expect("a row written by the outbox decodes"))
        .collect();
    assert_eq!(taken.len(), 3);
    let other = h.reopen(&store).await;
    assert!(
        other
            .claim(&Claim {
                owner: "x".into(),
                ..claim.clone()
            })
            .await
            .unwrap()
            .is_empty(),
        "leased rows are not claimable"
    );
    let relay = Relay::builder(other, broker.clone()).build().unwrap();
    eventually(
        "another relay takes over after the lease",
        DEADLINE,
        || async {
            relay.run_once().await.unwrap();
            broker.count() == 3
        },
    )
    .await;
    let order: Vec<_> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    assert_eq!(order, vec![b"0".to_vec(), b"1".to_vec(), b"2".to_vec()]);
    let stale = crate::Failure {
        seq: taken[0].seq,
        error: "late".into(),
        outcome: crate::Outcome::Dead,
    };
    store.fail("relay-that-dies", &[stale]).await.unwrap();
    assert_eq!(
        store.get(taken[0].seq).await.unwrap().unwrap().status,
        Status::Sent
    );
}

/// Contract point 4/6: Three relays on one table: every message published exactly once while all live.
pub async fn concurrent_relays_publish_each_once<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), RecordingPublisher::new())
        .stream_strategy("ordered", KeepOrder::default())
        .config(crate::Config {
            stream_strategies: [(
                "ordered".to_string(),
                Arc::new(KeepOrder::default()) as Arc<dyn crate::Strategy>,
            )]
            .into(),
            on_commit_lease: Duration::from_millis(300),
            delivery: crate::Delivery {
                publish_timeout: Duration::from_millis(200),
                retry: fast_retry(5),
                ..Default::default()
            },
            ..Default::default()
        })
        .build()
        .unwrap();
    let n = 120;
    for chunk in 0..6 {
        let batch = (0..n / 6)
            .map(|i| {
                let i = chunk * (n / 6) + i;
                if i % 2 == 0 {
                    msg("ordered", Some(&format!("k{}", i % 10)), i)
                } else {
                    msg("loose", None, i)
                }
            })
            .collect();
        // on-commit messages are "orphaned" (committer died): relays race for them
        drop(h.transact(&store, &outbox, batch, true).await.unwrap());
    }
    let mut running = Vec::new();
    for _ in 0..3 {
        let relay = Relay::builder(h.reopen(&store).await, broker.clone())
            .batch_size(8)
            .concurrency(3)
            .poll_interval(Duration::from_millis(20))
            .build()
            .unwrap();
        running.push(RunningRelay::spawn(relay));
    }
    eventually("every message published", DEADLINE, || async {
        broker.count() >= n
    })
    .await;
    for r in running {
        r.stop().await;
    }
    let mut ids: Vec<_> = broker.published().into_iter().map(|e| e.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicates while all relays lived");
    assert_eq!(broker.count(), n);
}

/// Contract point 8: The cleaner deletes sent rows past the retention in bounded batches, and never
/// pending or dead rows unless asked.
pub async fn cleaner_respects_retention_and_status<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let publisher = FaultyPublisher::new(broker.clone(), |e: &Envelope| {
        (e.message.destination == "poison").then(|| Error::permanent("no"))
    });
    let outbox = base(store.clone(), publisher)
        .stream_strategy("later", KeepOrder::default())
        .build()
        .unwrap();
    let mut batch: Vec<Message> = (0..5).map(|i| msg("s", None, i)).collect();
    batch.push(msg("later", None, 100));
    batch.push(msg("later", None, 101));
    batch.push(Message::new("poison", b"p".to_vec()));
    h.transact(&store, &outbox, batch, true)
        .await
        .unwrap()
        .publish()
        .await;
    let t = total(store.as_ref()).await;
    assert_eq!((t.sent, t.pending, t.dead), (5, 2, 1));

    assert_eq!(
        Cleaner::new(store.clone()).run_once().await.unwrap(),
        0,
        "7-day default retention"
    );
    assert_eq!(
        Cleaner::new(store.clone())
            .retention(Duration::from_secs(3600))
            .run_once()
            .await
            .unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(20)).await; // let the sent_at timestamps age
    let cleaner = Cleaner::new(store.clone())
        .retention(Duration::from_millis(5))
        .batch_size(2)
        .unwrap();
    assert_eq!(
        store.clean(SystemTime::now(), 2, false).await.unwrap(),
        2,
        "one batch is bounded"
    );
    assert_eq!(cleaner.run_once().await.unwrap(), 3, "the rest, in batches");
    let t = total(store.as_ref()).await;
    assert_eq!(
        (t.sent, t.pending, t.dead),
        (0, 2, 1),
        "pending and dead untouched"
    );
    assert_eq!(cleaner.include_dead(true).run_once().await.unwrap(), 1);
    let t = total(store.as_ref()).await;
    assert_eq!((t.sent, t.pending, t.dead), (0, 2, 0));
}

/// Contract point 9: Signed rows: a tampered row is never published and is reported; old keys still
/// verify during rotation; dropping a key refuses its rows.
pub async fn signing_tamper_and_rotation<H: Harness>(h: &H) {
    let k1 = SigningKey::new("k1", b"first-secret-0123456789".to_vec()).unwrap();
    let k2 = SigningKey::new("k2", b"second-secret-0123456789".to_vec()).unwrap();
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let events = EventLog::default();
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .signer(Signer::new(k1.clone()))
        .observer(events.observer())
        .build()
        .unwrap();
    let msgs = vec![
        msg("s", Some("a"), 1),
        msg("s", Some("b"), 2),
        msg("s", Some("c"), 3),
    ];
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let victim = find_by_payload(store.as_ref(), b"2").await;
    assert!(victim.signature.as_deref().unwrap_or("").starts_with("k1:"));
    h.tamper(&store, victim.seq).await;
    // A signed row moved to another unit (where it would be published out of its order)
    // does not verify either.
    let moved = find_by_payload(store.as_ref(), b"3").await;
    let can_move = h.corrupt(&store, moved.seq, Corruption::UnitMoved).await;

    // Rotation: relay signs with k2 but still accepts k1.
    let relay = outbox
        .relay()
        .signer(Signer::new(k2.clone()).accept(k1))
        .build()
        .unwrap();
    relay.run_once().await.unwrap();
    let got: Vec<_> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    assert_eq!(got.len(), if can_move { 1 } else { 2 }, "{got:?}");
    assert!(
        !got.iter().any(|p| p.starts_with(b"2") || p == b"tampered"),
        "tampered row published"
    );
    if can_move {
        assert!(
            !got.iter().any(|p| p.starts_with(b"3")),
            "moved row published"
        );
        let row = store.get(moved.seq).await.unwrap().unwrap();
        assert!(row.last_error.unwrap_or_default().contains("Tampered"));
    }
    // Reported at least once (its short backoff may end before run_once stops, and then it is
    // refused again).
    assert!(events.count("tampered") >= 1);
    let row = store.get(victim.seq).await.unwrap().unwrap();
    assert_eq!(
        row.status,
        Status::Pending,
        "kept (keep-order head blocks, reported)"
    );
    assert!(row.last_error.unwrap_or_default().contains("Tampered"));

    // A relay that dropped k1 refuses k1's rows.
    let store2 = h.fresh().await;
    let broker2 = RecordingPublisher::new();
    let outbox2 = base(store2.clone(), broker2.clone())
        .signer(Signer::new(
            SigningKey::new("k1", b"first-secret-0123456789".to_vec()).unwrap(),
        ))
        .stream_strategy("s", KeepOrder::default())
        .dead_letter_keep_order(true)
        .build()
        .unwrap();
    h.transact(&store2, &outbox2, vec![msg("s", None, 1)], true)
        .await
        .unwrap()
        .dispatch();
    let strict = outbox2.relay().signer(Signer::new(k2)).build().unwrap();
    strict.run_once().await.unwrap();
    assert_eq!(broker2.count(), 0);
    assert_eq!(
        total(store2.as_ref()).await.dead,
        1,
        "refused row is dead-lettered when opted in"
    );
}

/// Relays limited to streams publish only those; a relay for all streams takes the rest.
pub async fn stream_filter<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let msgs = vec![
        msg("a", None, 1),
        msg("b", None, 2),
        msg("c", None, 3),
        msg("a", None, 4),
    ];
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let ab = outbox.relay().streams(["a", "b"]).build().unwrap();
    assert_eq!(ab.run_once().await.unwrap().published, 3);
    assert!(broker.published().iter().all(|e| e.message.stream != "c"));
    let only_c = outbox.relay().streams(["zzz"]).build().unwrap();
    assert_eq!(only_c.run_once().await.unwrap().published, 0);
    let all = outbox.relay().build().unwrap();
    assert_eq!(all.run_once().await.unwrap().published, 1);
    assert_eq!(broker.count(), 4);
    assert!(
        outbox
            .relay()
            .streams(Vec::<String>::new())
            .build()
            .is_err(),
        "empty filter is a config error"
    );
}

/// Strategies are set globally and overridden per stream.
pub async fn strategy_per_stream<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .strategy(PublishOnCommit)
        .stream_strategy("ordered", KeepOrder::default())
        .build()
        .unwrap();
    let pending = h
        .transact(
            &store,
            &outbox,
            vec![msg("loose", None, 1), msg("ordered", None, 2)],
            true,
        )
        .await
        .unwrap();
    assert_eq!(
        pending.len(),
        1,
        "only the publish-on-commit message is published by the committer"
    );
    let rows = all_rows(store.as_ref(), 10).await;
    let strategies: HashMap<_, _> = rows
        .iter()
        .map(|r| (r.envelope.message.stream.clone(), r.order))
        .collect();
    assert_eq!(strategies["loose"], Order::Unordered);
    assert_eq!(strategies["ordered"], Order::InUnit);
    pending.publish().await;
    assert_eq!(broker.count(), 1);
    outbox.relay().build().unwrap().run_once().await.unwrap();
    assert_eq!(broker.count(), 2);
}

/// Contract point 7: A relay sleeping on a long poll interval wakes at once when rows are committed.
///
/// No sleep decides the interleaving: a first message, committed before the relay starts, is
/// published by its first claim; once it is out, the relay is at (or on its way to) its idle
/// wait, and every later commit must wake it, or a 120 s poll interval misses the deadline.
pub async fn wakeup_on_commit<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    h.transact(&store, &outbox, vec![msg("s", None, 0)], true)
        .await
        .unwrap()
        .dispatch();
    let relay = outbox
        .relay()
        .poll_interval(Duration::from_secs(120))
        .build()
        .unwrap();
    let running = RunningRelay::spawn(relay);
    for i in 1..4 {
        eventually(
            "relay published what was committed",
            Duration::from_secs(10),
            || async { broker.count() == i },
        )
        .await;
        h.transact(&store, &outbox, vec![msg("s", None, i)], true)
            .await
            .unwrap()
            .dispatch();
    }
    eventually(
        "relay woken by the last commit",
        Duration::from_secs(10),
        || async { broker.count() == 4 },
    )
    .await;
    running.stop().await;
}

/// Contract point 9: A signature nobody can check is never trusted: a relay without keys refuses
/// signed rows (unverifiable); a relay with keys publishes unsigned rows only while
/// `require_signatures` is off.
pub async fn signature_policy<H: Harness>(h: &H) {
    let key = SigningKey::new("k1", b"policy-secret-0123456789".to_vec()).unwrap();
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let events = EventLog::default();
    let signing = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .signer(Signer::new(key.clone()))
        .build()
        .unwrap();
    let plain = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    h.transact(&store, &signing, vec![msg("signed", None, 1)], true)
        .await
        .unwrap()
        .dispatch();
    h.transact(&store, &plain, vec![msg("unsigned", None, 2)], true)
        .await
        .unwrap()
        .dispatch();

    // No key: the unsigned row goes out, the signed one is unverifiable and stays.
    let keyless = Relay::builder(store.clone(), broker.clone())
        .retry(fast_retry(5))
        .observer(events.observer())
        .build()
        .unwrap();
    keyless.run_once().await.unwrap();
    let got: Vec<_> = broker
        .published()
        .into_iter()
        .map(|e| e.message.stream)
        .collect();
    assert_eq!(
        got,
        ["unsigned"],
        "a signed row was published without a key"
    );
    assert!(events.count("tampered") >= 1);
    let signed = find_by_payload(store.as_ref(), b"1").await;
    assert_eq!(signed.status, Status::Pending, "kept, blocking its unit");
    assert!(signed
        .last_error
        .unwrap_or_default()
        .contains("unverifiable"));

    // With the key, the signed row verifies (the unit unblocks once its backoff ends).
    let keyed = Relay::builder(store.clone(), broker.clone())
        .signer(Signer::new(key.clone()))
        .build()
        .unwrap();
    eventually(
        "the signed row is published with its key",
        DEADLINE,
        || async {
            keyed.run_once().await.unwrap();
            broker.count() == 2
        },
    )
    .await;

    // require_signatures refuses an unsigned row; without it, an unsigned row passes a keyed relay.
    h.transact(&store, &plain, vec![msg("late", None, 3)], true)
        .await
        .unwrap()
        .dispatch();
    let strict_events = EventLog::default();
    let strict = Relay::builder(store.clone(), broker.clone())
        .signer(Signer::new(key.clone()))
        .observer(strict_events.observer())
        .build()
        .unwrap();
    assert!(
        strict.config().require_signatures,
        "signer() requires signatures"
    );
    strict.run_once().await.unwrap();
    assert_eq!(
        broker.count(),
        2,
        "unsigned row published under require_signatures"
    );
    assert!(strict_events.count("tampered") >= 1);
    let lenient = Relay::builder(store.clone(), broker.clone())
        .signer(Signer::new(key))
        .require_signatures(false)
        .build()
        .unwrap();
    eventually(
        "the unsigned row passes a lenient relay",
        DEADLINE,
        || async {
            lenient.run_once().await.unwrap();
            broker.count() == 3
        },
    )
    .await;
    let e = Relay::builder(store.clone(), broker.clone())
        .require_signatures(true)
        .build()
        .err()
        .expect("require_signatures without a key is a config error");
    assert_eq!(e.kind(), ErrorKind::Config);
}

/// A publisher whose `publish_batch` override publishes in order and panics on a message
/// whose payload starts with "boom" (the messages before it in the batch went out).
struct PanicsInBatch(RecordingPublisher);

fn boom(e: &Envelope) -> bool {
    e.message.payload.starts_with(b"boom")
}

#[async_trait]
impl crate::Publisher for PanicsInBatch {
    async fn publish(&self, envelope: &Envelope) -> crate::Result<()> {
        assert!(!boom(envelope), "bug in publish: {}", envelope.id);
        self.0.publish(envelope).await
    }

    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<crate::Result<()>> {
        let mut out = Vec::new();
        for e in batch {
            assert!(!boom(e), "bug in publish_batch: {}", e.id);
            out.push(self.0.publish(e).await);
        }
        out
    }
}

/// A publisher that panics on one message is a failure of that message, on both paths: the
/// rest of the batch is published, the failure is reported and retried, and the message is
/// dead-lettered (publish-on-commit) or its unit reported stuck (keep-order) after
/// `max_attempts`. With `persist_all = false` the panicking message is written for the relay.
pub async fn panicking_publisher_is_a_failure<H: Harness>(h: &H) {
    for batch_override in [false, true] {
        let broker = RecordingPublisher::new();
        let publisher: Arc<dyn crate::Publisher> = if batch_override {
            Arc::new(PanicsInBatch(broker.clone()))
        } else {
            Arc::new(FaultyPublisher::new(broker.clone(), |e: &Envelope| {
                assert!(!boom(e), "bug in publish: {}", e.id);
                None
            }))
        };
        let published = |payload: &[u8]| {
            broker
                .published()
                .iter()
                .any(|e| e.message.payload == payload)
        };

        // Publish-on-commit, persisted: the committer's batch has the panicking message third.
        let store = h.fresh().await;
        let events = EventLog::default();
        let outbox = base(store.clone(), publisher.clone())
            .retry(fast_retry(3))
            .observer(events.observer())
            .build()
            .unwrap();
        let msgs = ["p1", "p2", "boom-p", "p4", "p5"]
            .iter()
            .map(|p| Message::new("d", p.as_bytes().to_vec()).stream("s"))
            .collect();
        let report = h
            .transact(&store, &outbox, msgs, true)
            .await
            .unwrap()
            .publish()
            .await;
        assert_eq!(
            (report.published, report.failed),
            (4, 1),
            "{batch_override}"
        );
        assert!(["p1", "p2", "p4", "p5"]
            .iter()
            .all(|p| published(p.as_bytes())));
        assert_eq!(events.count("failed"), 1);
        let row = find_by_payload(store.as_ref(), b"boom-p").await;
        assert_eq!((row.status, row.attempts), (Status::Pending, 1));
        assert!(
            row.last_error.as_deref().unwrap_or("").contains("panicked"),
            "{:?}",
            row.last_error
        );
        let relay = outbox.relay().build().unwrap();
        eventually(
            "the panicking message is dead-lettered",
            DEADLINE,
            || async {
                relay.run_once().await.unwrap();
                find_by_payload(store.as_ref(), b"boom-p").await.status == Status::Dead
            },
        )
        .await;
        assert_eq!(find_by_payload(store.as_ref(), b"boom-p").await.attempts, 3);
        assert_eq!(events.count("dead"), 1);
        assert!(!published(b"boom-p"));
        let t = total(store.as_ref()).await;
        assert_eq!((t.sent, t.dead, t.pending), (4, 1, 0));

        // persist_all = false: the panicking message is written after the fact, not lost.
        let store = h.fresh().await;
        let outbox = base(store.clone(), publisher.clone())
            .persist_all(false)
            .build()
            .unwrap();
        let msgs = ["q1", "boom-q"]
            .iter()
            .map(|p| Message::new("d", p.as_bytes().to_vec()).stream("s"))
            .collect();
        let report = h
            .transact(&store, &outbox, msgs, true)
            .await
            .unwrap()
            .publish()
            .await;
        assert_eq!((report.published, report.failed, report.lost), (1, 1, 0));
        let row = find_by_payload(store.as_ref(), b"boom-q").await;
        assert_eq!((row.status, row.attempts), (Status::Pending, 1));
        assert!(published(b"q1"));

        // Keep-order on the relay path: the panicking head blocks its own key only.
        let store = h.fresh().await;
        let events = EventLog::default();
        let outbox = base(store.clone(), publisher.clone())
            .strategy(KeepOrder::default())
            .retry(fast_retry(2))
            .observer(events.observer())
            .build()
            .unwrap();
        let msgs = vec![
            Message::new("d", b"x1".to_vec()).stream("k").key("x"),
            Message::new("d", b"boom-x2".to_vec()).stream("k").key("x"),
            Message::new("d", b"x3".to_vec()).stream("k").key("x"),
            Message::new("d", b"y1".to_vec()).stream("k").key("y"),
            Message::new("d", b"y2".to_vec()).stream("k").key("y"),
        ];
        h.transact(&store, &outbox, msgs, true)
            .await
            .unwrap()
            .dispatch();
        let relay = outbox.relay().build().unwrap();
        eventually("the panicking head is reported stuck", DEADLINE, || async {
            relay.run_once().await.unwrap();
            events.count("stuck") >= 1
        })
        .await;
        assert!(["x1", "y1", "y2"].iter().all(|p| published(p.as_bytes())));
        assert!(!published(b"x3"), "x3 overtook its panicking head");
        assert!(!published(b"boom-x2"));
        let head = find_by_payload(store.as_ref(), b"boom-x2").await;
        assert_eq!(head.status, Status::Pending);
        assert!(head.attempts >= 2);
        let distinct: std::collections::HashSet<_> =
            broker.published().into_iter().map(|e| e.id).collect();
        assert!(
            broker.count() - distinct.len() <= 8,
            "duplicates only from re-sent batches: {} of {}",
            broker.count() - distinct.len(),
            broker.count()
        );
    }
}

/// Contract point 12: streams, keys and units compare byte for byte on every store: names that
/// differ by case, by Unicode normalization, or (rows written around the validation) by a
/// trailing space are distinct streams and distinct units; 4-byte characters round-trip; a
/// name with leading or trailing whitespace is refused at enqueue.
pub async fn names_are_exact<H: Harness>(h: &H) {
    let (precomposed, decomposed) = ("\u{e9}t\u{e9}", "e\u{301}te\u{301}");
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let publisher = FaultyPublisher::new(broker.clone(), |e: &Envelope| {
        (e.message.destination == "poison").then(|| Error::transient("consumer down"))
    });
    let outbox = base(store.clone(), publisher)
        .strategy(KeepOrder::default())
        .build()
        .unwrap();

    // Streams.
    let streams = ["a", "A", precomposed, decomposed, "\u{1f980}"];
    let msgs = streams
        .iter()
        .map(|s| {
            Message::new("d", s.as_bytes().to_vec())
                .stream(*s)
                .key("\u{1f511}")
        })
        .collect();
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    for s in streams {
        let before = broker.count();
        let relay = outbox.relay().streams([s]).build().unwrap();
        relay.run_once().await.unwrap();
        let got: Vec<String> = broker.published()[before..]
            .iter()
            .map(|e| e.message.stream.clone())
            .collect();
        assert_eq!(got, [s], "a relay of stream {s:?} published {got:?}");
    }
    let crab = find_by_payload(store.as_ref(), "\u{1f980}".as_bytes()).await;
    assert_eq!(crab.envelope.message.stream, "\u{1f980}");
    assert_eq!(crab.envelope.message.key.as_deref(), Some("\u{1f511}"));

    // Units: a blocked head on key "k" holds back only "k".
    let keys = ["k", "K", precomposed, decomposed];
    let mut msgs = vec![Message::new("poison", b"k-head".to_vec())
        .stream("u")
        .key("k")];
    for k in keys {
        msgs.push(
            Message::new("d", format!("{k}-next").into_bytes())
                .stream("u")
                .key(k),
        );
    }
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let relay = outbox.relay().streams(["u"]).build().unwrap();
    relay.run_once().await.unwrap();
    let published: Vec<Vec<u8>> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    for k in &keys[1..] {
        assert!(
            published.contains(&format!("{k}-next").into_bytes()),
            "unit {k:?} was held back by the blocked unit \"k\""
        );
    }
    assert!(
        !published.contains(&b"k-next".to_vec()),
        "k-next overtook its head"
    );

    // Leading or trailing whitespace is refused at enqueue, with nothing written.
    let before = total(store.as_ref()).await.pending;
    for bad in [
        Message::new("d", b"x".to_vec()).stream("a "),
        Message::new("d", b"x".to_vec()).stream(" a"),
        Message::new("d", b"x".to_vec()).stream("u").key("k "),
    ] {
        let e = h
            .transact(&store, &outbox, vec![bad], true)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidMessage, "{e}");
    }
    assert_eq!(total(store.as_ref()).await.pending, before);

    // Rows written around the validation (another service, SQL) keep their exact names: a
    // relay of "a" never claims stream "a ", and unit ("u", "k ") is not unit ("u", "k"): it
    // is claimed while "k" is blocked (and then quarantined, since it breaks the enqueue
    // rules; merged with "k", it would wait behind k's head, pending).
    let raw = |stream: &str, key: &str, payload: &str| {
        let message = Message::new("d", payload.as_bytes().to_vec())
            .stream(stream)
            .key(key);
        crate::NewMessage {
            envelope: Envelope {
                id: MessageId::new(),
                created_at: SystemTime::now(),
                message,
            },
            order: Order::InUnit,
            unit: key.to_owned(),
            exhausted: Exhausted::Default,
            published_by: PublishedBy::Relay,
            signature: None,
            status: Status::Pending,
            attempts: 0,
            retry_after: Duration::ZERO,
            not_before: None,
            last_error: None,
            lease: None,
        }
    };
    store
        .insert(&[
            raw("a ", "x", "padded-stream"),
            raw("u", "k ", "padded-key"),
        ])
        .await
        .unwrap();
    let only_a = outbox.relay().streams(["a"]).build().unwrap();
    assert_eq!(
        only_a.run_once().await.unwrap().claimed,
        0,
        "a relay of \"a\" claimed \"a \""
    );
    let padded = find_by_payload(store.as_ref(), b"padded-stream").await;
    assert_eq!(
        padded.envelope.message.stream, "a ",
        "the name kept its trailing space"
    );
    assert_eq!(padded.status, Status::Pending);
    relay.run_once().await.unwrap();
    let padded_key = find_by_payload(store.as_ref(), b"padded-key").await;
    assert_eq!(
        padded_key.status,
        Status::Dead,
        "unit (\"u\", \"k \") was held back by unit (\"u\", \"k\")"
    );
    assert!(padded_key
        .last_error
        .unwrap_or_default()
        .contains("whitespace"));
    let got: Vec<Vec<u8>> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    assert!(
        !got.contains(&b"k-next".to_vec()),
        "k-next overtook its head"
    );
}

/// Contract point 14: rows are untrusted input. Each kind of broken row the store can hold is
/// quarantined (dead, with the column and the reason, reported), and every other row of the
/// batch (its own unit's next row included) is published.
pub async fn bad_rows_are_quarantined<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let events = EventLog::default();
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .observer(events.observer())
        .build()
        .unwrap();
    let m =
        |payload: String, key: String| Message::new("d", payload.into_bytes()).stream("s").key(key);
    let mut msgs = Vec::new();
    for i in 0..Corruption::ALL.len() {
        msgs.push(m(format!("victim-{i}"), format!("k{i}")));
        msgs.push(m(format!("after-{i}"), format!("k{i}")));
    }
    for j in 0..40 {
        msgs.push(m(format!("good-{j}"), format!("g{}", j % 4)));
    }
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let mut corrupted = Vec::new();
    for (i, kind) in Corruption::ALL.into_iter().enumerate() {
        let victim = find_by_payload(store.as_ref(), format!("victim-{i}").as_bytes()).await;
        if h.corrupt(&store, victim.seq, kind).await {
            corrupted.push((i, kind, victim.seq));
        }
    }

    let relay = outbox.relay().build().unwrap();
    let report = relay.run_once().await.unwrap();
    let published: std::collections::HashSet<Vec<u8>> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    for j in 0..40 {
        assert!(
            published.contains(format!("good-{j}").as_bytes()),
            "good-{j} not published"
        );
    }
    for i in 0..Corruption::ALL.len() {
        assert!(
            published.contains(format!("after-{i}").as_bytes()),
            "after-{i} held back by a broken row"
        );
        let victim_out = published.contains(format!("victim-{i}").as_bytes());
        let broken = corrupted.iter().any(|(c, ..)| *c == i);
        assert_eq!(
            victim_out, !broken,
            "victim-{i}: published {victim_out}, broken {broken}"
        );
    }
    for (_, kind, seq) in &corrupted {
        let row = store
            .get(*seq)
            .await
            .unwrap()
            .expect("the broken row is kept");
        assert_eq!(row.status, Status::Dead, "{kind:?}");
        let error = row.last_error.unwrap_or_default();
        assert!(
            error.contains("quarantined") && error.contains(kind.column()),
            "{kind:?}: {error}"
        );
    }
    assert_eq!(report.quarantined, corrupted.len());
    assert_eq!(events.count("quarantined"), corrupted.len());
    let t = total(store.as_ref()).await;
    assert_eq!((t.pending, t.dead), (0, corrupted.len() as u64));
    // Listing dead letters shows the broken rows too.
    assert_eq!(
        store.dead_letters(None, 100).await.unwrap().len(),
        corrupted.len()
    );
}

/// Contract point 14: sizes are read before payloads. A row over the relay's limit (written by
/// a writer with a larger limit, or by SQL) is quarantined without being loaded, and a batch
/// takes rows only while they fit its byte budget.
pub async fn oversized_rows_and_the_byte_budget<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let events = EventLog::default();
    // The writer accepts up to 1 MiB; the relay only 1000 bytes a row, 3000 a batch.
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .observer(events.observer())
        .build()
        .unwrap();
    let mut msgs = vec![Message::new("d", vec![b'x'; 5000]).stream("s").key("big")];
    for i in 0..5u8 {
        msgs.push(
            Message::new("d", vec![b'0' + i; 900])
                .stream("s")
                .key(format!("k{i}")),
        );
    }
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let relay = outbox
        .relay()
        .config(crate::RelayConfig {
            max_batch_bytes: 3000,
            delivery: crate::Delivery {
                max_payload_bytes: 1000,
                retry: fast_retry(5),
                ..Default::default()
            },
            ..Default::default()
        })
        .observers(vec![Arc::new(events.observer())])
        .build()
        .unwrap();
    let first = relay.step().await.unwrap();
    assert_eq!(
        (first.claimed, first.quarantined, first.published),
        (4, 1, 3),
        "the oversized row plus the three rows that fit 3000 bytes: {first:?}"
    );
    relay.run_once().await.unwrap();
    assert_eq!(broker.count(), 5, "every row that fits is published");
    let big = all_rows(store.as_ref(), 20)
        .await
        .into_iter()
        .find(|r| r.envelope.message.key.as_deref() == Some("big"))
        .expect("the oversized row is kept");
    assert_eq!(big.status, Status::Dead);
    let error = big.last_error.unwrap_or_default();
    assert!(
        error.contains("not loaded") && error.contains("1000"),
        "{error}"
    );
    assert_eq!(events.count("quarantined"), 1);
}

/// A migrated store reports its schema whole (nothing missing, nothing left of an older
/// version), and a second migrate keeps it so: `outbox doctor` asks the store, which knows
/// what its `migrate` makes.
pub async fn the_schema_is_whole_after_migrate<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let report = store.schema().await.expect("schema");
    assert_eq!(report, crate::SchemaReport::default(), "after migrate");
    store.migrate().await.expect("migrate again");
    assert_eq!(
        store.schema().await.expect("schema"),
        crate::SchemaReport::default()
    );
}

/// Contract point 11: one size limit. A message of exactly `max_payload_bytes` (payload plus
/// header names and values, [`Message::size`]) is accepted at enqueue and published by the
/// relay when the on-commit publish failed (the relay re-checks the same definition); one
/// byte over is refused at enqueue and nothing is written.
pub async fn one_size_limit<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let publisher = FaultyPublisher::new(broker.clone(), move |_| {
        d.load(Ordering::SeqCst)
            .then(|| Error::transient("broker down"))
    });
    let limit = crate::Delivery::default().max_payload_bytes;
    let outbox = base(store.clone(), publisher)
        .stream_strategy("ko", KeepOrder::default())
        .build()
        .unwrap();
    let sized = |stream: &str, size: usize, tag: u8| {
        let m = Message::new("d", Vec::new())
            .stream(stream)
            .header("trace", "abcdefgh")
            .header("tag", format!("{tag}"));
        let headers = m.size();
        Message {
            payload: vec![tag; size - headers],
            ..m
        }
    };
    // Published on commit (the broker is down: left for the relay), and kept in order.
    for (i, stream) in ["oc", "ko"].into_iter().enumerate() {
        let at = |size, n| sized(stream, size, (2 * i + n) as u8);
        let over = h
            .transact(&store, &outbox, vec![at(limit + 1, 0)], true)
            .await
            .expect_err("one byte over the limit is refused at enqueue");
        assert_eq!(over.kind(), ErrorKind::InvalidMessage, "{over}");
        let msgs = vec![at(limit - 1, 0), at(limit, 1)];
        assert_eq!(msgs[1].size(), limit);
        let after = h.transact(&store, &outbox, msgs, true).await.unwrap();
        // The broker is down at commit: the relay must publish them.
        after.publish().await;
    }
    down.store(false, Ordering::SeqCst);
    let relay = outbox.relay().retry(fast_retry(5)).build().unwrap();
    eventually("the relay publishes all four", DEADLINE, || async {
        relay.run_once().await.unwrap();
        broker.count() == 4
    })
    .await;
    let t = total(store.as_ref()).await;
    assert_eq!((t.sent, t.dead, t.pending), (4, 0, 0), "{t:?}");
    let sizes: Vec<usize> = broker
        .published()
        .iter()
        .map(|e| e.message.size())
        .collect();
    assert_eq!(
        sizes.iter().filter(|&&n| n == limit).count(),
        2,
        "{sizes:?}"
    );
}

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

/// Contract point 2: a duplicate only when a relay dies or times out. A batch whose settle
/// fails transiently after its messages were published (MariaDB breaking a deadlock by
/// rolling the settle back) is settled again, not left leased to be republished whole.
pub async fn a_failed_settle_is_retried_not_republished<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), NullPublisherDown)
        .stream_strategy("ko", KeepOrder::default())
        .build()
        .unwrap();
    let mut msgs: Vec<Message> = (0..4).map(|n| msg("ko", Some("k"), n)).collect();
    msgs.extend((4..8).map(|n| msg("oc", None, n)));
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .publish()
        .await;
    let faulty = Arc::new(Hooked::failing_settles(store.clone(), 2));
    let relay = Relay::builder(faulty, broker.clone())
        .lease(Duration::from_secs(3))
        .publish_timeout(Duration::from_secs(1))
        .retry(fast_retry(5))
        .build()
        .unwrap();
    // The on-commit rows back off after their failed publish: wait for them.
    eventually("the relay publishes all eight", DEADLINE, || async {
        relay
            .step()
            .await
            .expect("a settle that failed twice is retried");
        broker.count() >= 8
    })
    .await;
    let t = total(store.as_ref()).await;
    assert_eq!((t.sent, t.pending), (8, 0), "{t:?}");
    // Every row is recorded as sent: none is left leased, to come again after the lease.
    relay.run_once().await.unwrap();
    assert_eq!(broker.count(), 8, "nothing published twice");
}

/// A publisher that is always down (its failures leave rows to the relay).
struct NullPublisherDown;

#[async_trait]
impl crate::Publisher for NullPublisherDown {
    async fn publish(&self, _: &Envelope) -> crate::Result<()> {
        Err(Error::transient("broker down"))
    }
}

/// An ordered publisher (it pipelines a unit's run) that refuses, transiently and before
/// sending, the first try of every message whose number is 1 mod 4, through
/// `check_message` and `publish_batch` alike, and records what it sends.
struct OrderedRefuser {
    sent: RecordingPublisher,
    refused: Mutex<std::collections::HashSet<MessageId>>,
}

impl OrderedRefuser {
    fn refuse_once(&self, env: &Envelope) -> crate::Result<()> {
        let n: usize = String::from_utf8_lossy(&env.message.payload)
            .parse()
            .unwrap_or(0);
        if n % 4 == 1 && self.refused.lock().unwrap().insert(env.id) {
            return Err(Error::transient("refused before sending (injected)"));
        }
        Ok(())
    }
}

#[async_trait]
impl crate::Publisher for OrderedRefuser {
    async fn publish(&self, env: &Envelope) -> crate::Result<()> {
        self.refuse_once(env)?;
        self.sent.publish(env).await
    }
    fn ordered_batches(&self) -> bool {
        true
    }
    fn check_message(&self, env: &Envelope) -> crate::Result<()> {
        self.refuse_once(env)
    }
    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<crate::Result<()>> {
        let mut out = Vec::new();
        for env in batch {
            out.push(match self.refuse_once(env) {
                Ok(()) => self.sent.publish(env).await,
                Err(e) => Err(e),
            });
        }
        out
    }
}

/// Contract point 17: order survives refusals. A publisher that takes a unit's run as one
/// ordered batch refuses some messages before sending them; no later message of the unit
/// goes out in that batch, so the first deliveries are in order and nothing is sent twice.
pub async fn ordered_refusals_keep_first_delivery_order<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let outbox = base(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let mut msgs = Vec::new();
    for n in 0..12 {
        for k in 0..5 {
            msgs.push(msg("s", Some(&format!("k{k}")), n));
        }
    }
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let publisher = Arc::new(OrderedRefuser {
        sent: RecordingPublisher::new(),
        refused: Mutex::new(Default::default()),
    });
    let relay = Relay::builder(store.clone(), publisher.clone())
        .retry(fast_retry(50))
        .build()
        .unwrap();
    eventually("every message is delivered", DEADLINE, || async {
        relay.run_once().await.unwrap();
        publisher.sent.count() >= 60
    })
    .await;
    let mut deliveries = Deliveries::default();
    for e in publisher.sent.published() {
        let n = String::from_utf8_lossy(&e.message.payload).parse().unwrap();
        deliveries.record(e.id.to_string(), e.message.key.clone().unwrap(), n);
    }
    assert_eq!(deliveries.distinct(), 60);
    assert_eq!(
        (deliveries.order_violations(), deliveries.duplicates()),
        (0, 0),
        "first deliveries in order, none sent twice"
    );
    assert!(
        publisher.refused.lock().unwrap().len() >= 15,
        "refusals happened"
    );
}

/// Orders per tenant header, whatever the key; a tenant's failing message dead-letters
/// (its own answer) while the relay's default for ordered rows is to block.
#[derive(Debug)]
struct PerTenant;

impl crate::Strategy for PerTenant {
    fn name(&self) -> &str {
        "per-tenant"
    }
    fn published_by(&self, _: &Message) -> PublishedBy {
        PublishedBy::Relay
    }
    fn unit(&self, m: &Message) -> crate::Unit {
        match m.headers.get("tenant") {
            Some(t) => crate::Unit::Named(format!("tenant:{t}")),
            None => crate::Unit::Stream,
        }
    }
    fn exhausted(&self, m: &Message) -> Exhausted {
        if m.headers.contains_key("disposable") {
            Exhausted::DeadLetter
        } else {
            Exhausted::Block
        }
    }
}

/// A strategy of the application's own: its unit (a tenant header, across keys) and its
/// exhaustion answers are stored and obeyed by the relay; an answer the store cannot hold
/// writes nothing.
pub async fn custom_strategy_units_and_policies<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let publisher = FaultyPublisher::new(broker.clone(), |e: &Envelope| {
        (e.message.destination == "poison").then(|| Error::permanent("rejected"))
    });
    let events = EventLog::default();
    let outbox = base(store.clone(), publisher)
        .stream_strategy("t", PerTenant)
        .observer(events.observer())
        .build()
        .unwrap();
    let m = |tenant: &str, key: &str, n: usize, dest: &str| {
        Message::new(dest, format!("{tenant}-{n}").into_bytes())
            .stream("t")
            .key(key)
            .header("tenant", tenant)
    };
    // Tenant a: a poisoned head (blocks: the strategy's answer), then two keys behind it.
    // Tenant b: a disposable poisoned head (dead-lettered: its answer), then the rest.
    let msgs = vec![
        m("a", "k1", 1, "poison"),
        m("a", "k2", 2, "d"),
        m("a", "k3", 3, "d"),
        m("b", "k1", 1, "poison").header("disposable", "yes"),
        m("b", "k2", 2, "d"),
    ];
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let row = find_by_payload(store.as_ref(), b"a-2").await;
    assert_eq!((row.order, row.unit.as_str()), (Order::InUnit, "tenant:a"));
    assert_eq!(row.exhausted, Exhausted::Block);
    let relay = outbox.relay().build().unwrap();
    for _ in 0..8 {
        relay.run_once().await.unwrap();
    }
    let got: Vec<Vec<u8>> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    assert_eq!(
        got,
        vec![b"b-2".to_vec()],
        "tenant a blocked behind its head across keys; tenant b went on without its dead head"
    );
    let head = find_by_payload(store.as_ref(), b"a-1").await;
    assert_eq!(head.status, Status::Pending, "blocked, not dead-lettered");
    assert!(events.count("stuck") >= 1);
    let dead = find_by_payload(store.as_ref(), b"b-1").await;
    assert_eq!(dead.status, Status::Dead);

    // Answers a store cannot represent: typed error, nothing written.
    #[derive(Debug)]
    struct OrderedOnCommit;
    impl crate::Strategy for OrderedOnCommit {
        fn name(&self) -> &str {
            "ordered-on-commit"
        }
        fn published_by(&self, _: &Message) -> PublishedBy {
            PublishedBy::Committer
        }
        fn unit(&self, _: &Message) -> crate::Unit {
            crate::Unit::Key
        }
    }
    let before = total(store.as_ref()).await;
    let bad = base(store.clone(), RecordingPublisher::new())
        .stream_strategy("x", OrderedOnCommit)
        .stream_strategy("t", PerTenant)
        .build()
        .unwrap();
    for msgs in [
        vec![msg("t", None, 1), msg("x", Some("k"), 2)],
        vec![m(&"n".repeat(300), "k", 1, "d")],
    ] {
        let err = h.transact(&store, &bad, msgs, true).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidMessage, "{err}");
    }
    let after = total(store.as_ref()).await;
    assert_eq!(
        (after.pending, after.dead, after.sent),
        (before.pending, before.dead, before.sent)
    );
}

/// Scheduled messages: published by the relay no earlier than asked (also on a
/// publish-on-commit stream), and in a keep-order unit they hold back what follows them;
/// a schedule past `max_delay` is refused.
pub async fn scheduled_delivery<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .stream_strategy("ordered", KeepOrder::default())
        .max_delay(Duration::from_secs(7200))
        .build()
        .unwrap();
    let hour = Duration::from_secs(3600);
    let soon = Duration::from_millis(1500);
    let msgs = vec![
        // Publish-on-commit stream: scheduled ones go to the relay.
        msg("loose", None, 1).delay(hour),
        msg("loose", None, 2).delay(soon),
        msg("loose", None, 3).deliver_at(SystemTime::now() + hour),
        msg("loose", None, 4).deliver_at(SystemTime::now() - hour),
        msg("loose", None, 5),
        // Keep-order: k's first message is scheduled, its second waits for it; j is free;
        // h is held for an hour, and so is what follows it.
        msg("ordered", Some("k"), 6).delay(soon),
        msg("ordered", Some("k"), 7),
        msg("ordered", Some("j"), 8),
        msg("ordered", Some("h"), 9).deliver_at(SystemTime::now() + hour),
        msg("ordered", Some("h"), 10),
    ];
    let after = h.transact(&store, &outbox, msgs, true).await.unwrap();
    assert_eq!(
        after.len(),
        2,
        "only the unscheduled and past-due on-commit messages"
    );
    after.publish().await;
    let relay = outbox.relay().build().unwrap();
    relay.run_once().await.unwrap();
    let payloads = |b: &RecordingPublisher| -> Vec<String> {
        b.published()
            .into_iter()
            .map(|e| String::from_utf8(e.message.payload).unwrap())
            .collect()
    };
    let first = payloads(&broker);
    for early in ["1", "3", "9", "10"] {
        assert!(
            !first.contains(&early.to_string()),
            "{early} published early: {first:?}"
        );
    }
    assert!(first.contains(&"8".to_string()), "{first:?}");
    if !first.contains(&"6".to_string()) {
        assert!(
            !first.contains(&"7".to_string()),
            "7 overtook its scheduled head: {first:?}"
        );
    }
    eventually("the soon-scheduled messages", DEADLINE, || async {
        relay.run_once().await.unwrap();
        let got = payloads(&broker);
        ["2", "6", "7"].iter().all(|p| got.contains(&p.to_string()))
    })
    .await;
    let got = payloads(&broker);
    let at = |p: &str| got.iter().position(|g| g == p).unwrap();
    assert!(at("6") < at("7"), "order kept behind a schedule: {got:?}");
    for held in ["1", "3", "9", "10"] {
        assert!(
            !got.contains(&held.to_string()),
            "{held} published before its time: {got:?}"
        );
    }
    let held = find_by_payload(store.as_ref(), b"9").await;
    assert_eq!(held.status, Status::Pending);
    assert!(held.next_attempt_at > SystemTime::now() + Duration::from_secs(3000));

    // Past max_delay: refused, nothing written.
    let before = total(store.as_ref()).await;
    let err = h
        .transact(
            &store,
            &outbox,
            vec![
                msg("loose", None, 11),
                msg("loose", None, 12).delay(3 * hour),
            ],
            true,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidMessage);
    assert!(err.to_string().contains("max_delay"), "{err}");
    assert_eq!(total(store.as_ref()).await.pending, before.pending);
}

/// A table made before strategies were a trait, parking and crash-loop counts (no
/// `on_exhausted`, `claims`, `<table>_due.parked_at` ...) is upgraded by `migrate`; the rows already in it are claimed, published in order and read back with the
/// default answers.
pub async fn rows_of_an_earlier_schema_keep_working<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .stream_strategy("ordered", KeepOrder::default())
        .build()
        .unwrap();
    h.transact(
        &store,
        &outbox,
        vec![msg("ordered", Some("k"), 1), msg("ordered", Some("k"), 2)],
        true,
    )
    .await
    .unwrap()
    .dispatch();
    // As the table was before strategies, parking and crash-loop counts.
    for sql in [
        "DROP INDEX {t}_due_parked",
        "ALTER TABLE {t} DROP COLUMN on_exhausted",
        "ALTER TABLE {t} DROP COLUMN claims",
        "ALTER TABLE {t}_due DROP COLUMN parked_at",
        "ALTER TABLE {t}_due DROP COLUMN parked_reason",
        "ALTER TABLE {t}_due DROP COLUMN claims",
    ] {
        if !h.execute_sql(&store, sql).await {
            return; // a store without SQL
        }
    }
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    let row = find_by_payload(store.as_ref(), b"1").await;
    assert_eq!(
        (row.order, row.unit.as_str(), row.exhausted),
        (Order::InUnit, "k", Exhausted::Default)
    );
    store
        .park_unit("ordered", "k", "upgrade check")
        .await
        .unwrap();
    assert_eq!(store.parked_units(None, 10).await.unwrap().len(), 1);
    store.resume_unit("ordered", "k").await.unwrap();
    h.transact(&store, &outbox, vec![msg("ordered", Some("k"), 3)], true)
        .await
        .unwrap()
        .dispatch();
    outbox.relay().build().unwrap().run_once().await.unwrap();
    let got: Vec<Vec<u8>> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    assert_eq!(got, vec![b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
}

fn payload_order(broker: &RecordingPublisher) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    broker
        .published()
        .into_iter()
        .filter(|e| seen.insert(e.id))
        .map(|e| String::from_utf8_lossy(&e.message.payload).into_owned())
        .collect()
}

/// Park: a keep-order head that exhausts its attempts under `Exhausted::Park` parks its unit
/// (with two relays running); the unit's rows, and rows written meanwhile, wait in order and
/// cost claims nothing; `resume` republishes them in order from the head, `skip` dead-letters
/// just the head and publishes the rest in order; other units never wait.
pub async fn park_resume_and_skip<H: Harness>(h: &H) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let healed = Arc::new(AtomicBool::new(false));
    let heal = healed.clone();
    let publisher = FaultyPublisher::new(broker.clone(), move |e: &Envelope| {
        match e.message.destination.as_str() {
            "flaky" if !heal.load(Ordering::SeqCst) => Some(Error::transient("broker says no")),
            "poison" => Some(Error::permanent("rejected")),
            _ => None,
        }
    });
    let events = EventLog::default();
    let outbox = base(store.clone(), publisher)
        .stream_strategy("p", KeepOrder::park())
        .observer(events.observer())
        .retry(fast_retry(3))
        .build()
        .unwrap();
    let m = |key: &str, n: usize, dest: &str| {
        Message::new(dest, format!("{key}{n}").into_bytes())
            .stream("p")
            .key(key)
    };
    h.transact(
        &store,
        &outbox,
        vec![
            m("k", 1, "flaky"),
            m("k", 2, "d"),
            m("s", 1, "poison"),
            m("k", 3, "d"),
            m("s", 2, "d"),
            m("j", 1, "d"),
            m("j", 2, "d"),
        ],
        true,
    )
    .await
    .unwrap()
    .dispatch();
    let relays: Vec<RunningRelay> = (0..2)
        .map(|_| {
            RunningRelay::spawn(
                outbox
                    .relay()
                    .poll_interval(Duration::from_millis(20))
                    .build()
                    .unwrap(),
            )
        })
        .collect();
    eventually("k and s parked, j published", DEADLINE, || async {
        let parked = store.parked_units(Some("p"), 10).await.unwrap();
        parked.len() == 2 && payload_order(&broker).len() == 2
    })
    .await;
    // Written while parked: queued behind the parked rows.
    h.transact(&store, &outbox, vec![m("k", 4, "d"), m("s", 3, "d")], true)
        .await
        .unwrap()
        .dispatch();
    let parked = store.parked_units(Some("p"), 10).await.unwrap();
    let k = parked.iter().find(|p| p.unit == "k").expect("k parked");
    let k1 = find_by_payload(store.as_ref(), b"k1").await;
    assert_eq!(k.head, Some(k1.seq));
    assert_eq!(k.pending, 4, "k1..k4 wait in the parked unit");
    let reason = k.reason.clone().unwrap_or_default();
    assert!(reason.contains("failed 3 times"), "{reason}");
    assert!(reason.contains("broker says no"), "{reason}");
    assert_eq!(k1.status, Status::Pending);
    assert_eq!(events.count("parked"), 2);
    assert!(store
        .parked_units(Some("other"), 10)
        .await
        .unwrap()
        .is_empty());
    // A parked unit costs a claim nothing: nothing is claimable now.
    let idle = outbox.relay().build().unwrap();
    assert_eq!(idle.run_once().await.unwrap().claimed, 0);
    assert_eq!(payload_order(&broker), ["j1", "j2"]);

    // Resume k once the broker is healed: k1..k4 in order, with the relays still running.
    healed.store(true, Ordering::SeqCst);
    outbox.resume_unit("p", "k").await.unwrap();
    eventually("k published after resume", DEADLINE, || async {
        payload_order(&broker)
            .iter()
            .filter(|p| p.starts_with('k'))
            .count()
            == 4
    })
    .await;
    // Skip s's head: s1 dead-lettered, s2 and s3 in order.
    let s1 = find_by_payload(store.as_ref(), b"s1").await;
    assert_eq!(outbox.skip_head("p", "s").await.unwrap(), Some(s1.seq));
    eventually("s published after skip", DEADLINE, || async {
        payload_order(&broker)
            .iter()
            .filter(|p| p.starts_with('s'))
            .count()
            == 2
    })
    .await;
    for r in relays {
        r.stop().await;
    }
    let got = payload_order(&broker);
    let ks: Vec<&String> = got.iter().filter(|p| p.starts_with('k')).collect();
    assert_eq!(ks, ["k1", "k2", "k3", "k4"]);
    let ss: Vec<&String> = got.iter().filter(|p| p.starts_with('s')).collect();
    assert_eq!(ss, ["s2", "s3"]);
    let s1 = store.get(s1.seq).await.unwrap().unwrap();
    assert_eq!(s1.status, Status::Dead);
    assert!(s1
        .last_error
        .unwrap_or_default()
        .contains("skipped by an operator"));
    assert!(store.parked_units(None, 10).await.unwrap().is_empty());
    assert_eq!(events.count("resumed"), 2);
}

/// Operators park any unit at any time: its rows and new writes wait in order until resumed.
/// Parking, resuming or skipping a unit that does not exist (or is not parked) is a typed
/// `NotFound` error and changes nothing.
pub async fn operators_park_any_unit<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .stream_strategy("o", KeepOrder::default())
        .build()
        .unwrap();
    let m = |key: &str, n: usize| {
        Message::new("d", format!("{key}{n}").into_bytes())
            .stream("o")
            .key(key)
    };
    h.transact(&store, &outbox, vec![m("m", 1), m("m", 2), m("n", 1)], true)
        .await
        .unwrap()
        .dispatch();
    outbox
        .park_unit("o", "m", "checking the downstream ledger")
        .await
        .unwrap();
    // Parking again keeps the first reason.
    outbox.park_unit("o", "m", "again").await.unwrap();
    h.transact(&store, &outbox, vec![m("m", 3)], true)
        .await
        .unwrap()
        .dispatch();
    let relay = outbox.relay().build().unwrap();
    relay.run_once().await.unwrap();
    assert_eq!(payload_order(&broker), ["n1"]);
    let parked = store.parked_units(None, 10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(
        (parked[0].stream.as_str(), parked[0].unit.as_str()),
        ("o", "m")
    );
    assert_eq!(
        parked[0].reason.as_deref(),
        Some("checking the downstream ledger")
    );
    assert_eq!(parked[0].pending, 3);

    let before = total(store.as_ref()).await;
    for (what, result) in [
        ("park", outbox.park_unit("o", "nope", "x").await),
        ("park", outbox.park_unit("elsewhere", "m", "x").await),
        ("resume", outbox.resume_unit("o", "n").await),
        ("resume", outbox.resume_unit("o", "nope").await),
        ("skip", outbox.skip_head("o", "n").await.map(|_| ())),
    ] {
        let e = result.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::NotFound, "{what}: {e}");
    }
    let after = total(store.as_ref()).await;
    assert_eq!(
        (after.pending, after.dead, after.sent),
        (before.pending, before.dead, before.sent)
    );
    assert_eq!(store.parked_units(None, 10).await.unwrap().len(), 1);

    outbox.resume_unit("o", "m").await.unwrap();
    let e = outbox.resume_unit("o", "m").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "resumed twice: {e}");
    relay.run_once().await.unwrap();
    assert_eq!(payload_order(&broker), ["n1", "m1", "m2", "m3"]);
}

/// Publishes through `inner`, except messages to `crash`, on which it never returns: a relay
/// dropped there (as a process that dies mid-publish) records no outcome.
#[derive(Clone)]
struct Crasher {
    inner: RecordingPublisher,
    crashes: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait]
impl crate::Publisher for Crasher {
    async fn publish(&self, envelope: &Envelope) -> crate::Result<()> {
        if envelope.message.destination == "crash" {
            self.crashes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.inner.publish(envelope).await
    }
}

/// Crash loops (contract point for #15): a message whose publish kills every relay that
/// takes it (simulated by dropping the relay mid-publish: no outcome is recorded) is
/// published at most `max_attempts` times, then its unit's policy applies (here: parked);
/// the rows claimed with it are published meanwhile and never counted against.
pub async fn crash_loops_are_broken<H: Harness>(h: &H) {
    use std::sync::atomic::Ordering;
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let crasher = Crasher {
        inner: broker.clone(),
        crashes: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    };
    let budget = 3;
    let outbox = base(store.clone(), RecordingPublisher::new())
        .stream_strategy("k", KeepOrder::park())
        .stream_strategy("u", crate::RelayOnly)
        .retry(fast_retry(budget))
        .build()
        .unwrap();
    let m = |stream: &str, key: Option<&str>, name: &str, dest: &str| {
        let m = Message::new(dest, name.as_bytes().to_vec()).stream(stream);
        match key {
            Some(k) => m.key(k),
            None => m,
        }
    };
    h.transact(
        &store,
        &outbox,
        vec![
            m("k", Some("c"), "c1", "crash"),
            m("k", Some("c"), "c2", "d"),
            m("k", Some("j"), "j1", "d"),
            m("k", Some("j"), "j2", "d"),
            m("u", None, "u1", "d"),
        ],
        true,
    )
    .await
    .unwrap()
    .dispatch();
    let relay = || {
        outbox
            .relay_with(crasher.clone())
            .lease(Duration::from_millis(600))
            .publish_timeout(Duration::from_millis(400))
            .build()
            .unwrap()
    };
    // Each relay that takes c1 "dies" publishing it; the next claim after its lease is the
    // next relay's.
    eventually(
        "c1 crashed its relay `budget` times and was parked",
        DEADLINE,
        || async {
            let _ = tokio::time::timeout(Duration::from_millis(150), relay().step()).await;
            !store.parked_units(Some("k"), 10).await.unwrap().is_empty()
        },
    )
    .await;
    assert_eq!(
        crasher.crashes.load(Ordering::SeqCst),
        budget as usize,
        "published {budget} times, not once more"
    );
    let parked = store.parked_units(Some("k"), 10).await.unwrap();
    assert_eq!(parked[0].unit, "c");
    let reason = parked[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("crash loop"), "{reason}");
    eventually("the batch-mates published", DEADLINE, || async {
        let _ = tokio::time::timeout(Duration::from_secs(5), relay().run_once()).await;
        let got = payload_order(&broker);
        ["j1", "j2", "u1"]
            .iter()
            .all(|p| got.contains(&p.to_string()))
    })
    .await;
    let got = payload_order(&broker);
    let at = |p: &str| got.iter().position(|g| g == p).unwrap();
    assert!(at("j1") < at("j2"), "{got:?}");
    assert!(
        !got.contains(&"c2".to_string()),
        "c2 went before its head: {got:?}"
    );
    let stats = total(store.as_ref()).await;
    assert_eq!(stats.dead, 0, "no batch-mate was failed with the crasher");
    // The operator skips the crasher; the rest of its unit follows.
    outbox.skip_head("k", "c").await.unwrap();
    relay().run_once().await.unwrap();
    assert!(payload_order(&broker).contains(&"c2".to_string()));
    assert_eq!(crasher.crashes.load(Ordering::SeqCst), budget as usize);
}

/// `StoreAdmin::messages`: newest first, every filter narrows, keyset pages cover every row once,
/// a page size out of range is a `Config` error.
pub async fn messages_are_listed_by_filter<H: Harness>(h: &H) {
    use crate::MessageFilter;
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let poison = FaultyPublisher::new(broker.clone(), |e: &Envelope| {
        (e.message.destination == "poison").then(|| Error::permanent("rejected"))
    });
    let outbox = base(store.clone(), poison)
        .stream_strategy("b", KeepOrder::default())
        .build()
        .unwrap();
    let mut msgs: Vec<Message> = (0..7).map(|i| msg("a", Some("ka"), i)).collect();
    msgs.push(Message::new("poison", b"p".to_vec()).stream("a"));
    msgs.extend((0..5).map(|i| msg("b", Some(if i % 2 == 0 { "even" } else { "odd" }), i)));
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .publish()
        .await;
    let list = |f: MessageFilter| {
        let store = store.clone();
        async move { store.messages(&f).await.unwrap() }
    };
    let all = list(MessageFilter {
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(all.len(), 13);
    assert!(all.windows(2).all(|w| w[0].seq > w[1].seq), "newest first");
    // Pages of 4 cover every row once, in order.
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = list(MessageFilter {
            before,
            limit: 4,
            ..Default::default()
        })
        .await;
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 4);
        before = page.last().map(|m| m.seq);
        paged.extend(page.into_iter().map(|m| m.seq));
    }
    assert_eq!(paged, all.iter().map(|m| m.seq).collect::<Vec<_>>());
    let count =
        |f: MessageFilter| async move { list(MessageFilter { limit: 100, ..f }).await.len() };
    assert_eq!(
        count(MessageFilter {
            stream: Some("b".into()),
            ..Default::default()
        })
        .await,
        5
    );
    assert_eq!(
        count(MessageFilter {
            key: Some("even".into()),
            ..Default::default()
        })
        .await,
        3
    );
    assert_eq!(
        count(MessageFilter {
            status: Some(Status::Dead),
            ..Default::default()
        })
        .await,
        1
    );
    assert_eq!(
        count(MessageFilter {
            status: Some(Status::Sent),
            ..Default::default()
        })
        .await,
        7
    );
    assert_eq!(
        count(MessageFilter {
            destination: Some("poison".into()),
            ..Default::default()
        })
        .await,
        1
    );
    let one = &all[3];
    let by_id = list(MessageFilter {
        id: Some(one.envelope.id),
        ..Default::default()
    })
    .await;
    assert_eq!(by_id.len(), 1);
    assert_eq!(by_id[0].seq, one.seq);
    assert!(list(MessageFilter {
        id: Some(MessageId::new()),
        ..Default::default()
    })
    .await
    .is_empty());
    assert_eq!(
        count(MessageFilter {
            stream: Some("b".into()),
            key: Some("odd".into()),
            status: Some(Status::Pending),
            ..Default::default()
        })
        .await,
        2
    );
    for limit in [0, crate::MAX_PAGE + 1] {
        let e = store
            .messages(&MessageFilter {
                limit,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    }
}
