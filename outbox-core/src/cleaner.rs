//! Deletes old sent rows (jaiminho's `event_cleaner`), in bounded batches.

use std::future::Future;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::store::StoreAdmin;

/// Longest retention a cleaner takes: 100 years.
pub const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `older_than` before now: what a clean deletes below. A retention over
/// [`MAX_RETENTION`] is a `Config` error naming `what`, not an overflow.
pub fn cutoff(what: &str, older_than: Duration) -> Result<SystemTime> {
    crate::error::in_range(what, older_than, Duration::ZERO, MAX_RETENTION)?;
    SystemTime::now()
        .checked_sub(older_than)
        .ok_or_else(|| Error::config(format!("{what} reaches before the epoch")))
}

/// Default retention: 7 days (jaiminho's `TIME_TO_DELETE`).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Deletes sent rows older than a retention. Pending rows are never touched; dead rows only
/// with [`include_dead`](Self::include_dead).
#[derive(Clone)]
pub struct Cleaner<S> {
    store: S,
    retention: Duration,
    batch_size: usize,
    include_dead: bool,
    inboxes: Vec<(std::sync::Arc<dyn crate::InboxAdmin>, Duration)>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Cleaner<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cleaner")
            .field("store", &self.store)
            .field("retention", &self.retention)
            .field("batch_size", &self.batch_size)
            .field("include_dead", &self.include_dead)
            .field(
                "inboxes",
                &self
                    .inboxes
                    .iter()
                    .map(|(t, h)| (t.table().to_owned(), *h))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<S: StoreAdmin> Cleaner<S> {
    /// Retention 7 days, batches of 1000 rows, dead rows kept.
    pub fn new(store: S) -> Self {
        Self {
            store,
            retention: DEFAULT_RETENTION,
            batch_size: 1000,
            include_dead: false,
            inboxes: Vec::new(),
        }
    }

    /// Also delete an inbox table's marks of messages processed more than `horizon` ago
    /// (in the same bounded batches). The horizon must outlast the broker's redelivery
    /// window: a message delivered again after its mark is gone is processed again.
    pub fn inbox(mut self, table: impl crate::InboxAdmin + 'static, horizon: Duration) -> Self {
        self.inboxes.push((std::sync::Arc::new(table), horizon));
        self
    }

    /// Keep sent rows this long (at most 100 years: a longer one is checked by
    /// [`run_once`](Self::run_once), which then fails with a `Config` error).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Delete at most this many rows per statement (1 to 100 000).
    pub fn batch_size(mut self, n: usize) -> Result<Self> {
        crate::error::in_range("cleaner batch_size", n, 1, 100_000)?;
        self.batch_size = n;
        Ok(self)
    }

    /// Also delete dead letters created before the retention.
    pub fn include_dead(mut self, yes: bool) -> Self {
        self.include_dead = yes;
        self
    }

    /// Delete everything past the retention, one bounded batch at a time. Returns how many.
    pub async fn run_once(&self) -> Result<u64> {
        Ok(self.run_once_with(|_| true).await?.0)
    }

    /// [`run_once`](Self::run_once), calling `after_batch` with the running total after each
    /// batch; it returns false to stop there (an operator's Ctrl-C). Each batch is one
    /// statement, so a stop leaves no half-done batch. Returns the rows deleted and whether
    /// everything past the retention is gone.
    pub async fn run_once_with(
        &self,
        mut after_batch: impl FnMut(u64) -> bool,
    ) -> Result<(u64, bool)> {
        let before = cutoff("cleaner retention", self.retention)?;
        for (_, horizon) in &self.inboxes {
            cutoff("inbox retention", *horizon)?;
        }
        let mut total = 0;
        loop {
            let n = self
                .store
                .clean(before, self.batch_size, self.include_dead)
                .await?;
            total += n;
            metrics::counter!("outbox_cleaned_total").increment(n);
            if n < self.batch_size as u64 {
                break;
            }
            if !after_batch(total) {
                return Ok((total, false));
            }
        }
        for (table, horizon) in &self.inboxes {
            loop {
                let n = table.clean(*horizon, self.batch_size).await?;
                total += n;
                metrics::counter!("outbox_inbox_cleaned_total").increment(n);
                if n < self.batch_size as u64 {
                    break;
                }
                if !after_batch(total) {
                    return Ok((total, false));
                }
            }
        }
        Ok((total, true))
    }

    /// Clean every `interval` until `shutdown` completes; errors are logged and retried.
    pub async fn run(&self, interval: Duration, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            match self.run_once().await {
                Ok(n) => tracing::info!(deleted = n, "outbox cleaner pass"),
                Err(e) => tracing::warn!(error = %e, "outbox cleaner pass failed"),
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
