//! The [`Publisher`] trait and the publishers that need no broker: a router, named async
//! functions, stdout, and recording / fault-injecting publishers for tests.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result, Retry};
use crate::message::Envelope;

/// Sends messages to a broker or any external system.
///
/// # Contract
/// - `Ok(())` means the broker has durably accepted the message (for Kafka: acknowledged with
///   the configured acks; for RabbitMQ: confirmed). The relay marks the row only after that.
/// - Errors say whether retrying can help ([`Error::retry`]): a transient error is retried
///   with backoff, a permanent one dead-letters the message (or blocks a keep-order unit).
/// - `publish_batch` returns exactly one result per input, in input order. Implementations
///   should send all messages and then await all acknowledgements (one round trip per batch,
///   not per message). The default publishes one by one, and a panic in one `publish` call
///   becomes that message's error only.
/// - A panic is never fatal: the relay and the publish-on-commit path turn it into a transient
///   failure of the message (an attempt, then retries and dead letters as for any error). If a
///   `publish_batch` override panics, each message of the batch is published again on its own.
/// - Messages of one ordering unit appear at most once per batch: the relay sends a unit's
///   next message only after the previous one was acknowledged. Unless the publisher keeps a
///   batch's order ([`ordered_batches`](Publisher::ordered_batches)): then a unit's claimed
///   run to one destination comes in one batch, in order. Consumers de-duplicate on the
///   message id and act on the first copy they see, so order means the order of first
///   deliveries: once a unit's message *i* is refused, no later message of the unit may
///   reach the broker in that batch. The relay enforces it for refusals before sending
///   ([`check_message`](Publisher::check_message) cuts the run); an ordered publisher
///   promises it for the rest (see [`ordered_batches`](Publisher::ordered_batches)).
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publish one message.
    async fn publish(&self, envelope: &Envelope) -> Result<()>;

    /// Whether `publish_batch` hands a batch to the broker in order over one ordered channel
    /// (a Redis pipeline on one connection, one Kafka producer with idempotence on, one
    /// RabbitMQ channel with confirms), so that the messages of one ordering unit in a batch
    /// reach the broker in batch order. The relay then sends a keep-order unit's run to one
    /// destination in one batch instead of one acknowledged message at a time (a head that
    /// has failed before is sent alone until it goes through, so a stuck unit does not send
    /// its followers on every retry). Worth it only for a publisher that pipelines; one that
    /// sends message by message (the default `publish_batch`) gains nothing. Default: false.
    ///
    /// # Contract
    /// Returning true promises that within one `publish_batch`, once a message to a
    /// destination fails, no later message of the batch to that destination is delivered:
    /// - a refusal the publisher can tell before sending (a header the broker interprets, a
    ///   size over its limit) is refused by [`check_message`](Self::check_message) too, so
    ///   the relay never hands the message over with its followers;
    /// - a refusal it cannot tell in advance (a full local queue) makes the publisher refuse
    ///   the batch's later messages to the same destination without sending them;
    /// - a refusal after sending is one the broker applies to the later messages to that
    ///   destination as well (a closed channel, a missing topic or exchange, a key of the
    ///   wrong type, Kafka's idempotent producer failing a partition's later records).
    ///
    /// The relay counts any gap it sees anyway (a later message of a unit acknowledged after
    /// an earlier one failed) in `outbox_order_gaps_total` and logs it.
    fn ordered_batches(&self) -> bool {
        false
    }

    /// Whether this publisher would refuse `envelope` without sending it, and why: the
    /// checks a publisher makes before sending (a header the broker would interpret, a header
    /// table over a frame). Sends nothing. The relay asks before it hands an
    /// [ordered](Self::ordered_batches) unit's run over, and cuts the run at the first
    /// refusal, so that no later message of the unit goes out in that batch. `publish` must
    /// refuse what this refuses. The default accepts everything.
    fn check_message(&self, envelope: &Envelope) -> Result<()> {
        let _ = envelope;
        Ok(())
    }

    /// Check that the broker is reachable, sending no message (a `PING`, a metadata request,
    /// an open channel). `outbox doctor` calls it. The default succeeds: a publisher that
    /// cannot check says nothing.
    async fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Publish a batch; one result per message, in order.
    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<Result<()>> {
        let mut out = Vec::with_capacity(batch.len());
        for envelope in batch {
            out.push(catch_panic(self.publish(envelope)).await.and_then(|r| r));
        }
        out
    }
}

/// The one result of a one-message `publish_batch`: a publisher that implements `publish`
/// through its batch path uses this, so a batch that returns no result (or several) is an
/// error, never a silent success.
pub fn single_result(mut results: Vec<Result<()>>) -> Result<()> {
    match results.len() {
        1 => results
            .pop()
            .unwrap_or_else(|| Err(Error::transient("no result"))),
        n => Err(Error::new(
            ErrorKind::Publish,
            Retry::Transient,
            format!("the publisher returned {n} results for one message"),
        )),
    }
}

/// Run `fut`, turning a panic into an error that carries the panic message.
pub(crate) async fn catch_panic<T>(fut: impl std::future::Future<Output = T>) -> Result<T> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|payload| {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string payload".to_owned());
            Error::new(
                ErrorKind::Publish,
                Retry::Transient,
                format!("publisher panicked: {what}"),
            )
        })
}

macro_rules! forward_publisher {
    ($($ty:ty),*) => {$(
        #[async_trait]
        impl<T: Publisher + ?Sized> Publisher for $ty {
            async fn publish(&self, envelope: &Envelope) -> Result<()> {
                (**self).publish(envelope).await
            }
            async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<Result<()>> {
                (**self).publish_batch(batch).await
            }
            fn ordered_batches(&self) -> bool {
                (**self).ordered_batches()
            }
            fn check_message(&self, envelope: &Envelope) -> Result<()> {
                (**self).check_message(envelope)
            }
            async fn check(&self) -> Result<()> {
                (**self).check().await
            }
        }
    )*};
}

forward_publisher!(&T, Box<T>, Arc<T>);

/// Routes each message to a publisher by stream, then by destination prefix (longest
/// first), then to a fallback. One relay can so serve many external systems.
///
/// ```
/// use outbox_core::{Router, StdoutPublisher, RecordingPublisher};
/// let router = Router::new()
///     .stream("audit", StdoutPublisher::default())
///     .prefix("billing.", RecordingPublisher::new());
/// ```
#[derive(Default, Clone)]
pub struct Router {
    streams: HashMap<String, Arc<dyn Publisher>>,
    prefixes: Vec<(String, Arc<dyn Publisher>)>,
    fallback: Option<Arc<dyn Publisher>>,
}

impl Router {
    /// An empty router: every message is unroutable until a route is added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Send every message of `stream` to `publisher`.
    pub fn stream(
        mut self,
        stream: impl Into<String>,
        publisher: impl Publisher + 'static,
    ) -> Self {
        self.streams.insert(stream.into(), Arc::new(publisher));
        self
    }

    /// Send messages whose destination starts with `prefix` to `publisher`.
    pub fn prefix(
        mut self,
        prefix: impl Into<String>,
        publisher: impl Publisher + 'static,
    ) -> Self {
        self.prefixes.push((prefix.into(), Arc::new(publisher)));
        self.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        self
    }

    /// Send everything else to `publisher`.
    pub fn fallback(mut self, publisher: impl Publisher + 'static) -> Self {
        self.fallback = Some(Arc::new(publisher));
        self
    }

    fn route(&self, envelope: &Envelope) -> Result<&Arc<dyn Publisher>> {
        let m = &envelope.message;
        self.streams
            .get(&m.stream)
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(p, _)| m.destination.starts_with(p.as_str()))
                    .map(|(_, p)| p)
            })
            .or(self.fallback.as_ref())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unroutable,
                    Retry::Permanent,
                    format!(
                        "no route for stream {:?} destination {:?}",
                        m.stream, m.destination
                    ),
                )
            })
    }
}

#[async_trait]
impl Publisher for Router {
    async fn publish(&self, envelope: &Envelope) -> Result<()> {
        self.route(envelope)?.publish(envelope).await
    }

    fn check_message(&self, envelope: &Envelope) -> Result<()> {
        self.route(envelope)?.check_message(envelope)
    }

    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<Result<()>> {
        // Group by target publisher (pointer identity), keep each group's order, and send
        // each group as one batch.
        let mut results: Vec<Option<Result<()>>> = (0..batch.len()).map(|_| None).collect();
        let mut groups: Vec<(Arc<dyn Publisher>, Vec<usize>)> = Vec::new();
        for (i, env) in batch.iter().enumerate() {
            match self.route(env) {
                Err(e) => results[i] = Some(Err(e)),
                Ok(p) => match groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, p)) {
                    Some((_, idx)) => idx.push(i),
                    None => groups.push((p.clone(), vec![i])),
                },
            }
        }
        let sends = groups.iter().map(|(p, idx)| {
            let envs: Vec<&Envelope> = idx.iter().map(|&i| batch[i]).collect();
            async move { p.publish_batch(&envs).await }
        });
        let outs = futures_util::future::join_all(sends).await;
        for ((_, idx), out) in groups.iter().zip(outs) {
            for (&i, r) in idx.iter().zip(out) {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(Error::permanent("publisher returned too few results")))
            })
            .collect()
    }
}

type BoxFn =
    Arc<dyn Fn(Envelope) -> Pin<Box<dyn Future<Output = Result<()>> + Send>> + Send + Sync>;

/// Runs a registered async function by name: the destination is the function's name and
/// the payload its (encoded) arguments. This is the answer to jaiminho's `@save_to_outbox`
/// decorator: a call to an external system recorded in the transaction and run after the
/// commit (or by the relay), retried until it succeeds.
///
/// ```
/// use outbox_core::{FunctionPublisher, Error};
/// let functions = FunctionPublisher::new().register("send_welcome_email", |env| async move {
///     let args: serde_json::Value = serde_json::from_slice(&env.message.payload)?;
///     let _to = args["to"].as_str().ok_or_else(|| Error::permanent("missing 'to'"))?;
///     Ok(())
/// });
/// ```
#[derive(Default, Clone)]
pub struct FunctionPublisher {
    functions: HashMap<String, BoxFn>,
}

impl FunctionPublisher {
    /// No functions yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `f` under `name`.
    pub fn register<F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        self.functions
            .insert(name.into(), Arc::new(move |env| Box::pin(f(env))));
        self
    }
}

#[async_trait]
impl Publisher for FunctionPublisher {
    async fn publish(&self, envelope: &Envelope) -> Result<()> {
        let f = self
            .functions
            .get(&envelope.message.destination)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unroutable,
                    Retry::Permanent,
                    format!(
                        "no function registered as {:?}",
                        envelope.message.destination
                    ),
                )
            })?;
        f(envelope.clone()).await
    }
}

/// Prints each message as one line on stdout (for examples and debugging).
#[derive(Debug, Default, Clone)]
pub struct StdoutPublisher {
    _private: (),
}

#[async_trait]
impl Publisher for StdoutPublisher {
    async fn publish(&self, envelope: &Envelope) -> Result<()> {
        let m = &envelope.message;
        // Control characters are escaped: the text came from a row, not from us.
        let p = crate::redact::printable;
        let line = format!(
            "published id={} stream={} destination={} key={} payload={}\n",
            envelope.id,
            p(&m.stream),
            p(&m.destination),
            p(m.key.as_deref().unwrap_or("-")),
            p(&String::from_utf8_lossy(&m.payload))
        );
        std::io::stdout()
            .lock()
            .write_all(line.as_bytes())
            .map_err(|e| Error::transient("stdout write failed").with_source(e))
    }
}

/// Accepts and discards everything (benchmarks: the relay's own cost without a broker).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullPublisher;

#[async_trait]
impl Publisher for NullPublisher {
    async fn publish(&self, _envelope: &Envelope) -> Result<()> {
        Ok(())
    }

    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<Result<()>> {
        batch.iter().map(|_| Ok(())).collect()
    }

    fn ordered_batches(&self) -> bool {
        true
    }
}

/// Records every successful publish, in order (for tests and examples).
#[derive(Debug, Default, Clone)]
pub struct RecordingPublisher {
    log: Arc<Mutex<Vec<Envelope>>>,
}

impl RecordingPublisher {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything published so far, in publish order.
    pub fn published(&self) -> Vec<Envelope> {
        self.log.lock().unwrap().clone()
    }

    /// How many publishes succeeded.
    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }
}

#[async_trait]
impl Publisher for RecordingPublisher {
    async fn publish(&self, envelope: &Envelope) -> Result<()> {
        self.log.lock().unwrap().push(envelope.clone());
        Ok(())
    }
}

/// Decides, per message, whether a [`FaultyPublisher`] fails it.
pub type FaultFn = dyn Fn(&Envelope) -> Option<Error> + Send + Sync;

/// Wraps a publisher and fails the messages a function picks (fault injection for tests).
#[derive(Clone)]
pub struct FaultyPublisher<P> {
    inner: P,
    fault: Arc<FaultFn>,
}

impl<P: Publisher> FaultyPublisher<P> {
    /// Fail a message when `fault` returns an error for it.
    pub fn new(
        inner: P,
        fault: impl Fn(&Envelope) -> Option<Error> + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner,
            fault: Arc::new(fault),
        }
    }

    /// Fail each publish with probability `rate` (transiently), from a seeded generator.
    pub fn random(inner: P, rate: f64, seed: u64) -> Self {
        use rand::{Rng, SeedableRng};
        let rng = Mutex::new(rand::rngs::StdRng::seed_from_u64(seed));
        Self::new(inner, move |_| {
            rng.lock()
                .unwrap()
                .gen_bool(rate)
                .then(|| Error::transient("injected transient failure"))
        })
    }

    /// The wrapped publisher.
    pub fn inner(&self) -> &P {
        &self.inner
    }
}

#[async_trait]
impl<P: Publisher> Publisher for FaultyPublisher<P> {
    async fn publish(&self, envelope: &Envelope) -> Result<()> {
        if let Some(e) = (self.fault)(envelope) {
            return Err(e);
        }
        self.inner.publish(envelope).await
    }

    fn check_message(&self, envelope: &Envelope) -> Result<()> {
        self.inner.check_message(envelope)
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
///
/// `runs` (the relay's ordered runs: lengths of consecutive messages of one unit; `None`:
/// every message on its own) keeps that fallback in order: once a message of a run fails,
/// the rest of the run is not sent again.
///
/// Public for relays built outside the core (the PostgreSQL WAL relay): one guarded publish
/// path for every relay.
pub async fn publish_with_timeout(
    publisher: &dyn Publisher,
    envs: &[&Envelope],
    runs: Option<&[usize]>,
    timeout: Duration,
) -> Vec<Result<()>> {
    #[cfg(feature = "otel")]
    {
        // A publish span per message; each goes out with its span's context.
        let spans = crate::otel::start_publish(envs);
        let refs: Vec<&Envelope> = spans.envelopes.iter().collect();
        let results = publish_within(publisher, &refs, runs, timeout).await;
        crate::otel::end_publish(spans, &results);
        results
    }
    #[cfg(not(feature = "otel"))]
    publish_within(publisher, envs, runs, timeout).await
}

async fn publish_within(
    publisher: &dyn Publisher,
    envs: &[&Envelope],
    runs: Option<&[usize]>,
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
    let outcome =
        tokio::time::timeout_at(deadline, catch_panic(publisher.publish_batch(envs))).await;
    metrics::histogram!("outbox_publish_seconds").record(started.elapsed().as_secs_f64());
    let mut results = match outcome {
        Ok(Ok(r)) => r,
        Err(_) => return (0..n).map(|_| timed_out()).collect(),
        Ok(Err(panic)) if n == 1 => return vec![Err(panic)],
        Ok(Err(panic)) => {
            tracing::warn!(error = %panic, count = n, "publisher panicked on a batch; publishing its messages one by one");
            let ones = vec![1; n];
            let runs = runs.filter(|r| r.iter().sum::<usize>() == n);
            let mut out = Vec::with_capacity(n);
            let mut rest = envs;
            for &len in runs.unwrap_or(&ones) {
                let (run, after) = rest.split_at(len.min(rest.len()));
                rest = after;
                let mut failed = false;
                for env in run {
                    let result = if failed {
                        Err(Error::transient(
                            "not sent: an earlier message of its unit failed in this batch",
                        ))
                    } else {
                        match tokio::time::timeout_at(deadline, catch_panic(publisher.publish(env)))
                            .await
                        {
                            Ok(Ok(r)) => r,
                            Ok(Err(panic)) => Err(panic),
                            Err(_) => timed_out(),
                        }
                    };
                    failed |= result.is_err();
                    out.push(result);
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Message, MessageId};

    fn env(stream: &str, dest: &str) -> Envelope {
        Envelope {
            id: MessageId::new(),
            created_at: std::time::SystemTime::now(),
            message: Message::new(dest, b"x".to_vec()).stream(stream),
        }
    }

    #[test]
    fn a_batch_of_one_must_return_one_result() {
        assert!(single_result(vec![Ok(())]).is_ok());
        assert!(single_result(vec![Err(Error::permanent("x"))]).is_err());
        let none = single_result(vec![]).unwrap_err();
        assert!(
            none.is_transient() && none.to_string().contains("0 results"),
            "{none}"
        );
        assert!(single_result(vec![Ok(()), Ok(())]).is_err());
    }

    #[tokio::test]
    async fn router_routes_by_stream_then_longest_prefix_then_fallback() {
        let (a, b, c, d) = (
            RecordingPublisher::new(),
            RecordingPublisher::new(),
            RecordingPublisher::new(),
            RecordingPublisher::new(),
        );
        let router = Router::new()
            .stream("audit", a.clone())
            .prefix("billing.", b.clone())
            .prefix("billing.eu.", c.clone())
            .fallback(d.clone());
        let batch = [
            env("audit", "billing.x"),
            env("s", "billing.us"),
            env("s", "billing.eu.de"),
            env("s", "other"),
        ];
        let refs: Vec<&Envelope> = batch.iter().collect();
        let out = router.publish_batch(&refs).await;
        assert!(out.iter().all(|r| r.is_ok()));
        assert_eq!((a.count(), b.count(), c.count(), d.count()), (1, 1, 1, 1));
        assert_eq!(c.published()[0].message.destination, "billing.eu.de");

        let e = Router::new().publish(&env("s", "x")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unroutable);
        assert!(!e.is_transient());
    }

    #[tokio::test]
    async fn function_publisher_calls_by_name() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let f = FunctionPublisher::new().register("greet", move |env: Envelope| {
            let s2 = s2.clone();
            async move {
                s2.lock().unwrap().push(env.message.payload);
                Ok(())
            }
        });
        f.publish(&env("s", "greet")).await.unwrap();
        assert_eq!(seen.lock().unwrap().len(), 1);
        let e = f.publish(&env("s", "nope")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unroutable);
    }

    #[tokio::test]
    async fn faulty_publisher_fails_what_it_picks() {
        let rec = RecordingPublisher::new();
        let p = FaultyPublisher::new(rec.clone(), |e| {
            (e.message.destination == "bad").then(|| Error::permanent("poison"))
        });
        let batch = [env("s", "ok"), env("s", "bad"), env("s", "ok")];
        let refs: Vec<&Envelope> = batch.iter().collect();
        let out = p.publish_batch(&refs).await;
        assert!(out[0].is_ok() && out[1].is_err() && out[2].is_ok());
        assert_eq!(rec.count(), 2);
        // Arc<dyn Publisher> is a Publisher too.
        let dynp: Arc<dyn Publisher> = Arc::new(p);
        assert!(dynp.publish(&env("s", "ok")).await.is_ok());
    }
}
