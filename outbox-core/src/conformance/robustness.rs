//! Bad input and bad behaviour: panics, names, bad rows, sizes, crash loops.

use super::*;

/// A publisher whose `publish_batch` override publishes in order and panics on a message
/// whose payload starts with "boom" (the messages before it in the batch went out).
pub(super) struct PanicsInBatch(RecordingPublisher);

pub(super) fn boom(e: &Envelope) -> bool {
    e.message.payload.starts_with(b"boom")
}

#[async_trait]
impl crate::Publisher for PanicsInBatch {
    async fn publish(&self, envelope: &Envelope) -> crate::Result<()> {
        assert!(!boom(envelope), "bug in publish: {}", envelope.id);
        self.0.publish(envelope).await
    }

    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<crate::Result<()>> {
        let mut out = Vec::new();
        for e in batch {
            assert!(!boom(e), "bug in publish_batch: {}", e.id);
            out.push(self.0.publish(e).await);
        }
        out
    }
}

/// A publisher that panics on one message is a failure of that message, on both paths: the
/// rest of the batch is published, the failure is reported and retried, and the message is
/// dead-lettered (publish-on-commit) or its unit reported stuck (keep-order) after
/// `max_attempts`. With `persist_all = false` the panicking message is written for the relay.
pub async fn panicking_publisher_is_a_failure<H: Harness>(h: &H) {
    for batch_override in [false, true] {
        let broker = RecordingPublisher::new();
        let publisher: Arc<dyn crate::Publisher> = if batch_override {
            Arc::new(PanicsInBatch(broker.clone()))
        } else {
            Arc::new(FaultyPublisher::new(broker.clone(), |e: &Envelope| {
                assert!(!boom(e), "bug in publish: {}", e.id);
                None
            }))
        };
        let published = |payload: &[u8]| {
            broker
                .published()
                .iter()
                .any(|e| e.message.payload == payload)
        };

        // Publish-on-commit, persisted: the committer's batch has the panicking message third.
        let store = h.fresh().await;
        let events = EventLog::default();
        let outbox = base(store.clone(), publisher.clone())
            .retry(fast_retry(3))
            .observer(events.observer())
            .build()
            .unwrap();
        let msgs = ["p1", "p2", "boom-p", "p4", "p5"]
            .iter()
            .map(|p| Message::new("d", p.as_bytes().to_vec()).stream("s"))
            .collect();
        let report = h
            .transact(&store, &outbox, msgs, true)
            .await
            .unwrap()
            .publish()
            .await;
        assert_eq!(
            (report.published, report.failed),
            (4, 1),
            "{batch_override}"
        );
        assert!(["p1", "p2", "p4", "p5"]
            .iter()
            .all(|p| published(p.as_bytes())));
        assert_eq!(events.count("failed"), 1);
        let row = find_by_payload(store.as_ref(), b"boom-p").await;
        assert_eq!((row.status, row.attempts), (Status::Pending, 1));
        assert!(
            row.last_error.as_deref().unwrap_or("").contains("panicked"),
            "{:?}",
            row.last_error
        );
        let relay = outbox.relay().build().unwrap();
        eventually(
            "the panicking message is dead-lettered",
            DEADLINE,
            || async {
                relay.run_once().await.unwrap();
                find_by_payload(store.as_ref(), b"boom-p").await.status == Status::Dead
            },
        )
        .await;
        assert_eq!(find_by_payload(store.as_ref(), b"boom-p").await.attempts, 3);
        assert_eq!(events.count("dead"), 1);
        assert!(!published(b"boom-p"));
        let t = total(store.as_ref()).await;
        assert_eq!((t.sent, t.dead, t.pending), (4, 1, 0));

        // persist_all = false: the panicking message is written after the fact, not lost.
        let store = h.fresh().await;
        let outbox = base(store.clone(), publisher.clone())
            .persist_all(false)
            .build()
            .unwrap();
        let msgs = ["q1", "boom-q"]
            .iter()
            .map(|p| Message::new("d", p.as_bytes().to_vec()).stream("s"))
            .collect();
        let report = h
            .transact(&store, &outbox, msgs, true)
            .await
            .unwrap()
            .publish()
            .await;
        assert_eq!((report.published, report.failed, report.lost), (1, 1, 0));
        let row = find_by_payload(store.as_ref(), b"boom-q").await;
        assert_eq!((row.status, row.attempts), (Status::Pending, 1));
        assert!(published(b"q1"));

        // Keep-order on the relay path: the panicking head blocks its own key only.
        let store = h.fresh().await;
        let events = EventLog::default();
        let outbox = base(store.clone(), publisher.clone())
            .strategy(KeepOrder::default())
            .retry(fast_retry(2))
            .observer(events.observer())
            .build()
            .unwrap();
        let msgs = vec![
            Message::new("d", b"x1".to_vec()).stream("k").key("x"),
            Message::new("d", b"boom-x2".to_vec()).stream("k").key("x"),
            Message::new("d", b"x3".to_vec()).stream("k").key("x"),
            Message::new("d", b"y1".to_vec()).stream("k").key("y"),
            Message::new("d", b"y2".to_vec()).stream("k").key("y"),
        ];
        h.transact(&store, &outbox, msgs, true)
            .await
            .unwrap()
            .dispatch();
        let relay = outbox.relay().build().unwrap();
        eventually("the panicking head is reported stuck", DEADLINE, || async {
            relay.run_once().await.unwrap();
            events.count("stuck") >= 1
        })
        .await;
        assert!(["x1", "y1", "y2"].iter().all(|p| published(p.as_bytes())));
        assert!(!published(b"x3"), "x3 overtook its panicking head");
        assert!(!published(b"boom-x2"));
        let head = find_by_payload(store.as_ref(), b"boom-x2").await;
        assert_eq!(head.status, Status::Pending);
        assert!(head.attempts >= 2);
        let distinct: std::collections::HashSet<_> =
            broker.published().into_iter().map(|e| e.id).collect();
        assert!(
            broker.count() - distinct.len() <= 8,
            "duplicates only from re-sent batches: {} of {}",
            broker.count() - distinct.len(),
            broker.count()
        );
    }
}

/// Contract point 12: streams, keys and units compare byte for byte on every store: names that
/// differ by case, by Unicode normalization, or (rows written around the validation) by a
/// trailing space are distinct streams and distinct units; 4-byte characters round-trip; a
/// name with leading or trailing whitespace is refused at enqueue.
pub async fn names_are_exact<H: Harness>(h: &H) {
    let (precomposed, decomposed) = ("\u{e9}t\u{e9}", "e\u{301}te\u{301}");
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let publisher = FaultyPublisher::new(broker.clone(), |e: &Envelope| {
        (e.message.destination == "poison").then(|| Error::transient("consumer down"))
    });
    let outbox = base(store.clone(), publisher)
        .strategy(KeepOrder::default())
        .build()
        .unwrap();

    // Streams.
    let streams = ["a", "A", precomposed, decomposed, "\u{1f980}"];
    let msgs = streams
        .iter()
        .map(|s| {
            Message::new("d", s.as_bytes().to_vec())
                .stream(*s)
                .key("\u{1f511}")
        })
        .collect();
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    for s in streams {
        let before = broker.count();
        let relay = outbox.relay().streams([s]).build().unwrap();
        relay.run_once().await.unwrap();
        let got: Vec<String> = broker.published()[before..]
            .iter()
            .map(|e| e.message.stream.clone())
            .collect();
        assert_eq!(got, [s], "a relay of stream {s:?} published {got:?}");
    }
    let crab = find_by_payload(store.as_ref(), "\u{1f980}".as_bytes()).await;
    assert_eq!(crab.envelope.message.stream, "\u{1f980}");
    assert_eq!(crab.envelope.message.key.as_deref(), Some("\u{1f511}"));

    // Units: a blocked head on key "k" holds back only "k".
    let keys = ["k", "K", precomposed, decomposed];
    let mut msgs = vec![Message::new("poison", b"k-head".to_vec())
        .stream("u")
        .key("k")];
    for k in keys {
        msgs.push(
            Message::new("d", format!("{k}-next").into_bytes())
                .stream("u")
                .key(k),
        );
    }
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let relay = outbox.relay().streams(["u"]).build().unwrap();
    relay.run_once().await.unwrap();
    let published: Vec<Vec<u8>> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    for k in &keys[1..] {
        assert!(
            published.contains(&format!("{k}-next").into_bytes()),
            "unit {k:?} was held back by the blocked unit \"k\""
        );
    }
    assert!(
        !published.contains(&b"k-next".to_vec()),
        "k-next overtook its head"
    );

    // Leading or trailing whitespace is refused at enqueue, with nothing written.
    let before = total(store.as_ref()).await.pending;
    for bad in [
        Message::new("d", b"x".to_vec()).stream("a "),
        Message::new("d", b"x".to_vec()).stream(" a"),
        Message::new("d", b"x".to_vec()).stream("u").key("k "),
    ] {
        let e = h
            .transact(&store, &outbox, vec![bad], true)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidMessage, "{e}");
    }
    assert_eq!(total(store.as_ref()).await.pending, before);

    // Rows written around the validation (another service, SQL) keep their exact names: a
    // relay of "a" never claims stream "a ", and unit ("u", "k ") is not unit ("u", "k"): it
    // is claimed while "k" is blocked (and then quarantined, since it breaks the enqueue
    // rules; merged with "k", it would wait behind k's head, pending).
    let raw = |stream: &str, key: &str, payload: &str| {
        let message = Message::new("d", payload.as_bytes().to_vec())
            .stream(stream)
            .key(key);
        crate::NewMessage {
            envelope: Envelope {
                id: MessageId::new(),
                created_at: SystemTime::now(),
                message,
            },
            order: Order::InUnit,
            unit: key.to_owned(),
            exhausted: Exhausted::Default,
            published_by: PublishedBy::Relay,
            signature: None,
            status: Status::Pending,
            attempts: 0,
            retry_after: Duration::ZERO,
            not_before: None,
            last_error: None,
            lease: None,
        }
    };
    store
        .insert(&[
            raw("a ", "x", "padded-stream"),
            raw("u", "k ", "padded-key"),
        ])
        .await
        .unwrap();
    let only_a = outbox.relay().streams(["a"]).build().unwrap();
    assert_eq!(
        only_a.run_once().await.unwrap().claimed,
        0,
        "a relay of \"a\" claimed \"a \""
    );
    let padded = find_by_payload(store.as_ref(), b"padded-stream").await;
    assert_eq!(
        padded.envelope.message.stream, "a ",
        "the name kept its trailing space"
    );
    assert_eq!(padded.status, Status::Pending);
    relay.run_once().await.unwrap();
    let padded_key = find_by_payload(store.as_ref(), b"padded-key").await;
    assert_eq!(
        padded_key.status,
        Status::Dead,
        "unit (\"u\", \"k \") was held back by unit (\"u\", \"k\")"
    );
    assert!(padded_key
        .last_error
        .unwrap_or_default()
        .contains("whitespace"));
    let got: Vec<Vec<u8>> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    assert!(
        !got.contains(&b"k-next".to_vec()),
        "k-next overtook its head"
    );
}

/// Contract point 14: rows are untrusted input. Each kind of broken row the store can hold is
/// quarantined (dead, with the column and the reason, reported), and every other row of the
/// batch (its own unit's next row included) is published.
pub async fn bad_rows_are_quarantined<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let events = EventLog::default();
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .observer(events.observer())
        .build()
        .unwrap();
    let m =
        |payload: String, key: String| Message::new("d", payload.into_bytes()).stream("s").key(key);
    let mut msgs = Vec::new();
    for i in 0..Corruption::ALL.len() {
        msgs.push(m(format!("victim-{i}"), format!("k{i}")));
        msgs.push(m(format!("after-{i}"), format!("k{i}")));
    }
    for j in 0..40 {
        msgs.push(m(format!("good-{j}"), format!("g{}", j % 4)));
    }
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let mut corrupted = Vec::new();
    for (i, kind) in Corruption::ALL.into_iter().enumerate() {
        let victim = find_by_payload(store.as_ref(), format!("victim-{i}").as_bytes()).await;
        if h.corrupt(&store, victim.seq, kind).await {
            corrupted.push((i, kind, victim.seq));
        }
    }

    let relay = outbox.relay().build().unwrap();
    let report = relay.run_once().await.unwrap();
    let published: std::collections::HashSet<Vec<u8>> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    for j in 0..40 {
        assert!(
            published.contains(format!("good-{j}").as_bytes()),
            "good-{j} not published"
        );
    }
    for i in 0..Corruption::ALL.len() {
        assert!(
            published.contains(format!("after-{i}").as_bytes()),
            "after-{i} held back by a broken row"
        );
        let victim_out = published.contains(format!("victim-{i}").as_bytes());
        let broken = corrupted.iter().any(|(c, ..)| *c == i);
        assert_eq!(
            victim_out, !broken,
            "victim-{i}: published {victim_out}, broken {broken}"
        );
    }
    for (_, kind, seq) in &corrupted {
        let row = store
            .get(*seq)
            .await
            .unwrap()
            .expect("the broken row is kept");
        assert_eq!(row.status, Status::Dead, "{kind:?}");
        let error = row.last_error.unwrap_or_default();
        assert!(
            error.contains("quarantined") && error.contains(kind.column()),
            "{kind:?}: {error}"
        );
    }
    assert_eq!(report.quarantined, corrupted.len());
    assert_eq!(events.count("quarantined"), corrupted.len());
    let t = total(store.as_ref()).await;
    assert_eq!((t.pending, t.dead), (0, corrupted.len() as u64));
    // Listing dead letters shows the broken rows too.
    assert_eq!(
        store.dead_letters(None, 100).await.unwrap().len(),
        corrupted.len()
    );
}

/// Contract point 14: sizes are read before payloads. A row over the relay's limit (written by
/// a writer with a larger limit, or by SQL) is quarantined without being loaded, and a batch
/// takes rows only while they fit its byte budget.
pub async fn oversized_rows_and_the_byte_budget<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let events = EventLog::default();
    // The writer accepts up to 1 MiB; the relay only 1000 bytes a row, 3000 a batch.
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .observer(events.observer())
        .build()
        .unwrap();
    let mut msgs = vec![Message::new("d", vec![b'x'; 5000]).stream("s").key("big")];
    for i in 0..5u8 {
        msgs.push(
            Message::new("d", vec![b'0' + i; 900])
                .stream("s")
                .key(format!("k{i}")),
        );
    }
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let relay = outbox
        .relay()
        .config(crate::RelayConfig {
            max_batch_bytes: 3000,
            delivery: crate::Delivery {
                max_payload_bytes: 1000,
                retry: fast_retry(5),
                ..Default::default()
            },
            ..Default::default()
        })
        .observers(vec![Arc::new(events.observer())])
        .build()
        .unwrap();
    let first = relay.step().await.unwrap();
    assert_eq!(
        (first.claimed, first.quarantined, first.published),
        (4, 1, 3),
        "the oversized row plus the three rows that fit 3000 bytes: {first:?}"
    );
    relay.run_once().await.unwrap();
    assert_eq!(broker.count(), 5, "every row that fits is published");
    let big = all_rows(store.as_ref(), 20)
        .await
        .into_iter()
        .find(|r| r.envelope.message.key.as_deref() == Some("big"))
        .expect("the oversized row is kept");
    assert_eq!(big.status, Status::Dead);
    let error = big.last_error.unwrap_or_default();
    assert!(
        error.contains("not loaded") && error.contains("1000"),
        "{error}"
    );
    assert_eq!(events.count("quarantined"), 1);
}

/// Contract point 11: one size limit. A message of exactly `max_payload_bytes` (payload plus
/// header names and values, [`Message::size`]) is accepted at enqueue and published by the
/// relay when the on-commit publish failed (the relay re-checks the same definition); one
/// byte over is refused at enqueue and nothing is written.
pub async fn one_size_limit<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let publisher = FaultyPublisher::new(broker.clone(), move |_| {
        d.load(Ordering::SeqCst)
            .then(|| Error::transient("broker down"))
    });
    let limit = crate::Delivery::default().max_payload_bytes;
    let outbox = base(store.clone(), publisher)
        .stream_strategy("ko", KeepOrder::default())
        .build()
        .unwrap();
    let sized = |stream: &str, size: usize, tag: u8| {
        let m = Message::new("d", Vec::new())
            .stream(stream)
            .header("trace", "abcdefgh")
            .header("tag", format!("{tag}"));
        let headers = m.size();
        Message {
            payload: vec![tag; size - headers],
            ..m
        }
    };
    // Published on commit (the broker is down: left for the relay), and kept in order.
    for (i, stream) in ["oc", "ko"].into_iter().enumerate() {
        let at = |size, n| sized(stream, size, (2 * i + n) as u8);
        let over = h
            .transact(&store, &outbox, vec![at(limit + 1, 0)], true)
            .await
            .expect_err("one byte over the limit is refused at enqueue");
        assert_eq!(over.kind(), ErrorKind::InvalidMessage, "{over}");
        let msgs = vec![at(limit - 1, 0), at(limit, 1)];
        assert_eq!(msgs[1].size(), limit);
        let after = h.transact(&store, &outbox, msgs, true).await.unwrap();
        // The broker is down at commit: the relay must publish them.
        after.publish().await;
    }
    down.store(false, Ordering::SeqCst);
    let relay = outbox.relay().retry(fast_retry(5)).build().unwrap();
    eventually("the relay publishes all four", DEADLINE, || async {
        relay.run_once().await.unwrap();
        broker.count() == 4
    })
    .await;
    let t = total(store.as_ref()).await;
    assert_eq!((t.sent, t.dead, t.pending), (4, 0, 0), "{t:?}");
    let sizes: Vec<usize> = broker
        .published()
        .iter()
        .map(|e| e.message.size())
        .collect();
    assert_eq!(
        sizes.iter().filter(|&&n| n == limit).count(),
        2,
        "{sizes:?}"
    );
}

/// Publishes through `inner`, except messages to `crash`, on which it never returns: a relay
/// dropped there (as a process that dies mid-publish) records no outcome.
#[derive(Clone)]
pub(super) struct Crasher {
    inner: RecordingPublisher,
    crashes: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait]
impl crate::Publisher for Crasher {
    async fn publish(&self, envelope: &Envelope) -> crate::Result<()> {
        if envelope.message.destination == "crash" {
            self.crashes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.inner.publish(envelope).await
    }
}

/// Crash loops (contract point for #15): a message whose publish kills every relay that
/// takes it (simulated by dropping the relay mid-publish: no outcome is recorded) is
/// published at most `max_attempts` times, then its unit's policy applies (here: parked);
/// the rows claimed with it are published meanwhile and never counted against.
pub async fn crash_loops_are_broken<H: Harness>(h: &H) {
    use std::sync::atomic::Ordering;
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let crasher = Crasher {
        inner: broker.clone(),
        crashes: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    };
    let budget = 3;
    let outbox = base(store.clone(), RecordingPublisher::new())
        .stream_strategy("k", KeepOrder::park())
        .stream_strategy("u", crate::RelayOnly)
        .retry(fast_retry(budget))
        .build()
        .unwrap();
    let m = |stream: &str, key: Option<&str>, name: &str, dest: &str| {
        let m = Message::new(dest, name.as_bytes().to_vec()).stream(stream);
        match key {
            Some(k) => m.key(k),
            None => m,
        }
    };
    h.transact(
        &store,
        &outbox,
        vec![
            m("k", Some("c"), "c1", "crash"),
            m("k", Some("c"), "c2", "d"),
            m("k", Some("j"), "j1", "d"),
            m("k", Some("j"), "j2", "d"),
            m("u", None, "u1", "d"),
        ],
        true,
    )
    .await
    .unwrap()
    .dispatch();
    let relay = || {
        outbox
            .relay_with(crasher.clone())
            .lease(Duration::from_millis(600))
            .publish_timeout(Duration::from_millis(400))
            .build()
            .unwrap()
    };
    // Each relay that takes c1 "dies" publishing it; the next claim after its lease is the
    // next relay's.
    eventually(
        "c1 crashed its relay `budget` times and was parked",
        DEADLINE,
        || async {
            let _ = tokio::time::timeout(Duration::from_millis(150), relay().step()).await;
            !store.parked_units(Some("k"), 10).await.unwrap().is_empty()
        },
    )
    .await;
    assert_eq!(
        crasher.crashes.load(Ordering::SeqCst),
        budget as usize,
        "published {budget} times, not once more"
    );
    let parked = store.parked_units(Some("k"), 10).await.unwrap();
    assert_eq!(parked[0].unit, "c");
    let reason = parked[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("crash loop"), "{reason}");
    eventually("the batch-mates published", DEADLINE, || async {
        let _ = tokio::time::timeout(Duration::from_secs(5), relay().run_once()).await;
        let got = payload_order(&broker);
        ["j1", "j2", "u1"]
            .iter()
            .all(|p| got.contains(&p.to_string()))
    })
    .await;
    let got = payload_order(&broker);
    let at = |p: &str| got.iter().position(|g| g == p).unwrap();
    assert!(at("j1") < at("j2"), "{got:?}");
    assert!(
        !got.contains(&"c2".to_string()),
        "c2 went before its head: {got:?}"
    );
    let stats = total(store.as_ref()).await;
    assert_eq!(stats.dead, 0, "no batch-mate was failed with the crasher");
    // The operator skips the crasher; the rest of its unit follows.
    outbox.skip_head("k", "c").await.unwrap();
    relay().run_once().await.unwrap();
    assert!(payload_order(&broker).contains(&"c2".to_string()));
    assert_eq!(crasher.crashes.load(Ordering::SeqCst), budget as usize);
}
