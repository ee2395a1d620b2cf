//! What a stored row carries of its strategy's answers: how it is claimed ([`Order`]), what
//! exhaustion does ([`Exhausted`]) and when it may be published first ([`Schedule`]). A
//! [`Strategy`](crate::Strategy) gives them at enqueue; the stores persist them as plain
//! columns.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use crate::error::{Error, ErrorKind, Result, Retry};

/// What happens when a message exhausts its attempts or fails permanently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Exhausted {
    /// As the relay is configured: dead letter for unordered messages; for ordered ones,
    /// block the unit, or dead-letter the head when
    /// [`dead_letter_keep_order`](crate::Delivery::dead_letter_keep_order) is on.
    #[default]
    Default,
    /// Dead-letter the message; its unit goes on without it.
    DeadLetter,
    /// Keep retrying it (with the capped backoff) and report the unit stuck: nothing behind it
    /// is published until it passes or an operator acts.
    Block,
    /// Park its unit: the unit's rows, this one first, leave the claim path in their order
    /// (costing relays nothing) until an operator resumes the unit or skips its head; new
    /// messages of the unit queue behind them. See [`Store::park_unit`](crate::Store::park_unit).
    Park,
}

impl Exhausted {
    /// The name stored in the database (`None` for [`Exhausted::Default`], stored as NULL).
    pub fn as_stored(self) -> Option<&'static str> {
        match self {
            Exhausted::Default => None,
            Exhausted::DeadLetter => Some("dead"),
            Exhausted::Block => Some("block"),
            Exhausted::Park => Some("park"),
        }
    }

    /// The inverse of [`as_stored`](Self::as_stored).
    pub fn from_stored(s: Option<&str>) -> std::result::Result<Self, String> {
        match s {
            None => Ok(Exhausted::Default),
            Some("dead") => Ok(Exhausted::DeadLetter),
            Some("block") => Ok(Exhausted::Block),
            Some("park") => Ok(Exhausted::Park),
            Some(other) => Err(format!(
                "unknown exhaustion policy {:?}",
                other.chars().take(64).collect::<String>()
            )),
        }
    }
}

/// When a message may be published first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Not before this time, by the database's clock.
    At(SystemTime),
    /// Not before this long after the commit's write, by the database's clock.
    After(Duration),
}

/// How a stored row is claimed: the persisted form of the [`Unit`](crate::Unit) answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Order {
    /// On its own, with its own lease (stored `on_commit`, its name from the first schema).
    Unordered,
    /// In its unit, after every earlier row of the unit (stored `keep_order`).
    InUnit,
}

impl Order {
    /// The name stored in the `strategy` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Order::Unordered => "on_commit",
            Order::InUnit => "keep_order",
        }
    }
}

impl FromStr for Order {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "on_commit" => Ok(Order::Unordered),
            "keep_order" => Ok(Order::InUnit),
            other => Err(Error::new(
                ErrorKind::Store,
                Retry::Permanent,
                format!(
                    "unknown order {:?}",
                    other.chars().take(64).collect::<String>()
                ),
            )),
        }
    }
}
