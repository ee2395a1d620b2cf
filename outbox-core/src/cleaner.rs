//! Deletes old sent rows (jaiminho's `event_cleaner`), in bounded batches.

use std::future::Future;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::store::Store;

/// Default retention: 7 days (jaiminho's `TIME_TO_DELETE`).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Deletes sent rows older than a retention. Pending rows are never touched; dead rows only
/// with [`include_dead`](Self::include_dead).
#[derive(Debug, Clone)]
pub struct Cleaner<S> {
    store: S,
    retention: Duration,
    batch_size: usize,
    include_dead: bool,
}

impl<S: Store> Cleaner<S> {
    /// Retention 7 days, batches of 1000 rows, dead rows kept.
    pub fn new(store: S) -> Self {
        Self {
            store,
            retention: DEFAULT_RETENTION,
            batch_size: 1000,
            include_dead: false,
        }
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
        crate::error::in_range(
            "cleaner retention",
            self.retention,
            Duration::ZERO,
            Duration::from_secs(100 * 365 * 24 * 3600),
        )?;
        let before = SystemTime::now()
            .checked_sub(self.retention)
            .ok_or_else(|| Error::config("cleaner retention reaches before the epoch"))?;
        let mut total = 0;
        loop {
            let n = self
                .store
                .clean(before, self.batch_size, self.include_dead)
                .await?;
            total += n;
            metrics::counter!("outbox_cleaned_total").increment(n);
            if n < self.batch_size as u64 {
                return Ok((total, true));
            }
            if !after_batch(total) {
                return Ok((total, false));
            }
        }
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
