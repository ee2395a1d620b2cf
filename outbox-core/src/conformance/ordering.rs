//! Order per unit: failures, blocked units, deep backlogs, refusals in ordered runs.

use super::*;

/// Contract point 4: Keep-order: commit order per (stream, key) under random transient
/// failures, with four relays (each its own connection, two batches at once each) at once;
/// nothing published twice. Run twice: with a publisher that gets one row per unit per call,
/// and with one that keeps a batch's order (its relays claim units 16 rows deep, and a
/// failure in a batch stops the rest of it).
pub async fn keep_order_per_key_under_failures<H: Harness>(h: &H) {
    keep_order_with_four_relays(h, false).await;
    keep_order_with_four_relays(h, true).await;
}

/// Fails at random (as [`FaultyPublisher::random`]); keeps a batch's order: after a failure,
/// nothing more of the batch is sent.
struct OrderedFaulty(FaultyPublisher<RecordingPublisher>);

#[async_trait]
impl crate::Publisher for OrderedFaulty {
    async fn publish(&self, env: &Envelope) -> crate::Result<()> {
        self.0.publish(env).await
    }
    fn ordered_batches(&self) -> bool {
        true
    }
    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<crate::Result<()>> {
        let mut out = Vec::with_capacity(batch.len());
        let mut failed = false;
        for env in batch {
            out.push(if failed {
                Err(Error::transient(
                    "not sent: an earlier message of the batch failed",
                ))
            } else {
                let r = self.0.publish(env).await;
                failed = r.is_err();
                r
            });
        }
        out
    }
}

async fn keep_order_with_four_relays<H: Harness>(h: &H, ordered: bool) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .retry(fast_retry(1_000))
        .build()
        .unwrap();
    let keys = ["a", "b", "c", "d", "e"];
    let per_key = 24;
    for round in 0..per_key / 4 {
        let mut batch = Vec::new();
        for i in 0..4 {
            for k in keys {
                batch.push(msg("s", Some(k), round * 4 + i));
            }
        }
        // and a keyless unit on another stream
        batch.push(msg("t", None, round));
        h.transact(&store, &outbox, batch, true)
            .await
            .unwrap()
            .dispatch();
    }
    let expected = keys.len() * per_key + per_key / 4;

    let mut running = Vec::new();
    let mut relays = vec![store.clone()];
    for _ in 0..3 {
        relays.push(h.reopen(&store).await);
    }
    assert_eq!(relays.len(), 4);
    for (i, s) in relays.into_iter().enumerate() {
        let faulty = FaultyPublisher::random(broker.clone(), 0.25, 7 + i as u64);
        let publisher: Arc<dyn crate::Publisher> = if ordered {
            Arc::new(OrderedFaulty(faulty))
        } else {
            Arc::new(faulty)
        };
        let relay = Relay::builder(s, publisher)
            .retry(fast_retry(1_000))
            .batch_size(5)
            .concurrency(2)
            .poll_interval(Duration::from_millis(20))
            .build()
            .unwrap();
        running.push(RunningRelay::spawn(relay));
    }
    eventually("all keep-order messages published", DEADLINE, || async {
        broker.count() >= expected
    })
    .await;
    for r in running {
        r.stop().await;
    }
    let mut seen: HashMap<(String, Option<String>), Vec<usize>> = HashMap::new();
    for e in broker.published() {
        let n: usize = String::from_utf8(e.message.payload)
            .unwrap()
            .parse()
            .unwrap();
        seen.entry((e.message.stream, e.message.key))
            .or_default()
            .push(n);
    }
    for (unit, ns) in &seen {
        let expect: Vec<usize> = (0..ns.len()).collect();
        assert_eq!(
            ns, &expect,
            "unit {unit:?} published out of order or twice (ordered publisher: {ordered})"
        );
    }
    assert_eq!(broker.count(), expected);
}

/// Contract point 4/5: A failing keep-order head blocks its own unit only and is reported stuck; with
/// dead-lettering opted in, it is dead-lettered and its unit moves on.
pub async fn keep_order_failing_head_blocks_only_its_unit<H: Harness>(h: &H) {
    for dead_letter in [false, true] {
        let store = h.fresh().await;
        let broker = RecordingPublisher::new();
        let publisher = FaultyPublisher::new(broker.clone(), |e: &Envelope| {
            (e.message.destination == "poison").then(|| Error::permanent("rejected"))
        });
        let events = EventLog::default();
        let outbox = base(store.clone(), publisher)
            .strategy(KeepOrder::default())
            .config(crate::Config {
                default_strategy: Arc::new(KeepOrder::default()),
                delivery: crate::Delivery {
                    dead_letter_keep_order: dead_letter,
                    retry: fast_retry(3),
                    ..Default::default()
                },
                ..Default::default()
            })
            .observer(events.observer())
            .build()
            .unwrap();
        let batch = vec![
            Message::new("poison", b"a1".to_vec()).stream("s").key("A"),
            Message::new("ok", b"a2".to_vec()).stream("s").key("A"),
            Message::new("ok", b"b1".to_vec()).stream("s").key("B"),
            Message::new("ok", b"b2".to_vec()).stream("s").key("B"),
            Message::new("ok", b"t1".to_vec()).stream("t"),
        ];
        h.transact(&store, &outbox, batch, true)
            .await
            .unwrap()
            .dispatch();
        let relay = outbox.relay().build().unwrap();
        relay.run_once().await.unwrap();
        let got: Vec<_> = broker
            .published()
            .into_iter()
            .map(|e| e.message.payload)
            .collect();
        let a1 = find_by_payload(store.as_ref(), b"a1").await;
        if dead_letter {
            eventually("a2 follows the dead-lettered head", DEADLINE, || async {
                relay.run_once().await.unwrap();
                broker.count() == 4
            })
            .await;
            assert_eq!(
                find_by_payload(store.as_ref(), b"a1").await.status,
                Status::Dead
            );
            assert_eq!(events.count("dead"), 1);
            assert_eq!(events.count("stuck"), 0);
        } else {
            assert_eq!(got.len(), 3, "B and t flow: {got:?}");
            assert!(!got.contains(&b"a2".to_vec()), "a2 must wait behind a1");
            // At least one attempt: the head's short backoff may end within run_once.
            assert_eq!(a1.status, Status::Pending);
            assert!(a1.attempts >= 1);
            assert_eq!(find_by_payload(store.as_ref(), b"a2").await.attempts, 0);
            let reported = events.count("stuck");
            assert!(reported >= 1, "the blocked head is reported");
            assert_eq!(events.count("dead"), 0, "nothing dead-lettered by default");
            // Still blocked later, still reported.
            eventually(
                "stuck head retried and reported again",
                DEADLINE,
                || async {
                    relay.run_once().await.unwrap();
                    events.count("stuck") > reported
                },
            )
            .await;
            assert_eq!(broker.count(), 3);
        }
    }
}

/// Contract point 4 at depth: a unit whose head keeps failing, with thousands of rows queued
/// behind it, holds back none of the other units, in any claim; its own rows stay pending and
/// unpublished, in order, and nothing of it is claimed while its head backs off.
pub async fn stuck_unit_with_a_deep_backlog<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let publisher = FaultyPublisher::new(broker.clone(), |e: &Envelope| {
        (e.message.destination == "poison").then(|| Error::transient("consumer down"))
    });
    let slow = RetryPolicy {
        initial: Duration::from_secs(600),
        max: Duration::from_secs(600),
        multiplier: 2.0,
        jitter: 0.0,
        max_attempts: 100,
    };
    let outbox = base(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let behind = 3_000;
    let mut head = vec![Message::new("poison", b"stuck-head".to_vec())
        .stream("s")
        .key("stuck")];
    head.extend((0..499).map(|i| msg("s", Some("stuck"), i)));
    h.transact(&store, &outbox, head, true)
        .await
        .unwrap()
        .dispatch();
    for chunk in 1..behind / 500 {
        let rows = (0..500)
            .map(|i| msg("s", Some("stuck"), chunk * 500 + i))
            .collect();
        h.transact(&store, &outbox, rows, true)
            .await
            .unwrap()
            .dispatch();
    }
    // The stuck unit fails once before the others are even written: its head now backs off.
    let relay = Relay::builder(store.clone(), publisher)
        .retry(slow)
        .batch_size(20)
        .build()
        .unwrap();
    let first = relay.step().await.unwrap();
    assert_eq!(first.published, 0, "{first:?}");
    assert!(first.failed == 1, "the head was tried: {first:?}");

    let keys = ["k1", "k2", "k3", "k4", "k5"];
    let per_key = 40;
    for round in 0..per_key / 10 {
        let rows = keys
            .iter()
            .flat_map(|k| (0..10).map(move |i| msg("s", Some(k), round * 10 + i)))
            .collect();
        h.transact(&store, &outbox, rows, true)
            .await
            .unwrap()
            .dispatch();
    }
    let expected = keys.len() * per_key;
    let claims_with_stuck_rows = std::sync::atomic::AtomicUsize::new(0);
    eventually("every other unit published", DEADLINE, || async {
        let r = relay.step().await.unwrap();
        if r.failed > 0 || r.released > 0 {
            claims_with_stuck_rows.fetch_add(1, Ordering::SeqCst);
        }
        broker.count() >= expected
    })
    .await;
    assert_eq!(
        claims_with_stuck_rows.load(Ordering::SeqCst),
        0,
        "a claim took rows of the backing-off unit"
    );
    assert_eq!(broker.count(), expected);
    let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
    for e in broker.published() {
        let key = e.message.key.clone().unwrap_or_default();
        assert_ne!(key, "stuck", "a row behind the stuck head was published");
        let n: usize = String::from_utf8(e.message.payload)
            .unwrap()
            .parse()
            .unwrap();
        seen.entry(key).or_default().push(n);
    }
    for (key, ns) in &seen {
        assert_eq!(
            ns,
            &(0..per_key).collect::<Vec<_>>(),
            "unit {key} out of order"
        );
    }
    let stuck = find_by_payload(store.as_ref(), b"stuck-head").await;
    assert_eq!((stuck.status, stuck.attempts), (Status::Pending, 1));
    assert_eq!(total(store.as_ref()).await.pending, behind as u64);
}

/// A publisher that is always down (its failures leave rows to the relay).
pub(super) struct NullPublisherDown;

#[async_trait]
impl crate::Publisher for NullPublisherDown {
    async fn publish(&self, _: &Envelope) -> crate::Result<()> {
        Err(Error::transient("broker down"))
    }
}

/// An ordered publisher (it pipelines a unit's run) that refuses, transiently and before
/// sending, the first try of every message whose number is 1 mod 4, through
/// `check_message` and `publish_batch` alike, and records what it sends.
pub(super) struct OrderedRefuser {
    sent: RecordingPublisher,
    refused: Mutex<std::collections::HashSet<MessageId>>,
}

impl OrderedRefuser {
    fn refuse_once(&self, env: &Envelope) -> crate::Result<()> {
        let n: usize = String::from_utf8_lossy(&env.message.payload)
            .parse()
            .unwrap_or(0);
        if n % 4 == 1 && self.refused.lock().unwrap().insert(env.id) {
            return Err(Error::transient("refused before sending (injected)"));
        }
        Ok(())
    }
}

#[async_trait]
impl crate::Publisher for OrderedRefuser {
    async fn publish(&self, env: &Envelope) -> crate::Result<()> {
        self.refuse_once(env)?;
        self.sent.publish(env).await
    }
    fn ordered_batches(&self) -> bool {
        true
    }
    fn check_message(&self, env: &Envelope) -> crate::Result<()> {
        self.refuse_once(env)
    }
    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<crate::Result<()>> {
        let mut out = Vec::new();
        for env in batch {
            out.push(match self.refuse_once(env) {
                Ok(()) => self.sent.publish(env).await,
                Err(e) => Err(e),
            });
        }
        out
    }
}

/// Contract point 17: order survives refusals. A publisher that takes a unit's run as one
/// ordered batch refuses some messages before sending them; no later message of the unit
/// goes out in that batch, so the first deliveries are in order and nothing is sent twice.
pub async fn ordered_refusals_keep_first_delivery_order<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let outbox = base(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let mut msgs = Vec::new();
    for n in 0..12 {
        for k in 0..5 {
            msgs.push(msg("s", Some(&format!("k{k}")), n));
        }
    }
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let publisher = Arc::new(OrderedRefuser {
        sent: RecordingPublisher::new(),
        refused: Mutex::new(Default::default()),
    });
    let relay = Relay::builder(store.clone(), publisher.clone())
        .retry(fast_retry(50))
        .build()
        .unwrap();
    eventually("every message is delivered", DEADLINE, || async {
        relay.run_once().await.unwrap();
        publisher.sent.count() >= 60
    })
    .await;
    let mut deliveries = Deliveries::default();
    for e in publisher.sent.published() {
        let n = String::from_utf8_lossy(&e.message.payload).parse().unwrap();
        deliveries.record(e.id.to_string(), e.message.key.clone().unwrap(), n);
    }
    assert_eq!(deliveries.distinct(), 60);
    assert_eq!(
        (deliveries.order_violations(), deliveries.duplicates()),
        (0, 0),
        "first deliveries in order, none sent twice"
    );
    assert!(
        publisher.refused.lock().unwrap().len() >= 15,
        "refusals happened"
    );
}

/// A recording publisher that keeps a batch's order.
#[derive(Clone, Default)]
struct InOrder(RecordingPublisher);

#[async_trait]
impl crate::Publisher for InOrder {
    async fn publish(&self, env: &Envelope) -> crate::Result<()> {
        self.0.publish(env).await
    }
    fn ordered_batches(&self) -> bool {
        true
    }
}

/// Each claimed row's key and payload, in the order the claim returned them.
fn keys_and_payloads(rows: Vec<crate::Claimed>) -> Vec<(String, String)> {
    rows.into_iter()
        .map(|r| {
            let m = r
                .expect("a row written by the outbox decodes")
                .envelope
                .message;
            (
                m.key.unwrap_or_default(),
                String::from_utf8_lossy(&m.payload).into_owned(),
            )
        })
        .collect()
}

/// A fresh store holding 4 keep-order units (`u0`..`u3`) of 8 rows, written interleaved:
/// u0's first row is the oldest, then u1's, ...
async fn four_interleaved_units<H: Harness>(h: &H) -> Arc<H::Store> {
    let store = h.fresh().await;
    let outbox = base(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let rows = (0..8)
        .flat_map(|i| (0..4).map(move |u| msg("s", Some(&format!("u{u}")), i)))
        .collect();
    h.transact(&store, &outbox, rows, true)
        .await
        .unwrap()
        .dispatch();
    store
}

/// Claims read keep-order units [`Claim::depth`] rows deep and fill a batch unit by unit, the
/// unit whose first row is oldest first, each unit's rows a prefix in order: a second relay
/// finds units of its own. Depth 1 spreads a batch over the units. A relay whose publisher
/// keeps a batch's order asks for depth, so one batch takes a unit's whole run.
pub async fn deep_claims_take_units_whole<H: Harness>(h: &H) {
    let store = four_interleaved_units(h).await;
    let whole = |key: &str| -> Vec<(String, String)> {
        (0..8).map(|i| (key.to_owned(), i.to_string())).collect()
    };
    let mut claim = Claim::new("a", StreamFilter::All, 8, Duration::from_secs(60));
    claim.depth = 8;
    let a = keys_and_payloads(store.claim(&claim).await.unwrap());
    assert_eq!(a, whole("u0"), "a deep claim takes the oldest unit's run");
    let other = h.reopen(&store).await;
    claim.owner = "b".into();
    let b = keys_and_payloads(other.claim(&claim).await.unwrap());
    assert_eq!(b, whole("u1"), "another relay takes the next unit's run");
    claim.owner = "c".into();
    claim.depth = 1;
    let mut c = keys_and_payloads(other.claim(&claim).await.unwrap());
    c.sort();
    let mut spread: Vec<(String, String)> = ["u2", "u3"]
        .iter()
        .flat_map(|k| (0..4).map(move |i| (k.to_string(), i.to_string())))
        .collect();
    spread.sort();
    assert_eq!(c, spread, "depth 1 spreads a batch over the free units");

    // Through a relay: one batch for a publisher that keeps a batch's order is one unit's run.
    let store = four_interleaved_units(h).await;
    let broker = InOrder::default();
    let relay = Relay::builder(store.clone(), broker.clone())
        .batch_size(8)
        .build()
        .unwrap();
    let report = relay.step().await.unwrap();
    assert_eq!(report.published, 8);
    let sent: Vec<(String, String)> = broker
        .0
        .published()
        .into_iter()
        .map(|e| {
            (
                e.message.key.unwrap_or_default(),
                String::from_utf8_lossy(&e.message.payload).into_owned(),
            )
        })
        .collect();
    assert_eq!(
        sent,
        whole("u0"),
        "an ordered publisher's batch is a unit's run"
    );
}
