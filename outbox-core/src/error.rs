//! The one public error type: a kind, a retry class, a message and an optional source.

use std::fmt;

/// What went wrong, coarsely. Match on this, not on the message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The configuration is invalid (bad URL, bad duration, missing setting).
    Config,
    /// A message was rejected before anything was written (oversized payload, empty
    /// destination, invalid header, ...).
    InvalidMessage,
    /// A table or other SQL identifier is not a plain identifier.
    InvalidIdentifier,
    /// The payload could not be encoded.
    Encode,
    /// The store (database) failed.
    Store,
    /// The broker or external system failed to accept a message.
    Publish,
    /// The broker accepted the connection but has no route for this destination.
    Unroutable,
    /// A stored message's signature did not verify.
    Tampered,
    /// An operation ran past its deadline.
    Timeout,
    /// A component was asked to work after it was shut down.
    Closed,
    /// What an operation names does not exist, or is not in the state it needs (resuming a
    /// unit that is not parked, say). Nothing was changed.
    NotFound,
    /// An inbox consumer's handler failed (see [`Error::handler`]).
    Handler,
    /// A message to be published after the commit was enqueued in (or a commit helper was
    /// given) a savepoint, a nested transaction: releasing it commits nothing, and its parent
    /// may still roll back, so nothing may be published then. Enqueue publish-on-commit
    /// messages in the outermost transaction. Nothing was written.
    Savepoint,
}

/// Whether retrying the same operation later can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Retry {
    /// Try again later (connection lost, broker unavailable, timeout).
    Transient,
    /// Retrying will fail the same way (unroutable, oversized, malformed).
    Permanent,
}

/// The error type of every outbox crate.
pub struct Error {
    kind: ErrorKind,
    retry: Retry,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    retry_after: Option<std::time::Duration>,
}

/// A `Config` error unless `value` is within `min..=max` (durations and sizes given by users:
/// a huge one must not wrap a database integer, overflow a clock or allocate gigabytes).
pub(crate) fn in_range<T: PartialOrd + std::fmt::Debug>(
    name: &str,
    value: T,
    min: T,
    max: T,
) -> Result<()> {
    if value < min || value > max {
        return Err(Error::config(format!(
            "{name} = {value:?} is out of range: use {min:?} to {max:?}"
        )));
    }
    Ok(())
}

/// Result alias with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error with an explicit retry class.
    pub fn new(kind: ErrorKind, retry: Retry, message: impl Into<String>) -> Self {
        Self {
            kind,
            retry,
            message: message.into(),
            source: None,
            retry_after: None,
        }
    }

    /// Ask for the next attempt no sooner than `after` (a broker's or receiver's
    /// `Retry-After`): the relay waits the longer of this and its own backoff.
    pub fn with_retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The wait [`with_retry_after`](Self::with_retry_after) asked for.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }

    /// A permanent configuration error.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, Retry::Permanent, message)
    }

    /// A permanent invalid-message error.
    pub fn invalid_message(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidMessage, Retry::Permanent, message)
    }

    /// A [`ErrorKind::NotFound`] error (permanent).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, Retry::Permanent, message)
    }

    /// A store error that a later attempt may not hit (connection loss, lock timeout).
    pub fn store(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Store, Retry::Transient, message)
    }

    /// A transient publish error (broker down, timeout, throttled).
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Publish, Retry::Transient, message)
    }

    /// A permanent publish error: retrying cannot help.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Publish, Retry::Permanent, message)
    }

    /// An inbox handler's failure: `transient` ones are retried with backoff, the others
    /// (and transient ones after `max_attempts`) make the message a dead letter.
    pub fn handler(retry: Retry, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Handler, retry, message)
    }

    /// An [`ErrorKind::Savepoint`] error (permanent): something to publish after the commit
    /// was enqueued at transaction `depth` (2 or more).
    pub fn savepoint(depth: usize) -> Self {
        Self::new(
            ErrorKind::Savepoint,
            Retry::Permanent,
            format!(
                "a publish-on-commit message was enqueued in a savepoint (transaction depth {depth}): \
                 releasing a savepoint commits nothing and its parent may still roll back, so it \
                 could announce what never happened; enqueue it in the outermost transaction \
                 (keep-order messages may be enqueued in savepoints). Nothing was written"
            ),
        )
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The error's retry class.
    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// True when a later attempt may succeed.
    pub fn is_transient(&self) -> bool {
        self.retry == Retry::Transient
    }

    /// The human-readable message, without the source chain.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind)
            .field("retry", &self.retry)
            .field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", &source.to_string());
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({:?}): {}", self.kind, self.retry, self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::new(
            ErrorKind::Encode,
            Retry::Permanent,
            "payload encoding failed",
        )
        .with_source(e)
    }
}

/// Validate a SQL identifier (table name): ASCII letter or `_` first, then letters, digits
/// or `_`, at most 63 characters. Stores call this before a name ever reaches SQL text.
pub fn validate_identifier(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok_first = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_');
    let ok_rest = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok_first && ok_rest && name.len() <= 63 {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidIdentifier,
            Retry::Permanent,
            format!(
                "invalid table name {name:?}: use 1-63 ASCII letters, digits or '_', not starting with a digit"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(validate_identifier("outbox").is_ok());
        assert!(validate_identifier("_outbox_2").is_ok());
        for bad in [
            "",
            "1abc",
            "out box",
            "outbox;drop table x",
            "a\"b",
            &"a".repeat(64),
        ] {
            let e = validate_identifier(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidIdentifier, "{bad}");
        }
    }

    #[test]
    fn display_includes_source() {
        let io = std::io::Error::other("boom");
        let e = Error::store("claim failed").with_source(io);
        assert!(e.to_string().contains("claim failed: boom"));
        assert!(e.is_transient());
    }
}
