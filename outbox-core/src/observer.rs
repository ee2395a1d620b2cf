//! Observer hooks (jaiminho's signals), plus the metrics and tracing every event also emits.

use std::sync::Arc;

use crate::error::Error;
use crate::message::{Envelope, MessageId};

/// Which path published (or failed to publish) a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PublishPath {
    /// Right after the commit, from the committing process.
    OnCommit,
    /// From a relay.
    Relay,
}

impl PublishPath {
    /// Label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PublishPath::OnCommit => "on_commit",
            PublishPath::Relay => "relay",
        }
    }
}

/// Something that happened to a message.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// The broker accepted it.
    Published {
        /// The message.
        envelope: &'a Envelope,
        /// Who published it.
        path: PublishPath,
    },
    /// A publish failed.
    Failed {
        /// The message.
        envelope: &'a Envelope,
        /// Why.
        error: &'a Error,
        /// Attempts so far, including this one.
        attempts: u32,
        /// Whether it will be retried.
        will_retry: bool,
        /// Who tried.
        path: PublishPath,
    },
    /// It was moved to the dead letters.
    DeadLettered {
        /// The message.
        envelope: &'a Envelope,
        /// The last error.
        error: &'a Error,
        /// Who gave up.
        path: PublishPath,
    },
    /// A keep-order head cannot be delivered and blocks its ordering unit.
    Stuck {
        /// The head message.
        envelope: &'a Envelope,
        /// The last error.
        error: &'a Error,
        /// Attempts so far.
        attempts: u32,
    },
    /// A claimed row could not be read back, or broke the enqueue rules (a destination with
    /// a line break, a name with whitespace around it, an oversized payload, ...): it was
    /// dead-lettered without being published, and the rest of its batch went on.
    Quarantined {
        /// The row's sequence number.
        seq: i64,
        /// The row's id as stored, when readable.
        id: Option<&'a str>,
        /// Which column or rule failed, and why.
        reason: &'a str,
    },
    /// A keep-order unit was parked: by a relay, after its head exhausted its attempts under
    /// [`Exhausted::Park`](crate::Exhausted::Park) (`envelope` is the head), or by an operator
    /// through [`Outbox::park_unit`](crate::Outbox::park_unit).
    Parked {
        /// The unit's stream.
        stream: &'a str,
        /// The unit.
        unit: &'a str,
        /// Why.
        reason: &'a str,
        /// The head that exhausted its attempts, when a relay parked it.
        envelope: Option<&'a Envelope>,
    },
    /// An operator resumed a parked unit through [`Outbox::resume_unit`](crate::Outbox::resume_unit)
    /// or [`Outbox::skip_head`](crate::Outbox::skip_head).
    Resumed {
        /// The unit's stream.
        stream: &'a str,
        /// The unit.
        unit: &'a str,
        /// The head dead-lettered first, when skipped.
        skipped: Option<i64>,
    },
    /// A stored row's signature did not verify; it will never be published.
    Tampered {
        /// The row's sequence number.
        seq: i64,
        /// The id the row claims.
        id: MessageId,
        /// Why verification failed.
        error: &'a Error,
    },
}

/// Receives [`Event`]s. Keep it fast: it runs on the publishing path.
pub trait Observer: Send + Sync {
    /// Called once per event.
    fn on_event(&self, event: &Event<'_>);
}

impl<F: Fn(&Event<'_>) + Send + Sync> Observer for F {
    fn on_event(&self, event: &Event<'_>) {
        self(event)
    }
}

/// The observers of one outbox or relay, plus metrics and log lines.
#[derive(Clone, Default)]
pub(crate) struct Observers(pub(crate) Vec<Arc<dyn Observer>>);

impl Observers {
    pub(crate) fn emit(&self, event: &Event<'_>) {
        match event {
            Event::Published { envelope, path } => {
                metrics::counter!("outbox_published_total", "path" => path.as_str()).increment(1);
                // Commit-to-publish lag (enqueue time to broker acknowledgement).
                if let Ok(lag) = envelope.created_at.elapsed() {
                    metrics::histogram!("outbox_delivery_lag_seconds", "path" => path.as_str())
                        .record(lag.as_secs_f64());
                }
            }
            Event::Failed {
                envelope,
                error,
                attempts,
                will_retry,
                path,
            } => {
                metrics::counter!("outbox_failed_total", "path" => path.as_str()).increment(1);
                tracing::warn!(id = %envelope.id, stream = %envelope.message.stream, attempts, will_retry, path = path.as_str(), %error, "publish failed");
            }
            Event::DeadLettered {
                envelope,
                error,
                path,
            } => {
                metrics::counter!("outbox_dead_lettered_total", "path" => path.as_str())
                    .increment(1);
                tracing::error!(id = %envelope.id, stream = %envelope.message.stream, %error, "message dead-lettered");
            }
            Event::Stuck {
                envelope,
                error,
                attempts,
            } => {
                metrics::counter!("outbox_stuck_total").increment(1);
                tracing::error!(id = %envelope.id, stream = %envelope.message.stream, key = envelope.message.key.as_deref().unwrap_or(""), attempts, %error, "keep-order unit is stuck behind this message");
            }
            Event::Quarantined { seq, id, reason } => {
                metrics::counter!("outbox_quarantined_total").increment(1);
                tracing::error!(seq, id = id.unwrap_or("<unreadable>"), %reason, "quarantined a row that is not a valid message: dead-lettered, not published");
            }
            Event::Parked {
                stream,
                unit,
                reason,
                envelope,
            } => {
                metrics::counter!("outbox_parked_total").increment(1);
                tracing::error!(%stream, %unit, %reason, head = %envelope.map_or_else(|| "-".to_owned(), |e| e.id.to_string()), "keep-order unit parked: its messages wait, in order, for an operator to resume it or skip its head");
            }
            Event::Resumed {
                stream,
                unit,
                skipped,
            } => {
                metrics::counter!("outbox_resumed_total").increment(1);
                tracing::info!(%stream, %unit, ?skipped, "parked unit resumed");
            }
            Event::Tampered { seq, id, error } => {
                metrics::counter!("outbox_tampered_total").increment(1);
                tracing::error!(seq, %id, %error, "refusing to publish a row whose signature does not verify");
            }
        }
        for o in &self.0 {
            o.on_event(event);
        }
    }
}
