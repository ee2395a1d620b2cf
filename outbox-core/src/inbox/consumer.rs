//! The [`Consumer`] loop: receive, count the attempt, mark and handle in one transaction,
//! commit, acknowledge; retries and dead letters.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::message::MessageId;
use crate::retry::RetryPolicy;

use super::delivery::{delivery_size, refuse_bad_trace_context};
use super::*;

/// Counts of one [`Consumer::run_once`] or of a whole run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerReport {
    /// Messages whose handler ran and committed.
    pub processed: u64,
    /// Deliveries of messages already processed (or processed by another consumer at the
    /// same moment): acknowledged, no effect.
    pub duplicates: u64,
    /// Messages kept as dead letters (failed `max_attempts` times, failed permanently,
    /// crashed the consumer too often, or unreadable).
    pub dead_lettered: u64,
    /// Failed handler attempts.
    pub failed_attempts: u64,
}

impl std::ops::AddAssign for ConsumerReport {
    fn add_assign(&mut self, o: Self) {
        self.processed += o.processed;
        self.duplicates += o.duplicates;
        self.dead_lettered += o.dead_lettered;
        self.failed_attempts += o.failed_attempts;
    }
}

/// [`Consumer::max_delivery_bytes`] by default: 16 MiB.
pub const DEFAULT_MAX_DELIVERY_BYTES: usize = 16 * 1024 * 1024;

/// The consumer loop: a [`Source`] feeding an [`Inbox`].
pub struct Consumer<S: Source> {
    source: S,
    inbox: Arc<dyn Inbox>,
    retry: RetryPolicy,
    batch_size: usize,
    wait: Duration,
    max_delivery_bytes: usize,
    /// One transaction per run of new messages ([`Consumer::batched`]).
    batched: bool,
    /// A batch whose round failed (a database or broker error): retried, whole, before
    /// anything new is received. Brokers do not give it back while this consumer lives
    /// (Kafka's position has moved past it, RabbitMQ keeps it unacknowledged on the channel),
    /// and acknowledging a later batch would cover it (a Kafka offset, a multiple ack).
    unfinished: Option<Vec<Incoming<S::Token>>>,
}

impl<S: Source> std::fmt::Debug for Consumer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("consumer", &self.inbox.consumer())
            .field("retry", &self.retry)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

impl<S: Source> Consumer<S> {
    /// A consumer of `source` into `inbox`, with the default [`RetryPolicy`] and batches of
    /// up to 100.
    pub fn new(source: S, inbox: impl Inbox + 'static) -> Self {
        Self {
            source,
            inbox: Arc::new(inbox),
            retry: RetryPolicy::default(),
            batch_size: 100,
            wait: Duration::from_millis(500),
            max_delivery_bytes: DEFAULT_MAX_DELIVERY_BYTES,
            batched: false,
            unfinished: None,
        }
    }

    /// The largest delivery (payload and headers) that is processed (1 KiB to 1 GiB; default
    /// [`DEFAULT_MAX_DELIVERY_BYTES`]). A larger one is kept as a dead letter without its
    /// payload (its id, source and headers, and the size in the error) and acknowledged:
    /// the handler never sees it, and the inbox table never stores it. Bound the broker
    /// client's own fetch size too (Kafka `fetch.max.bytes`, ...): this limit applies once
    /// a delivery has been received.
    pub fn max_delivery_bytes(mut self, n: usize) -> Result<Self> {
        crate::error::in_range("max_delivery_bytes", n, 1024, 1 << 30)?;
        self.max_delivery_bytes = n;
        Ok(self)
    }

    /// How failed handlers are retried: `max_attempts` attempts (crashes included), then a
    /// dead letter. The same policy type as the relay's.
    pub fn retry(mut self, retry: RetryPolicy) -> Result<Self> {
        retry.validate()?;
        self.retry = retry;
        Ok(self)
    }

    /// Deliveries taken per round (1 to 10 000). The attempts of a batch are counted in one
    /// transaction; each message still commits in its own.
    pub fn batch_size(mut self, n: usize) -> Result<Self> {
        if !(1..=10_000).contains(&n) {
            return Err(Error::config("consumer batch size must be 1 to 10000"));
        }
        self.batch_size = n;
        Ok(self)
    }

    /// Batched mode (off by default): the new messages of a round are processed in **one**
    /// transaction ([`Inbox::process_batch`]): marks and handler writes commit together, once
    /// per run instead of once per message. Exactly-once effects hold as in the default mode
    /// (a crash rolls the whole batch back; its messages come back and are processed again).
    ///
    /// A handler that fails rolls back its batch-mates' writes too, so they are processed
    /// again without it: the messages before it as a batch, then it alone (with the usual
    /// retries and dead letter; the failed batch attempt is not counted against it), then
    /// the rest. Messages started in an earlier unfinished round (a crash, a failure) are
    /// always processed alone. Effects keep the delivery order either way.
    pub fn batched(mut self, yes: bool) -> Self {
        self.batched = yes;
        self
    }

    /// How long one round waits for a first delivery (default 500 ms).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// The source, to inspect or to close.
    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// Run until `shutdown` completes. The round in progress is then abandoned, not waited
    /// for (a handler's retries can take minutes): its unacknowledged messages come back from
    /// the broker, and those whose effects had committed are recognised by the inbox. Broker
    /// and database errors are logged and retried with backoff; nothing else stops the loop.
    pub async fn run(&mut self, shutdown: impl std::future::Future<Output = ()>) -> ConsumerReport {
        tokio::pin!(shutdown);
        let mut total = ConsumerReport::default();
        let mut errors = 0u32;
        loop {
            let round = tokio::select! {
                biased;
                _ = &mut shutdown => return total,
                r = self.run_once() => r,
            };
            match round {
                Ok(r) => {
                    errors = 0;
                    total += r;
                }
                Err(e) => {
                    errors = errors.saturating_add(1);
                    let delay = self.retry.delay(errors).min(Duration::from_secs(30));
                    tracing::warn!(consumer = self.inbox.consumer(), error = %e, ?delay, "consumer round failed; retrying");
                    tokio::select! {
                        _ = &mut shutdown => return total,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One round: requeued dead letters first, then one batch from the source, processed and
    /// acknowledged. An error leaves the batch unacknowledged and kept: the next round takes
    /// the same batch again before receiving anything new (the inbox recognises what was
    /// done), so a later batch's acknowledgement never covers it.
    pub async fn run_once(&mut self) -> Result<ConsumerReport> {
        let mut report = ConsumerReport::default();
        for message in self.inbox.requeued(self.batch_size).await? {
            let attempts = match self.inbox.start(&[message.id]).await?.first() {
                Some(Seen::New { attempts }) => *attempts,
                _ => continue,
            };
            self.handle(&message, attempts, true, &mut report).await?;
        }

        let deliveries = match self.unfinished.take() {
            Some(batch) => batch,
            None => {
                let received = self.source.receive(self.batch_size, self.wait).await?;
                if received.is_empty() {
                    return Ok(report);
                }
                refuse_bad_trace_context(received)
            }
        };
        match self.round(&deliveries, &mut report).await {
            Ok(()) => Ok(report),
            Err(e) => {
                // Nothing of it acknowledged: the next round takes it again (what committed
                // is recognised by the inbox).
                self.unfinished = Some(deliveries);
                Err(e)
            }
        }
    }

    /// Attempts counted, each message processed (or dead-lettered), the batch acknowledged.
    async fn round(
        &mut self,
        deliveries: &[Incoming<S::Token>],
        report: &mut ConsumerReport,
    ) -> Result<()> {
        let ids: Vec<MessageId> = deliveries
            .iter()
            .filter_map(|d| d.message.as_ref().ok().map(|m| m.id))
            .collect();
        let mut seen = self.inbox.start(&ids).await?.into_iter();
        // Oversized deliveries dead-lettered in this round (a second copy is a duplicate).
        let mut oversized: Vec<MessageId> = Vec::new();
        // Whether a message started in an earlier round came before: see `handle`.
        let mut suspect_before = false;
        // Batched mode: the run of new messages not processed yet, in delivery order.
        let mut run: Vec<&Received> = Vec::new();
        for d in deliveries {
            let readable = d.message.as_ref().ok().filter(|m| {
                self.batched
                    && !oversized.contains(&m.id)
                    && delivery_size(m) <= self.max_delivery_bytes
            });
            if let Some(message) = readable {
                match seen.next() {
                    Some(Seen::New { attempts: 1 }) => run.push(message),
                    // No effect: the run goes on around it.
                    Some(Seen::Done | Seen::Dead) => report.duplicates += 1,
                    // Started in an earlier round: alone, after the run before it (effects
                    // keep the delivery order).
                    Some(Seen::New { attempts }) => {
                        self.flush(&mut run, report).await?;
                        let first_suspect = !suspect_before;
                        suspect_before = true;
                        self.handle(message, attempts, first_suspect, report)
                            .await?;
                    }
                    None => {
                        return Err(Error::store(
                            "the inbox answered for fewer messages than it was asked about",
                        ))
                    }
                }
                continue;
            }
            self.flush(&mut run, report).await?;
            match &d.message {
                Err(bad) => {
                    let message = Received {
                        id: bad.stable_id(),
                        source: bad.source.clone(),
                        stream: None,
                        key: None,
                        content_type: None,
                        headers: bad.headers.clone(),
                        payload: bad.payload.clone(),
                    };
                    tracing::warn!(consumer = self.inbox.consumer(), id = %message.id, reason = %bad.reason, "unreadable delivery kept as a dead letter");
                    self.inbox
                        .dead_letter(&message, &format!("unreadable delivery: {}", bad.reason))
                        .await?;
                    report.dead_lettered += 1;
                }
                Ok(message) => match seen.next() {
                    Some(Seen::Done) | Some(Seen::Dead) => report.duplicates += 1,
                    Some(Seen::New { .. }) if oversized.contains(&message.id) => {
                        report.duplicates += 1
                    }
                    Some(Seen::New { .. }) if delivery_size(message) > self.max_delivery_bytes => {
                        oversized.push(message.id);
                        let size = delivery_size(message);
                        tracing::warn!(consumer = self.inbox.consumer(), id = %message.id, size, max = self.max_delivery_bytes, "delivery over max_delivery_bytes kept as a dead letter without its payload");
                        let kept = Received {
                            payload: Vec::new(),
                            ..message.clone()
                        };
                        self.inbox
                            .dead_letter(
                                &kept,
                                &format!(
                                    "delivery of {size} bytes is over max_delivery_bytes ({}): kept without its payload",
                                    self.max_delivery_bytes
                                ),
                            )
                            .await?;
                        report.dead_lettered += 1;
                    }
                    Some(Seen::New { attempts }) => {
                        let first_suspect = attempts > 1 && !suspect_before;
                        suspect_before |= attempts > 1;
                        self.handle(message, attempts, first_suspect, report)
                            .await?
                    }
                    None => {
                        return Err(Error::store(
                            "the inbox answered for fewer messages than it was asked about",
                        ))
                    }
                },
            }
        }
        self.flush(&mut run, report).await?;
        let tokens = deliveries.iter().map(|d| d.token.clone()).collect();
        self.source.ack(tokens).await
    }

    /// Batched mode: process `run` in one transaction; a message whose handler fails is
    /// taken out (the ones before it go as a batch again, it goes alone, then the rest).
    async fn flush(&self, run: &mut Vec<&Received>, report: &mut ConsumerReport) -> Result<()> {
        let all = std::mem::take(run);
        let (mut start, mut end) = (0, all.len());
        // The message whose handler failed in a batch (its index in `all`), and its error.
        let mut failed: Option<(usize, Error)> = None;
        while start < all.len() {
            if let Some((at, error)) = failed.take_if(|(at, _)| *at == start) {
                let m = all[at];
                report.failed_attempts += 1;
                tracing::warn!(consumer = self.inbox.consumer(), id = %m.id, error = %error, "handler failed in a batch; its batch-mates go on without it, and it is processed alone");
                self.handle(m, 1, true, report).await?;
                (start, end) = (start + 1, all.len());
                continue;
            }
            match self.inbox.process_batch(&all[start..end]).await? {
                BatchProcessed::Committed(results) => {
                    if results.len() != end - start {
                        return Err(Error::store(
                            "the inbox answered for another number of messages than its batch",
                        ));
                    }
                    for p in results {
                        match p {
                            Processed::Done => report.processed += 1,
                            Processed::Duplicate => report.duplicates += 1,
                        }
                    }
                    (start, end) = (end, all.len());
                }
                // Its batch-mates before it first, as a batch without it; then it alone.
                BatchProcessed::Failed { index, error } if index < end - start => {
                    failed = Some((start + index, error));
                    end = start + index;
                }
                BatchProcessed::Failed { index, .. } => {
                    return Err(Error::store(format!(
                        "the inbox reported a failure at message {index} of a batch of {}",
                        end - start
                    )))
                }
            }
        }
        Ok(())
    }

    /// Attempts at one message until it is done, a duplicate, or a dead letter.
    ///
    /// A round counts an attempt at its whole batch at once, so when the consumer dies in one
    /// message's handler, the messages behind it are counted too without having run. Round
    /// after round they carry the same count as the one that kills the consumer, which is the
    /// first unfinished message of the batch the broker gives again (`crash_suspect`): only
    /// that one is judged a crash loop. The others run; if one of them turns out to kill the
    /// consumer too, it is the first next time, with fewer crashes left than `max_attempts`.
    async fn handle(
        &self,
        message: &Received,
        mut attempts: u32,
        mut crash_suspect: bool,
        report: &mut ConsumerReport,
    ) -> Result<()> {
        let inbox = &self.inbox;
        loop {
            if crash_suspect && attempts > self.retry.max_attempts {
                tracing::error!(consumer = inbox.consumer(), id = %message.id, attempts, "message crashed the consumer too often; kept as a dead letter");
                inbox
                    .dead_letter(
                        message,
                        &format!(
                            "crash loop: {} attempts started and none finished",
                            attempts - 1
                        ),
                    )
                    .await?;
                report.dead_lettered += 1;
                return Ok(());
            }
            #[cfg(feature = "otel")]
            let processed = {
                use opentelemetry::context::FutureExt as _;
                let cx = crate::otel::start_process(
                    inbox.consumer(),
                    &message.source,
                    message.id,
                    &message.headers,
                );
                let r = inbox.process(message).with_context(cx.clone()).await;
                crate::otel::end_process(&cx, r.as_ref().err());
                r
            };
            #[cfg(not(feature = "otel"))]
            let processed = inbox.process(message).await;
            let error = match processed {
                Ok(Processed::Done) => {
                    report.processed += 1;
                    return Ok(());
                }
                Ok(Processed::Duplicate) => {
                    report.duplicates += 1;
                    return Ok(());
                }
                Err(e) => e,
            };
            report.failed_attempts += 1;
            let text = crate::printable(&error.to_string()).into_owned();
            let n = inbox.failed(message.id, &text).await?;
            if !error.is_transient() || n >= self.retry.max_attempts {
                tracing::error!(consumer = inbox.consumer(), id = %message.id, attempts = n, error = %error, "handler failed; message kept as a dead letter");
                inbox.dead_letter(message, &text).await?;
                report.dead_lettered += 1;
                return Ok(());
            }
            // From here on, attempts are this message's own.
            crash_suspect = true;
            let delay = error.retry_after().unwrap_or_else(|| self.retry.delay(n));
            tracing::warn!(consumer = inbox.consumer(), id = %message.id, attempts = n, error = %error, ?delay, "handler failed; retrying");
            tokio::time::sleep(delay).await;
            attempts = match inbox.start(&[message.id]).await?.first() {
                Some(Seen::New { attempts }) => *attempts,
                // Processed meanwhile by another consumer of the group.
                Some(Seen::Done | Seen::Dead) => {
                    report.duplicates += 1;
                    return Ok(());
                }
                None => return Err(Error::store("the inbox did not answer for a message")),
            };
        }
    }
}
