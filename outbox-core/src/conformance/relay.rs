//! The relay: backoff, dead letters, leases, several relays, cleaning, settling.

use super::*;

/// Contract point 5: Exponential backoff: a failed message is not due before its delay.
pub async fn backoff_delays_retries<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let publisher = FaultyPublisher::new(RecordingPublisher::new(), |_| {
        Some(Error::transient("down"))
    });
    let retry = RetryPolicy {
        initial: Duration::from_millis(400),
        max: Duration::from_secs(60),
        multiplier: 2.0,
        jitter: 0.0,
        max_attempts: 10,
    };
    let outbox = base(store.clone(), publisher)
        .strategy(KeepOrder::default())
        .retry(retry)
        .build()
        .unwrap();
    h.transact(&store, &outbox, vec![msg("s", None, 1)], true)
        .await
        .unwrap()
        .dispatch();
    let relay = outbox.relay().build().unwrap();
    for (attempt, nominal_ms) in [(1u32, 400u64), (2, 800)] {
        let before = SystemTime::now();
        let r = relay.step().await.unwrap();
        assert_eq!((r.claimed, r.failed), (1, 1), "attempt {attempt}");
        let row = find_by_payload(store.as_ref(), b"1").await;
        assert_eq!(row.attempts, attempt);
        let delay = row
            .next_attempt_at
            .duration_since(before)
            .unwrap_or_default();
        assert!(
            delay >= Duration::from_millis(nominal_ms - 50)
                && delay <= Duration::from_millis(nominal_ms + 1_000),
            "attempt {attempt}: next attempt in {delay:?}, expected about {nominal_ms} ms"
        );
        assert_eq!(
            relay.step().await.unwrap().claimed,
            0,
            "not due during the backoff"
        );
        eventually("due again after the backoff", DEADLINE, || async {
            SystemTime::now() >= row.next_attempt_at
        })
        .await;
    }
}

/// Contract point 5: After max_attempts a publish-on-commit message is dead-lettered (kept, listed,
/// requeueable); a permanent error dead-letters at once.
pub async fn dead_letter_after_max_attempts_and_requeue<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let publisher = FaultyPublisher::new(broker.clone(), move |e: &Envelope| {
        if e.message.destination == "poison" {
            return Some(Error::permanent("unroutable"));
        }
        d.load(Ordering::SeqCst).then(|| Error::transient("down"))
    });
    let events = EventLog::default();
    let outbox = base(store.clone(), publisher)
        .retry(fast_retry(3))
        .observer(events.observer())
        .build()
        .unwrap();
    let pending = h
        .transact(
            &store,
            &outbox,
            vec![
                msg("s", None, 1),
                Message::new("poison", b"p".to_vec()).stream("s"),
            ],
            true,
        )
        .await
        .unwrap();
    pending.publish().await;
    let poison = find_by_payload(store.as_ref(), b"p").await;
    assert_eq!(
        (poison.status, poison.attempts),
        (Status::Dead, 1),
        "permanent: dead at once"
    );

    let relay = outbox.relay().build().unwrap();
    eventually("dead-lettered after 3 attempts", DEADLINE, || async {
        relay.run_once().await.unwrap();
        find_by_payload(store.as_ref(), b"1").await.status == Status::Dead
    })
    .await;
    let row = find_by_payload(store.as_ref(), b"1").await;
    assert_eq!(row.attempts, 3);
    assert!(row.last_error.is_some());
    assert_eq!(events.count("dead"), 2);
    let dead = store.dead_letters(Some("s"), 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(total(store.as_ref()).await.dead, 2);

    down.store(false, Ordering::SeqCst);
    assert_eq!(
        store.requeue(&Selector::Seqs(vec![row.seq])).await.unwrap(),
        1
    );
    let requeued = store.get(row.seq).await.unwrap().unwrap();
    assert_eq!((requeued.status, requeued.attempts), (Status::Pending, 0));
    relay.run_once().await.unwrap();
    assert_eq!(broker.count(), 1);
    assert_eq!(
        store
            .purge_dead(&Selector::Stream("s".into()))
            .await
            .unwrap(),
        1
    );
    let t = total(store.as_ref()).await;
    assert_eq!((t.sent, t.dead, t.pending), (1, 0, 0));
}

/// Contract point 6: A relay that dies mid-batch loses its claim when the lease expires; a stale owner's
/// late failure report changes nothing.
pub async fn lease_expiry_hands_over<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let msgs = (0..3).map(|i| msg("s", Some("k"), i)).collect();
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let claim = Claim::new(
        "relay-that-dies",
        StreamFilter::All,
        10,
        Duration::from_millis(300),
    );
    let taken: Vec<crate::StoredMessage> = store
        .claim(&claim)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.expect("a row written by the outbox decodes"))
        .collect();
    assert_eq!(taken.len(), 3);
    let other = h.reopen(&store).await;
    assert!(
        other
            .claim(&Claim {
                owner: "x".into(),
                ..claim.clone()
            })
            .await
            .unwrap()
            .is_empty(),
        "leased rows are not claimable"
    );
    let relay = Relay::builder(other, broker.clone()).build().unwrap();
    eventually(
        "another relay takes over after the lease",
        DEADLINE,
        || async {
            relay.run_once().await.unwrap();
            broker.count() == 3
        },
    )
    .await;
    let order: Vec<_> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    assert_eq!(order, vec![b"0".to_vec(), b"1".to_vec(), b"2".to_vec()]);
    let stale = crate::Failure {
        seq: taken[0].seq,
        error: "late".into(),
        outcome: crate::Outcome::Dead,
    };
    store.fail("relay-that-dies", &[stale]).await.unwrap();
    assert_eq!(
        store.get(taken[0].seq).await.unwrap().unwrap().status,
        Status::Sent
    );
}

/// Contract point 4/6: Three relays on one table: every message published exactly once while all live.
pub async fn concurrent_relays_publish_each_once<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), RecordingPublisher::new())
        .stream_strategy("ordered", KeepOrder::default())
        .config(crate::Config {
            stream_strategies: [(
                "ordered".to_string(),
                Arc::new(KeepOrder::default()) as Arc<dyn crate::Strategy>,
            )]
            .into(),
            on_commit_lease: Duration::from_millis(300),
            delivery: crate::Delivery {
                publish_timeout: Duration::from_millis(200),
                retry: fast_retry(5),
                ..Default::default()
            },
            ..Default::default()
        })
        .build()
        .unwrap();
    let n = 120;
    for chunk in 0..6 {
        let batch = (0..n / 6)
            .map(|i| {
                let i = chunk * (n / 6) + i;
                if i % 2 == 0 {
                    msg("ordered", Some(&format!("k{}", i % 10)), i)
                } else {
                    msg("loose", None, i)
                }
            })
            .collect();
        // on-commit messages are "orphaned" (committer died): relays race for them
        drop(h.transact(&store, &outbox, batch, true).await.unwrap());
    }
    let mut running = Vec::new();
    for _ in 0..3 {
        let relay = Relay::builder(h.reopen(&store).await, broker.clone())
            .batch_size(8)
            .concurrency(3)
            .poll_interval(Duration::from_millis(20))
            .build()
            .unwrap();
        running.push(RunningRelay::spawn(relay));
    }
    eventually("every message published", DEADLINE, || async {
        broker.count() >= n
    })
    .await;
    for r in running {
        r.stop().await;
    }
    let mut ids: Vec<_> = broker.published().into_iter().map(|e| e.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicates while all relays lived");
    assert_eq!(broker.count(), n);
}

/// Contract point 8: The cleaner deletes sent rows past the retention in bounded batches, and never
/// pending or dead rows unless asked.
pub async fn cleaner_respects_retention_and_status<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let publisher = FaultyPublisher::new(broker.clone(), |e: &Envelope| {
        (e.message.destination == "poison").then(|| Error::permanent("no"))
    });
    let outbox = base(store.clone(), publisher)
        .stream_strategy("later", KeepOrder::default())
        .build()
        .unwrap();
    let mut batch: Vec<Message> = (0..5).map(|i| msg("s", None, i)).collect();
    batch.push(msg("later", None, 100));
    batch.push(msg("later", None, 101));
    batch.push(Message::new("poison", b"p".to_vec()));
    h.transact(&store, &outbox, batch, true)
        .await
        .unwrap()
        .publish()
        .await;
    let t = total(store.as_ref()).await;
    assert_eq!((t.sent, t.pending, t.dead), (5, 2, 1));

    assert_eq!(
        Cleaner::new(store.clone()).run_once().await.unwrap(),
        0,
        "7-day default retention"
    );
    assert_eq!(
        Cleaner::new(store.clone())
            .retention(Duration::from_secs(3600))
            .run_once()
            .await
            .unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(20)).await; // let the sent_at timestamps age
    let cleaner = Cleaner::new(store.clone())
        .retention(Duration::from_millis(5))
        .batch_size(2)
        .unwrap();
    assert_eq!(
        store.clean(SystemTime::now(), 2, false).await.unwrap(),
        2,
        "one batch is bounded"
    );
    assert_eq!(cleaner.run_once().await.unwrap(), 3, "the rest, in batches");
    let t = total(store.as_ref()).await;
    assert_eq!(
        (t.sent, t.pending, t.dead),
        (0, 2, 1),
        "pending and dead untouched"
    );
    assert_eq!(cleaner.include_dead(true).run_once().await.unwrap(), 1);
    let t = total(store.as_ref()).await;
    assert_eq!((t.sent, t.pending, t.dead), (0, 2, 0));
}

/// Contract point 2: a duplicate only when a relay dies or times out. A batch whose settle
/// fails transiently after its messages were published (MariaDB breaking a deadlock by
/// rolling the settle back) is settled again, not left leased to be republished whole.
pub async fn a_failed_settle_is_retried_not_republished<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), NullPublisherDown)
        .stream_strategy("ko", KeepOrder::default())
        .build()
        .unwrap();
    let mut msgs: Vec<Message> = (0..4).map(|n| msg("ko", Some("k"), n)).collect();
    msgs.extend((4..8).map(|n| msg("oc", None, n)));
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .publish()
        .await;
    let faulty = Arc::new(Hooked::failing_settles(store.clone(), 2));
    let relay = Relay::builder(faulty, broker.clone())
        .lease(Duration::from_secs(3))
        .publish_timeout(Duration::from_secs(1))
        .retry(fast_retry(5))
        .build()
        .unwrap();
    // The on-commit rows back off after their failed publish: wait for them.
    eventually("the relay publishes all eight", DEADLINE, || async {
        relay
            .step()
            .await
            .expect("a settle that failed twice is retried");
        broker.count() >= 8
    })
    .await;
    let t = total(store.as_ref()).await;
    assert_eq!((t.sent, t.pending), (8, 0), "{t:?}");
    // Every row is recorded as sent: none is left leased, to come again after the lease.
    relay.run_once().await.unwrap();
    assert_eq!(broker.count(), 8, "nothing published twice");
}
