//! [`Fleet`]: one process relaying many stores (a database or schema per tenant, shards),
//! each with a [`Relay`] of its own, sharing one publisher and a bound on the batches in
//! flight.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Semaphore};
use tracing::Instrument;

use super::{Relay, RelayConfig, RelayHealth};
use crate::error::{Error, Result};
use crate::observer::{Event, Observer};
use crate::publisher::Publisher;
use crate::store::Store;

/// How a member store is opened: called again, with backoff, until it succeeds.
pub type OpenStore =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Arc<dyn Store>>> + Send>> + Send + Sync>;

/// Stores beyond this many share the metrics label `store="(other)"`.
pub const MAX_STORE_SERIES: usize = 100;

/// Relays for many stores in one process.
///
/// - **Fair**: every batch of every member runs while holding one of `max_batches` shared
///   permits, handed out in the order asked for. A store with a 1 000 000-row backlog takes
///   one batch per turn, like a store with 10 rows, so it cannot starve it.
/// - **Isolated**: a store that cannot be opened, or whose batches fail (unreachable,
///   unmigrated, dropped table), is retried with a growing pause (up to the config's
///   `max_error_backoff`) and reported in [`status`](Fleet::status), in the log (every
///   line in a `store` span) and in the metrics `outbox_store_up`,
///   `outbox_store_published_total`, `outbox_store_failed_total` and
///   `outbox_store_dead_total` (label `store`; past 100 stores (`MAX_STORE_SERIES`),
///   `"(other)"`). The other members never wait for it.
/// - **Changing**: [`add`](Fleet::add) and [`remove`](Fleet::remove) while it runs; a
///   removed member finishes its batch in flight.
///
/// Several processes may serve the same stores: each member is an ordinary relay, and the
/// stores' leases keep them apart.
pub struct Fleet {
    inner: Arc<Inner>,
}

struct Inner {
    publisher: Arc<dyn Publisher>,
    config: RelayConfig,
    observers: Vec<Arc<dyn Observer>>,
    permits: Arc<Semaphore>,
    members: Mutex<BTreeMap<String, Member>>,
    /// Names served with a metrics label of their own (at most `MAX_STORE_SERIES`).
    labelled: Mutex<std::collections::HashSet<String>>,
}

struct Member {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

/// What a member's task and [`Fleet::status`] share.
#[derive(Default)]
struct Shared {
    relay: std::sync::OnceLock<Relay<Arc<dyn Store>, Arc<dyn Publisher>>>,
    /// While the store cannot be opened: since when, and why.
    open_error: Mutex<Option<(SystemTime, String)>>,
    published: AtomicU64,
    failed: AtomicU64,
    dead: AtomicU64,
}

/// Where a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// Its store is being opened (the first try has not finished).
    Opening,
    /// Its relay runs and its last batch worked (or none ran yet).
    Running,
    /// Its store cannot be opened, or its last batch failed: retried with backoff.
    Failing,
}

impl MemberState {
    /// `opening`, `running` or `failing`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Opening => "opening",
            MemberState::Running => "running",
            MemberState::Failing => "failing",
        }
    }
}

/// One member of a [`Fleet`], as [`Fleet::status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its name.
    pub name: String,
    /// Where it is.
    pub state: MemberState,
    /// Since when it has been failing.
    pub failing_since: Option<SystemTime>,
    /// The last error (opening the store, or a batch).
    pub last_error: Option<String>,
    /// Messages published, failed (to be retried) and dead-lettered since it joined.
    pub published: u64,
    /// See `published`.
    pub failed: u64,
    /// See `published`.
    pub dead: u64,
}

/// Builds a [`Fleet`].
pub struct FleetBuilder {
    publisher: Arc<dyn Publisher>,
    config: RelayConfig,
    observers: Vec<Arc<dyn Observer>>,
    max_batches: usize,
}

impl FleetBuilder {
    /// The settings of every member's relay (default: [`RelayConfig::default`]).
    pub fn config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// Batches in flight at once across all members (default 8).
    pub fn max_batches(mut self, n: usize) -> Self {
        self.max_batches = n;
        self
    }

    /// Also tell `observer` what every member does.
    pub fn observer(mut self, observer: impl Observer + 'static) -> Self {
        self.observers.push(Arc::new(observer));
        self
    }

    /// Check the settings (as a relay's) and make the fleet, with no member yet.
    pub fn build(self) -> Result<Fleet> {
        crate::error::in_range("max_batches", self.max_batches, 1, 4096)?;
        // The members' relays are built from the same settings: refuse bad ones now.
        Relay::builder(crate::MemoryStore::new(), self.publisher.clone())
            .config(self.config.clone())
            .build()?;
        Ok(Fleet {
            inner: Arc::new(Inner {
                publisher: self.publisher,
                config: self.config,
                observers: self.observers,
                permits: Arc::new(Semaphore::new(self.max_batches)),
                members: Mutex::new(BTreeMap::new()),
                labelled: Mutex::new(Default::default()),
            }),
        })
    }
}

/// Counts a member's outcomes, for [`Fleet::status`] and the per-store metrics.
struct Counting {
    shared: Arc<Shared>,
    label: String,
}

impl Observer for Counting {
    fn on_event(&self, event: &Event<'_>) {
        let (counter, name) = match event {
            Event::Published { .. } => (&self.shared.published, "outbox_store_published_total"),
            Event::Failed { .. } => (&self.shared.failed, "outbox_store_failed_total"),
            Event::DeadLettered { .. } => (&self.shared.dead, "outbox_store_dead_total"),
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(name, "store" => self.label.clone()).increment(1);
    }
}

impl Fleet {
    /// A fleet publishing through `publisher`.
    pub fn builder(publisher: impl Publisher + 'static) -> FleetBuilder {
        FleetBuilder {
            publisher: Arc::new(publisher),
            config: RelayConfig::default(),
            observers: Vec::new(),
            max_batches: 8,
        }
    }

    /// Serve `store` as `name`. A name already served is a
    /// [`Config`](crate::ErrorKind::Config) error. Needs a Tokio runtime.
    pub fn add(&self, name: &str, store: Arc<dyn Store>) -> Result<()> {
        self.add_with(
            name,
            Arc::new(move || {
                let store = store.clone();
                Box::pin(async move { Ok(store) })
            }),
        )
    }

    /// Serve the store that `connect` opens as `name`: until it opens, the member is
    /// `Opening`, then `Failing` while it keeps failing (tried again with a growing pause).
    pub fn add_with(&self, name: &str, connect: OpenStore) -> Result<()> {
        let mut members = self.inner.members.lock().unwrap_or_else(|p| p.into_inner());
        if members.contains_key(name) {
            return Err(Error::config(format!(
                "the fleet already serves a store named {:?}",
                crate::printable(name)
            )));
        }
        let label = {
            let mut labelled = self
                .inner
                .labelled
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if labelled.contains(name) || labelled.len() < MAX_STORE_SERIES {
                labelled.insert(name.to_owned());
                crate::printable(name).into_owned()
            } else {
                "(other)".to_owned()
            }
        };
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = watch::channel(false);
        let span = tracing::info_span!("store", store = %crate::printable(name));
        let task = tokio::spawn(
            serve(self.inner.clone(), connect, shared.clone(), stopped, label).instrument(span),
        );
        members.insert(name.to_owned(), Member { stop, task, shared });
        Ok(())
    }

    /// Stop serving `name`: its batch in flight finishes first. False when it was not served.
    pub async fn remove(&self, name: &str) -> bool {
        let member = self
            .inner
            .members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        match member {
            Some(m) => {
                let _ = m.stop.send(true);
                let _ = m.task.await;
                // Its label is free for a store added later (the cap counts stores served).
                self.inner
                    .labelled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(name);
                true
            }
            None => false,
        }
    }

    /// The names served, in order.
    pub fn names(&self) -> Vec<String> {
        self.inner
            .members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Every member's state and counts, by name.
    pub fn status(&self) -> Vec<MemberStatus> {
        let members = self.inner.members.lock().unwrap_or_else(|p| p.into_inner());
        members
            .iter()
            .map(|(name, m)| {
                let s = &m.shared;
                let open_error = s
                    .open_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let health = s.relay.get().map(Relay::health);
                let (state, failing_since, last_error) = match (health, open_error) {
                    (
                        Some(RelayHealth {
                            failing_since: Some(since),
                            last_error,
                            ..
                        }),
                        _,
                    ) => (MemberState::Failing, Some(since), last_error),
                    (Some(_), _) => (MemberState::Running, None, None),
                    (None, Some((since, e))) => (MemberState::Failing, Some(since), Some(e)),
                    (None, None) => (MemberState::Opening, None, None),
                };
                MemberStatus {
                    name: name.clone(),
                    state,
                    failing_since,
                    last_error,
                    published: s.published.load(Ordering::Relaxed),
                    failed: s.failed.load(Ordering::Relaxed),
                    dead: s.dead.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Serve until `shutdown` completes, refreshing the `outbox_store_up` gauges every
    /// second; then stop every member (batches in flight finish first).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            for s in self.status() {
                let label = {
                    let labelled = self
                        .inner
                        .labelled
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if labelled.contains(&s.name) {
                        crate::printable(&s.name).into_owned()
                    } else {
                        continue;
                    }
                };
                metrics::gauge!("outbox_store_up", "store" => label).set(
                    if s.state == MemberState::Running {
                        1.0
                    } else {
                        0.0
                    },
                );
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        self.shutdown().await;
    }

    /// Stop every member; batches in flight finish first.
    pub async fn shutdown(&self) {
        let members: Vec<Member> =
            std::mem::take(&mut *self.inner.members.lock().unwrap_or_else(|p| p.into_inner()))
                .into_values()
                .collect();
        for m in &members {
            let _ = m.stop.send(true);
        }
        for m in members {
            let _ = m.task.await;
        }
    }
}

/// A member's life: open its store (retrying), then run its relay until stopped.
async fn serve(
    fleet: Arc<Inner>,
    connect: OpenStore,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
    label: String,
) {
    let mut pause = Duration::from_millis(100);
    let store = loop {
        if *stopped.borrow() {
            return;
        }
        match connect().await {
            Ok(store) => break store,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?pause, "cannot open the store; trying again");
                metrics::counter!("outbox_store_open_errors_total", "store" => label.clone())
                    .increment(1);
                let mut slot = shared.open_error.lock().unwrap_or_else(|p| p.into_inner());
                let since = slot.as_ref().map_or_else(SystemTime::now, |(t, _)| *t);
                *slot = Some((since, e.to_string()));
            }
        }
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(fleet.config.max_error_backoff);
    };
    *shared.open_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let mut observers = fleet.observers.clone();
    observers.push(Arc::new(Counting {
        shared: shared.clone(),
        label,
    }));
    let relay = Relay::builder(store, fleet.publisher.clone())
        .config(fleet.config.clone())
        .shared_permits(fleet.permits.clone())
        .observers(observers)
        .build();
    let relay = match relay {
        Ok(r) => r,
        Err(e) => {
            // The settings were checked when the fleet was built; a store can still refuse.
            tracing::error!(error = %e, "cannot build the store's relay");
            *shared.open_error.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((SystemTime::now(), e.to_string()));
            return;
        }
    };
    let relay = shared.relay.get_or_init(|| relay);
    tracing::info!(owner = relay.owner(), "serving the store");
    relay
        .run(async {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await;
    tracing::info!("stopped serving the store");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Envelope, KeepOrder, MemoryStore, Message, Outbox, RecordingPublisher};
    use std::sync::atomic::AtomicUsize;

    /// Records, and counts the publishes in flight at once.
    #[derive(Clone, Default)]
    struct Counted {
        inner: RecordingPublisher,
        now: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
    }

    #[async_trait::async_trait]
    impl Publisher for Counted {
        async fn publish(&self, e: &Envelope) -> Result<()> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_micros(200)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.inner.publish(e).await
        }
    }

    fn fill(store: &MemoryStore, name: &str, n: usize) {
        let outbox = Outbox::writer(store.clone())
            .strategy(KeepOrder::default())
            .build()
            .unwrap();
        let mut tx = store.begin();
        let msgs =
            (0..n).map(|i| Message::new(name.to_owned(), i.to_string().into_bytes()).key("k"));
        let _ = outbox.enqueue_blocking(&mut tx, msgs).unwrap();
        tx.commit();
    }

    fn published(p: &Counted, name: &str) -> usize {
        p.inner
            .published()
            .iter()
            .filter(|e| e.message.destination == name)
            .count()
    }

    /// With one batch at a time across the fleet, a store with a large backlog takes turns:
    /// ten small stores are drained while it has published at most a few batches; and no
    /// more than one publish is ever in flight.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_backlog_takes_turns_with_small_stores() {
        let publisher = Counted::default();
        let fleet = Fleet::builder(publisher.clone())
            .config(RelayConfig {
                poll_interval: Duration::from_millis(20),
                ..Default::default()
            })
            .max_batches(1)
            .build()
            .unwrap();
        let big = MemoryStore::new();
        fill(&big, "big", 5_000);
        fleet.add("big", Arc::new(big)).unwrap();
        for i in 0..10 {
            let s = MemoryStore::new();
            fill(&s, &format!("small{i}"), 10);
            fleet.add(&format!("small{i}"), Arc::new(s)).unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while (0..10).any(|i| published(&publisher, &format!("small{i}")) < 10) {
            assert!(
                std::time::Instant::now() < deadline,
                "small stores not drained"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let big_so_far = published(&publisher, "big");
        assert!(
            big_so_far <= 300,
            "the big store published {big_so_far} before ten small ones had 10 each"
        );
        assert_eq!(
            publisher.most.load(Ordering::SeqCst),
            1,
            "more than one batch at once"
        );
        let status = fleet.status();
        assert_eq!(status.len(), 11);
        assert!(
            status.iter().all(|s| s.state == MemberState::Running),
            "{status:?}"
        );
        assert_eq!(
            status
                .iter()
                .find(|s| s.name == "small3")
                .unwrap()
                .published,
            10
        );
        // Removing finishes the batch in flight; the name is free again.
        assert!(fleet.remove("big").await);
        assert!(!fleet.remove("big").await);
        assert!(!fleet.names().contains(&"big".to_owned()));
        let e = fleet
            .add("small1", Arc::new(MemoryStore::new()))
            .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        fleet.shutdown().await;
        assert!(fleet.names().is_empty());
    }

    /// A store that cannot be opened is Failing with its error, retried, and Running once it
    /// opens; the others are served meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_that_cannot_open_is_retried_and_reported() {
        let publisher = Counted::default();
        let fleet = Fleet::builder(publisher.clone())
            .config(RelayConfig {
                poll_interval: Duration::from_millis(20),
                max_error_backoff: Duration::from_millis(50),
                ..Default::default()
            })
            .build()
            .unwrap();
        let fine = MemoryStore::new();
        fill(&fine, "fine", 10);
        fleet.add("fine", Arc::new(fine)).unwrap();
        let tries = Arc::new(AtomicUsize::new(0));
        let late = MemoryStore::new();
        fill(&late, "late", 5);
        let connect: OpenStore = {
            let tries = tries.clone();
            Arc::new(move || {
                let (tries, late) = (tries.clone(), late.clone());
                Box::pin(async move {
                    if tries.fetch_add(1, Ordering::SeqCst) < 3 {
                        Err(Error::store("connection refused (test)"))
                    } else {
                        Ok(Arc::new(late) as Arc<dyn Store>)
                    }
                })
            })
        };
        fleet.add_with("late", connect).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let failing = loop {
            let s = fleet.status();
            let late = s.iter().find(|s| s.name == "late").unwrap().clone();
            if late.state == MemberState::Failing {
                break late;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never reported failing"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert!(failing
            .last_error
            .unwrap()
            .contains("connection refused (test)"));
        while published(&publisher, "late") < 5 || published(&publisher, "fine") < 10 {
            assert!(std::time::Instant::now() < deadline, "not delivered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let late = fleet
            .status()
            .into_iter()
            .find(|s| s.name == "late")
            .unwrap();
        assert_eq!(late.state, MemberState::Running);
        assert!(tries.load(Ordering::SeqCst) >= 4);
        fleet.shutdown().await;
    }
}
