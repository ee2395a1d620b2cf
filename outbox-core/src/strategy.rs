//! Strategies: how a message is delivered. A [`Strategy`] answers four questions per message
//! at enqueue: who publishes it ([`PublishedBy`]), in which ordering unit ([`Unit`]), what a
//! failure past the retry budget does ([`Exhausted`]) and when it may be published first
//! ([`Schedule`]). The stores persist the *answers* as plain columns (the row's order, its unit,
//! its exhaustion policy and its first attempt time), never the strategy: claims stay plain SQL,
//! relays need no strategy registry, and a strategy may change while rows written under the
//! old one are still pending.
//!
//! [`PublishOnCommit`] and [`KeepOrder`] are the built-in strategies (jaiminho's two), and
//! [`RelayOnly`] the relay-published one without order.

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::error::{Error, ErrorKind, Result, Retry};
use crate::message::Message;
/// The stored answers are the message module's (a stored row carries them); named here too,
/// where strategies give them.
pub use crate::message::{Exhausted, Order, Schedule};

/// Who publishes a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PublishedBy {
    /// The committing process, right after the commit; a relay retries what fails (and what
    /// a crash left). No order can be kept: concurrent committers publish concurrently.
    Committer,
    /// Only a relay, after the commit.
    Relay,
}

/// The ordering unit of a message: messages of one unit are published one after the other,
/// in commit order. Units never span streams.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Unit {
    /// No order: the message is published on its own (and may overtake others).
    None,
    /// The whole stream is one unit.
    Stream,
    /// The message's key (stream + key; a message without a key belongs to the stream's
    /// unit of the empty key).
    Key,
    /// A unit the strategy names (1-255 bytes without NUL or surrounding whitespace): a
    /// tenant header, a destination, a key prefix.
    Named(String),
}

/// How messages are delivered: implemented by the built-ins and by applications (see
/// `examples/custom_strategy.rs`). Registered per stream
/// ([`OutboxBuilder::stream_strategy`](crate::OutboxBuilder::stream_strategy)) or as the
/// default ([`OutboxBuilder::strategy`](crate::OutboxBuilder::strategy)).
///
/// Called once per message at enqueue, before anything is written; the answers are checked
/// ([`Plan::resolve`]) and an answer the stores cannot represent (publish-on-commit with an
/// ordering unit, a block policy without a unit, a malformed unit name, a schedule past
/// [`Config::max_delay`](crate::Config::max_delay)) fails the enqueue with a typed error and
/// writes nothing.
pub trait Strategy: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and errors.
    fn name(&self) -> &str;

    /// Who publishes `message`.
    fn published_by(&self, message: &Message) -> PublishedBy;

    /// The ordering unit of `message`. Must be [`Unit::None`] when
    /// [`published_by`](Self::published_by) answers [`PublishedBy::Committer`].
    fn unit(&self, message: &Message) -> Unit;

    /// What a failure past the retry budget does. Default: [`Exhausted::Default`].
    fn exhausted(&self, _message: &Message) -> Exhausted {
        Exhausted::Default
    }

    /// When `message` may be published first. Default: what the message asks for
    /// ([`Message::deliver_at`], [`Message::delay`]). A scheduled message is always
    /// relay-published, and in an ordered unit it holds back the messages behind it.
    fn schedule(&self, message: &Message) -> Option<Schedule> {
        message.schedule
    }
}

impl<T: Strategy + ?Sized> Strategy for std::sync::Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn published_by(&self, message: &Message) -> PublishedBy {
        (**self).published_by(message)
    }
    fn unit(&self, message: &Message) -> Unit {
        (**self).unit(message)
    }
    fn exhausted(&self, message: &Message) -> Exhausted {
        (**self).exhausted(message)
    }
    fn schedule(&self, message: &Message) -> Option<Schedule> {
        (**self).schedule(message)
    }
}

/// Published by the committing process right after the commit; the relay retries failures.
/// No order. jaiminho's default strategy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishOnCommit;

impl Strategy for PublishOnCommit {
    fn name(&self) -> &str {
        "publish-on-commit"
    }
    fn published_by(&self, _: &Message) -> PublishedBy {
        PublishedBy::Committer
    }
    fn unit(&self, _: &Message) -> Unit {
        Unit::None
    }
}

/// Published only by the relay, in commit order per stream + key. jaiminho's
/// keep-order strategy, per key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepOrder {
    /// What a head that exhausts its attempts does. Default: [`Exhausted::Default`] (the
    /// relay's `dead_letter_keep_order`).
    pub exhausted: Exhausted,
}

impl KeepOrder {
    /// A head that exhausts its attempts is dead-lettered and its unit moves on.
    pub fn dead_letter() -> Self {
        Self {
            exhausted: Exhausted::DeadLetter,
        }
    }

    /// A head that exhausts its attempts blocks its unit (and is reported stuck).
    pub fn block() -> Self {
        Self {
            exhausted: Exhausted::Block,
        }
    }

    /// A head that exhausts its attempts parks its unit, in order, for an operator.
    pub fn park() -> Self {
        Self {
            exhausted: Exhausted::Park,
        }
    }
}

impl Strategy for KeepOrder {
    fn name(&self) -> &str {
        "keep-order"
    }
    fn published_by(&self, _: &Message) -> PublishedBy {
        PublishedBy::Relay
    }
    fn unit(&self, _: &Message) -> Unit {
        Unit::Key
    }
    fn exhausted(&self, _: &Message) -> Exhausted {
        self.exhausted
    }
}

/// Published only by the relay, without order (for writer-only services that hold no broker
/// connection and need no order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayOnly;

impl Strategy for RelayOnly {
    fn name(&self) -> &str {
        "relay-only"
    }
    fn published_by(&self, _: &Message) -> PublishedBy {
        PublishedBy::Relay
    }
    fn unit(&self, _: &Message) -> Unit {
        Unit::None
    }
}

/// A built-in strategy by name (`publish-on-commit`, `keep-order`, `relay-only`; `_` for `-`
/// is accepted), for configuration files.
pub fn builtin(name: &str) -> Result<std::sync::Arc<dyn Strategy>> {
    match name.replace('_', "-").as_str() {
        "publish-on-commit" | "on-commit" => Ok(std::sync::Arc::new(PublishOnCommit)),
        "keep-order" => Ok(std::sync::Arc::new(KeepOrder::default())),
        "relay-only" => Ok(std::sync::Arc::new(RelayOnly)),
        _ => Err(Error::config(format!(
            "unknown strategy {:?}: use publish-on-commit, keep-order or relay-only",
            name.chars().take(64).collect::<String>()
        ))),
    }
}

/// A strategy's answers for one message, checked: what the stores persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Who publishes it (a scheduled message is always [`PublishedBy::Relay`]).
    pub published_by: PublishedBy,
    /// How it is claimed.
    pub order: Order,
    /// The unit's name within the stream (empty for the stream's unit; unused when
    /// unordered).
    pub unit: String,
    /// What exhaustion does.
    pub exhausted: Exhausted,
    /// Delay after the write, by the database's clock.
    pub delay: Duration,
    /// Not before this time, by the database's clock.
    pub not_before: Option<SystemTime>,
}

impl Plan {
    /// Ask `strategy` about `message` and check the answers (see [`Strategy`]); `max_delay`
    /// bounds a schedule, `now` is the enqueue time.
    pub fn resolve(
        strategy: &dyn Strategy,
        message: &Message,
        max_delay: Duration,
        now: SystemTime,
    ) -> Result<Self> {
        let name = strategy.name();
        let bad = |why: String| {
            Err(Error::new(
                ErrorKind::InvalidMessage,
                Retry::Permanent,
                format!("strategy {name:?}: {why}"),
            ))
        };
        let mut published_by = strategy.published_by(message);
        let unit = strategy.unit(message);
        let exhausted = strategy.exhausted(message);
        let (order, unit) = match unit {
            Unit::None => (Order::Unordered, String::new()),
            Unit::Stream => (Order::InUnit, String::new()),
            Unit::Key => (Order::InUnit, message.key.clone().unwrap_or_default()),
            Unit::Named(n) => {
                if n.is_empty() || n.len() > 255 || n.contains('\0') || n.trim() != n {
                    return bad(format!(
                        "unit {:?} must be 1-255 bytes without NUL or surrounding whitespace",
                        n.chars().take(64).collect::<String>()
                    ));
                }
                (Order::InUnit, n)
            }
        };
        if published_by == PublishedBy::Committer && order == Order::InUnit {
            return bad(
                "publish-on-commit cannot keep order (committers publish concurrently): answer Unit::None, or PublishedBy::Relay".into(),
            );
        }
        if order == Order::Unordered && matches!(exhausted, Exhausted::Block | Exhausted::Park) {
            return bad(format!(
                "Exhausted::{exhausted:?} needs an ordering unit to hold back"
            ));
        }
        let (delay, not_before) = match strategy.schedule(message) {
            None => (Duration::ZERO, None),
            Some(Schedule::After(d)) => (d, None),
            Some(Schedule::At(t)) => (Duration::ZERO, Some(t)),
        };
        let ahead = match not_before {
            Some(t) => t.duration_since(now).unwrap_or(Duration::ZERO),
            None => delay,
        };
        if ahead > max_delay {
            return bad(format!(
                "scheduled {ahead:?} ahead, over max_delay ({max_delay:?})"
            ));
        }
        if !ahead.is_zero() {
            published_by = PublishedBy::Relay;
        }
        Ok(Self {
            published_by,
            order,
            unit,
            exhausted,
            delay,
            not_before,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(s: &dyn Strategy, m: &Message) -> Result<Plan> {
        Plan::resolve(s, m, Duration::from_secs(3600), SystemTime::now())
    }

    #[derive(Debug)]
    struct Bad(PublishedBy, Unit, Exhausted);
    impl Strategy for Bad {
        fn name(&self) -> &str {
            "bad"
        }
        fn published_by(&self, _: &Message) -> PublishedBy {
            self.0
        }
        fn unit(&self, _: &Message) -> Unit {
            self.1.clone()
        }
        fn exhausted(&self, _: &Message) -> Exhausted {
            self.2
        }
    }

    #[test]
    fn built_ins_answer_as_before() {
        let m = Message::new("d", vec![]).key("k");
        let p = resolve(&PublishOnCommit, &m).unwrap();
        assert_eq!(
            (p.published_by, p.order),
            (PublishedBy::Committer, Order::Unordered)
        );
        let p = resolve(&KeepOrder::default(), &m).unwrap();
        assert_eq!(
            (p.published_by, p.order, p.unit.as_str()),
            (PublishedBy::Relay, Order::InUnit, "k")
        );
        let p = resolve(&RelayOnly, &m).unwrap();
        assert_eq!(
            (p.published_by, p.order),
            (PublishedBy::Relay, Order::Unordered)
        );
        assert_eq!(builtin("keep_order").unwrap().name(), "keep-order");
        assert_eq!(builtin("nope").unwrap_err().kind(), ErrorKind::Config);
    }

    #[test]
    fn answers_the_stores_cannot_represent_are_refused() {
        let m = Message::new("d", vec![]);
        let cases = [
            Bad(PublishedBy::Committer, Unit::Key, Exhausted::Default),
            Bad(PublishedBy::Relay, Unit::None, Exhausted::Block),
            Bad(PublishedBy::Relay, Unit::None, Exhausted::Park),
            Bad(
                PublishedBy::Relay,
                Unit::Named(String::new()),
                Exhausted::Default,
            ),
            Bad(
                PublishedBy::Relay,
                Unit::Named("a\0".into()),
                Exhausted::Default,
            ),
            Bad(
                PublishedBy::Relay,
                Unit::Named(" a".into()),
                Exhausted::Default,
            ),
            Bad(
                PublishedBy::Relay,
                Unit::Named("x".repeat(256)),
                Exhausted::Default,
            ),
        ];
        for s in &cases {
            let e = resolve(s, &m).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidMessage, "{s:?}");
            assert!(e.to_string().contains("\"bad\""), "{e}");
        }
        let ok = Bad(
            PublishedBy::Relay,
            Unit::Named("tenant-1".into()),
            Exhausted::Block,
        );
        assert_eq!(resolve(&ok, &m).unwrap().unit, "tenant-1");
    }

    #[test]
    fn schedules_go_to_the_relay_within_max_delay() {
        let now = SystemTime::now();
        let m = Message::new("d", vec![]).delay(Duration::from_secs(60));
        let p = Plan::resolve(&PublishOnCommit, &m, Duration::from_secs(3600), now).unwrap();
        assert_eq!(p.published_by, PublishedBy::Relay);
        assert_eq!(p.delay, Duration::from_secs(60));
        let m = Message::new("d", vec![]).deliver_at(now + Duration::from_secs(7200));
        let e = Plan::resolve(&PublishOnCommit, &m, Duration::from_secs(3600), now).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidMessage);
        assert!(e.to_string().contains("max_delay"), "{e}");
        // A time in the past is due at once: still publish-on-commit.
        let m = Message::new("d", vec![]).deliver_at(now - Duration::from_secs(1));
        let p = Plan::resolve(&PublishOnCommit, &m, Duration::from_secs(3600), now).unwrap();
        assert_eq!(p.published_by, PublishedBy::Committer);
    }

    #[test]
    fn exhaustion_names_round_trip() {
        for e in [
            Exhausted::Default,
            Exhausted::DeadLetter,
            Exhausted::Block,
            Exhausted::Park,
        ] {
            assert_eq!(Exhausted::from_stored(e.as_stored()).unwrap(), e);
        }
        assert!(Exhausted::from_stored(Some("nope")).is_err());
        for o in [Order::Unordered, Order::InUnit] {
            assert_eq!(o.as_str().parse::<Order>().unwrap(), o);
        }
    }
}
