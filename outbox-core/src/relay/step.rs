//! One batch: claim, quarantine, isolate a crash-loop suspect, publish in waves, park, settle.
//! The decisions are [`plan`](super::plan)'s; this module makes the store and publisher
//! calls between them and keeps the tally.

use std::time::Instant;

use crate::error::Result;
use crate::error::{Error, ErrorKind, Retry};
use crate::message::StoredMessage;
use crate::observer::{Event, PublishPath};
use crate::publisher::{publish_with_timeout, Publisher};
use crate::retry::Decision;
use crate::store::{Claim, Claimed, Failure, Outcome, Quarantined, Store};

use super::plan::{self, RowResult, Waves};
use super::{BatchReport, Relay};

/// Rows of each keep-order unit a claim reads for a publisher that keeps a batch's order
/// ([`Claim::depth`]): a batch of 100 then spans about 7 units instead of 100, at a cost of at
/// most 16 rows' sizes read per unit locked.
const UNIT_DEPTH: usize = 16;

/// What a batch records: its report, the rows published, the outcomes of the others, and
/// the heads whose units are to be parked.
struct Tally<'m> {
    report: BatchReport,
    done: Vec<i64>,
    failures: Vec<Failure>,
    parks: Vec<(&'m StoredMessage, Error)>,
    out_of_lease: usize,
}

impl Tally<'_> {
    /// A batch of `claimed` rows of which `quarantined` were dead-lettered unpublished.
    fn new(claimed: usize, quarantined: Vec<Failure>) -> Self {
        Self {
            report: BatchReport {
                claimed,
                quarantined: quarantined.len(),
                dead: quarantined.len(),
                ..Default::default()
            },
            done: Vec::new(),
            failures: quarantined,
            parks: Vec::new(),
            out_of_lease: 0,
        }
    }

    fn release(&mut self, seq: i64) {
        self.report.released += 1;
        self.failures.push(plan::release(seq));
    }
}

impl<S: Store, P: Publisher> Relay<S, P> {
    pub(super) async fn step_inner(&self) -> Result<BatchReport> {
        let started = Instant::now();
        let claimed = self.claim().await?;
        if claimed.is_empty() {
            return Ok(BatchReport::default());
        }
        let count = claimed.len();
        let (messages, quarantined) = self.quarantine(claimed);
        let mut units = plan::units(messages);
        let isolated = plan::isolate_suspect(&mut units);
        let mut tally = Tally::new(count, quarantined);
        let mut waves = Waves::new(&units);
        if let Some(isolated) = isolated {
            if !self
                .publish_suspect(&units[0][0], isolated, &mut tally)
                .await?
            {
                waves = Waves::none(&units);
            }
        }
        self.publish_waves(started, &mut waves, &mut tally).await;
        self.park(&tally.parks, &mut tally.report).await;
        if !tally.done.is_empty() || !tally.failures.is_empty() {
            self.settle_batch(started, &tally.done, &tally.failures)
                .await?;
        }
        metrics::histogram!("outbox_batch_seconds").record(started.elapsed().as_secs_f64());
        self.adapt(tally.out_of_lease, tally.report.claimed);
        Ok(tally.report)
    }

    async fn claim(&self) -> Result<Vec<Claimed>> {
        let cfg = &self.config;
        let limit = self.batch_limit();
        // A publisher that keeps a batch's order sends a unit's run in one call: a claim of a
        // few units' runs fills the batch as well as one row from each of `limit` units, and
        // leaves the other units to other relays and batches. One that does not gets a wave
        // (one row per unit) per call, so it is given as many units as possible.
        let depth = if self.publisher.ordered_batches() {
            UNIT_DEPTH.min(limit)
        } else {
            1
        };
        let claim = Claim {
            owner: self.owner.clone(),
            streams: cfg.streams.clone(),
            limit,
            lease: cfg.lease,
            max_row_bytes: cfg.delivery.max_payload_bytes,
            max_batch_bytes: cfg.max_batch_bytes,
            depth,
        };
        self.store_call("claim", self.store.claim(&claim)).await
    }

    /// Rows are input: one that does not decode, or that breaks the enqueue rules, is
    /// dead-lettered unpublished and the rest of the batch goes on.
    fn quarantine(&self, claimed: Vec<Claimed>) -> (Vec<StoredMessage>, Vec<Failure>) {
        let limit = self.config.delivery.max_payload_bytes;
        let mut messages = Vec::with_capacity(claimed.len());
        let mut quarantined = Vec::new();
        for row in claimed {
            let checked = row.and_then(|m| match m.envelope.message.validate(limit) {
                Ok(()) => Ok(m),
                Err(e) => Err(Quarantined {
                    seq: m.seq,
                    id: Some(m.envelope.id.to_string()),
                    reason: format!("breaks the enqueue rules: {}", e.message()),
                }),
            });
            match checked {
                Ok(m) => messages.push(m),
                Err(q) => {
                    self.observers.emit(&Event::Quarantined {
                        seq: q.seq,
                        id: q.id.as_deref(),
                        reason: &q.reason,
                    });
                    quarantined.push(Failure {
                        seq: q.seq,
                        error: format!("quarantined: {}", q.reason),
                        outcome: Outcome::Dead,
                    });
                }
            }
        }
        (messages, quarantined)
    }

    /// A crash-loop suspect (see [`plan::isolate_suspect`]) is published alone: the other
    /// units are given back now, before the publish, so only the row in flight keeps counting
    /// if it crashes this relay too. A suspect whose claims before this one reach the retry
    /// budget is failed without being published (its unit's policy applies: dead letter,
    /// block or park) instead of taking every relay of the fleet down in turn. Returns
    /// whether to publish it.
    async fn publish_suspect<'m>(
        &self,
        head: &'m StoredMessage,
        isolated: plan::Isolated,
        tally: &mut Tally<'m>,
    ) -> Result<bool> {
        metrics::counter!("outbox_suspects_total").increment(1);
        let given_back: Vec<Failure> = isolated.given_back.into_iter().map(plan::release).collect();
        tally.report.released += given_back.len();
        if !given_back.is_empty() {
            self.store_call(
                "settle",
                self.store.settle(&self.owner, &[], false, &given_back),
            )
            .await?;
        }
        for seq in isolated.behind {
            tally.release(seq);
        }
        let lost = head.claims - 1;
        tracing::warn!(seq = head.seq, id = %head.envelope.id, lost, "a claim of this message ended without an outcome (its relay stopped): publishing it alone");
        if lost < self.config.delivery.retry.max_attempts {
            return Ok(true);
        }
        metrics::counter!("outbox_crash_loops_total").increment(1);
        let error = Error::new(
            ErrorKind::Publish,
            Retry::Permanent,
            format!(
                "crash loop: claimed {lost} times before without an outcome (the relays that took it stopped while publishing it); not published again"
            ),
        );
        self.record_failure(head, error, tally);
        Ok(false)
    }

    /// Publishes wave after wave while the lease leaves room for another publish; what is
    /// left then is given back.
    async fn publish_waves<'m>(
        &self,
        started: Instant,
        waves: &mut Waves<'m>,
        tally: &mut Tally<'m>,
    ) {
        let cfg = &self.config;
        let ordered = self.publisher.ordered_batches();
        while !waves.is_done() {
            if started.elapsed() + cfg.delivery.publish_timeout >= cfg.lease.mul_f64(0.9) {
                let rest: Vec<i64> = waves.remaining().map(|m| m.seq).collect();
                tally.out_of_lease += rest.len();
                for seq in rest {
                    tally.release(seq);
                }
                break;
            }
            let wave = waves.next(ordered, |m| self.refusal(m, ordered));
            for (m, (error, tampered)) in wave.refused {
                if tampered {
                    self.observers.emit(&Event::Tampered {
                        seq: m.seq,
                        id: m.envelope.id,
                        error: &error,
                    });
                }
                self.record_failure(m, error, tally);
            }
            let results = if wave.envelopes.is_empty() {
                Vec::new()
            } else {
                let lens: Vec<usize> = wave.runs.iter().map(|&(_, len)| len).collect();
                let timeout = cfg.delivery.publish_timeout;
                publish_with_timeout(&self.publisher, &wave.envelopes, Some(&lens), timeout).await
            };
            for result in waves.apply(&wave.runs, results) {
                match result {
                    RowResult::Published(m) => {
                        tally.report.published += 1;
                        tally.done.push(m.seq);
                        self.observers.emit(&Event::Published {
                            envelope: &m.envelope,
                            path: PublishPath::Relay,
                        });
                    }
                    RowResult::Failed(m, error) => self.record_failure(m, error, tally),
                    RowResult::Gap(m) => {
                        let (stream, unit) = m.ordering_unit();
                        metrics::counter!("outbox_order_gaps_total").increment(1);
                        tracing::warn!(%stream, %unit, head = %m.envelope.id,
                            "the publisher took a unit's later message after refusing an earlier one in the same batch: consumers may see them out of order");
                    }
                }
            }
            for m in waves.finish() {
                tally.release(m.seq);
            }
        }
    }

    /// Why `m` may not be published in this wave: it does not verify (`true`: tampered), or a
    /// publisher that keeps a batch's order would refuse it.
    fn refusal(&self, m: &StoredMessage, ordered: bool) -> Option<(Error, bool)> {
        match self.verify(m) {
            Err(error) => Some((error, true)),
            Ok(()) if ordered => self
                .publisher
                .check_message(&m.envelope)
                .err()
                .map(|e| (e, false)),
            Ok(()) => None,
        }
    }

    /// Park before settling, while this relay still leases the units: a settled unit could
    /// be claimed again before it was parked. A unit that fails to park is retried after its
    /// head's backoff, and parked at its next failure.
    async fn park(&self, parks: &[(&StoredMessage, Error)], report: &mut BatchReport) {
        for (m, error) in parks {
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
    }

    fn record_failure<'m>(&self, m: &'m StoredMessage, error: Error, tally: &mut Tally<'m>) {
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
        tally.report.failed += 1;
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
                // batch is settled (see `park`).
                let after = cfg.delivery.retry.delay(attempts);
                tally.failures.push(Failure {
                    seq: m.seq,
                    error: error.to_string(),
                    outcome: Outcome::Retry { after },
                });
                tally.parks.push((m, error));
                return;
            }
            Decision::Dead => {
                tally.report.dead += 1;
                self.observers.emit(&Event::DeadLettered {
                    envelope: env,
                    error: &error,
                    path: PublishPath::Relay,
                });
                Outcome::Dead
            }
        };
        tally.failures.push(Failure {
            seq: m.seq,
            error: error.to_string(),
            outcome,
        });
    }
}
