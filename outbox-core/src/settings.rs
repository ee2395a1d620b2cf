//! Settings: [`Delivery`] (shared by the enqueue side and the relays) and [`Config`] (the
//! enqueue side). Both the outbox and the relay depend on this module, never on each other.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::{in_range, Error, Result};
use std::sync::Arc;

use crate::retry::RetryPolicy;
use crate::signing::Signer;
use crate::strategy::{PublishOnCommit, Strategy};

/// Settings the enqueue side ([`Config`]) and the relays ([`RelayConfig`](crate::RelayConfig))
/// share: one home, copied whole by [`RelayBuilder::with_config`](crate::RelayBuilder::with_config)
/// (and so by [`Outbox::relay`](crate::Outbox::relay)).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Deadline of one publish call (one message or one batch). Default: 10 s.
    pub publish_timeout: Duration,
    /// Backoff and attempts. Default: [`RetryPolicy::default`].
    pub retry: RetryPolicy,
    /// Delete rows once published (true) or mark them sent and let the cleaner remove them
    /// after the retention (false). Default: false.
    pub delete_after_send: bool,
    /// Keep-order heads that exhaust their attempts (or fail permanently) are dead-lettered
    /// so their unit moves on (true), instead of staying blocked and reported stuck (false).
    /// Default: false.
    pub dead_letter_keep_order: bool,
    /// Largest accepted payload plus headers: a larger message is refused at enqueue, and a
    /// larger claimed row is quarantined (dead-lettered unpublished). Default: 1 MiB.
    pub max_payload_bytes: usize,
    /// HMAC signing at enqueue and verification at the relay. A relay publishes a row that
    /// carries a signature only if it verifies with one of these keys: a changed row, a row
    /// signed with an unknown key, or a signed row while no key is configured is reported
    /// [`Event::Tampered`](crate::Event::Tampered) and never published. Default: off.
    pub signer: Option<Signer>,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            publish_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            delete_after_send: false,
            dead_letter_keep_order: false,
            max_payload_bytes: 1024 * 1024,
            signer: None,
        }
    }
}

impl Delivery {
    pub(crate) fn validate(&self) -> Result<()> {
        self.retry.validate()?;
        const HOUR: Duration = Duration::from_secs(3600);
        in_range("max_payload_bytes", self.max_payload_bytes, 1, 1 << 30)?;
        in_range(
            "publish_timeout",
            self.publish_timeout,
            Duration::from_millis(1),
            HOUR,
        )?;
        Ok(())
    }
}

/// Enqueue-side settings, with the [`Delivery`] settings its relays share.
#[derive(Debug, Clone)]
pub struct Config {
    /// Strategy of streams without an override. Default: [`PublishOnCommit`].
    pub default_strategy: Arc<dyn Strategy>,
    /// Per-stream overrides (jaiminho's `save_to_outbox_stream(stream, strategy)`).
    /// Default: none.
    pub stream_strategies: HashMap<String, Arc<dyn Strategy>>,
    /// Furthest ahead a message may be scheduled ([`Message::deliver_at`](crate::Message::deliver_at),
    /// [`Message::delay`](crate::Message::delay)): a schedule beyond it is refused at enqueue,
    /// so a unit-of-measure mistake does not hold a keep-order unit for years. Default: 30 days.
    pub max_delay: Duration,
    /// Publish-on-commit: write every message in the transaction (true), or only those whose
    /// after-commit publish failed (false, jaiminho's default). With false, a crash between
    /// the commit and the publish LOSES the message. Default: true.
    pub persist_all: bool,
    /// How long a publish-on-commit row is reserved for the committing process before a
    /// relay may take it. Default: 30 s.
    pub on_commit_lease: Duration,
    /// Publish-on-commit batches in flight at once per [`Outbox`](crate::Outbox). Default: 64.
    pub on_commit_concurrency: usize,
    /// Settings shared with the relays.
    pub delivery: Delivery,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            default_strategy: Arc::new(PublishOnCommit),
            stream_strategies: HashMap::new(),
            max_delay: Duration::from_secs(30 * 24 * 3600),
            persist_all: true,
            on_commit_lease: Duration::from_secs(30),
            on_commit_concurrency: 64,
            delivery: Delivery::default(),
        }
    }
}

impl Config {
    /// The strategy of `stream`.
    pub fn strategy_for(&self, stream: &str) -> &dyn Strategy {
        self.stream_strategies
            .get(stream)
            .unwrap_or(&self.default_strategy)
            .as_ref()
    }

    pub(crate) fn validate(&self) -> Result<()> {
        self.delivery.validate()?;
        if self.delivery.max_payload_bytes == 0 || self.on_commit_concurrency == 0 {
            return Err(Error::config(
                "max_payload_bytes and on_commit_concurrency must be positive",
            ));
        }
        if self.delivery.publish_timeout.is_zero()
            || self.on_commit_lease <= self.delivery.publish_timeout
        {
            return Err(Error::config(
                "on_commit_lease must be longer than publish_timeout, which must be positive",
            ));
        }
        const HOUR: Duration = Duration::from_secs(3600);
        in_range(
            "on_commit_lease",
            self.on_commit_lease,
            Duration::from_millis(10),
            24 * HOUR,
        )?;
        in_range("on_commit_concurrency", self.on_commit_concurrency, 1, 4096)?;
        in_range(
            "max_delay",
            self.max_delay,
            Duration::ZERO,
            Duration::from_secs(10 * 365 * 24 * 3600),
        )?;
        Ok(())
    }
}
