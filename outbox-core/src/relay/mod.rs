//! The relay: claims due rows with a lease, publishes them (per-unit order for keep-order),
//! and records the outcome in one statement per batch.
//!
//! [`Relay`] runs batches ([`Relay::step`]) once or in a loop; a batch's decisions (units,
//! crash-loop suspects, waves, what a result means) are the pure `plan` module's, and the
//! `step` module makes the store and publisher calls between them.

mod fleet;
mod plan;
mod step;

pub use fleet::{Fleet, FleetBuilder, MemberState, MemberStatus, OpenStore};

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::error::{Error, ErrorKind, Result, Retry};
use crate::message::StoredMessage;
use crate::observer::{Observer, Observers};
use crate::publisher::Publisher;
use crate::retry::RetryPolicy;
use crate::settings::{Config, Delivery};
use crate::signing::Signer;
use crate::store::{Store, StreamFilter};

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Streams served. Default: all.
    pub streams: StreamFilter,
    /// Rows claimed per batch. Default: 100.
    pub batch_size: usize,
    /// Lease on claimed rows; must exceed `publish_timeout`. Default: 30 s.
    pub lease: Duration,
    /// Longest wait between polls when idle (stores that hear commits wake earlier).
    /// Default: 1 s.
    pub poll_interval: Duration,
    /// Settings shared with the enqueue side ([`Delivery`]): publish deadline, retries, delete
    /// after send, dead-lettering keep-order heads, payload limit (a larger claimed row is
    /// quarantined) and signature verification. [`RelayBuilder::with_config`] copies them
    /// from an outbox [`Config`].
    pub delivery: Delivery,
    /// Also refuse rows that carry no signature (an attacker who can write the table could
    /// otherwise strip a signature). Needs `signer`. Default: false; set by
    /// [`RelayBuilder::signer`] and by relays built from an outbox that signs.
    pub require_signatures: bool,
    /// Longest pause after a store error (the pause doubles from 100 ms). Default: 30 s.
    pub max_error_backoff: Duration,
    /// Deadline of one store call (a claim, a batch's settle). A database that stops
    /// answering without closing the connection (a partition, a black-holed route) is then
    /// a transient error the relay retries with backoff, instead of a relay hung until the
    /// operating system gives up on the connection (often 15 minutes or more); leases of a
    /// batch whose settle timed out expire and its rows are published again. Default: 30 s.
    pub store_timeout: Duration,
    /// Byte budget of one batch (payload plus headers): a claim takes rows while they fit, at
    /// least one. Default: 32 MiB.
    pub max_batch_bytes: usize,
    /// Batches in flight at once. Each claims its own rows (leases keep batches apart, and a
    /// keep-order unit in flight holds back its later rows), so one batch's claim and
    /// acknowledgement overlap another's publishing. Default: 1.
    pub concurrency: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            streams: StreamFilter::All,
            batch_size: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            delivery: Delivery::default(),
            require_signatures: false,
            max_error_backoff: Duration::from_secs(30),
            store_timeout: Duration::from_secs(30),
            max_batch_bytes: crate::store::DEFAULT_MAX_BATCH_BYTES,
            concurrency: 1,
        }
    }
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows published.
    pub published: usize,
    /// Rows whose publish failed (will retry, stuck or dead).
    pub failed: usize,
    /// Rows dead-lettered.
    pub dead: usize,
    /// Rows released without an attempt (behind a failed keep-order head, or lease budget).
    pub released: usize,
    /// Rows that could not be read back or broke the enqueue rules: dead-lettered unpublished.
    pub quarantined: usize,
    /// Units parked (their head exhausted its attempts under `Exhausted::Park`).
    pub parked: usize,
}

impl std::ops::AddAssign for BatchReport {
    fn add_assign(&mut self, o: Self) {
        self.claimed += o.claimed;
        self.published += o.published;
        self.failed += o.failed;
        self.dead += o.dead;
        self.released += o.released;
        self.quarantined += o.quarantined;
        self.parked += o.parked;
    }
}

/// Publishes what the store holds. Generic over the store and the publisher, so both are
/// chosen at compile time (`Arc<dyn Store>` / `Arc<dyn Publisher>` work too).
pub struct Relay<S, P> {
    store: S,
    publisher: P,
    config: RelayConfig,
    observers: Observers,
    owner: String,
    /// The store's signing scope (its table).
    scope: String,
    /// Rows to claim next: `batch_size`, halved after a batch ran out of lease, grown back
    /// after batches that did not.
    limit: std::sync::atomic::AtomicUsize,
    /// Batches run only while holding one of these (shared with other relays).
    permits: Option<Arc<tokio::sync::Semaphore>>,
    health: std::sync::Mutex<RelayHealth>,
}

/// How a relay's store calls are going ([`Relay::health`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayHealth {
    /// Since when its batches have failed, without a success since (`None`: the last batch
    /// worked, or none ran yet).
    pub failing_since: Option<std::time::SystemTime>,
    /// The last batch error, as logged.
    pub last_error: Option<String>,
    /// Batch errors since the relay started.
    pub errors: u64,
    /// Batches that worked since the relay started.
    pub batches: u64,
}

/// Builds a [`Relay`].
pub struct RelayBuilder<S, P> {
    store: S,
    publisher: P,
    config: RelayConfig,
    observers: Vec<Arc<dyn Observer>>,
    permits: Option<Arc<tokio::sync::Semaphore>>,
    /// Set when the builder cannot make a working relay (an outbox without a publisher).
    refused: Option<Error>,
}

impl<S: Store, P: Publisher> Relay<S, P> {
    /// Start building a relay.
    pub fn builder(store: S, publisher: P) -> RelayBuilder<S, P> {
        RelayBuilder::new(store, publisher)
    }

    /// This relay's lease owner id (unique per relay instance).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The settings.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Whether its batches work, and the last error when they do not.
    pub fn health(&self) -> RelayHealth {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// One batch ([`step`](Self::step)) while holding a shared permit, when there are any;
    /// its outcome is recorded in [`health`](Self::health).
    async fn batch(&self) -> Result<BatchReport> {
        let _permit = match &self.permits {
            Some(p) => Some(p.acquire().await.map_err(|_| {
                Error::new(
                    ErrorKind::Closed,
                    Retry::Permanent,
                    "the relay's shared batch permits were closed",
                )
            })?),
            None => None,
        };
        let r = self.step().await;
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match &r {
            Ok(_) => {
                h.batches += 1;
                h.failing_since = None;
            }
            Err(e) => {
                h.errors += 1;
                h.last_error = Some(e.to_string());
                h.failing_since
                    .get_or_insert_with(std::time::SystemTime::now);
            }
        }
        r
    }

    fn batch_limit(&self) -> usize {
        self.limit.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// After a batch: halve the next claim if this one ran out of lease, else grow it back.
    fn adapt(&self, ran_out_of_lease: usize, claimed: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.batch_limit();
        let next = if ran_out_of_lease > 0 {
            let next = (now / 2).max(1);
            tracing::warn!(
                released = ran_out_of_lease,
                claimed,
                next_batch = next,
                lease = ?self.config.lease,
                "the batch ran out of lease before it was published; the rest was given back and the next batch is smaller"
            );
            next
        } else if claimed >= now {
            (now * 2).min(self.config.batch_size)
        } else {
            now
        };
        self.limit.store(next, Relaxed);
    }

    /// Claim one batch and publish it.
    pub async fn step(&self) -> Result<BatchReport> {
        let span = tracing::debug_span!("outbox.relay.batch", owner = %self.owner);
        self.step_inner().instrument(span).await
    }

    /// Record a batch's outcome, trying again after a transient failure while the lease
    /// lasts ([`until_recorded`](crate::retry::until_recorded)): its messages were sent, and
    /// a batch left leased is published again whole once the lease ends.
    async fn settle_batch(
        &self,
        started: Instant,
        done: &[i64],
        failures: &[crate::store::Failure],
    ) -> Result<()> {
        let cfg = &self.config;
        let deadline = started + cfg.lease.mul_f64(0.9);
        crate::retry::until_recorded(deadline, "recording a batch's outcome", || {
            self.store_call(
                "settle",
                self.store
                    .settle(&self.owner, done, cfg.delivery.delete_after_send, failures),
            )
        })
        .await
    }

    /// A store call within [`RelayConfig::store_timeout`]: a connection that stopped answering
    /// (a network partition, a black-holed route) is a transient error the loop retries,
    /// not a relay hung for good. The dropped call drops its connection.
    async fn store_call<T>(&self, what: &str, call: impl Future<Output = Result<T>>) -> Result<T> {
        let limit = self.config.store_timeout;
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => {
                metrics::counter!("outbox_store_timeouts_total").increment(1);
                Err(Error::new(
                    ErrorKind::Timeout,
                    Retry::Transient,
                    format!("store {what} did not answer within {limit:?} (store_timeout)"),
                ))
            }
        }
    }

    fn verify(&self, m: &StoredMessage) -> Result<()> {
        crate::signing::check_signature(
            self.config.delivery.signer.as_ref(),
            self.config.require_signatures,
            &m.envelope,
            &m.signed_plan(),
            &self.scope,
            m.signature.as_deref(),
        )
    }

    /// Publish until nothing is due (jaiminho's relay command without `--run-in-loop`; a
    /// cron job). Messages backing off are left for a later run.
    pub async fn run_once(&self) -> Result<BatchReport> {
        let drains = (0..self.config.concurrency).map(|_| self.drain());
        let mut total = BatchReport::default();
        for r in futures_util::future::join_all(drains).await {
            total += r?;
        }
        Ok(total)
    }

    async fn drain(&self) -> Result<BatchReport> {
        let mut total = BatchReport::default();
        loop {
            let r = self.batch().await?;
            total += r;
            if r.claimed == 0 {
                return Ok(total);
            }
            if r.published + r.released + r.quarantined == 0 {
                tracing::info!(
                    claimed = r.claimed,
                    failed = r.failed,
                    dead = r.dead,
                    "stopping: a batch published nothing (its rows failed and back off, or were dead-lettered); they are retried later"
                );
                return Ok(total);
            }
        }
    }

    /// Publish in a loop until `shutdown` completes. Batches in flight are finished first.
    /// Store errors are logged and retried with a growing pause; the relay never gives up.
    ///
    /// Before the first claim, the store gets ready to hear commits
    /// ([`Store::start_listening`]), so no commit made after that waits a poll interval.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> BatchReport {
        tokio::pin!(shutdown);
        tokio::select! {
            biased;
            _ = &mut shutdown => return BatchReport::default(),
            r = self.store.start_listening() => if let Err(e) = r {
                tracing::warn!(error = %e, poll_interval = ?self.config.poll_interval, "cannot hear commits yet; polling meanwhile");
            },
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let loops = futures_util::future::join_all(
            (0..self.config.concurrency).map(|_| self.run_loop(stopped.clone())),
        );
        tokio::pin!(loops);
        let mut asked = false;
        loop {
            tokio::select! {
                reports = &mut loops => {
                    let mut total = BatchReport::default();
                    for r in reports {
                        total += r;
                    }
                    return total;
                }
                _ = &mut shutdown, if !asked => {
                    asked = true;
                    let _ = stop.send(true);
                }
            }
        }
    }

    async fn run_loop(&self, mut stopped: tokio::sync::watch::Receiver<bool>) -> BatchReport {
        let mut total = BatchReport::default();
        let mut error_pause = Duration::from_millis(100);
        loop {
            if *stopped.borrow() {
                return total;
            }
            let pause = match self.batch().await {
                Ok(r) => {
                    total += r;
                    error_pause = Duration::from_millis(100);
                    (r.claimed < self.config.batch_size).then_some(self.config.poll_interval)
                }
                Err(e) => {
                    metrics::counter!("outbox_relay_errors_total").increment(1);
                    tracing::warn!(error = %e, pause = ?error_pause, "relay batch failed; retrying");
                    let p = error_pause;
                    error_pause = (error_pause * 2).min(self.config.max_error_backoff);
                    Some(p)
                }
            };
            if let Some(p) = pause {
                tokio::select! {
                    biased;
                    _ = stopped.wait_for(|s| *s) => return total,
                    _ = self.store.wait_for_work(p) => {}
                }
            }
        }
    }
}

impl<S: Store, P: Publisher> RelayBuilder<S, P> {
    /// Defaults over `store` and `publisher`.
    pub fn new(store: S, publisher: P) -> Self {
        Self {
            store,
            publisher,
            config: RelayConfig::default(),
            observers: Vec::new(),
            permits: None,
            refused: None,
        }
    }

    /// Run batches only while holding a permit of `permits`, shared with other relays: a
    /// bound on the batches in flight across all of them (as [`Fleet`] does for many stores).
    /// Permits are handed out in the order they are asked for, so relays with work take
    /// turns, one batch each, however large one relay's backlog is.
    pub fn shared_permits(mut self, permits: Arc<tokio::sync::Semaphore>) -> Self {
        self.permits = Some(permits);
        self
    }

    /// Make [`build`](Self::build) fail with `error`.
    pub(crate) fn refuse(mut self, error: Error) -> Self {
        self.refused = Some(error);
        self
    }

    /// Copy the shared settings of an outbox [`Config`].
    pub fn with_config(mut self, c: &Config) -> Self {
        self.config.delivery = c.delivery.clone();
        self.config.require_signatures = c.delivery.signer.is_some();
        self
    }

    /// Replace all settings.
    pub fn config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// Serve only these streams.
    pub fn streams<I: IntoIterator<Item = T>, T: Into<String>>(mut self, streams: I) -> Self {
        self.config.streams = StreamFilter::Only(streams.into_iter().map(Into::into).collect());
        self
    }

    /// Rows per batch.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.config.batch_size = n;
        self
    }

    /// Lease on claimed rows.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// Idle poll interval.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval;
        self
    }

    /// Publish deadline.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.config.delivery.publish_timeout = timeout;
        self
    }

    /// Retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.config.delivery.retry = retry;
        self
    }

    /// Delete rows after publishing.
    pub fn delete_after_send(mut self, yes: bool) -> Self {
        self.config.delivery.delete_after_send = yes;
        self
    }

    /// Dead-letter keep-order heads instead of blocking.
    pub fn dead_letter_keep_order(mut self, yes: bool) -> Self {
        self.config.delivery.dead_letter_keep_order = yes;
        self
    }

    /// Deadline of one store call (see [`RelayConfig::store_timeout`]).
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config.store_timeout = timeout;
        self
    }

    /// Batches in flight at once (see [`RelayConfig::concurrency`]).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// Verify signatures with `signer`'s keys, and refuse unsigned rows (undo with
    /// [`require_signatures(false)`](Self::require_signatures) while older rows drain).
    pub fn signer(mut self, signer: Signer) -> Self {
        self.config.delivery.signer = Some(signer);
        self.config.require_signatures = true;
        self
    }

    /// Refuse rows that carry no signature (see [`RelayConfig::require_signatures`]).
    pub fn require_signatures(mut self, yes: bool) -> Self {
        self.config.require_signatures = yes;
        self
    }

    /// Add an observer.
    pub fn observer(mut self, observer: impl Observer + 'static) -> Self {
        self.observers.push(Arc::new(observer));
        self
    }

    /// Replace the observers.
    pub fn observers(mut self, observers: Vec<Arc<dyn Observer>>) -> Self {
        self.observers = observers;
        self
    }

    /// Check the settings and build.
    pub fn build(self) -> Result<Relay<S, P>> {
        if let Some(e) = self.refused {
            return Err(e);
        }
        let c = &self.config;
        c.delivery.validate()?;
        if c.batch_size == 0 || c.concurrency == 0 || c.delivery.max_payload_bytes == 0 {
            return Err(Error::config(
                "batch_size, concurrency and max_payload_bytes must be at least 1",
            ));
        }
        if matches!(&c.streams, StreamFilter::Only(s) if s.is_empty()) {
            return Err(Error::config(
                "stream filter is empty: name at least one stream, or serve all",
            ));
        }
        if c.delivery.publish_timeout.is_zero()
            || c.lease.mul_f64(0.9) <= c.delivery.publish_timeout
        {
            return Err(Error::config(format!(
                "lease ({:?}) must exceed publish_timeout ({:?}) by more than 10%",
                c.lease, c.delivery.publish_timeout
            )));
        }
        if c.require_signatures && c.delivery.signer.is_none() {
            return Err(Error::config(
                "require_signatures needs at least one verification key",
            ));
        }
        if c.poll_interval.is_zero() {
            return Err(Error::config("poll_interval must be positive"));
        }
        use crate::error::in_range;
        const HOUR: Duration = Duration::from_secs(3600);
        in_range("batch_size", c.batch_size, 1, 10_000)?;
        in_range("concurrency", c.concurrency, 1, 256)?;
        in_range("lease", c.lease, Duration::from_millis(10), 24 * HOUR)?;
        in_range(
            "publish_timeout",
            c.delivery.publish_timeout,
            Duration::from_millis(1),
            HOUR,
        )?;
        in_range(
            "poll_interval",
            c.poll_interval,
            Duration::from_millis(1),
            24 * HOUR,
        )?;
        in_range(
            "max_error_backoff",
            c.max_error_backoff,
            Duration::from_millis(1),
            HOUR,
        )?;
        in_range(
            "max_payload_bytes",
            c.delivery.max_payload_bytes,
            1,
            1 << 30,
        )?;
        in_range("max_batch_bytes", c.max_batch_bytes, 1, 1 << 32)?;
        in_range(
            "store_timeout",
            c.store_timeout,
            Duration::from_millis(10),
            HOUR,
        )?;
        Ok(Relay {
            limit: std::sync::atomic::AtomicUsize::new(self.config.batch_size),
            scope: self.store.signing_scope(),
            store: self.store,
            publisher: self.publisher,
            config: self.config,
            observers: Observers(self.observers),
            owner: format!("relay:{}", uuid::Uuid::now_v7()),
            permits: self.permits,
            health: std::sync::Mutex::new(RelayHealth::default()),
        })
    }
}
