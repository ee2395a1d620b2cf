//! The enqueue side: [`Outbox`] validates, signs and routes messages to a strategy;
//! [`Pending`] publishes publish-on-commit messages right after the commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::error::{Error, ErrorKind, Result, Retry};
use crate::message::{Encoder, Envelope, JsonEncoder, Message, MessageId, Status, Strategy};
use crate::observer::{Event, Observer, Observers, PublishPath};
use crate::publisher::Publisher;
use crate::relay::RelayBuilder;
use crate::retry::{Decision, RetryPolicy};
use crate::signing::Signer;
use crate::store::{Failure, NewMessage, Outcome, Store};

/// Settings shared by the enqueue side and the relays built from it.
#[derive(Debug, Clone)]
pub struct Config {
    /// Strategy of streams without an override. Default: `PublishOnCommit`.
    pub default_strategy: Strategy,
    /// Per-stream overrides (jaiminho's `save_to_outbox_stream(stream, strategy)`).
    /// Default: none.
    pub stream_strategies: HashMap<String, Strategy>,
    /// Publish-on-commit: write every message in the transaction (true), or only those whose
    /// after-commit publish failed (false, jaiminho's default). With false, a crash between
    /// the commit and the publish LOSES the message. Default: true.
    pub persist_all: bool,
    /// Delete rows once published (true) or mark them sent and let the cleaner remove them
    /// after the retention (false). Default: false.
    pub delete_after_send: bool,
    /// Largest accepted payload. Default: 1 MiB.
    pub max_payload_bytes: usize,
    /// Deadline of one publish call (one message or one batch). Default: 10 s.
    pub publish_timeout: Duration,
    /// Backoff and attempts. Default: [`RetryPolicy::default`].
    pub retry: RetryPolicy,
    /// Keep-order heads that exhaust their attempts (or fail permanently) are dead-lettered
    /// so their unit moves on (true), instead of staying blocked and reported stuck (false).
    /// Default: false.
    pub dead_letter_keep_order: bool,
    /// How long a publish-on-commit row is reserved for the committing process before a
    /// relay may take it. Default: 30 s.
    pub on_commit_lease: Duration,
    /// Publish-on-commit batches in flight at once per [`Outbox`]. Default: 64.
    pub on_commit_concurrency: usize,
    /// HMAC signing of every row. Default: off.
    pub signer: Option<Signer>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            default_strategy: Strategy::PublishOnCommit,
            stream_strategies: HashMap::new(),
            persist_all: true,
            delete_after_send: false,
            max_payload_bytes: 1024 * 1024,
            publish_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            dead_letter_keep_order: false,
            on_commit_lease: Duration::from_secs(30),
            on_commit_concurrency: 64,
            signer: None,
        }
    }
}

impl Config {
    /// The strategy of `stream`.
    pub fn strategy_for(&self, stream: &str) -> Strategy {
        self.stream_strategies
            .get(stream)
            .copied()
            .unwrap_or(self.default_strategy)
    }

    fn validate(&self) -> Result<()> {
        self.retry.validate()?;
        if self.max_payload_bytes == 0 || self.on_commit_concurrency == 0 {
            return Err(Error::config(
                "max_payload_bytes and on_commit_concurrency must be positive",
            ));
        }
        if self.publish_timeout.is_zero() || self.on_commit_lease <= self.publish_timeout {
            return Err(Error::config(
                "on_commit_lease must be longer than publish_timeout, which must be positive",
            ));
        }
        use crate::error::in_range;
        const HOUR: Duration = Duration::from_secs(3600);
        in_range("max_payload_bytes", self.max_payload_bytes, 1, 1 << 30)?;
        in_range(
            "publish_timeout",
            self.publish_timeout,
            Duration::from_millis(1),
            HOUR,
        )?;
        in_range(
            "on_commit_lease",
            self.on_commit_lease,
            Duration::from_millis(10),
            24 * HOUR,
        )?;
        in_range("on_commit_concurrency", self.on_commit_concurrency, 1, 4096)?;
        Ok(())
    }
}

/// The application's handle: builds rows for the caller's transaction and publishes
/// publish-on-commit messages after the commit. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

/// Adds headers to every message at enqueue (trace context, tenant, ...).
pub type HeaderInjector = dyn Fn(&mut Message) + Send + Sync;

struct Inner {
    injector: Option<Arc<HeaderInjector>>,
    store: Arc<dyn Store>,
    publisher: Arc<dyn Publisher>,
    config: Config,
    encoder: Arc<dyn Encoder>,
    observers: Observers,
    owner: String,
    permits: Arc<Semaphore>,
}

/// Builds an [`Outbox`].
pub struct OutboxBuilder {
    injector: Option<Arc<HeaderInjector>>,
    store: Arc<dyn Store>,
    publisher: Arc<dyn Publisher>,
    config: Config,
    encoder: Arc<dyn Encoder>,
    observers: Vec<Arc<dyn Observer>>,
}

impl Outbox {
    /// Start building an outbox over `store` that publishes with `publisher`.
    pub fn builder(
        store: impl Store + 'static,
        publisher: impl Publisher + 'static,
    ) -> OutboxBuilder {
        OutboxBuilder {
            injector: None,
            store: Arc::new(store),
            publisher: Arc::new(publisher),
            config: Config::default(),
            encoder: Arc::new(JsonEncoder),
            observers: Vec::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// A message whose payload is `value` encoded by the configured encoder.
    pub fn message<T: Serialize + ?Sized>(
        &self,
        destination: impl Into<String>,
        value: &T,
    ) -> Result<Message> {
        Message::encoded(destination, value, self.inner.encoder.as_ref())
    }

    /// A deferred call of the function registered as `function` in a
    /// [`FunctionPublisher`](crate::FunctionPublisher), with `args` as its payload.
    pub fn call<T: Serialize + ?Sized>(&self, function: &str, args: &T) -> Result<Message> {
        Ok(self.message(function, args)?.header("outbox-kind", "call"))
    }

    /// Validate, assign ids, resolve strategies and sign. Nothing is written: a backend's
    /// `enqueue` writes [`Prepared::rows`] in the caller's transaction. Either every message
    /// is accepted or none is.
    pub fn prepare(&self, messages: impl IntoIterator<Item = Message>) -> Result<Prepared> {
        let cfg = &self.inner.config;
        let mut rows = Vec::new();
        let mut deferred = Vec::new();
        let now = SystemTime::now();
        for mut message in messages {
            if let Some(inject) = &self.inner.injector {
                inject(&mut message);
            }
            message.validate(cfg.max_payload_bytes)?;
            let strategy = cfg.strategy_for(&message.stream);
            let envelope = Envelope {
                id: MessageId::new(),
                created_at: now,
                message,
            };
            let signature = cfg
                .signer
                .as_ref()
                .map(|s| s.sign(&envelope, strategy, &self.inner.store.signing_scope()));
            let on_commit = strategy == Strategy::PublishOnCommit;
            let row = NewMessage {
                envelope,
                strategy,
                signature,
                status: Status::Pending,
                attempts: 0,
                retry_after: Duration::ZERO,
                last_error: None,
                lease: on_commit.then(|| (self.inner.owner.clone(), cfg.on_commit_lease)),
            };
            if on_commit && !cfg.persist_all {
                deferred.push(row);
            } else {
                rows.push(row);
            }
        }
        Ok(Prepared {
            outbox: self.clone(),
            rows,
            deferred,
        })
    }

    /// A relay over the same store, publisher, observers and settings.
    pub fn relay(&self) -> RelayBuilder<Arc<dyn Store>, Arc<dyn Publisher>> {
        let i = &self.inner;
        RelayBuilder::new(i.store.clone(), i.publisher.clone())
            .with_config(&i.config)
            .observers(i.observers.0.clone())
    }

    async fn publish_on_commit(&self, items: Vec<(Option<i64>, NewMessage)>) -> DispatchReport {
        let i = &self.inner;
        let cfg = &i.config;
        let envs: Vec<&Envelope> = items.iter().map(|(_, r)| &r.envelope).collect();
        let results = publish_with_timeout(i.publisher.as_ref(), &envs, cfg.publish_timeout).await;
        let mut report = DispatchReport::default();
        let (mut done, mut failures, mut inserts) = (Vec::new(), Vec::new(), Vec::new());
        for ((seq, row), result) in items.into_iter().zip(results) {
            let env = &row.envelope;
            match result {
                Ok(()) => {
                    report.published += 1;
                    i.observers.emit(&Event::Published {
                        envelope: env,
                        path: PublishPath::OnCommit,
                    });
                    done.extend(seq);
                }
                Err(error) => {
                    report.failed += 1;
                    let decision =
                        cfg.retry
                            .decide(row.strategy, 1, &error, cfg.dead_letter_keep_order);
                    let dead = decision == Decision::Dead;
                    i.observers.emit(&Event::Failed {
                        envelope: env,
                        error: &error,
                        attempts: 1,
                        will_retry: !dead,
                        path: PublishPath::OnCommit,
                    });
                    if dead {
                        i.observers.emit(&Event::DeadLettered {
                            envelope: env,
                            error: &error,
                            path: PublishPath::OnCommit,
                        });
                    }
                    let after = match decision {
                        Decision::Retry(d) | Decision::Stuck(d) => d,
                        Decision::Dead => Duration::ZERO,
                    };
                    match seq {
                        Some(seq) => failures.push(Failure {
                            seq,
                            error: error.to_string(),
                            outcome: if dead {
                                Outcome::Dead
                            } else {
                                Outcome::Retry { after }
                            },
                        }),
                        None => inserts.push(NewMessage {
                            status: if dead { Status::Dead } else { Status::Pending },
                            attempts: 1,
                            retry_after: after,
                            last_error: Some(error.to_string()),
                            lease: None,
                            ..row
                        }),
                    }
                }
            }
        }
        if !done.is_empty() {
            if let Err(e) = i.store.complete(&done, cfg.delete_after_send).await {
                // The rows stay leased; a relay republishes them after the lease (a duplicate,
                // never a loss).
                tracing::warn!(error = %e, count = done.len(), "could not mark on-commit messages sent");
            }
        }
        if !failures.is_empty() {
            if let Err(e) = i.store.fail(&i.owner, &failures).await {
                tracing::warn!(error = %e, count = failures.len(), "could not record on-commit failures; the relay retries them after the lease");
            }
        }
        if !inserts.is_empty() {
            if let Err(e) = i.store.insert(&inserts).await {
                report.lost += inserts.len();
                tracing::error!(error = %e, count = inserts.len(), "persist_all=false: failed on-commit messages could not be written and are LOST");
            }
        }
        report
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("config", &self.inner.config)
            .field("owner", &self.inner.owner)
            .finish()
    }
}

/// Publish `envs` as one batch within `timeout`: one result per envelope, in order.
///
/// A panic inside the publisher (a bug in user code, an `unwrap` on a broker reply) is not a
/// process crash: it becomes a transient [`ErrorKind::Publish`] failure carrying the panic
/// message, so it counts as an attempt and retries, dead letters and keep-order blocking
/// apply as for any other failure. When a batch call panics, nobody knows which messages went
/// out, so each message is published again on its own (a possible duplicate, never a loss),
/// and only the ones that panic again fail.
pub(crate) async fn publish_with_timeout(
    publisher: &dyn Publisher,
    envs: &[&Envelope],
    timeout: Duration,
) -> Vec<Result<()>> {
    let n = envs.len();
    let started = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = || {
        Err(Error::new(
            ErrorKind::Timeout,
            Retry::Transient,
            format!("publish timed out after {timeout:?}"),
        ))
    };
    let outcome = tokio::time::timeout_at(
        deadline,
        crate::publisher::catch_panic(publisher.publish_batch(envs)),
    )
    .await;
    metrics::histogram!("outbox_publish_seconds").record(started.elapsed().as_secs_f64());
    let mut results = match outcome {
        Ok(Ok(r)) => r,
        Err(_) => return (0..n).map(|_| timed_out()).collect(),
        Ok(Err(panic)) if n == 1 => return vec![Err(panic)],
        Ok(Err(panic)) => {
            tracing::warn!(error = %panic, count = n, "publisher panicked on a batch; publishing its messages one by one");
            let mut out = Vec::with_capacity(n);
            for env in envs {
                out.push(
                    match tokio::time::timeout_at(
                        deadline,
                        crate::publisher::catch_panic(publisher.publish(env)),
                    )
                    .await
                    {
                        Ok(Ok(r)) => r,
                        Ok(Err(panic)) => Err(panic),
                        Err(_) => timed_out(),
                    },
                );
            }
            return out;
        }
    };
    if results.len() != n {
        let got = results.len();
        results.truncate(n);
        while results.len() < n {
            results.push(Err(Error::permanent(format!(
                "publisher returned {got} results for {n} messages"
            ))));
        }
    }
    results
}

impl OutboxBuilder {
    /// Replace all settings.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Strategy of streams without an override.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.config.default_strategy = strategy;
        self
    }

    /// Override the strategy of one stream.
    pub fn stream_strategy(mut self, stream: impl Into<String>, strategy: Strategy) -> Self {
        self.config
            .stream_strategies
            .insert(stream.into(), strategy);
        self
    }

    /// See [`Config::persist_all`].
    pub fn persist_all(mut self, yes: bool) -> Self {
        self.config.persist_all = yes;
        self
    }

    /// See [`Config::delete_after_send`].
    pub fn delete_after_send(mut self, yes: bool) -> Self {
        self.config.delete_after_send = yes;
        self
    }

    /// See [`Config::retry`].
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.config.retry = retry;
        self
    }

    /// See [`Config::dead_letter_keep_order`].
    pub fn dead_letter_keep_order(mut self, yes: bool) -> Self {
        self.config.dead_letter_keep_order = yes;
        self
    }

    /// Sign every row with `signer`; relays built from this outbox verify.
    pub fn signer(mut self, signer: Signer) -> Self {
        self.config.signer = Some(signer);
        self
    }

    /// Replace the payload encoder used by [`Outbox::message`].
    pub fn encoder(mut self, encoder: impl Encoder) -> Self {
        self.encoder = Arc::new(encoder);
        self
    }

    /// Add an observer.
    pub fn observer(mut self, observer: impl Observer + 'static) -> Self {
        self.observers.push(Arc::new(observer));
        self
    }

    /// Run `inject` on every message at enqueue, before validation. This is where W3C trace
    /// context goes: with OpenTelemetry, inject the current context's `traceparent` /
    /// `tracestate` here, and every publisher carries them to the broker as headers.
    ///
    /// ```
    /// # use outbox_core::{MemoryStore, Outbox, RecordingPublisher};
    /// let outbox = Outbox::builder(MemoryStore::new(), RecordingPublisher::new())
    ///     .header_injector(|m| {
    ///         // e.g. opentelemetry's TraceContextPropagator::inject_context(&cx, &mut injector)
    ///         m.headers.entry("traceparent".into()).or_insert_with(|| "00-...-01".into());
    ///     })
    ///     .build()?;
    /// # Ok::<(), outbox_core::Error>(())
    /// ```
    pub fn header_injector(
        mut self,
        inject: impl Fn(&mut Message) + Send + Sync + 'static,
    ) -> Self {
        self.injector = Some(Arc::new(inject));
        self
    }

    /// Check the settings and build.
    pub fn build(self) -> Result<Outbox> {
        self.config.validate()?;
        let permits = Arc::new(Semaphore::new(self.config.on_commit_concurrency));
        Ok(Outbox {
            inner: Arc::new(Inner {
                injector: self.injector,
                store: self.store,
                publisher: self.publisher,
                encoder: self.encoder,
                observers: Observers(self.observers),
                owner: format!("on-commit:{}", uuid::Uuid::now_v7()),
                permits,
                config: self.config,
            }),
        })
    }
}

/// Rows to write in the caller's transaction, from [`Outbox::prepare`].
#[must_use = "write the rows in your transaction, then turn this into a Pending"]
pub struct Prepared {
    outbox: Outbox,
    rows: Vec<NewMessage>,
    deferred: Vec<NewMessage>,
}

impl Prepared {
    /// The rows a backend writes in the transaction.
    pub fn rows(&self) -> &[NewMessage] {
        &self.rows
    }

    /// Whether [`into_pending`](Self::into_pending) needs the real `seq`s: only
    /// publish-on-commit rows are acknowledged by `seq` after publishing. When false, a backend
    /// may skip reading them back and pass any values of the right length.
    pub fn needs_seqs(&self) -> bool {
        self.rows
            .iter()
            .any(|r| r.strategy == Strategy::PublishOnCommit)
    }

    /// After the backend wrote [`rows`](Self::rows) and got their `seq`s (same order).
    pub fn into_pending(self, seqs: Vec<i64>) -> Result<Pending> {
        if seqs.len() != self.rows.len() {
            return Err(Error::store(format!(
                "store returned {} seqs for {} rows",
                seqs.len(),
                self.rows.len()
            )));
        }
        let wake = self.rows.iter().any(|r| r.strategy == Strategy::KeepOrder);
        let mut items: Vec<(Option<i64>, NewMessage)> = self
            .rows
            .into_iter()
            .zip(seqs)
            .filter(|(r, _)| r.strategy == Strategy::PublishOnCommit)
            .map(|(r, s)| (Some(s), r))
            .collect();
        items.extend(self.deferred.into_iter().map(|r| (None, r)));
        Ok(Pending {
            outbox: Some(self.outbox),
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
pub struct Pending {
    outbox: Option<Outbox>,
    items: Vec<(Option<i64>, NewMessage)>,
    wake: bool,
}

/// What a [`Pending::publish`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchReport {
    /// Accepted by the broker.
    pub published: usize,
    /// Failed (left for the relay, or dead-lettered when permanent).
    pub failed: usize,
    /// Failed with `persist_all = false` and could not be written: lost.
    pub lost: usize,
}

impl Pending {
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
    pub fn merge(&mut self, other: Pending) {
        if self.outbox.is_none() {
            self.outbox = other.outbox;
        }
        self.items.extend(other.items);
        self.wake |= other.wake;
    }

    /// Publish in the background on the current Tokio runtime, at most
    /// `on_commit_concurrency` batches at once per outbox, and wake local relays. Outside a
    /// Tokio runtime nothing is published now (an error is logged): persisted rows are
    /// published by a relay once the committer's lease expires.
    pub fn dispatch(self) {
        let Some(outbox) = self.outbox.clone() else {
            return;
        };
        if self.items.is_empty() {
            if self.wake {
                outbox.inner.store.notify_committed();
            }
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Never panic after a commit: persisted rows go to a relay once the committer's
            // lease expires; unpersisted ones (persist_all = false) cannot be saved.
            tracing::error!(
                count = self.items.len(),
                "Pending::dispatch called outside a Tokio runtime: not published now; persisted rows are left to the relay"
            );
            return;
        };
        let permits = outbox.inner.permits.clone();
        runtime.spawn(async move {
            let _permit = permits.acquire_owned().await;
            self.publish().await;
        });
    }

    /// Publish now and wait for the outcome (also wakes local relays).
    pub async fn publish(self) -> DispatchReport {
        let Some(outbox) = self.outbox else {
            return DispatchReport::default();
        };
        if self.wake {
            outbox.inner.store.notify_committed();
        }
        if self.items.is_empty() {
            return DispatchReport::default();
        }
        let span = tracing::info_span!("outbox.publish_on_commit", count = self.items.len());
        outbox.publish_on_commit(self.items).instrument(span).await
    }
}
