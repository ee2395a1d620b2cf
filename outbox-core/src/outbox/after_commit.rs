//! After the commit: [`Prepared`] rows become an [`AfterCommit`], which publishes
//! publish-on-commit messages right away and records what the broker said.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::error::{Error, Result};
use crate::message::{Envelope, Status};
use crate::observer::{Event, PublishPath};
use crate::publisher::publish_with_timeout;
use crate::retry::Decision;
use crate::store::{Failure, NewMessage, Outcome};
use crate::strategy::PublishedBy;

use super::{InFlightGuard, Shared};

/// Rows to write in the caller's transaction, from [`Outbox::prepare`](super::Outbox::prepare).
#[must_use = "write the rows in your transaction, then turn this into an AfterCommit"]
pub struct Prepared {
    pub(super) shared: Arc<Shared>,
    pub(super) rows: Vec<NewMessage>,
    pub(super) deferred: Vec<NewMessage>,
}

impl Prepared {
    /// The rows a backend writes in the transaction.
    pub fn rows(&self) -> &[NewMessage] {
        &self.rows
    }

    /// Whether [`into_after_commit`](Self::into_after_commit) needs the real `seq`s: only
    /// publish-on-commit rows are acknowledged by `seq` after publishing. When false, a backend
    /// may skip reading them back and pass any values of the right length.
    pub fn needs_seqs(&self) -> bool {
        self.rows
            .iter()
            .any(|r| r.published_by == PublishedBy::Committer)
    }

    /// Whether the [`AfterCommit`] this becomes publishes anything: publish-on-commit rows,
    /// or messages written only if their publish fails (`persist_all = false`).
    pub fn publishes_after_commit(&self) -> bool {
        !self.deferred.is_empty()
            || self
                .rows
                .iter()
                .any(|r| r.published_by == PublishedBy::Committer)
    }

    /// After the backend wrote [`rows`](Self::rows) and got their `seq`s (same order).
    pub fn into_after_commit(self, seqs: Vec<i64>) -> Result<AfterCommit> {
        if seqs.len() != self.rows.len() {
            return Err(Error::store(format!(
                "store returned {} seqs for {} rows",
                seqs.len(),
                self.rows.len()
            )));
        }
        let wake = self
            .rows
            .iter()
            .any(|r| r.published_by == PublishedBy::Relay && r.retry_after.is_zero());
        let mut items: Vec<(Option<i64>, NewMessage)> = self
            .rows
            .into_iter()
            .zip(seqs)
            .filter(|(r, _)| r.published_by == PublishedBy::Committer)
            .map(|(r, s)| (Some(s), r))
            .collect();
        items.extend(self.deferred.into_iter().map(|r| (None, r)));
        Ok(AfterCommit {
            shared: Some(self.shared),
            items,
            wake,
        })
    }
}

/// What a committed transaction owes the broker: publish-on-commit messages to publish now,
/// and whether relays should be woken for keep-order rows.
///
/// Call [`dispatch`](Self::dispatch) (or await [`publish`](Self::publish)) **after** the
/// commit succeeded; drop it on rollback. If it is dropped after a commit, rows written with
/// `persist_all = true` are published by a relay once their lease expires; with
/// `persist_all = false` the messages are lost.
#[must_use = "dispatch() after the commit, or the messages wait for a relay (or are lost with persist_all=false)"]
#[derive(Default)]
pub struct AfterCommit {
    shared: Option<Arc<Shared>>,
    items: Vec<(Option<i64>, NewMessage)>,
    wake: bool,
}

impl std::fmt::Debug for AfterCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfterCommit")
            .field("messages", &self.items.len())
            .field("wake", &self.wake)
            .finish()
    }
}

/// What an [`AfterCommit::publish`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchReport {
    /// Accepted by the broker.
    pub published: usize,
    /// Failed (left for the relay, or dead-lettered when permanent).
    pub failed: usize,
    /// Failed with `persist_all = false` and could not be written: lost.
    pub lost: usize,
}

impl AfterCommit {
    /// Nothing to publish.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Number of messages to publish on commit.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when there is nothing to publish on commit.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Add another transaction part's messages (several `enqueue` calls in one transaction).
    pub fn merge(&mut self, other: AfterCommit) {
        if self.shared.is_none() {
            self.shared = other.shared;
        }
        self.items.extend(other.items);
        self.wake |= other.wake;
    }

    /// Publish in the background on the current Tokio runtime, at most
    /// `on_commit_concurrency` batches at once per outbox, and wake local relays.
    /// [`Outbox::shutdown`](super::Outbox::shutdown) waits for these tasks. Outside a Tokio runtime nothing is
    /// published now (an error is logged): persisted rows are published by a relay once the
    /// committer's lease expires.
    pub fn dispatch(self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        if self.items.is_empty() {
            if self.wake {
                shared.store.notify_committed();
            }
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Never panic after a commit: persisted rows go to a relay once the committer's
            // lease expires; unpersisted ones (persist_all = false) cannot be saved.
            tracing::error!(
                count = self.items.len(),
                "AfterCommit::dispatch called outside a Tokio runtime: not published now; persisted rows are left to the relay"
            );
            return;
        };
        // Counted before the spawn, so a shutdown that starts right after this call waits.
        let guard = InFlightGuard::new(shared.clone());
        runtime.spawn(async move {
            let _guard = guard;
            let _permit = shared.permits.clone().acquire_owned().await;
            self.publish().await;
        });
    }

    /// Publish now and wait for the outcome (also wakes local relays).
    pub async fn publish(self) -> DispatchReport {
        let Some(shared) = self.shared else {
            return DispatchReport::default();
        };
        if self.wake {
            shared.store.notify_committed();
        }
        if self.items.is_empty() {
            return DispatchReport::default();
        }
        let span = tracing::info_span!("outbox.publish_on_commit", count = self.items.len());
        shared.publish_on_commit(self.items).instrument(span).await
    }
}

impl Shared {
    /// Publish right after the commit, then record the outcome: published rows marked sent,
    /// failed ones given their retry time or dead-lettered (or, not persisted, written now).
    pub(super) async fn publish_on_commit(
        &self,
        items: Vec<(Option<i64>, NewMessage)>,
    ) -> DispatchReport {
        let started = std::time::Instant::now();
        let cfg = &self.config;
        let Some(publisher) = &self.publisher else {
            // Unreachable: build() refuses publish-on-commit without a publisher.
            return DispatchReport::default();
        };
        let envs: Vec<&Envelope> = items.iter().map(|(_, r)| &r.envelope).collect();
        let results = publish_with_timeout(
            publisher.as_ref(),
            &envs,
            None,
            cfg.delivery.publish_timeout,
        )
        .await;
        let mut report = DispatchReport::default();
        let mut outcome = Outcomes::default();
        for ((seq, row), result) in items.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    report.published += 1;
                    self.observers.emit(&Event::Published {
                        envelope: &row.envelope,
                        path: PublishPath::OnCommit,
                    });
                    outcome.done.extend(seq);
                }
                Err(error) => {
                    report.failed += 1;
                    self.failed(seq, row, error, &mut outcome);
                }
            }
        }
        // The rows are leased to this committer for `on_commit_lease` from their insert: a
        // write that fails transiently is tried again within the half of it that surely
        // remains (the insert was a little before `started`). Past it, they stay leased and a
        // relay republishes them after the lease (a duplicate, never a loss).
        self.record(outcome, started + cfg.on_commit_lease / 2, &mut report)
            .await;
        report
    }

    /// A failed first attempt: its observers told, its outcome decided by the retry policy.
    fn failed(&self, seq: Option<i64>, row: NewMessage, error: Error, outcome: &mut Outcomes) {
        let cfg = &self.config;
        let decision = cfg.delivery.retry.decide(
            row.order,
            row.exhausted,
            1,
            &error,
            cfg.delivery.dead_letter_keep_order,
        );
        let dead = decision == Decision::Dead;
        let env = &row.envelope;
        self.observers.emit(&Event::Failed {
            envelope: env,
            error: &error,
            attempts: 1,
            will_retry: !dead,
            path: PublishPath::OnCommit,
        });
        if dead {
            self.observers.emit(&Event::DeadLettered {
                envelope: env,
                error: &error,
                path: PublishPath::OnCommit,
            });
        }
        let after = match decision {
            Decision::Retry(d) | Decision::Stuck(d) => d,
            // Publish-on-commit rows have no unit to park (refused at enqueue).
            Decision::Dead | Decision::Park => Duration::ZERO,
        };
        match seq {
            Some(seq) => outcome.failures.push(Failure {
                seq,
                error: error.to_string(),
                outcome: if dead {
                    Outcome::Dead
                } else {
                    Outcome::Retry { after }
                },
            }),
            None => outcome.inserts.push(NewMessage {
                status: if dead { Status::Dead } else { Status::Pending },
                attempts: 1,
                retry_after: after,
                last_error: Some(error.to_string()),
                lease: None,
                ..row
            }),
        }
    }

    /// Records what publishing did, each part retried until `deadline` when it fails
    /// transiently.
    async fn record(
        &self,
        outcome: Outcomes,
        deadline: std::time::Instant,
        report: &mut DispatchReport,
    ) {
        let Outcomes {
            done,
            failures,
            inserts,
        } = outcome;
        if !done.is_empty() {
            let delete = self.config.delivery.delete_after_send;
            let marked =
                crate::retry::until_recorded(deadline, "marking on-commit messages sent", || {
                    self.store.complete(&done, delete)
                })
                .await;
            if let Err(e) = marked {
                tracing::warn!(error = %e, count = done.len(), "could not mark on-commit messages sent");
            }
        }
        if !failures.is_empty() {
            let recorded =
                crate::retry::until_recorded(deadline, "recording on-commit failures", || {
                    self.store.fail(&self.owner, &failures)
                })
                .await;
            if let Err(e) = recorded {
                tracing::warn!(error = %e, count = failures.len(), "could not record on-commit failures; the relay retries them after the lease");
            }
        }
        if !inserts.is_empty() {
            if let Err(e) = self.store.insert(&inserts).await {
                report.lost += inserts.len();
                tracing::error!(error = %e, count = inserts.len(), "persist_all=false: failed on-commit messages could not be written and are LOST");
            }
        }
    }
}

/// What publishing after a commit did: rows published (by `seq`), failures of persisted
/// rows, and failed rows that were not persisted (`persist_all = false`) to write now.
#[derive(Default)]
struct Outcomes {
    done: Vec<i64>,
    failures: Vec<Failure>,
    inserts: Vec<NewMessage>,
}
