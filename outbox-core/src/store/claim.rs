//! What the relay and the writers hand a store: the claim, the rows to insert, the outcomes.

use std::time::{Duration, SystemTime};

use crate::message::{Envelope, Status, StoredMessage};
use crate::strategy::{Exhausted, Order, PublishedBy};

/// Which streams a relay serves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StreamFilter {
    /// Every stream.
    #[default]
    All,
    /// Only these streams (never empty: an empty list is rejected by the relay builder).
    Only(Vec<String>),
}

impl StreamFilter {
    /// True when `stream` passes the filter.
    pub fn matches(&self, stream: &str) -> bool {
        match self {
            StreamFilter::All => true,
            StreamFilter::Only(list) => list.iter().any(|s| s == stream),
        }
    }
}

/// A request to lease a batch of due messages.
#[derive(Debug, Clone)]
pub struct Claim {
    /// Who holds the lease (a relay's unique id).
    pub owner: String,
    /// Which streams.
    pub streams: StreamFilter,
    /// At most this many rows.
    pub limit: usize,
    /// How long the lease lasts; after that another relay may take the rows.
    pub lease: Duration,
    /// A row whose payload alone takes more bytes is returned [`Quarantined`] without its
    /// payload being read (it is over the limit however its headers are counted). Rows that
    /// are loaded are checked by the relay against the one definition of a message's size,
    /// [`Message::size`](crate::Message::size), as at enqueue.
    pub max_row_bytes: usize,
    /// The rows of one claim take at most this many bytes (payload plus headers), or one row
    /// when a single row is larger; the rest waits for the next claim.
    pub max_batch_bytes: usize,
    /// How deep a claim reads each keep-order unit: at least this many of its first rows
    /// (more when few units are due, up to `limit ÷ units`), and the batch is filled unit by
    /// unit, the unit whose first row is oldest first. Units the batch did not reach stay free
    /// for other relays.
    ///
    /// `1` (the default) spreads a batch over as many units as it can: right for a publisher
    /// that sends one row per unit per call. A relay whose publisher keeps a batch's order
    /// ([`ordered_batches`](crate::Publisher::ordered_batches)) asks for more, so a claim
    /// takes a few units' runs instead of one row from each of `limit` units, and several
    /// relays over few units each find units of their own. A store reads at most `limit ×
    /// depth` rows' sizes for it.
    pub depth: usize,
}

impl Claim {
    /// A claim with the default byte limits (1 MiB a row, 32 MiB a batch).
    pub fn new(
        owner: impl Into<String>,
        streams: StreamFilter,
        limit: usize,
        lease: Duration,
    ) -> Self {
        Self {
            owner: owner.into(),
            streams,
            limit,
            lease,
            max_row_bytes: 1024 * 1024,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            depth: 1,
        }
    }

    /// Which of `sizes` (in claim order) this claim takes: oversized rows are always taken
    /// (to be quarantined; they cost nothing), the others while the running total stays within
    /// `max_batch_bytes` (always at least one).
    pub fn within_budget(&self, sizes: &[usize]) -> Vec<bool> {
        let mut total = 0usize;
        let mut any = false;
        sizes
            .iter()
            .map(|&size| {
                if size > self.max_row_bytes {
                    return true;
                }
                let fits = !any || total + size <= self.max_batch_bytes;
                if fits {
                    total += size;
                    any = true;
                }
                fits
            })
            .collect()
    }

    /// How many of its first rows a claim reads of each of `units` locked keep-order units:
    /// an even share of the limit, at least [`depth`](Self::depth) (itself at most the limit).
    pub fn rows_per_unit(&self, units: usize) -> usize {
        let limit = self.limit.max(1);
        (limit / units.max(1)).max(self.depth.clamp(1, limit))
    }

    /// Puts candidate rows in claim order: unit by unit, the unit whose first row is oldest
    /// first, each unit in `seq` order; a row of no unit (publish-on-commit) stands alone.
    /// `key` gives a row's `seq` and its unit's index. With [`depth`](Self::depth) 1 and an
    /// even share per unit this takes the same rows as plain `seq` order.
    pub fn sort_unit_by_unit<T>(rows: &mut [T], key: impl Fn(&T) -> (i64, Option<usize>)) {
        let mut heads: std::collections::HashMap<usize, i64> = std::collections::HashMap::new();
        for r in rows.iter() {
            if let (seq, Some(u)) = key(r) {
                heads
                    .entry(u)
                    .and_modify(|h| *h = (*h).min(seq))
                    .or_insert(seq);
            }
        }
        rows.sort_by_key(|r| {
            let (seq, unit) = key(r);
            (
                unit.and_then(|u| heads.get(&u).copied()).unwrap_or(seq),
                seq,
            )
        });
    }

    /// The reason a row of `size` bytes is quarantined.
    pub fn oversized(&self, size: usize) -> String {
        format!(
            "payload and headers take {size} bytes, over the limit of {} bytes (not loaded)",
            self.max_row_bytes
        )
    }
}

/// Default byte budget of one claim.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// A claimed row that cannot be read back as a message (a column that does not decode:
/// headers that are not a JSON map of strings, an unknown strategy, an id that is not a UUID,
/// a name that is not UTF-8, a negative count, ...). Rows are input: another service, an
/// operator or an attacker may have written them. The relay dead-letters a quarantined row
/// with `reason` as its error and goes on with the rest of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The row's sequence number.
    pub seq: i64,
    /// The row's id as stored, when it could be read as text.
    pub id: Option<String>,
    /// Which column failed and why.
    pub reason: String,
}

/// One row of a claim: the message, or why it could not be read.
pub type Claimed = std::result::Result<StoredMessage, Quarantined>;

/// A row to insert: built by [`Outbox::prepare`](crate::Outbox::prepare), written by a backend.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Id, creation time and message.
    pub envelope: Envelope,
    /// How it is claimed (the strategy's unit answer).
    pub order: Order,
    /// Its ordering unit within the stream (empty: the stream's unit, or unordered).
    pub unit: String,
    /// What exhaustion does (the strategy's answer).
    pub exhausted: Exhausted,
    /// Who publishes it first.
    pub published_by: PublishedBy,
    /// HMAC signature when signing is on.
    pub signature: Option<String>,
    /// Initial status (pending, or dead for a permanent on-commit failure).
    pub status: Status,
    /// Attempts already made (non-zero only for rows written after a failed on-commit publish).
    pub attempts: u32,
    /// Delay from the write until the first relay attempt, by the database's clock (a
    /// schedule's delay, or the backoff after a failed on-commit publish).
    pub retry_after: Duration,
    /// And not before this time, by the database's clock ([`Schedule::At`](crate::Schedule::At)).
    pub not_before: Option<SystemTime>,
    /// The error of the failed on-commit publish.
    pub last_error: Option<String>,
    /// A lease held from the start (publish-on-commit rows are leased to the committing
    /// process so that no relay races it; if it dies, the lease expires).
    pub lease: Option<(String, Duration)>,
}

/// What to do with a message whose publish failed or was skipped.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Count an attempt, store the error, and make it due again after the delay.
    Retry {
        /// Delay until the next attempt.
        after: Duration,
    },
    /// Count an attempt and move it to the dead letters.
    Dead,
    /// Give the lease back without counting an attempt (a keep-order message behind a
    /// failed head, or a batch cut short).
    Release,
}

/// A failed (or skipped) message in a batch.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The row.
    pub seq: i64,
    /// The error text stored in `last_error` (ignored for [`Outcome::Release`]).
    pub error: String,
    /// What to do.
    pub outcome: Outcome,
}
