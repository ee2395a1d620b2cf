//! The enqueue side: [`Outbox`] validates, signs and routes messages to a strategy, and
//! writes them in the caller's transaction through the store's [`Enqueue`] (or
//! [`EnqueueBlocking`]) implementation; [`AfterCommit`] publishes publish-on-commit messages
//! right after the commit, and [`Outbox::shutdown`] waits for those still in flight.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::error::{Error, ErrorKind, Result, Retry};
use crate::message::{Encoder, Envelope, JsonEncoder, Message, MessageId, Status};
use crate::observer::{Event, Observer, Observers};
use crate::publisher::Publisher;
use crate::relay::RelayBuilder;
use crate::retry::RetryPolicy;
use crate::settings::Config;
use crate::signing::{SignedPlan, Signer};
use crate::store::{Enqueue, EnqueueBlocking, NewMessage, Store};
use crate::strategy::{Plan, PublishedBy, Strategy};

mod after_commit;
pub use after_commit::{AfterCommit, DispatchReport, Prepared};

/// The application's handle: writes messages in the caller's transaction
/// ([`enqueue`](Self::enqueue)) and publishes publish-on-commit messages after the commit.
/// `S` is the store's type, so a transaction of the wrong database does not compile. Cheap to
/// clone.
///
/// Built with a publisher ([`Outbox::builder`]) or without one ([`Outbox::writer`]: a
/// process that only writes relay-published messages needs no broker connection).
pub struct Outbox<S> {
    store: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for Outbox<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// Adds headers to every message at enqueue (trace context, tenant, ...).
pub type HeaderInjector = dyn Fn(&mut Message) + Send + Sync;

/// What an outbox and its [`AfterCommit`] handles share, whatever the store's type.
struct Shared {
    injector: Option<Arc<HeaderInjector>>,
    store: Arc<dyn Store>,
    publisher: Option<Arc<dyn Publisher>>,
    config: Config,
    encoder: Arc<dyn Encoder>,
    observers: Observers,
    owner: String,
    permits: Arc<Semaphore>,
    in_flight: InFlight,
}

/// Counts dispatched publish-on-commit tasks so that [`Outbox::shutdown`] can wait for them.
#[derive(Default)]
struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Held by one dispatched task; its drop (also on panic or cancellation) counts it out.
struct InFlightGuard(Arc<Shared>);

impl InFlightGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared
            .in_flight
            .count
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let f = &self.0.in_flight;
        if f.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            f.idle.notify_waiters();
        }
    }
}

/// Builds an [`Outbox`].
pub struct OutboxBuilder<S> {
    injector: Option<Arc<HeaderInjector>>,
    store: S,
    publisher: Option<Arc<dyn Publisher>>,
    config: Config,
    encoder: Arc<dyn Encoder>,
    observers: Vec<Arc<dyn Observer>>,
}

impl<S: Store + Clone + 'static> Outbox<S> {
    /// Start building an outbox over `store` that publishes publish-on-commit messages with
    /// `publisher` right after the commit.
    pub fn builder(store: S, publisher: impl Publisher + 'static) -> OutboxBuilder<S> {
        let mut b = Self::writer(store);
        b.publisher = Some(Arc::new(publisher));
        b
    }

    /// Start building a writer-only outbox: it needs no broker, and every message goes to a
    /// relay: a message whose strategy answers publish-on-commit is written for the relays
    /// instead (as with [`RelayOnly`](crate::RelayOnly)), which publish it at once, woken by
    /// the commit. Give its relays a publisher with [`Outbox::relay_with`].
    pub fn writer(store: S) -> OutboxBuilder<S> {
        OutboxBuilder {
            injector: None,
            store,
            publisher: None,
            config: Config::default(),
            encoder: Arc::new(JsonEncoder),
            observers: Vec::new(),
        }
    }
}

impl<S> Outbox<S> {
    /// The settings.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// A message whose payload is `value` encoded by the configured encoder.
    pub fn message<T: Serialize + ?Sized>(
        &self,
        destination: impl Into<String>,
        value: &T,
    ) -> Result<Message> {
        Message::encoded(destination, value, self.shared.encoder.as_ref())
    }

    /// A deferred call of the function registered as `function` in a
    /// [`FunctionPublisher`](crate::FunctionPublisher), with `args` as its payload.
    pub fn call<T: Serialize + ?Sized>(&self, function: &str, args: &T) -> Result<Message> {
        Ok(self.message(function, args)?.header("outbox-kind", "call"))
    }

    /// Write `messages` in the caller's transaction `tx` (`&mut tx` of the store's own
    /// transaction type, such as `sqlx::Transaction<'_, Postgres>`). Either every message is
    /// written or, on error, none is. Commit `tx`, then [`dispatch`](AfterCommit::dispatch)
    /// the returned handle (the backends' `commit(tx, after)` does both); on rollback drop it.
    ///
    /// Several calls in one transaction are fine: [`merge`](AfterCommit::merge) their handles.
    ///
    /// Nothing is published before the outermost transaction commits: a message that would
    /// be published after the commit (publish-on-commit) is refused in a savepoint (a nested
    /// transaction, [`Enqueue::transaction_depth`] over 1) with an
    /// [`ErrorKind::Savepoint`](crate::ErrorKind::Savepoint) error and nothing written, since
    /// releasing a savepoint commits nothing and its parent may still roll back. Messages only
    /// relays publish (keep-order) are fine there: their rows live and die with the savepoint.
    pub async fn enqueue<Tx>(
        &self,
        tx: &mut Tx,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<AfterCommit>
    where
        Tx: Send + ?Sized,
        S: Enqueue<Tx>,
    {
        let prepared = self.prepare(messages)?;
        let depth = self.store.transaction_depth(tx);
        if depth > 1 && prepared.publishes_after_commit() {
            return Err(Error::savepoint(depth));
        }
        let seqs = self
            .store
            .write_rows(tx, prepared.rows(), prepared.needs_seqs())
            .await?;
        prepared.into_after_commit(seqs)
    }

    /// [`enqueue`](Self::enqueue) for stores whose transactions are synchronous (SQLite's
    /// `rusqlite::Transaction`, the memory store's [`MemoryTx`](crate::MemoryTx)).
    pub fn enqueue_blocking<Tx>(
        &self,
        tx: &mut Tx,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<AfterCommit>
    where
        Tx: ?Sized,
        S: EnqueueBlocking<Tx>,
    {
        let prepared = self.prepare(messages)?;
        let seqs = self
            .store
            .write_rows_blocking(tx, prepared.rows(), prepared.needs_seqs())?;
        prepared.into_after_commit(seqs)
    }

    /// Validate, assign ids, resolve strategies and sign. Nothing is written:
    /// [`enqueue`](Self::enqueue) does this, then has the store write [`Prepared::rows`].
    /// Public for stores written outside this project. Either every message is accepted or
    /// none is.
    pub fn prepare(&self, messages: impl IntoIterator<Item = Message>) -> Result<Prepared> {
        let sh = &self.shared;
        let cfg = &sh.config;
        let mut rows = Vec::new();
        let mut deferred = Vec::new();
        let now = SystemTime::now();
        for mut message in messages {
            if let Some(inject) = &sh.injector {
                inject(&mut message);
            }
            message.validate(cfg.delivery.max_payload_bytes)?;
            let mut plan = Plan::resolve(
                cfg.strategy_for(&message.stream),
                &message,
                cfg.max_delay,
                now,
            )?;
            if sh.publisher.is_none() {
                // A writer-only outbox: nobody here publishes after the commit.
                plan.published_by = PublishedBy::Relay;
            }
            message.schedule = None;
            let envelope = Envelope {
                id: MessageId::new(),
                created_at: now,
                message,
            };
            let signature = cfg.delivery.signer.as_ref().map(|s| {
                let signed = SignedPlan {
                    order: plan.order,
                    unit: &plan.unit,
                    exhausted: plan.exhausted,
                };
                s.sign(&envelope, &signed, &sh.store.signing_scope())
            });
            let on_commit = plan.published_by == PublishedBy::Committer;
            let row = NewMessage {
                envelope,
                order: plan.order,
                unit: std::mem::take(&mut plan.unit),
                exhausted: plan.exhausted,
                published_by: plan.published_by,
                signature,
                status: Status::Pending,
                attempts: 0,
                retry_after: plan.delay,
                not_before: plan.not_before,
                last_error: None,
                lease: on_commit.then(|| (sh.owner.clone(), cfg.on_commit_lease)),
            };
            if on_commit && !cfg.persist_all {
                deferred.push(row);
            } else {
                rows.push(row);
            }
        }
        Ok(Prepared {
            shared: self.shared.clone(),
            rows,
            deferred,
        })
    }

    /// A relay over the same store, publisher, observers and settings. A writer-only outbox
    /// has no publisher: its relay's [`build`](RelayBuilder::build) fails with a
    /// configuration error; use [`relay_with`](Self::relay_with).
    pub fn relay(&self) -> RelayBuilder<Arc<dyn Store>, Arc<dyn Publisher>> {
        let sh = &self.shared;
        match &sh.publisher {
            Some(p) => RelayBuilder::new(sh.store.clone(), p.clone())
                .with_config(&sh.config)
                .observers(sh.observers.0.clone()),
            None => RelayBuilder::new(
                sh.store.clone(),
                Arc::new(crate::publisher::NullPublisher) as Arc<dyn Publisher>,
            )
            .refuse(Error::config(
                "this outbox was built without a publisher (Outbox::writer): build its relay with relay_with(publisher)",
            )),
        }
    }

    /// A relay over the same store, observers and settings that publishes with `publisher`.
    pub fn relay_with<P: Publisher>(&self, publisher: P) -> RelayBuilder<Arc<dyn Store>, P> {
        let sh = &self.shared;
        RelayBuilder::new(sh.store.clone(), publisher)
            .with_config(&sh.config)
            .observers(sh.observers.0.clone())
    }

    /// Park a keep-order unit by hand ([`Store::park_unit`]), and tell the observers.
    pub async fn park_unit(&self, stream: &str, unit: &str, reason: &str) -> Result<()> {
        self.shared.store.park_unit(stream, unit, reason).await?;
        self.shared.observers.emit(&Event::Parked {
            stream,
            unit,
            reason,
            envelope: None,
        });
        Ok(())
    }

    /// Resume a parked unit ([`StoreAdmin::resume_unit`](crate::StoreAdmin::resume_unit)), and tell the observers.
    pub async fn resume_unit(&self, stream: &str, unit: &str) -> Result<()>
    where
        S: crate::StoreAdmin,
    {
        self.store.resume_unit(stream, unit).await?;
        self.shared.observers.emit(&Event::Resumed {
            stream,
            unit,
            skipped: None,
        });
        Ok(())
    }

    /// Dead-letter a parked unit's head and resume the rest ([`StoreAdmin::skip_head`](crate::StoreAdmin::skip_head)), and tell
    /// the observers. Returns the skipped head's `seq`.
    pub async fn skip_head(&self, stream: &str, unit: &str) -> Result<Option<i64>>
    where
        S: crate::StoreAdmin,
    {
        let skipped = self.store.skip_head(stream, unit).await?;
        self.shared.observers.emit(&Event::Resumed {
            stream,
            unit,
            skipped,
        });
        Ok(skipped)
    }

    /// Publish-on-commit batches dispatched and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.shared
            .in_flight
            .count
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait, at most `timeout`, until every publish-on-commit batch dispatched so far has
    /// finished: published and marked sent, or (failed) recorded for the relay. Call it when
    /// the service stops, after its last commit and before the runtime ends: a dispatched
    /// task the runtime drops mid-publish leaves its rows leased until `on_commit_lease`
    /// passes (`persist_all = true`), or loses them (`persist_all = false`).
    ///
    /// Returns a [`ErrorKind::Timeout`] error, saying how many batches are still in flight,
    /// if they do not finish in time.
    pub async fn shutdown(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let f = &self.shared.in_flight;
        loop {
            let idle = f.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let n = f.count.load(std::sync::atomic::Ordering::SeqCst);
            if n == 0 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                let n = f.count.load(std::sync::atomic::Ordering::SeqCst);
                if n == 0 {
                    return Ok(());
                }
                return Err(Error::new(
                    ErrorKind::Timeout,
                    Retry::Transient,
                    format!("{n} publish-on-commit batches still in flight after {timeout:?}"),
                ));
            }
        }
    }
}

impl<S> std::fmt::Debug for Outbox<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("config", &self.shared.config)
            .field("owner", &self.shared.owner)
            .field("publisher", &self.shared.publisher.is_some())
            .finish()
    }
}

impl<S: Store + Clone + 'static> OutboxBuilder<S> {
    /// Replace all settings.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Strategy of streams without an override ([`PublishOnCommit`](crate::PublishOnCommit)
    /// unless set).
    pub fn strategy(mut self, strategy: impl Strategy) -> Self {
        self.config.default_strategy = Arc::new(strategy);
        self
    }

    /// Override the strategy of one stream.
    pub fn stream_strategy(mut self, stream: impl Into<String>, strategy: impl Strategy) -> Self {
        self.config
            .stream_strategies
            .insert(stream.into(), Arc::new(strategy));
        self
    }

    /// See [`Config::max_delay`].
    pub fn max_delay(mut self, max: Duration) -> Self {
        self.config.max_delay = max;
        self
    }

    /// See [`Config::persist_all`].
    pub fn persist_all(mut self, yes: bool) -> Self {
        self.config.persist_all = yes;
        self
    }

    /// See [`Delivery::delete_after_send`](crate::Delivery::delete_after_send).
    pub fn delete_after_send(mut self, yes: bool) -> Self {
        self.config.delivery.delete_after_send = yes;
        self
    }

    /// See [`Delivery::retry`](crate::Delivery::retry).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.config.delivery.retry = retry;
        self
    }

    /// See [`Delivery::dead_letter_keep_order`](crate::Delivery::dead_letter_keep_order).
    pub fn dead_letter_keep_order(mut self, yes: bool) -> Self {
        self.config.delivery.dead_letter_keep_order = yes;
        self
    }

    /// Sign every row with `signer`; relays built from this outbox verify.
    pub fn signer(mut self, signer: Signer) -> Self {
        self.config.delivery.signer = Some(signer);
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
    pub fn build(self) -> Result<Outbox<S>> {
        self.config.validate()?;
        let permits = Arc::new(Semaphore::new(self.config.on_commit_concurrency));
        Ok(Outbox {
            shared: Arc::new(Shared {
                injector: self.injector,
                store: Arc::new(self.store.clone()),
                publisher: self.publisher,
                encoder: self.encoder,
                observers: Observers(self.observers),
                owner: format!("on-commit:{}", uuid::Uuid::now_v7()),
                permits,
                config: self.config,
                in_flight: InFlight::default(),
            }),
            store: self.store,
        })
    }
}
