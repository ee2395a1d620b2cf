//! An in-memory [`Store`] for unit tests of the engine and for examples. Not durable.

use crate::StoreAdmin;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::error::Result;
use crate::message::{Status, StoredMessage};
use crate::store::{
    Claim, Claimed, EnqueueBlocking, Failure, NewMessage, Outcome, Selector, Stats, Store,
    StreamStats,
};
use crate::strategy::Order;

#[derive(Debug)]
struct Row {
    stored: StoredMessage,
    locked_by: Option<String>,
    locked_until: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct State {
    rows: BTreeMap<i64, Row>,
    next_seq: i64,
    /// Parked units: when, and why.
    parked: BTreeMap<(String, String), (SystemTime, Option<String>)>,
}

impl State {
    /// The pending rows of a keep-order unit, in order.
    fn unit_rows<'a>(
        &'a mut self,
        stream: &'a str,
        unit: &'a str,
    ) -> impl Iterator<Item = &'a mut Row> + 'a {
        self.rows.values_mut().filter(move |r| {
            r.stored.status == Status::Pending
                && r.stored.order == Order::InUnit
                && r.stored.ordering_unit() == (stream, unit)
        })
    }

    fn resume(&mut self, stream: &str, unit: &str) {
        self.parked.remove(&(stream.to_owned(), unit.to_owned()));
        let now = SystemTime::now();
        for r in self.unit_rows(stream, unit) {
            r.stored.claims = 0;
            if r.stored.attempts > 0 {
                r.stored.attempts = 0;
                r.stored.next_attempt_at = r.stored.next_attempt_at.min(now);
            }
        }
    }
}

/// An in-memory store. Clones share the same rows.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Start a transaction: rows enqueued in it appear at [`MemoryTx::commit`].
    pub fn begin(&self) -> MemoryTx {
        MemoryTx {
            store: self.clone(),
            staged: Vec::new(),
        }
    }

    /// Overwrite a row's payload without re-signing (for tamper tests).
    pub fn tamper(&self, seq: i64, payload: Vec<u8>) {
        if let Some(r) = self.state.lock().unwrap().rows.get_mut(&seq) {
            r.stored.envelope.message.payload = payload;
        }
    }

    /// Change a stored message behind the outbox's back (tests of what the relay does with
    /// rows it did not write).
    pub fn alter(&self, seq: i64, change: impl FnOnce(&mut StoredMessage)) {
        if let Some(r) = self.state.lock().unwrap().rows.get_mut(&seq) {
            change(&mut r.stored);
        }
    }

    fn insert_locked(state: &mut State, rows: &[NewMessage]) -> Vec<i64> {
        let now = SystemTime::now();
        rows.iter()
            .map(|r| {
                state.next_seq += 1;
                let seq = state.next_seq;
                Self::insert_at(state, seq, r, now);
                seq
            })
            .collect()
    }

    fn insert_at(state: &mut State, seq: i64, r: &NewMessage, now: SystemTime) {
        let (locked_by, locked_until) = match &r.lease {
            Some((owner, d)) => (Some(owner.clone()), Some(now + *d)),
            None => (None, None),
        };
        state.rows.insert(
            seq,
            Row {
                stored: StoredMessage {
                    seq,
                    envelope: r.envelope.clone(),
                    order: r.order,
                    unit: r.unit.clone(),
                    exhausted: r.exhausted,
                    status: r.status,
                    attempts: r.attempts,
                    next_attempt_at: r
                        .not_before
                        .map_or(now + r.retry_after, |t| t.max(now + r.retry_after)),
                    last_error: r.last_error.clone(),
                    sent_at: None,
                    signature: r.signature.clone(),
                    claims: 0,
                },
                locked_by,
                locked_until,
            },
        );
    }
}

/// A transaction on a [`MemoryStore`]: all or nothing. Write into it with
/// [`Outbox::enqueue_blocking`](crate::Outbox::enqueue_blocking).
#[must_use = "commit or drop (rollback)"]
pub struct MemoryTx {
    store: MemoryStore,
    /// Rows with the `seq`s reserved for them, inserted at commit.
    staged: Vec<(i64, NewMessage)>,
}

impl MemoryTx {
    /// Make every enqueued row visible at once. Then dispatch what `enqueue_blocking`
    /// returned.
    pub fn commit(self) {
        let mut state = self.store.state.lock().unwrap();
        let now = SystemTime::now();
        for (seq, row) in &self.staged {
            MemoryStore::insert_at(&mut state, *seq, row, now);
        }
    }

    /// Discard everything (same as dropping).
    pub fn rollback(self) {}
}

impl EnqueueBlocking<MemoryTx> for MemoryStore {
    fn write_rows_blocking(
        &self,
        tx: &mut MemoryTx,
        rows: &[NewMessage],
        _need_seqs: bool,
    ) -> Result<Vec<i64>> {
        if !Arc::ptr_eq(&tx.store.state, &self.state) {
            return Err(crate::Error::config(
                "this MemoryTx belongs to another MemoryStore",
            ));
        }
        let mut state = self.state.lock().unwrap();
        Ok(rows
            .iter()
            .map(|r| {
                state.next_seq += 1;
                tx.staged.push((state.next_seq, r.clone()));
                state.next_seq
            })
            .collect())
    }
}

fn selected(sel: &Selector, r: &StoredMessage) -> bool {
    match sel {
        Selector::All => true,
        Selector::Stream(s) => &r.envelope.message.stream == s,
        Selector::Seqs(seqs) => seqs.contains(&r.seq),
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn signing_scope(&self) -> String {
        "memory".into()
    }

    async fn migrate(&self) -> Result<()> {
        Ok(())
    }

    async fn insert(&self, rows: &[NewMessage]) -> Result<Vec<i64>> {
        Ok(Self::insert_locked(&mut self.state.lock().unwrap(), rows))
    }

    async fn claim(&self, claim: &Claim) -> Result<Vec<Claimed>> {
        let now = SystemTime::now();
        let mut state = self.state.lock().unwrap();
        let state = &mut *state;
        // The free rows, in seq order, each with its keep-order unit's index; a unit with a
        // leased or backing-off row is blocked from that row on.
        let mut blocked: HashSet<(String, String)> = HashSet::new();
        let mut units: HashMap<(String, String), usize> = HashMap::new();
        let mut candidates: Vec<(i64, Option<usize>)> = Vec::new();
        for row in state.rows.values() {
            if claim.depth <= 1 && candidates.len() >= claim.limit {
                break;
            }
            let s = &row.stored;
            if s.status != Status::Pending || !claim.streams.matches(&s.envelope.message.stream) {
                continue;
            }
            let free = row.locked_until.is_none_or(|t| t <= now) && s.next_attempt_at <= now;
            let mut unit = None;
            if s.order == Order::InUnit {
                let (st, k) = s.ordering_unit();
                let key = (st.to_owned(), k.to_owned());
                if blocked.contains(&key) || state.parked.contains_key(&key) {
                    continue;
                }
                if !free {
                    blocked.insert(key);
                    continue;
                }
                let next = units.len();
                unit = Some(*units.entry(key).or_insert(next));
            } else if !free {
                continue;
            }
            candidates.push((s.seq, unit));
        }
        if claim.depth > 1 {
            Claim::sort_unit_by_unit(&mut candidates, |c| *c);
        }
        candidates.truncate(claim.limit);
        let mut out = Vec::new();
        let (mut bytes, mut taken_any) = (0usize, false);
        for (seq, _) in candidates {
            let row = state.rows.get_mut(&seq).expect("a candidate row is held");
            let m = &row.stored.envelope.message;
            let size = m.size();
            // Not loaded when the payload alone is over the limit (as the SQL stores); the
            // relay checks the exact size (`Message::size`) of every row it loads.
            let oversized = m.payload.len() > claim.max_row_bytes;
            if !oversized {
                if taken_any && bytes + size > claim.max_batch_bytes {
                    break; // in claim order: each unit stays a prefix
                }
                bytes += size;
                taken_any = true;
            }
            row.locked_by = Some(claim.owner.clone());
            row.locked_until = Some(now + claim.lease);
            row.stored.claims += 1;
            out.push(if oversized {
                Err(crate::store::Quarantined {
                    seq: row.stored.seq,
                    id: Some(row.stored.envelope.id.to_string()),
                    reason: claim.oversized(size),
                })
            } else {
                Ok(row.stored.clone())
            });
        }
        Ok(out)
    }

    async fn complete(&self, seqs: &[i64], delete: bool) -> Result<()> {
        let now = SystemTime::now();
        let mut state = self.state.lock().unwrap();
        for seq in seqs {
            if delete {
                state.rows.remove(seq);
            } else if let Some(r) = state.rows.get_mut(seq) {
                r.stored.status = Status::Sent;
                r.stored.sent_at = Some(now);
                r.locked_by = None;
                r.locked_until = None;
            }
        }
        Ok(())
    }

    async fn fail(&self, owner: &str, failures: &[Failure]) -> Result<()> {
        let now = SystemTime::now();
        let mut state = self.state.lock().unwrap();
        for f in failures {
            let Some(r) = state.rows.get_mut(&f.seq) else {
                continue;
            };
            if r.locked_by.as_deref() != Some(owner) || r.stored.status != Status::Pending {
                continue;
            }
            r.locked_by = None;
            r.locked_until = None;
            r.stored.claims = 0;
            match f.outcome {
                Outcome::Release => {}
                Outcome::Retry { after } => {
                    r.stored.attempts += 1;
                    r.stored.last_error = Some(f.error.clone());
                    r.stored.next_attempt_at = now + after;
                }
                Outcome::Dead => {
                    r.stored.attempts += 1;
                    r.stored.last_error = Some(f.error.clone());
                    r.stored.status = Status::Dead;
                }
            }
        }
        Ok(())
    }

    async fn park_unit(&self, stream: &str, unit: &str, reason: &str) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        if state.unit_rows(stream, unit).next().is_none() {
            return Err(crate::store::no_such_unit(stream, unit, false));
        }
        state
            .parked
            .entry((stream.to_owned(), unit.to_owned()))
            .or_insert_with(|| (SystemTime::now(), Some(reason.to_owned())));
        Ok(())
    }

    async fn wait_for_work(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.notify.notified()).await;
    }

    fn notify_committed(&self) {
        self.notify.notify_one();
    }
}

#[async_trait]
impl StoreAdmin for MemoryStore {
    /// Nothing to make: the schema is always whole and current.
    async fn schema(&self) -> Result<crate::SchemaReport> {
        Ok(crate::SchemaReport {
            version: Some(crate::SCHEMA_VERSION),
            ..Default::default()
        })
    }

    async fn requeue(&self, selector: &Selector) -> Result<u64> {
        let now = SystemTime::now();
        let mut n = 0;
        for r in self.state.lock().unwrap().rows.values_mut() {
            if r.stored.status == Status::Dead && selected(selector, &r.stored) {
                r.stored.status = Status::Pending;
                r.stored.attempts = 0;
                r.stored.next_attempt_at = now;
                n += 1;
            }
        }
        self.notify.notify_one();
        Ok(n)
    }

    async fn resume_unit(&self, stream: &str, unit: &str) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        if !state
            .parked
            .contains_key(&(stream.to_owned(), unit.to_owned()))
        {
            return Err(crate::store::no_such_unit(stream, unit, true));
        }
        state.resume(stream, unit);
        drop(state);
        self.notify.notify_one();
        Ok(())
    }

    async fn skip_head(&self, stream: &str, unit: &str) -> Result<Option<i64>> {
        let mut state = self.state.lock().unwrap();
        if !state
            .parked
            .contains_key(&(stream.to_owned(), unit.to_owned()))
        {
            return Err(crate::store::no_such_unit(stream, unit, true));
        }
        let head = state.unit_rows(stream, unit).next().map(|r| {
            r.stored.status = Status::Dead;
            r.stored.last_error = Some(format!(
                "{} [skipped by an operator]",
                r.stored.last_error.as_deref().unwrap_or("")
            ));
            r.locked_by = None;
            r.locked_until = None;
            r.stored.seq
        });
        state.resume(stream, unit);
        drop(state);
        self.notify.notify_one();
        Ok(head)
    }

    async fn parked_units(
        &self,
        stream: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::store::ParkedUnit>> {
        let mut state = self.state.lock().unwrap();
        let mut parked: Vec<_> = state
            .parked
            .iter()
            .filter(|((s, _), _)| stream.is_none_or(|want| want == s))
            .map(|((s, u), (at, why))| (s.clone(), u.clone(), *at, why.clone()))
            .collect();
        parked.sort_by_key(|p| p.2);
        parked.truncate(limit);
        Ok(parked
            .into_iter()
            .map(|(s, u, parked_at, reason)| {
                let rows: Vec<i64> = state.unit_rows(&s, &u).map(|r| r.stored.seq).collect();
                crate::store::ParkedUnit {
                    head: rows.first().copied(),
                    pending: (rows.len() as u64).min(crate::store::PARKED_COUNT_CAP),
                    stream: s,
                    unit: u,
                    parked_at,
                    reason,
                }
            })
            .collect())
    }

    async fn messages(&self, f: &crate::store::MessageFilter) -> Result<Vec<StoredMessage>> {
        f.validate()?;
        let state = self.state.lock().unwrap();
        Ok(state
            .rows
            .values()
            .rev()
            .map(|r| &r.stored)
            .filter(|m| {
                let msg = &m.envelope.message;
                f.before.is_none_or(|b| m.seq < b)
                    && f.stream.as_ref().is_none_or(|s| &msg.stream == s)
                    && f.status.is_none_or(|s| m.status == s)
                    && f.key.as_ref().is_none_or(|k| msg.key.as_ref() == Some(k))
                    && f.id.is_none_or(|id| m.envelope.id == id)
                    && f.destination.as_ref().is_none_or(|d| &msg.destination == d)
            })
            .take(f.limit)
            .cloned()
            .collect())
    }

    async fn purge_dead(&self, selector: &Selector) -> Result<u64> {
        let mut state = self.state.lock().unwrap();
        let before = state.rows.len();
        state
            .rows
            .retain(|_, r| !(r.stored.status == Status::Dead && selected(selector, &r.stored)));
        Ok((before - state.rows.len()) as u64)
    }

    async fn dead_letters(&self, stream: Option<&str>, limit: usize) -> Result<Vec<StoredMessage>> {
        let state = self.state.lock().unwrap();
        Ok(state
            .rows
            .values()
            .filter(|r| {
                r.stored.status == Status::Dead
                    && stream.is_none_or(|s| s == r.stored.envelope.message.stream)
            })
            .take(limit)
            .map(|r| r.stored.clone())
            .collect())
    }

    async fn clean(
        &self,
        sent_before: SystemTime,
        limit: usize,
        include_dead: bool,
    ) -> Result<u64> {
        let mut state = self.state.lock().unwrap();
        let victims: Vec<i64> = state
            .rows
            .values()
            .filter(|r| match r.stored.status {
                Status::Sent => r.stored.sent_at.is_some_and(|t| t < sent_before),
                Status::Dead => include_dead && r.stored.envelope.created_at < sent_before,
                Status::Pending => false,
            })
            .take(limit)
            .map(|r| r.stored.seq)
            .collect();
        for seq in &victims {
            state.rows.remove(seq);
        }
        Ok(victims.len() as u64)
    }

    async fn stats(&self) -> Result<Stats> {
        let state = self.state.lock().unwrap();
        let mut map: BTreeMap<String, StreamStats> = BTreeMap::new();
        for r in state.rows.values() {
            let s = &r.stored;
            let e = map
                .entry(s.envelope.message.stream.clone())
                .or_insert_with(|| StreamStats {
                    stream: s.envelope.message.stream.clone(),
                    ..Default::default()
                });
            match s.status {
                Status::Pending => {
                    e.pending += 1;
                    let t = s.envelope.created_at;
                    e.oldest_pending = Some(e.oldest_pending.map_or(t, |o| o.min(t)));
                }
                Status::Sent => e.sent += 1,
                Status::Dead => e.dead += 1,
            }
        }
        Ok(Stats {
            streams: map.into_values().collect(),
        })
    }

    async fn get(&self, seq: i64) -> Result<Option<StoredMessage>> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .rows
            .get(&seq)
            .map(|r| r.stored.clone()))
    }
}
