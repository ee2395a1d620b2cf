//! What operators ask a store about: selections, listings, parked units, counts.

use std::time::SystemTime;

use crate::error::Result;
use crate::message::Status;

/// Which dead (or all) messages an admin operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// All of them.
    All,
    /// One stream's.
    Stream(String),
    /// These rows.
    Seqs(Vec<i64>),
}

/// Which rows [`StoreAdmin::messages`](crate::StoreAdmin::messages) lists: every field set narrows the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFilter {
    /// Only this stream.
    pub stream: Option<String>,
    /// Only this status.
    pub status: Option<Status>,
    /// Only this message key.
    pub key: Option<String>,
    /// Only this message id.
    pub id: Option<crate::MessageId>,
    /// Only this destination.
    pub destination: Option<String>,
    /// Keyset pagination, newest first: only rows with a smaller `seq` (the last `seq` of the
    /// previous page).
    pub before: Option<i64>,
    /// At most this many rows (1 to [`MAX_PAGE`]).
    pub limit: usize,
}

impl Default for MessageFilter {
    fn default() -> Self {
        Self {
            stream: None,
            status: None,
            key: None,
            id: None,
            destination: None,
            before: None,
            limit: 50,
        }
    }
}

/// Largest page of [`StoreAdmin::messages`](crate::StoreAdmin::messages).
pub const MAX_PAGE: usize = 500;

impl MessageFilter {
    /// A `Config` error when the page size is out of range.
    pub fn validate(&self) -> Result<()> {
        crate::error::in_range("limit", self.limit, 1, MAX_PAGE)
    }
}

/// A parked ordering unit, as [`StoreAdmin::parked_units`](crate::StoreAdmin::parked_units) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedUnit {
    /// Its stream.
    pub stream: String,
    /// Its unit within the stream.
    pub unit: String,
    /// When it was parked (by the database's clock).
    pub parked_at: SystemTime,
    /// Why: the head's last error, or the operator's reason.
    pub reason: Option<String>,
    /// Its first pending row (the one a [`StoreAdmin::skip_head`](crate::StoreAdmin::skip_head) dead-letters).
    pub head: Option<i64>,
    /// Pending rows waiting in it, counted up to [`PARKED_COUNT_CAP`].
    pub pending: u64,
}

/// `next_at` of a parked unit in the stores' unit tables: never due, so claims never read it
/// (one value for every store).
pub const PARKED_NEXT_AT: i64 = i64::MAX;

/// [`ParkedUnit::pending`] counts no further (a listing stays cheap behind a deep unit).
pub const PARKED_COUNT_CAP: u64 = 100_000;

/// Counts for one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Stream name.
    pub stream: String,
    /// Pending rows (including leased and backing-off ones).
    pub pending: u64,
    /// Sent rows still kept.
    pub sent: u64,
    /// Dead letters.
    pub dead: u64,
    /// Creation time of the oldest pending row.
    pub oldest_pending: Option<SystemTime>,
}

/// Counts per stream, sorted by stream name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// One entry per stream with at least one row.
    pub streams: Vec<StreamStats>,
}

impl Stats {
    /// Sum over all streams.
    pub fn total(&self) -> StreamStats {
        let mut t = StreamStats {
            stream: "*".into(),
            ..Default::default()
        };
        for s in &self.streams {
            t.pending += s.pending;
            t.sent += s.sent;
            t.dead += s.dead;
            t.oldest_pending = match (t.oldest_pending, s.oldest_pending) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        t
    }
}
