//! Enqueue in the business transaction, and publish-on-commit.

use super::*;

/// Contract point 1: Rollback writes nothing and publishes nothing; commit makes the rows durable.
pub async fn atomic_enqueue<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();

    let msgs = vec![msg("s", None, 1), msg("s", None, 2)];
    let pending = h
        .transact(&store, &outbox, msgs.clone(), false)
        .await
        .unwrap();
    pending.publish().await;
    assert_eq!(h.business_rows(&store).await, 0, "rolled-back business row");
    assert_eq!(
        total(store.as_ref()).await.pending,
        0,
        "rolled-back outbox rows"
    );
    let relay = outbox.relay().build().unwrap();
    assert_eq!(relay.run_once().await.unwrap().published, 0);
    assert_eq!(broker.count(), 0, "nothing published for a rollback");

    let pending = h.transact(&store, &outbox, msgs, true).await.unwrap();
    drop(pending);
    assert_eq!(h.business_rows(&store).await, 1);
    // Durable: another connection sees the rows and relays them.
    let other = h.reopen(&store).await;
    assert_eq!(total(other.as_ref()).await.pending, 2);
    let relay = Relay::builder(other, broker.clone()).build().unwrap();
    assert_eq!(relay.run_once().await.unwrap().published, 2);
    let payloads: Vec<_> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    assert_eq!(payloads, vec![b"1".to_vec(), b"2".to_vec()]);
}

/// Contract point 11: Bad input: a typed error, and nothing of the batch is written.
pub async fn invalid_input_writes_nothing<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let outbox = base(store.clone(), RecordingPublisher::new())
        .config(crate::Config {
            delivery: crate::Delivery {
                max_payload_bytes: 16,
                retry: fast_retry(5),
                ..Default::default()
            },
            ..Default::default()
        })
        .build()
        .unwrap();
    let bad_batches = vec![
        vec![msg("s", None, 1), Message::new("d", vec![0u8; 17])],
        vec![msg("s", None, 1), Message::new("", b"x".to_vec())],
        vec![
            msg("s", None, 1),
            Message::new("d", b"x".to_vec()).header("bad:name", "v"),
        ],
        vec![
            msg("s", None, 1),
            Message::new("d", b"x".to_vec()).stream(""),
        ],
        // Headers: counted in the size limit, capped in number, reserved names refused.
        vec![Message::new("d", b"0123456789".to_vec()).header("h", "0123456")],
        vec![
            (0..=crate::MAX_HEADERS).fold(Message::new("d", Vec::new()), |m, i| {
                m.header(format!("h{i}"), "")
            }),
        ],
        vec![Message::new("d", b"x".to_vec()).header("OUTBOX-ID", "forged")],
        vec![Message::new("d", b"x".to_vec()).header("Content-Type", "text/html")],
    ];
    for (i, batch) in bad_batches.into_iter().enumerate() {
        let err = match h.transact(&store, &outbox, batch, true).await {
            Err(e) => e,
            Ok(_) => panic!("bad batch {i} was accepted"),
        };
        assert_eq!(err.kind(), ErrorKind::InvalidMessage, "batch {i}: {err}");
        assert!(!err.is_transient());
        assert_eq!(
            h.business_rows(&store).await,
            i as i64 + 1,
            "the caller's transaction still works"
        );
        let t = total(store.as_ref()).await;
        assert_eq!(t.pending + t.sent + t.dead, 0, "batch {i} was half-written");
    }
}

/// Contract point 3: Publish-on-commit with persist_all: published by the committer, then marked sent or
/// deleted; never published twice by a relay.
pub async fn publish_on_commit_persist_all<H: Harness>(h: &H) {
    for delete in [false, true] {
        let store = h.fresh().await;
        let broker = RecordingPublisher::new();
        let outbox = base(store.clone(), broker.clone())
            .delete_after_send(delete)
            .build()
            .unwrap();
        let pending = h
            .transact(
                &store,
                &outbox,
                vec![msg("s", None, 1), msg("s", None, 2)],
                true,
            )
            .await
            .unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!(
            total(store.as_ref()).await.pending,
            2,
            "written in the transaction"
        );
        // Leased to the committer: a relay cannot race it.
        let relay = outbox.relay().build().unwrap();
        assert_eq!(relay.step().await.unwrap().claimed, 0);

        let report = pending.publish().await;
        assert_eq!((report.published, report.failed), (2, 0));
        assert_eq!(broker.count(), 2);
        let t = total(store.as_ref()).await;
        assert_eq!(
            (t.pending, t.sent),
            (0, if delete { 0 } else { 2 }),
            "delete_after_send={delete}"
        );
        assert_eq!(relay.run_once().await.unwrap().published, 0);
        assert_eq!(broker.count(), 2, "no duplicate from the relay");
    }
}

/// Contract point 3: A failed on-commit publish stays for the relay, which publishes it after the backoff.
pub async fn publish_on_commit_failure_left_for_relay<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let publisher = FaultyPublisher::new(broker.clone(), move |_| {
        d.load(Ordering::SeqCst)
            .then(|| Error::transient("broker down"))
    });
    let events = EventLog::default();
    let outbox = base(store.clone(), publisher)
        .observer(events.observer())
        .build()
        .unwrap();
    let pending = h
        .transact(&store, &outbox, vec![msg("s", None, 1)], true)
        .await
        .unwrap();
    let report = pending.publish().await;
    assert_eq!((report.published, report.failed), (0, 1));
    assert_eq!(events.count("failed"), 1);
    let row = find_by_payload(store.as_ref(), b"1").await;
    assert_eq!((row.status, row.attempts), (Status::Pending, 1));
    assert!(row
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("broker down"));

    down.store(false, Ordering::SeqCst);
    let relay = outbox.relay().build().unwrap();
    eventually("relay publishes the failed message", DEADLINE, || async {
        relay.run_once().await.unwrap();
        broker.count() == 1
    })
    .await;
    assert_eq!(events.count("published"), 1);
    assert_eq!(total(store.as_ref()).await.sent, 1);
}

/// Contract point 3: persist_all = false: a success writes no row; a failure writes one after the fact
/// (pending for transient errors, dead for permanent ones), which the relay delivers.
pub async fn publish_on_commit_not_persisted<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let down = Arc::new(AtomicBool::new(false));
    let d = down.clone();
    let publisher = FaultyPublisher::new(broker.clone(), move |e: &Envelope| {
        if e.message.destination == "poison" {
            return Some(Error::permanent("unroutable"));
        }
        d.load(Ordering::SeqCst)
            .then(|| Error::transient("broker down"))
    });
    let outbox = base(store.clone(), publisher)
        .persist_all(false)
        .build()
        .unwrap();

    let pending = h
        .transact(&store, &outbox, vec![msg("s", None, 1)], true)
        .await
        .unwrap();
    let t = total(store.as_ref()).await;
    assert_eq!(t.pending + t.sent, 0, "nothing written in the transaction");
    assert_eq!(pending.publish().await.published, 1);
    let t = total(store.as_ref()).await;
    assert_eq!(t.pending + t.sent + t.dead, 0, "a success leaves no row");

    down.store(true, Ordering::SeqCst);
    let pending = h
        .transact(
            &store,
            &outbox,
            vec![msg("s", None, 2), Message::new("poison", b"p".to_vec())],
            true,
        )
        .await
        .unwrap();
    let r = pending.publish().await;
    assert_eq!((r.failed, r.lost), (2, 0));
    let t = total(store.as_ref()).await;
    assert_eq!(
        (t.pending, t.dead),
        (1, 1),
        "failures written after the fact"
    );
    let row = find_by_payload(store.as_ref(), b"2").await;
    assert_eq!(row.attempts, 1);

    down.store(false, Ordering::SeqCst);
    let relay = outbox.relay().build().unwrap();
    eventually("relay delivers the failed message", DEADLINE, || async {
        relay.run_once().await.unwrap();
        broker.count() == 2
    })
    .await;
}

/// Contract point 2/6: The committer dies between commit and publish: the relay publishes once the
/// committer's lease expires, not before.
pub async fn publish_on_commit_crash_recovered_by_relay<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .config(crate::Config {
            on_commit_lease: Duration::from_millis(400),
            delivery: crate::Delivery {
                publish_timeout: Duration::from_millis(100),
                retry: fast_retry(5),
                ..Default::default()
            },
            ..Default::default()
        })
        .build()
        .unwrap();
    let pending = h
        .transact(&store, &outbox, vec![msg("s", None, 1)], true)
        .await
        .unwrap();
    drop(pending); // the process "dies" here
    let relay = Relay::builder(h.reopen(&store).await, broker.clone())
        .build()
        .unwrap();
    assert_eq!(
        relay.step().await.unwrap().claimed,
        0,
        "lease still held by the committer"
    );
    eventually("relay publishes after the lease", DEADLINE, || async {
        relay.run_once().await.unwrap();
        broker.count() == 1
    })
    .await;
}
