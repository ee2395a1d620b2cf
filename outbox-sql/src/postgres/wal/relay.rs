//! The WAL relay's engine: read the slot, publish, write aside what the broker will not take,
//! confirm. See the [module docs](super) for the contract.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use outbox_core::{
    publish_with_timeout, Decision, Delivery, Envelope, Error, NewMessage, Order, Publisher, Relay,
    Result, RetryPolicy, SignedPlan, Status, Store,
};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio::sync::watch;

use super::pgoutput::{self, Change};
use super::{record, slot_lag, WalStore};
use crate::common::redact_url;
use crate::postgres::map_err;

/// How often diverted units, the slot's WAL and table mode's published rows are looked at.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// A unit: (stream, unit) of a keep-order message.
type UnitKey = (String, String);

/// Builds a [`WalRelay`].
pub struct WalRelayBuilder {
    url: String,
    store: WalStore,
    publisher: Arc<dyn Publisher>,
    slot: String,
    publication: String,
    batch_size: usize,
    memory_attempts: u32,
    max_buffered: usize,
    delivery: Delivery,
    require_signatures: bool,
    standby_interval: Duration,
    status_interval: Duration,
    max_retained_bytes: u64,
}

impl WalRelayBuilder {
    /// The replication slot (default `outbox`).
    pub fn slot(mut self, slot: &str) -> Self {
        self.slot = slot.to_owned();
        self
    }

    /// The publication (default `outbox`).
    pub fn publication(mut self, publication: &str) -> Self {
        self.publication = publication.to_owned();
        self
    }

    /// Messages per publisher call (default 100).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// Failed publishes of one message retried in memory before the table takes it (its
    /// attempts, error and unit go with it; the table relay then applies `retry`). Default 3.
    pub fn memory_attempts(mut self, n: u32) -> Self {
        self.memory_attempts = n;
        self
    }

    /// Messages held in memory (read, not yet confirmed) before reading pauses. When full,
    /// messages backing off go to the table at once, so one slow unit cannot stop the
    /// stream. Default 10 000.
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.max_buffered = n;
        self
    }

    /// Retry policy, dead-lettering of keep-order messages, publish timeout and signature
    /// checking, as for the polling relay.
    pub fn delivery(mut self, delivery: Delivery) -> Self {
        self.delivery = delivery;
        self
    }

    /// With verification keys (`delivery.signer`), refuse messages that carry no signature
    /// (default true: whoever can emit a message could otherwise strip a signature). Turn it
    /// off, as the polling relay's `require_signatures(false)` and the CLI's
    /// `--allow-unsigned`, while writers start signing. A signed message is always checked,
    /// and one that this relay has no key for is a dead letter (the polling relay's rule:
    /// [`check_signature`](outbox_core::check_signature)).
    pub fn require_signatures(mut self, yes: bool) -> Self {
        self.require_signatures = yes;
        self
    }

    /// The retry policy (see [`delivery`](Self::delivery)).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.delivery.retry = retry;
        self
    }

    /// How often a standby relay (the slot is held by another) tries again. Default 1 s.
    pub fn standby_interval(mut self, every: Duration) -> Self {
        self.standby_interval = every;
        self
    }

    /// How often the confirmed position is sent to the server (default 1 s).
    pub fn status_interval(mut self, every: Duration) -> Self {
        self.status_interval = every;
        self
    }

    /// Warn when the slot keeps more WAL than this on the server (default 1 GiB).
    pub fn max_retained_bytes(mut self, bytes: u64) -> Self {
        self.max_retained_bytes = bytes;
        self
    }

    /// Check the settings and the URL (TLS parameters as for [`PgStore`](crate::postgres::PgStore)).
    pub fn build(self) -> Result<WalRelay> {
        outbox_core::validate_identifier(&self.slot)?;
        outbox_core::validate_identifier(&self.publication)?;
        if self.batch_size == 0 || self.max_buffered < self.batch_size {
            return Err(Error::config(
                "WAL relay: batch_size must be at least 1 and max_buffered at least batch_size",
            ));
        }
        let repl = replication_config(&self.url, &self.slot, &self.publication)?
            .with_status_interval(self.status_interval)
            .with_wakeup_interval(Duration::from_secs(5))
            .with_application_name("outbox-wal-relay");
        let mut table = Relay::builder(self.store.table().clone(), self.publisher.clone())
            .retry(self.delivery.retry.clone())
            .dead_letter_keep_order(self.delivery.dead_letter_keep_order)
            .publish_timeout(self.delivery.publish_timeout)
            .delete_after_send(self.delivery.delete_after_send);
        if let Some(signer) = &self.delivery.signer {
            table = table
                .signer(signer.clone())
                .require_signatures(self.require_signatures);
        }
        let table = table.build()?;
        Ok(WalRelay {
            inner: Arc::new(Inner {
                wal_table: self.store.writes_rows().then(|| self.store.wal_table()),
                signing_scope: self.store.signing_scope(),
                store: self.store,
                publisher: self.publisher,
                repl,
                slot: self.slot,
                batch_size: self.batch_size,
                memory_attempts: self.memory_attempts.max(1),
                max_buffered: self.max_buffered,
                require_signatures: self.require_signatures,
                delivery: self.delivery,
                standby_interval: self.standby_interval,
                max_retained_bytes: self.max_retained_bytes,
                counters: Counters::default(),
            }),
            table,
        })
    }
}

/// A relay that publishes [`WalStore`] messages from a logical replication slot. See the
/// [module docs](super).
pub struct WalRelay {
    inner: Arc<Inner>,
    table: Relay<crate::postgres::PgStore, Arc<dyn Publisher>>,
}

struct Inner {
    store: WalStore,
    /// Table mode: the append-only table whose inserts carry the messages.
    wal_table: Option<String>,
    publisher: Arc<dyn Publisher>,
    repl: ReplicationConfig,
    slot: String,
    batch_size: usize,
    memory_attempts: u32,
    max_buffered: usize,
    delivery: Delivery,
    require_signatures: bool,
    standby_interval: Duration,
    max_retained_bytes: u64,
    counters: Counters,
    /// The store's signing scope, read once (checked for every message).
    signing_scope: String,
}

/// What a [`WalRelay`] has done since it started.
#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    aside: AtomicU64,
    dead: AtomicU64,
    confirmed: AtomicU64,
    sessions: AtomicU64,
    rounds: AtomicU64,
}

/// A snapshot of a [`WalRelay`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Messages the broker acknowledged from the WAL.
    pub published: u64,
    /// Messages written to the table (diverted units, retries handed over, schedules).
    pub aside: u64,
    /// Of those, dead letters (refused for good, quarantined, tampered).
    pub dead: u64,
    /// The last position confirmed to the slot.
    pub confirmed_lsn: u64,
    /// Replication sessions started (1 + reconnections and takeovers).
    pub sessions: u64,
    /// Dispatch rounds run (a relay with nothing ready runs none).
    pub rounds: u64,
}

impl WalRelay {
    /// A relay over `store`'s messages, reading the slot on the server at `url` (a role with
    /// `REPLICATION`), publishing through `publisher`.
    pub fn builder(
        url: &str,
        store: WalStore,
        publisher: impl Publisher + 'static,
    ) -> WalRelayBuilder {
        WalRelayBuilder {
            url: url.to_owned(),
            store,
            publisher: Arc::new(publisher),
            slot: "outbox".into(),
            publication: "outbox".into(),
            batch_size: 100,
            memory_attempts: 3,
            max_buffered: 10_000,
            delivery: Delivery::default(),
            require_signatures: true,
            standby_interval: Duration::from_secs(1),
            status_interval: Duration::from_secs(1),
            max_retained_bytes: 1 << 30,
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> WalStats {
        let c = &self.inner.counters;
        WalStats {
            published: c.published.load(AtomicOrdering::Relaxed),
            aside: c.aside.load(AtomicOrdering::Relaxed),
            dead: c.dead.load(AtomicOrdering::Relaxed),
            confirmed_lsn: c.confirmed.load(AtomicOrdering::Relaxed),
            sessions: c.sessions.load(AtomicOrdering::Relaxed),
            rounds: c.rounds.load(AtomicOrdering::Relaxed),
        }
    }

    /// Stream, publish and confirm until `shutdown` completes; the table's rows (dead
    /// letters aside, diverted units) are published by a polling relay running alongside.
    /// Connection losses, a server restart and a slot held by another relay (standby) are
    /// waited out and retried; only a configuration error (no slot, no publication, no
    /// `REPLICATION` privilege) ends the run with an error.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let (stop, stopped) = watch::channel(false);
        let stop = Arc::new(stop);
        let table_stop = stopped.clone();
        let work = async {
            let table = self.table.run(async move {
                let mut rx = table_stop;
                until_stopped(&mut rx).await;
            });
            let stream = async {
                let r = self.inner.stream(stopped).await;
                let _ = stop.send(true);
                r
            };
            tokio::join!(table, stream).1
        };
        tokio::pin!(work);
        tokio::select! {
            r = &mut work => r,
            _ = shutdown => {
                let _ = stop.send(true);
                work.await
            }
        }
    }
}

/// How a replication session ended, other than by shutdown.
enum End {
    /// Try again (connection lost, server restarting, slot held by another relay).
    Retry(Error, bool),
    /// A configuration error: stop.
    Fatal(Error),
}

impl Inner {
    async fn stream(&self, mut stopped: watch::Receiver<bool>) -> Result<()> {
        let mut pause = Duration::from_millis(100);
        loop {
            let stop_now = *stopped.borrow();
            if stop_now {
                return Ok(());
            }
            let started = Instant::now();
            match self.session(&mut stopped).await {
                Ok(()) => return Ok(()),
                Err(End::Fatal(e)) => return Err(e),
                Err(End::Retry(e, standby)) => {
                    if standby {
                        tracing::debug!(slot = %self.slot, error = %e, "WAL relay on standby: the slot is held by another relay");
                        pause = self.standby_interval;
                    } else {
                        if started.elapsed() > Duration::from_secs(30) {
                            pause = Duration::from_millis(100);
                        }
                        tracing::warn!(slot = %self.slot, error = %e, retry_in = ?pause, "WAL relay session ended; reconnecting");
                    }
                    let _ = tokio::time::timeout(pause, until_stopped(&mut stopped)).await;
                    if !standby {
                        pause = (pause * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
    }

    async fn session(&self, stopped: &mut watch::Receiver<bool>) -> std::result::Result<(), End> {
        let mut client = ReplicationClient::connect(self.repl.clone())
            .await
            .map_err(classify)?;
        client.wait_started().await.map_err(classify)?;
        self.counters.sessions.fetch_add(1, AtomicOrdering::Relaxed);
        tracing::info!(slot = %self.slot, "WAL relay streaming");
        let mut st = State::new(
            self.diverted_units()
                .await
                .map_err(|e| End::Retry(e, false))?,
        );
        let mut last_check = Instant::now();
        loop {
            let wake = st.wake;
            tokio::select! {
                biased;
                _ = until_stopped(stopped) => {
                    client.stop();
                    let _ = client.shutdown().await;
                    self.flush_confirmed(st.confirmed).await;
                    self.delete_confirmed_rows(&mut st).await;
                    return Ok(());
                }
                ev = client.recv(), if st.buffer.len() < self.max_buffered => {
                    st.on_event(ev.map_err(classify)?.ok_or_else(|| End::Retry(Error::store("the replication stream ended"), false))?, &self.store.prefix, self)?;
                    // Take what else has arrived, without waiting, up to the buffer's size.
                    while st.buffer.len() < self.max_buffered {
                        match client.recv().now_or_never() {
                            Some(ev) => st.on_event(ev.map_err(classify)?.ok_or_else(|| End::Retry(Error::store("the replication stream ended"), false))?, &self.store.prefix, self)?,
                            None => break,
                        }
                    }
                }
                _ = sleep_until(wake) => {}
                // The periodic work below runs on an idle stream too.
                _ = tokio::time::sleep_until((last_check + CHECK_EVERY).into()) => {}
            }
            self.dispatch(&mut st).await;
            if let Some(lsn) = st.confirmable() {
                client.update_applied_lsn(lsn);
                self.counters
                    .confirmed
                    .store(lsn.as_u64(), AtomicOrdering::Relaxed);
            }
            if last_check.elapsed() >= CHECK_EVERY {
                last_check = Instant::now();
                self.undivert(&mut st).await;
                self.check_retained(&mut st).await;
                self.delete_confirmed_rows(&mut st).await;
            }
        }
    }

    /// A graceful stop ends the session without sending the last confirmed position (the
    /// replication client sends positions every `status_interval`): move the slot there
    /// with SQL once the server has let go of it, so that a restart does not publish the
    /// last interval's messages again.
    async fn flush_confirmed(&self, lsn: Lsn) {
        if lsn.is_zero() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let r = sqlx::query("SELECT pg_replication_slot_advance($1, $2::pg_lsn)")
                .bind(&self.slot)
                .bind(lsn.to_pg_string())
                .execute(self.store.table().pool())
                .await;
            match r {
                Ok(_) => return,
                // Already there or past it.
                Err(e) if e.to_string().contains("minimum is") => return,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "WAL relay: the slot is not free yet");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %map_err(e), "WAL relay: could not record the last confirmed position; a restart publishes up to one status interval again");
                    return;
                }
            }
        }
    }

    /// Table mode: delete the rows up to the highest `seq` of the confirmed transactions.
    /// Their inserts stay in the WAL, so deleting a row a little early (a row of a
    /// transaction that committed later with a smaller `seq`) loses nothing.
    async fn delete_confirmed_rows(&self, st: &mut State) {
        let Some(t) = &self.wal_table else { return };
        if st.confirmed_seq <= st.deleted_seq {
            return;
        }
        let r = sqlx::query(&format!("DELETE FROM {t} WHERE seq <= $1"))
            .bind(st.confirmed_seq)
            .execute(self.store.table().pool())
            .await;
        match r {
            Ok(_) => st.deleted_seq = st.confirmed_seq,
            Err(e) => {
                tracing::warn!(error = %map_err(e), table = %t, "WAL relay: could not delete published rows; trying again")
            }
        }
    }

    /// Units with pending rows in the table: their WAL messages go behind them.
    async fn diverted_units(&self) -> Result<Diverted> {
        let t = self.store.table().table();
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT DISTINCT stream, okey FROM {t} WHERE status = 'pending' AND strategy = 'keep_order'"
        ))
        .fetch_all(self.store.table().pool())
        .await
        .map_err(map_err)?;
        Ok(rows.into_iter().collect())
    }

    /// A diverted unit with nothing pending in the table flows from the WAL again. Its
    /// buffered messages were all written aside already (dispatch does that before this).
    async fn undivert(&self, st: &mut State) {
        if st.diverted.is_empty() {
            return;
        }
        let t = self.store.table().table();
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {t} WHERE stream = $1 AND okey = $2 AND status = 'pending')"
        );
        let units = st.diverted.units();
        for u in units {
            if st
                .buffer
                .iter()
                .any(|it| it.fate != Fate::Done && it.is_unit(&u))
            {
                continue;
            }
            let pending: std::result::Result<bool, _> = sqlx::query_scalar(&sql)
                .bind(&u.0)
                .bind(&u.1)
                .fetch_one(self.store.table().pool())
                .await;
            match pending {
                Ok(false) => {
                    st.diverted.remove(&u);
                }
                Ok(true) => {}
                Err(e) => {
                    tracing::warn!(error = %map_err(e), "WAL relay: could not check a diverted unit");
                    return;
                }
            }
        }
    }

    async fn check_retained(&self, st: &mut State) {
        if st.last_retained_check.elapsed() < Duration::from_secs(30) {
            return;
        }
        st.last_retained_check = Instant::now();
        match slot_lag(self.store.table().pool(), &self.slot).await {
            Ok(Some(lag)) => {
                metrics::gauge!("outbox_wal_retained_bytes").set(lag.retained_bytes as f64);
                if lag.retained_bytes > self.max_retained_bytes {
                    tracing::warn!(slot = %self.slot, retained_bytes = lag.retained_bytes, limit = self.max_retained_bytes, "the WAL relay's slot keeps more WAL than its limit on the server's disk");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "WAL relay: could not read the slot's lag"),
        }
    }

    /// One round: publish what is ready, decide for what failed, write aside what must go to
    /// the table, and forget what is done.
    async fn dispatch(&self, st: &mut State) {
        self.counters.rounds.fetch_add(1, AtomicOrdering::Relaxed);
        let now = Instant::now();
        let window = self.window();
        // A full buffer with units backing off: hand them to the table now.
        if st.buffer.len() >= self.max_buffered {
            for it in st.buffer.iter_mut().take(window) {
                if it.fate == Fate::Wal && it.attempts > 0 && it.not_before > now {
                    it.row.retry_after = it.not_before - now;
                    it.fate = Fate::Aside { park: false };
                    if let Some(u) = it.unit() {
                        st.diverted.insert(u);
                    }
                }
            }
        }
        let ordered = self.publisher.ordered_batches();
        let mut batch: Vec<usize> = Vec::new();
        // Units by their hash: two units that collide are only treated as one (serialised),
        // which costs concurrency, never order.
        let mut in_batch: HashMap<u64, u64> = HashMap::new();
        let mut stopped: HashSet<u64> = HashSet::new();
        let mut refused: Vec<(usize, Error)> = Vec::new();
        let diverting = !st.diverted.is_empty();
        let mut wake: Option<Instant> = None;
        for (i, it) in st.buffer.iter().enumerate().take(window) {
            if it.fate != Fate::Wal {
                continue;
            }
            if it.ordered() {
                if stopped.contains(&it.uid) || (diverting && st.diverted.holds(it)) {
                    continue;
                }
                if it.not_before > now {
                    wake = Some(wake.map_or(it.not_before, |w: Instant| w.min(it.not_before)));
                    stopped.insert(it.uid);
                    continue;
                }
                match in_batch.get(&it.uid) {
                    // One message per unit per batch, unless the publisher keeps a batch's
                    // order: then a run to one destination.
                    Some(&dest) if !ordered || dest != it.dest => {
                        stopped.insert(it.uid);
                        continue;
                    }
                    _ => {}
                }
                if ordered {
                    if let Err(e) = self.publisher.check_message(&it.row.envelope) {
                        refused.push((i, e));
                        stopped.insert(it.uid);
                        continue;
                    }
                }
                in_batch.insert(it.uid, it.dest);
            } else if it.not_before > now {
                wake = Some(wake.map_or(it.not_before, |w: Instant| w.min(it.not_before)));
                continue;
            }
            batch.push(i);
            if batch.len() >= self.batch_size {
                break;
            }
        }
        // Anything published or refused changes what is ready: look again at once. Otherwise
        // the next round is due when the first message backing off is, or on new events:
        // a unit waiting behind its backing-off head never spins the loop.
        if !batch.is_empty() || !refused.is_empty() {
            wake = Some(now);
        }
        st.wake = wake;
        for (i, e) in refused {
            self.failed(st, i, e, now);
        }
        if !batch.is_empty() {
            let envs: Vec<&Envelope> = batch.iter().map(|&i| &st.buffer[i].row.envelope).collect();
            let results =
                publish_with_timeout(&*self.publisher, &envs, None, self.delivery.publish_timeout)
                    .await;
            let mut failed_units: HashSet<u64> = HashSet::new();
            let mut published = 0u64;
            for (&i, r) in batch.iter().zip(results) {
                match r {
                    Ok(()) => {
                        let it = &st.buffer[i];
                        if it.ordered() && failed_units.contains(&it.uid) {
                            metrics::counter!("outbox_order_gaps_total").increment(1);
                            tracing::warn!(id = %it.row.envelope.id, "a later message of a unit was acknowledged after an earlier one failed in the same batch");
                        }
                        st.resolve(i);
                        published += 1;
                    }
                    Err(e) => {
                        failed_units.insert(st.buffer[i].uid);
                        self.failed(st, i, e, now);
                    }
                }
            }
            self.counters
                .published
                .fetch_add(published, AtomicOrdering::Relaxed);
            metrics::counter!("outbox_wal_published_total").increment(published);
        }
        self.write_aside(st, window).await;
        st.forget_done();
    }

    /// How far into the buffer a round looks: messages further back wait for the front to
    /// move, so a round costs O(window), not O(buffer), however large a transaction is.
    fn window(&self) -> usize {
        (self.batch_size * 8).max(1024)
    }

    /// A failed publish (or a refusal before sending) of buffered message `i`: retry in
    /// memory, or hand it to the table by the retry policy's decision.
    fn failed(&self, st: &mut State, i: usize, error: Error, now: Instant) {
        let d = &self.delivery;
        let it = &mut st.buffer[i];
        it.attempts += 1;
        let decision = d.retry.decide(
            it.row.order,
            it.row.exhausted,
            it.attempts,
            &error,
            d.dead_letter_keep_order,
        );
        let decision = match (decision, error.retry_after()) {
            (Decision::Retry(x), Some(hint)) => Decision::Retry(x.max(hint)),
            (Decision::Stuck(x), Some(hint)) => Decision::Stuck(x.max(hint)),
            (x, _) => x,
        };
        tracing::debug!(id = %it.row.envelope.id, attempts = it.attempts, error = %error, "WAL relay: publish failed");
        it.row.last_error = Some(error.to_string());
        it.row.attempts = it.attempts;
        match decision {
            Decision::Retry(after) if it.attempts < self.memory_attempts => {
                it.not_before = now + after;
            }
            Decision::Retry(after) | Decision::Stuck(after) => {
                if matches!(decision, Decision::Stuck(_)) {
                    tracing::error!(id = %it.row.envelope.id, attempts = it.attempts, error = %error, "keep-order message stuck: its unit waits in the table");
                }
                it.row.retry_after = after;
                it.fate = Fate::Aside { park: false };
            }
            Decision::Park => {
                it.row.retry_after = d.retry.delay(it.attempts);
                it.fate = Fate::Aside { park: true };
            }
            Decision::Dead => {
                it.row.status = Status::Dead;
                it.fate = Fate::Aside { park: false };
            }
        }
        if let (Fate::Aside { .. }, Some(u)) = (it.fate, it.unit()) {
            if it.row.status != Status::Dead {
                st.diverted.insert(u);
            }
        }
    }

    /// Write to the table, in commit order, every message that goes there: handed over,
    /// scheduled, quarantined, or behind a diverted unit. On failure they stay buffered
    /// (and unconfirmed) and are tried again next round.
    async fn write_aside(&self, st: &mut State, window: usize) {
        let diverting = !st.diverted.is_empty();
        let mut idx = Vec::new();
        for (i, it) in st.buffer.iter_mut().enumerate().take(window) {
            if diverting && it.fate == Fate::Wal && st.diverted.holds(it) {
                it.fate = Fate::Aside { park: false };
            }
            if matches!(it.fate, Fate::Aside { .. }) {
                idx.push(i);
            }
        }
        if idx.is_empty() {
            return;
        }
        let rows: Vec<NewMessage> = idx.iter().map(|&i| st.buffer[i].row.clone()).collect();
        if let Err(e) = self.store.table().insert(&rows).await {
            tracing::warn!(error = %e, count = rows.len(), "WAL relay: could not write messages to the table; trying again");
            let retry = Instant::now() + Duration::from_secs(1);
            st.wake = Some(st.wake.map_or(retry, |w| w.min(retry)));
            return;
        }
        for &i in &idx {
            let it = &st.buffer[i];
            if let (Fate::Aside { park: true }, Some(u)) = (it.fate, it.unit()) {
                let reason = it.row.last_error.clone().unwrap_or_default();
                if let Err(e) = self.store.table().park_unit(&u.0, &u.1, &reason).await {
                    tracing::warn!(error = %e, stream = %u.0, unit = %u.1, "WAL relay: could not park the unit; the table relay parks it at its next failure");
                }
            }
            if it.row.status == Status::Dead {
                self.counters.dead.fetch_add(1, AtomicOrdering::Relaxed);
                metrics::counter!("outbox_wal_dead_total").increment(1);
            }
            st.resolve(i);
        }
        self.counters
            .aside
            .fetch_add(idx.len() as u64, AtomicOrdering::Relaxed);
        metrics::counter!("outbox_wal_aside_total").increment(idx.len() as u64);
    }

    /// A decoded row as the relay will treat it: checked like a claimed row (size, names,
    /// signature), or dead with the reason.
    fn admit(&self, mut row: NewMessage) -> (NewMessage, Fate) {
        let checked = row
            .envelope
            .message
            .validate(self.delivery.max_payload_bytes)
            .and_then(|()| {
                outbox_core::check_signature(
                    self.delivery.signer.as_ref(),
                    self.require_signatures,
                    &row.envelope,
                    &SignedPlan {
                        order: row.order,
                        unit: &row.unit,
                        exhausted: row.exhausted,
                    },
                    &self.signing_scope,
                    row.signature.as_deref(),
                )
            });
        match checked {
            Ok(()) if record::scheduled(&row, SystemTime::now()) => {
                (row, Fate::Aside { park: false })
            }
            Ok(()) => (row, Fate::Wal),
            Err(e) => {
                tracing::error!(id = %row.envelope.id, error = %e, "WAL relay: message refused before publishing; dead-lettered");
                row.status = Status::Dead;
                row.last_error = Some(e.to_string());
                (row, Fate::Aside { park: false })
            }
        }
    }

    /// A logical message that does not decode: kept as a dead letter with its raw bytes (up
    /// to the payload limit) and the reason, so nothing is lost silently.
    fn quarantine(&self, content: &[u8], reason: String) -> NewMessage {
        tracing::error!(%reason, bytes = content.len(), "WAL relay: a logical message with the outbox prefix does not decode; dead-lettered");
        let keep = content.len().min(self.delivery.max_payload_bytes);
        let envelope = Envelope {
            id: outbox_core::MessageId::new(),
            created_at: SystemTime::now(),
            message: outbox_core::Message::new("quarantined", content[..keep].to_vec())
                .stream(&*self.store.prefix),
        };
        NewMessage {
            envelope,
            order: Order::Unordered,
            unit: String::new(),
            exhausted: outbox_core::Exhausted::DeadLetter,
            published_by: outbox_core::PublishedBy::Relay,
            signature: None,
            status: Status::Dead,
            attempts: 0,
            retry_after: Duration::ZERO,
            not_before: None,
            last_error: Some(format!("undecodable WAL message: {reason}")),
            lease: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// To publish from the WAL.
    Wal,
    /// To write to the table (and park its unit).
    Aside { park: bool },
    /// Published or written: resolved.
    Done,
}

struct Item {
    txn: u64,
    row: NewMessage,
    /// Hashes of the unit (0 when unordered) and the destination, for the rounds'
    /// bookkeeping.
    uid: u64,
    dest: u64,
    attempts: u32,
    not_before: Instant,
    fate: Fate,
}

impl Item {
    fn ordered(&self) -> bool {
        self.row.order == Order::InUnit
    }

    /// The keep-order unit, as an owned key (for the rare paths: diverting, parking).
    fn unit(&self) -> Option<UnitKey> {
        self.ordered().then(|| {
            (
                self.row.envelope.message.stream.clone(),
                self.row.unit.clone(),
            )
        })
    }

    fn is_unit(&self, u: &UnitKey) -> bool {
        self.ordered() && self.row.envelope.message.stream == u.0 && self.row.unit == u.1
    }
}

/// Units whose messages go to the table behind their pending rows, by their hash (as in
/// [`Item::uid`]), so a buffered message is checked without building an owned key.
#[derive(Default)]
struct Diverted(HashMap<u64, Vec<UnitKey>>);

impl Diverted {
    fn uid(stream: &str, unit: &str) -> u64 {
        // The same hash as `Item::uid`'s.
        hash(&(stream, unit))
    }

    fn insert(&mut self, u: UnitKey) {
        let units = self.0.entry(Self::uid(&u.0, &u.1)).or_default();
        if !units.contains(&u) {
            units.push(u);
        }
    }

    fn remove(&mut self, u: &UnitKey) {
        let uid = Self::uid(&u.0, &u.1);
        if let Some(units) = self.0.get_mut(&uid) {
            units.retain(|x| x != u);
            if units.is_empty() {
                self.0.remove(&uid);
            }
        }
    }

    /// Whether `it`'s unit is diverted.
    fn holds(&self, it: &Item) -> bool {
        it.ordered()
            && self
                .0
                .get(&it.uid)
                .is_some_and(|units| units.iter().any(|u| it.is_unit(u)))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn units(&self) -> Vec<UnitKey> {
        self.0.values().flatten().cloned().collect()
    }
}

impl FromIterator<UnitKey> for Diverted {
    fn from_iter<I: IntoIterator<Item = UnitKey>>(iter: I) -> Self {
        let mut d = Self::default();
        for u in iter {
            d.insert(u);
        }
        d
    }
}

/// A committed transaction's position and how many of its messages are unresolved.
struct Txn {
    id: u64,
    end_lsn: Lsn,
    open: usize,
    /// Table mode: the highest row `seq` in it.
    max_seq: Option<i64>,
}

struct State {
    buffer: VecDeque<Item>,
    txns: VecDeque<Txn>,
    next_txn: u64,
    /// Messages of the transaction being read (between Begin and Commit), in a `Vec` kept
    /// for the next transaction (no allocation per transaction), and whether one is open.
    current: Vec<(NewMessage, Fate)>,
    in_txn: bool,
    diverted: Diverted,
    /// When the next round is due without a new event (set by each round).
    wake: Option<Instant>,
    /// Table mode: the relations that are the append-only table (their `seq` and `batch`
    /// columns), the highest `seq` of the transaction being read, of the confirmed ones, and
    /// deleted.
    relations: HashMap<u32, (usize, usize)>,
    current_seq: Option<i64>,
    confirmed_seq: i64,
    deleted_seq: i64,
    /// A keepalive's position, confirmable when nothing is open before it.
    idle_lsn: Option<Lsn>,
    confirmed: Lsn,
    last_retained_check: Instant,
}

impl State {
    fn new(diverted: Diverted) -> Self {
        Self {
            buffer: VecDeque::new(),
            txns: VecDeque::new(),
            next_txn: 0,
            current: Vec::new(),
            in_txn: false,
            diverted,
            wake: None,
            relations: HashMap::new(),
            current_seq: None,
            confirmed_seq: 0,
            deleted_seq: 0,
            idle_lsn: None,
            confirmed: Lsn::from_u64(0),
            last_retained_check: Instant::now() - Duration::from_secs(3600),
        }
    }

    fn on_event(
        &mut self,
        ev: ReplicationEvent,
        prefix: &str,
        relay: &Inner,
    ) -> std::result::Result<(), End> {
        match ev {
            ReplicationEvent::Begin { .. } => {
                self.current.clear();
                self.in_txn = true;
            }
            ReplicationEvent::XLogData { data, .. } if relay.wal_table.is_some() => {
                self.on_change(&data, relay);
            }
            ReplicationEvent::Message {
                transactional,
                prefix: p,
                content,
                ..
            } if transactional && p == prefix => {
                self.decode(&content, &content, relay);
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                // How far behind the reading is: now against the commit's time (PostgreSQL
                // counts microseconds from 2000-01-01).
                const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as i64);
                let lag = (now - PG_EPOCH_MICROS - commit_time_micros).max(0);
                metrics::gauge!("outbox_wal_lag_seconds").set(lag as f64 / 1e6);
                self.in_txn = false;
                let id = self.next_txn;
                self.next_txn += 1;
                self.txns.push_back(Txn {
                    id,
                    end_lsn,
                    open: self.current.len(),
                    max_seq: self.current_seq.take(),
                });
                let now = Instant::now();
                for (row, fate) in self.current.drain(..) {
                    let m = &row.envelope.message;
                    let ordered = row.order == Order::InUnit;
                    if ordered && matches!(fate, Fate::Aside { .. }) && row.status != Status::Dead {
                        self.diverted.insert((m.stream.clone(), row.unit.clone()));
                    }
                    // The same hash as the owned key's: (String, String) hashes as (str, str).
                    let uid = if ordered {
                        hash(&(m.stream.as_str(), row.unit.as_str()))
                    } else {
                        0
                    };
                    let dest = hash(m.destination.as_str());
                    self.buffer.push_back(Item {
                        txn: id,
                        row,
                        uid,
                        dest,
                        attempts: 0,
                        not_before: now,
                        fate,
                    });
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } if !self.in_txn => {
                self.idle_lsn = Some(wal_end);
            }
            ReplicationEvent::StoppedAt { .. } => {
                return Err(End::Retry(
                    Error::store("the replication stream stopped"),
                    false,
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// Table mode: a relation description or an inserted row of the append-only table.
    fn on_change(&mut self, data: &[u8], relay: &Inner) {
        let wal_table = relay.wal_table.as_deref().unwrap_or_default();
        match pgoutput::parse(data) {
            Ok(Change::Relation { id, name, columns }) => {
                let at = |c: &str| columns.iter().position(|x| *x == c);
                match (name == wal_table, at("seq"), at("batch")) {
                    (true, Some(seq), Some(batch)) => {
                        self.relations.insert(id, (seq, batch));
                    }
                    _ => {
                        self.relations.remove(&id);
                    }
                }
            }
            Ok(Change::Insert { relation, values }) => {
                let Some(&(seq_at, batch_at)) = self.relations.get(&relation) else {
                    return;
                };
                let seq = values
                    .get(seq_at)
                    .copied()
                    .flatten()
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok());
                if let Some(seq) = seq {
                    self.current_seq = Some(self.current_seq.map_or(seq, |s| s.max(seq)));
                }
                let batch = values
                    .get(batch_at)
                    .copied()
                    .flatten()
                    .ok_or_else(|| "an inserted row without its batch column".to_owned());
                match batch.and_then(pgoutput::bytea) {
                    Ok(bytes) => self.decode(&bytes, data, relay),
                    Err(reason) => {
                        self.in_txn = true;
                        self.current
                            .push((relay.quarantine(data, reason), Fate::Aside { park: false }));
                    }
                }
            }
            Ok(Change::Other) => {}
            Err(reason) => {
                tracing::error!(%reason, "WAL relay: a change of the stream does not decode");
            }
        }
    }

    /// One logical message's rows, checked, onto the transaction being read; a message that
    /// does not decode counts whole or not at all: its rows read so far are taken back and
    /// `raw` is kept as one dead letter instead.
    fn decode(&mut self, bytes: &[u8], raw: &[u8], relay: &Inner) {
        // Rows belong to a transaction being read, Begin seen or not.
        self.in_txn = true;
        let before = self.current.len();
        let current = &mut self.current;
        if let Err(reason) = record::decode_each(bytes, |row| current.push(relay.admit(row))) {
            self.current.truncate(before);
            self.current
                .push((relay.quarantine(raw, reason), Fate::Aside { park: false }));
        }
    }

    /// Message `i` is published or written: its transaction has one fewer open.
    fn resolve(&mut self, i: usize) {
        let it = &mut self.buffer[i];
        if it.fate == Fate::Done {
            return;
        }
        it.fate = Fate::Done;
        let front = self.txns.front().map_or(0, |t| t.id);
        if let Some(t) = self.txns.get_mut((it.txn - front) as usize) {
            t.open -= 1;
        }
    }

    /// Drop resolved messages from the front (the ones behind wait until they get there).
    fn forget_done(&mut self) {
        while self.buffer.front().is_some_and(|it| it.fate == Fate::Done) {
            self.buffer.pop_front();
        }
    }

    /// The position to confirm: the end of the last transaction with everything before it
    /// resolved, or an idle keepalive's when nothing is open.
    fn confirmable(&mut self) -> Option<Lsn> {
        let mut lsn = None;
        while self.txns.front().is_some_and(|t| t.open == 0) {
            if let Some(t) = self.txns.pop_front() {
                lsn = Some(t.end_lsn);
                self.confirmed_seq = self.confirmed_seq.max(t.max_seq.unwrap_or(0));
            }
        }
        if self.txns.is_empty() && !self.in_txn {
            if let Some(idle) = self.idle_lsn.take() {
                lsn = Some(lsn.map_or(idle, |l: Lsn| l.max(idle)));
            }
        }
        match lsn {
            Some(l) if l > self.confirmed => {
                self.confirmed = l;
                Some(l)
            }
            _ => None,
        }
    }
}

fn hash<T: std::hash::Hash + ?Sized>(v: &T) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(v)
}

/// Until the stop flag is set (or its sender is gone).
async fn until_stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Errors of a session: a slot in use elsewhere is a standby's wait; a missing slot or
/// publication, refused login or privilege is a configuration error; the rest are retried.
fn classify(e: pgwire_replication::PgWireError) -> End {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if lower.contains("is active for pid") || lower.contains("55006") {
        return End::Retry(Error::store(text), true);
    }
    let config = lower.contains("does not exist")
        || lower.contains("permission denied")
        || lower.contains("must be superuser or replication")
        || lower.contains("password authentication failed")
        || lower.contains("logical decoding requires wal_level");
    if config {
        End::Fatal(Error::config(format!("WAL relay: {text}")))
    } else {
        End::Retry(Error::store(format!("WAL relay: {text}")), false)
    }
}

/// The replication session's settings from a PostgreSQL URL (the same TLS parameters as the
/// store's: `sslmode`, `sslrootcert`, `sslcert`, `sslkey`).
fn replication_config(url: &str, slot: &str, publication: &str) -> Result<ReplicationConfig> {
    crate::common::check_tls_params(url, &crate::common::PG_TLS)?;
    let bad =
        |why: &str| Error::config(format!("invalid PostgreSQL URL {}: {why}", redact_url(url)));
    let parsed = url::Url::parse(url).map_err(|_| bad("not a URL"))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(bad("the scheme must be postgres://"));
    }
    let decode = |s: &str| percent_decode(s).ok_or_else(|| bad("bad percent-encoding"));
    let host = parsed.host_str().unwrap_or("localhost").to_owned();
    let user = match parsed.username() {
        "" => "postgres".to_owned(),
        u => decode(u)?,
    };
    let password = parsed
        .password()
        .map(decode)
        .transpose()?
        .unwrap_or_default();
    let database = match parsed.path().trim_start_matches('/') {
        "" => user.clone(),
        d => decode(d)?,
    };
    let mut mode = "prefer".to_owned();
    let (mut root, mut cert, mut key) = (None, None, None);
    for (k, v) in parsed.query_pairs() {
        match &*k {
            "sslmode" => mode = v.into_owned(),
            "sslrootcert" => root = Some(std::path::PathBuf::from(&*v)),
            "sslcert" => cert = Some(std::path::PathBuf::from(&*v)),
            "sslkey" => key = Some(std::path::PathBuf::from(&*v)),
            _ => {}
        }
    }
    let mut tls = match mode.as_str() {
        "disable" => TlsConfig::disabled(),
        "prefer" | "allow" => {
            let mut t = TlsConfig::require();
            t.mode = pgwire_replication::SslMode::Prefer;
            t
        }
        "require" => TlsConfig::require(),
        "verify-ca" => TlsConfig::verify_ca(root),
        "verify-full" => TlsConfig::verify_full(root),
        other => return Err(bad(&format!("unsupported sslmode {other:?}"))),
    };
    if let (Some(c), Some(k)) = (cert, key) {
        tls = tls.with_client_cert(c, k);
    }
    Ok(
        ReplicationConfig::new(host, user, password, database, slot, publication)
            .with_tls(tls)
            .with_port(parsed.port().unwrap_or(5432)),
    )
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
