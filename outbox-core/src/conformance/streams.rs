//! Streams and strategies: filters, per-stream strategies, wake-up, custom units, schedules.

use super::*;

/// Relays limited to streams publish only those; a relay for all streams takes the rest.
pub async fn stream_filter<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let msgs = vec![
        msg("a", None, 1),
        msg("b", None, 2),
        msg("c", None, 3),
        msg("a", None, 4),
    ];
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let ab = outbox.relay().streams(["a", "b"]).build().unwrap();
    assert_eq!(ab.run_once().await.unwrap().published, 3);
    assert!(broker.published().iter().all(|e| e.message.stream != "c"));
    let only_c = outbox.relay().streams(["zzz"]).build().unwrap();
    assert_eq!(only_c.run_once().await.unwrap().published, 0);
    let all = outbox.relay().build().unwrap();
    assert_eq!(all.run_once().await.unwrap().published, 1);
    assert_eq!(broker.count(), 4);
    assert!(
        outbox
            .relay()
            .streams(Vec::<String>::new())
            .build()
            .is_err(),
        "empty filter is a config error"
    );
}

/// Strategies are set globally and overridden per stream.
pub async fn strategy_per_stream<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .strategy(PublishOnCommit)
        .stream_strategy("ordered", KeepOrder::default())
        .build()
        .unwrap();
    let pending = h
        .transact(
            &store,
            &outbox,
            vec![msg("loose", None, 1), msg("ordered", None, 2)],
            true,
        )
        .await
        .unwrap();
    assert_eq!(
        pending.len(),
        1,
        "only the publish-on-commit message is published by the committer"
    );
    let rows = all_rows(store.as_ref(), 10).await;
    let strategies: HashMap<_, _> = rows
        .iter()
        .map(|r| (r.envelope.message.stream.clone(), r.order))
        .collect();
    assert_eq!(strategies["loose"], Order::Unordered);
    assert_eq!(strategies["ordered"], Order::InUnit);
    pending.publish().await;
    assert_eq!(broker.count(), 1);
    outbox.relay().build().unwrap().run_once().await.unwrap();
    assert_eq!(broker.count(), 2);
}

/// Contract point 7: A relay sleeping on a long poll interval wakes at once when rows are committed.
///
/// No sleep decides the interleaving: a first message, committed before the relay starts, is
/// published by its first claim; once it is out, the relay is at (or on its way to) its idle
/// wait, and every later commit must wake it, or a 120 s poll interval misses the deadline.
pub async fn wakeup_on_commit<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    h.transact(&store, &outbox, vec![msg("s", None, 0)], true)
        .await
        .unwrap()
        .dispatch();
    let relay = outbox
        .relay()
        .poll_interval(Duration::from_secs(120))
        .build()
        .unwrap();
    let running = RunningRelay::spawn(relay);
    for i in 1..4 {
        eventually(
            "relay published what was committed",
            Duration::from_secs(10),
            || async { broker.count() == i },
        )
        .await;
        h.transact(&store, &outbox, vec![msg("s", None, i)], true)
            .await
            .unwrap()
            .dispatch();
    }
    eventually(
        "relay woken by the last commit",
        Duration::from_secs(10),
        || async { broker.count() == 4 },
    )
    .await;
    running.stop().await;
}

/// Orders per tenant header, whatever the key; a tenant's failing message dead-letters
/// (its own answer) while the relay's default for ordered rows is to block.
#[derive(Debug)]
pub(super) struct PerTenant;

impl crate::Strategy for PerTenant {
    fn name(&self) -> &str {
        "per-tenant"
    }
    fn published_by(&self, _: &Message) -> PublishedBy {
        PublishedBy::Relay
    }
    fn unit(&self, m: &Message) -> crate::Unit {
        match m.headers.get("tenant") {
            Some(t) => crate::Unit::Named(format!("tenant:{t}")),
            None => crate::Unit::Stream,
        }
    }
    fn exhausted(&self, m: &Message) -> Exhausted {
        if m.headers.contains_key("disposable") {
            Exhausted::DeadLetter
        } else {
            Exhausted::Block
        }
    }
}

/// A strategy of the application's own: its unit (a tenant header, across keys) and its
/// exhaustion answers are stored and obeyed by the relay; an answer the store cannot hold
/// writes nothing.
pub async fn custom_strategy_units_and_policies<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let publisher = FaultyPublisher::new(broker.clone(), |e: &Envelope| {
        (e.message.destination == "poison").then(|| Error::permanent("rejected"))
    });
    let events = EventLog::default();
    let outbox = base(store.clone(), publisher)
        .stream_strategy("t", PerTenant)
        .observer(events.observer())
        .build()
        .unwrap();
    let m = |tenant: &str, key: &str, n: usize, dest: &str| {
        Message::new(dest, format!("{tenant}-{n}").into_bytes())
            .stream("t")
            .key(key)
            .header("tenant", tenant)
    };
    // Tenant a: a poisoned head (blocks: the strategy's answer), then two keys behind it.
    // Tenant b: a disposable poisoned head (dead-lettered: its answer), then the rest.
    let msgs = vec![
        m("a", "k1", 1, "poison"),
        m("a", "k2", 2, "d"),
        m("a", "k3", 3, "d"),
        m("b", "k1", 1, "poison").header("disposable", "yes"),
        m("b", "k2", 2, "d"),
    ];
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let row = find_by_payload(store.as_ref(), b"a-2").await;
    assert_eq!((row.order, row.unit.as_str()), (Order::InUnit, "tenant:a"));
    assert_eq!(row.exhausted, Exhausted::Block);
    let relay = outbox.relay().build().unwrap();
    for _ in 0..8 {
        relay.run_once().await.unwrap();
    }
    let got: Vec<Vec<u8>> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    assert_eq!(
        got,
        vec![b"b-2".to_vec()],
        "tenant a blocked behind its head across keys; tenant b went on without its dead head"
    );
    let head = find_by_payload(store.as_ref(), b"a-1").await;
    assert_eq!(head.status, Status::Pending, "blocked, not dead-lettered");
    assert!(events.count("stuck") >= 1);
    let dead = find_by_payload(store.as_ref(), b"b-1").await;
    assert_eq!(dead.status, Status::Dead);

    // Answers a store cannot represent: typed error, nothing written.
    #[derive(Debug)]
    struct OrderedOnCommit;
    impl crate::Strategy for OrderedOnCommit {
        fn name(&self) -> &str {
            "ordered-on-commit"
        }
        fn published_by(&self, _: &Message) -> PublishedBy {
            PublishedBy::Committer
        }
        fn unit(&self, _: &Message) -> crate::Unit {
            crate::Unit::Key
        }
    }
    let before = total(store.as_ref()).await;
    let bad = base(store.clone(), RecordingPublisher::new())
        .stream_strategy("x", OrderedOnCommit)
        .stream_strategy("t", PerTenant)
        .build()
        .unwrap();
    for msgs in [
        vec![msg("t", None, 1), msg("x", Some("k"), 2)],
        vec![m(&"n".repeat(300), "k", 1, "d")],
    ] {
        let err = h.transact(&store, &bad, msgs, true).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidMessage, "{err}");
    }
    let after = total(store.as_ref()).await;
    assert_eq!(
        (after.pending, after.dead, after.sent),
        (before.pending, before.dead, before.sent)
    );
}

/// Scheduled messages: published by the relay no earlier than asked (also on a
/// publish-on-commit stream), and in a keep-order unit they hold back what follows them;
/// a schedule past `max_delay` is refused.
pub async fn scheduled_delivery<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .stream_strategy("ordered", KeepOrder::default())
        .max_delay(Duration::from_secs(7200))
        .build()
        .unwrap();
    let hour = Duration::from_secs(3600);
    let soon = Duration::from_millis(1500);
    let msgs = vec![
        // Publish-on-commit stream: scheduled ones go to the relay.
        msg("loose", None, 1).delay(hour),
        msg("loose", None, 2).delay(soon),
        msg("loose", None, 3).deliver_at(SystemTime::now() + hour),
        msg("loose", None, 4).deliver_at(SystemTime::now() - hour),
        msg("loose", None, 5),
        // Keep-order: k's first message is scheduled, its second waits for it; j is free;
        // h is held for an hour, and so is what follows it.
        msg("ordered", Some("k"), 6).delay(soon),
        msg("ordered", Some("k"), 7),
        msg("ordered", Some("j"), 8),
        msg("ordered", Some("h"), 9).deliver_at(SystemTime::now() + hour),
        msg("ordered", Some("h"), 10),
    ];
    let after = h.transact(&store, &outbox, msgs, true).await.unwrap();
    assert_eq!(
        after.len(),
        2,
        "only the unscheduled and past-due on-commit messages"
    );
    after.publish().await;
    let relay = outbox.relay().build().unwrap();
    relay.run_once().await.unwrap();
    let payloads = |b: &RecordingPublisher| -> Vec<String> {
        b.published()
            .into_iter()
            .map(|e| String::from_utf8(e.message.payload).unwrap())
            .collect()
    };
    let first = payloads(&broker);
    for early in ["1", "3", "9", "10"] {
        assert!(
            !first.contains(&early.to_string()),
            "{early} published early: {first:?}"
        );
    }
    assert!(first.contains(&"8".to_string()), "{first:?}");
    if !first.contains(&"6".to_string()) {
        assert!(
            !first.contains(&"7".to_string()),
            "7 overtook its scheduled head: {first:?}"
        );
    }
    eventually("the soon-scheduled messages", DEADLINE, || async {
        relay.run_once().await.unwrap();
        let got = payloads(&broker);
        ["2", "6", "7"].iter().all(|p| got.contains(&p.to_string()))
    })
    .await;
    let got = payloads(&broker);
    let at = |p: &str| got.iter().position(|g| g == p).unwrap();
    assert!(at("6") < at("7"), "order kept behind a schedule: {got:?}");
    for held in ["1", "3", "9", "10"] {
        assert!(
            !got.contains(&held.to_string()),
            "{held} published before its time: {got:?}"
        );
    }
    let held = find_by_payload(store.as_ref(), b"9").await;
    assert_eq!(held.status, Status::Pending);
    assert!(held.next_attempt_at > SystemTime::now() + Duration::from_secs(3000));

    // Past max_delay: refused, nothing written.
    let before = total(store.as_ref()).await;
    let err = h
        .transact(
            &store,
            &outbox,
            vec![
                msg("loose", None, 11),
                msg("loose", None, 12).delay(3 * hour),
            ],
            true,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidMessage);
    assert!(err.to_string().contains("max_delay"), "{err}");
    assert_eq!(total(store.as_ref()).await.pending, before.pending);
}
