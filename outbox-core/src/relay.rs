//! The relay: claims due rows with a lease, publishes them (per-unit order for keep-order),
//! and records the outcome in one statement per batch.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::error::{Error, ErrorKind, Result, Retry};
use crate::message::{Envelope, StoredMessage};
use crate::observer::{Event, Observer, Observers, PublishPath};
use crate::publisher::{publish_with_timeout, Publisher};
use crate::retry::{Decision, RetryPolicy};
use crate::settings::{Config, Delivery};
use crate::signing::Signer;
use crate::store::{Claim, Failure, Outcome, Store, StreamFilter};
use crate::strategy::Order;

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
}

/// Builds a [`Relay`].
pub struct RelayBuilder<S, P> {
    store: S,
    publisher: P,
    config: RelayConfig,
    observers: Vec<Arc<dyn Observer>>,
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

    async fn step_inner(&self) -> Result<BatchReport> {
        let started = Instant::now();
        let cfg = &self.config;
        let claimed = self
            .store_call(
                "claim",
                self.store.claim(&Claim {
                    owner: self.owner.clone(),
                    streams: cfg.streams.clone(),
                    limit: self.batch_limit(),
                    lease: cfg.lease,
                    max_row_bytes: cfg.delivery.max_payload_bytes,
                    max_batch_bytes: cfg.max_batch_bytes,
                }),
            )
            .await?;
        let mut report = BatchReport {
            claimed: claimed.len(),
            ..Default::default()
        };
        if claimed.is_empty() {
            return Ok(report);
        }
        let mut failures = Vec::new();

        // Rows are input: one that does not decode, or that breaks the enqueue rules, is
        // dead-lettered unpublished and the rest of the batch goes on.
        let mut messages = Vec::with_capacity(claimed.len());
        for row in claimed {
            let checked = row.and_then(|m| {
                match m.envelope.message.validate(cfg.delivery.max_payload_bytes) {
                    Ok(()) => Ok(m),
                    Err(e) => Err(crate::store::Quarantined {
                        seq: m.seq,
                        id: Some(m.envelope.id.to_string()),
                        reason: format!("breaks the enqueue rules: {}", e.message()),
                    }),
                }
            });
            match checked {
                Ok(m) => messages.push(m),
                Err(q) => {
                    self.observers.emit(&Event::Quarantined {
                        seq: q.seq,
                        id: q.id.as_deref(),
                        reason: &q.reason,
                    });
                    report.quarantined += 1;
                    report.dead += 1;
                    failures.push(Failure {
                        seq: q.seq,
                        error: format!("quarantined: {}", q.reason),
                        outcome: Outcome::Dead,
                    });
                }
            }
        }

        // Units: a keep-order unit is all claimed rows of one (stream, key), in seq order;
        // every publish-on-commit row is a unit of its own.
        let mut units: Vec<Vec<StoredMessage>> = Vec::new();
        let mut index: HashMap<(String, String), usize> = HashMap::new();
        for m in messages {
            if m.order == Order::InUnit {
                let (s, k) = m.ordering_unit();
                let unit = (s.to_owned(), k.to_owned());
                match index.get(&unit) {
                    Some(&u) => units[u].push(m),
                    None => {
                        index.insert(unit, units.len());
                        units.push(vec![m]);
                    }
                }
            } else {
                units.push(vec![m]);
            }
        }

        // Waves: wave k holds the k-th row of every unit still going, so a unit's next row
        // is sent only after the previous one was acknowledged; a publisher that keeps a
        // batch's order takes each unit's run in one wave.
        let ordered = self.publisher.ordered_batches();
        let mut done = Vec::new();
        // Heads that exhausted their attempts under Exhausted::Park, with their errors.
        let mut parks: Vec<(&StoredMessage, Error)> = Vec::new();
        let mut out_of_lease = 0usize;
        let mut cursor = vec![0usize; units.len()];
        let mut alive: Vec<usize> = (0..units.len()).collect();
        // Crash loops. A row (a keep-order unit) claimed before without an outcome is a
        // suspect: the relay that took it stopped while publishing it (a crash, a kill, a lost
        // database), perhaps because of it. When a batch holds suspects, only the one with the
        // lowest seq is published, alone; the rest of the batch is given back, and recorded
        // before that publish, so that only the row in flight keeps counting if it crashes
        // this relay too. A suspect whose claims before this one reach the retry budget is
        // failed without being published (its unit's policy applies: dead letter, block or
        // park) instead of taking every relay of the fleet down in turn.
        let suspect = (0..units.len())
            .filter(|&u| units[u][0].claims >= 2)
            .min_by_key(|&u| units[u][0].seq);
        if let Some(su) = suspect {
            metrics::counter!("outbox_suspects_total").increment(1);
            let mut given_back = Vec::new();
            for (u, unit) in units.iter().enumerate() {
                if u != su {
                    given_back.extend(unit.iter().map(|m| Failure {
                        seq: m.seq,
                        error: String::new(),
                        outcome: Outcome::Release,
                    }));
                }
            }
            report.released += given_back.len();
            if !given_back.is_empty() {
                self.store_call(
                    "settle",
                    self.store.settle(&self.owner, &[], false, &given_back),
                )
                .await?;
            }
            // The rest of the suspect's unit waits behind it (recorded with the batch).
            let rest = units[su].split_off(1);
            for m in &rest {
                report.released += 1;
                failures.push(Failure {
                    seq: m.seq,
                    error: String::new(),
                    outcome: Outcome::Release,
                });
            }
            alive = vec![su];
            let head = &units[su][0];
            let lost = head.claims - 1;
            tracing::warn!(seq = head.seq, id = %head.envelope.id, lost, "a claim of this message ended without an outcome (its relay stopped): publishing it alone");
            if lost >= cfg.delivery.retry.max_attempts {
                metrics::counter!("outbox_crash_loops_total").increment(1);
                let error = Error::new(
                    ErrorKind::Publish,
                    Retry::Permanent,
                    format!(
                        "crash loop: claimed {lost} times before without an outcome (the relays that took it stopped while publishing it); not published again"
                    ),
                );
                self.record_failure(head, error, &mut failures, &mut report, &mut parks);
                alive.clear();
            }
        }
        while !alive.is_empty() {
            if started.elapsed() + cfg.delivery.publish_timeout >= cfg.lease.mul_f64(0.9) {
                // Not enough lease left for another publish: give the rest back.
                for &u in &alive {
                    for m in &units[u][cursor[u]..] {
                        out_of_lease += 1;
                        report.released += 1;
                        failures.push(Failure {
                            seq: m.seq,
                            error: String::new(),
                            outcome: Outcome::Release,
                        });
                    }
                }
                break;
            }
            // Each unit sends its next row, or, to a publisher that keeps a batch's order,
            // its run to one destination, up to a row that does not verify or that the
            // publisher would refuse: no later row of a unit goes out in the batch where an
            // earlier one is refused.
            let mut runs: Vec<(usize, usize)> = Vec::with_capacity(alive.len());
            let mut envs: Vec<&Envelope> = Vec::new();
            let mut stopped: Vec<usize> = Vec::new();
            for &u in &alive {
                // A head that failed before goes alone until it passes.
                let head = &units[u][cursor[u]];
                let max = if ordered && head.attempts == 0 {
                    units[u].len() - cursor[u]
                } else {
                    1
                };
                let mut len = 0;
                while len < max {
                    let m = &units[u][cursor[u] + len];
                    if m.envelope.message.destination != head.envelope.message.destination {
                        break; // a broker orders a destination's messages, not two's
                    }
                    let refused = match self.verify(m) {
                        Err(error) => Some((error, true)),
                        Ok(()) if ordered => self
                            .publisher
                            .check_message(&m.envelope)
                            .err()
                            .map(|e| (e, false)),
                        Ok(()) => None,
                    };
                    let Some((error, tampered)) = refused else {
                        envs.push(&m.envelope);
                        len += 1;
                        continue;
                    };
                    // Later in a run, the rows before it go first; the next wave starts at it
                    // and stops the unit there.
                    if len == 0 {
                        if tampered {
                            self.observers.emit(&Event::Tampered {
                                seq: m.seq,
                                id: m.envelope.id,
                                error: &error,
                            });
                        }
                        self.record_failure(m, error, &mut failures, &mut report, &mut parks);
                        stopped.push(u);
                    }
                    break;
                }
                if len > 0 {
                    runs.push((u, len));
                }
            }
            let lens: Vec<usize> = runs.iter().map(|&(_, len)| len).collect();
            let mut results = if envs.is_empty() {
                Vec::new()
            } else {
                let timeout = cfg.delivery.publish_timeout;
                publish_with_timeout(&self.publisher, &envs, Some(&lens), timeout).await
            }
            .into_iter();
            for (u, len) in runs {
                // A run stops at its first failure: the rows after it are given back and go
                // again after it. One the broker took anyway broke the publisher's promise
                // (see `Publisher::ordered_batches`): counted and logged.
                let mut failed = false;
                for _ in 0..len {
                    let result = results.next().unwrap_or_else(|| {
                        Err(Error::transient("the publisher returned too few results"))
                    });
                    if failed {
                        if result.is_ok() {
                            let m = &units[u][cursor[u]];
                            let (stream, unit) = m.ordering_unit();
                            metrics::counter!("outbox_order_gaps_total").increment(1);
                            tracing::warn!(%stream, %unit, head = %m.envelope.id,
                                "the publisher took a unit's later message after refusing an earlier one in the same batch: consumers may see them out of order");
                        }
                        continue;
                    }
                    let m = &units[u][cursor[u]];
                    match result {
                        Ok(()) => {
                            report.published += 1;
                            done.push(m.seq);
                            self.observers.emit(&Event::Published {
                                envelope: &m.envelope,
                                path: PublishPath::Relay,
                            });
                            cursor[u] += 1;
                        }
                        Err(error) => {
                            self.record_failure(m, error, &mut failures, &mut report, &mut parks);
                            stopped.push(u);
                            failed = true;
                        }
                    }
                }
            }
            for &u in &stopped {
                // The rest of a stopped unit waits behind its head.
                for m in &units[u][cursor[u] + 1..] {
                    report.released += 1;
                    failures.push(Failure {
                        seq: m.seq,
                        error: String::new(),
                        outcome: Outcome::Release,
                    });
                }
                cursor[u] = units[u].len();
            }
            alive.retain(|&u| cursor[u] < units[u].len());
        }

        // Park before settling, while this relay still leases the units: a settled unit could
        // be claimed again before it was parked. A unit that fails to park is retried after
        // its head's backoff, and parked at its next failure.
        for (m, error) in &parks {
            let (stream, unit) = m.ordering_unit();
            let reason = format!(
                "message {} failed {} times: {error}",
                m.envelope.id,
                m.attempts.saturating_add(1)
            );
            match self
                .store_call("park", self.store.park_unit(stream, unit, &reason))
                .await
            {
                Ok(()) => {
                    report.parked += 1;
                    self.observers.emit(&Event::Parked {
                        stream,
                        unit,
                        reason: &reason,
                        envelope: Some(&m.envelope),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, %stream, %unit, "could not park the unit; it is retried and parked at its next failure")
                }
            }
        }
        if !done.is_empty() || !failures.is_empty() {
            self.settle_batch(started, &done, &failures).await?;
        }
        metrics::histogram!("outbox_batch_seconds").record(started.elapsed().as_secs_f64());
        self.adapt(out_of_lease, report.claimed);
        Ok(report)
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
        let cfg = &self.config;
        match (&cfg.delivery.signer, m.signature.as_deref()) {
            (Some(signer), Some(signature)) => {
                signer.verify(&m.envelope, &m.signed_plan(), &self.scope, Some(signature))
            }
            (Some(_), None) if !cfg.require_signatures => Ok(()),
            (Some(signer), None) => signer.verify(&m.envelope, &m.signed_plan(), &self.scope, None),
            // A signature nobody can check is not a reason to trust the row.
            (None, Some(_)) => Err(Error::new(
                ErrorKind::Tampered,
                Retry::Permanent,
                format!(
                    "message {}: unverifiable: the row is signed but this relay has no verification key",
                    m.envelope.id
                ),
            )),
            (None, None) => Ok(()),
        }
    }

    fn record_failure<'m>(
        &self,
        m: &'m StoredMessage,
        error: Error,
        failures: &mut Vec<Failure>,
        report: &mut BatchReport,
        parks: &mut Vec<(&'m StoredMessage, Error)>,
    ) {
        let cfg = &self.config;
        let attempts = m.attempts.saturating_add(1);
        let decision = cfg.delivery.retry.decide(
            m.order,
            m.exhausted,
            attempts,
            &error,
            cfg.delivery.dead_letter_keep_order,
        );
        // A receiver's Retry-After wins over a shorter backoff.
        let decision = match (decision, error.retry_after()) {
            (Decision::Retry(d), Some(hint)) => Decision::Retry(d.max(hint)),
            (Decision::Stuck(d), Some(hint)) => Decision::Stuck(d.max(hint)),
            (d, _) => d,
        };
        let env = &m.envelope;
        let dead = decision == Decision::Dead;
        report.failed += 1;
        self.observers.emit(&Event::Failed {
            envelope: env,
            error: &error,
            attempts,
            will_retry: !dead,
            path: PublishPath::Relay,
        });
        let outcome = match decision {
            Decision::Retry(after) => Outcome::Retry { after },
            Decision::Stuck(after) => {
                self.observers.emit(&Event::Stuck {
                    envelope: env,
                    error: &error,
                    attempts,
                });
                Outcome::Retry { after }
            }
            Decision::Park => {
                // The attempt is counted and its error kept; the unit is parked before the
                // batch is settled (see `step`).
                let after = cfg.delivery.retry.delay(attempts);
                failures.push(Failure {
                    seq: m.seq,
                    error: error.to_string(),
                    outcome: Outcome::Retry { after },
                });
                parks.push((m, error));
                return;
            }
            Decision::Dead => {
                report.dead += 1;
                self.observers.emit(&Event::DeadLettered {
                    envelope: env,
                    error: &error,
                    path: PublishPath::Relay,
                });
                Outcome::Dead
            }
        };
        failures.push(Failure {
            seq: m.seq,
            error: error.to_string(),
            outcome,
        });
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
            let r = self.step().await?;
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
            let pause = match self.step().await {
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
            refused: None,
        }
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
        })
    }
}
