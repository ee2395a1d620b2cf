//! Signatures: tampering, rotation, policy.

use super::*;

/// Contract point 9: Signed rows: a tampered row is never published and is reported; old keys still
/// verify during rotation; dropping a key refuses its rows.
pub async fn signing_tamper_and_rotation<H: Harness>(h: &H) {
    let k1 = SigningKey::new("k1", b"first-secret-0123456789".to_vec()).unwrap();
    let k2 = SigningKey::new("k2", b"second-secret-0123456789".to_vec()).unwrap();
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let events = EventLog::default();
    let outbox = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .signer(Signer::new(k1.clone()))
        .observer(events.observer())
        .build()
        .unwrap();
    let msgs = vec![
        msg("s", Some("a"), 1),
        msg("s", Some("b"), 2),
        msg("s", Some("c"), 3),
    ];
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .dispatch();
    let victim = find_by_payload(store.as_ref(), b"2").await;
    assert!(victim.signature.as_deref().unwrap_or("").starts_with("k1:"));
    h.tamper(&store, victim.seq).await;
    // A signed row moved to another unit (where it would be published out of its order)
    // does not verify either.
    let moved = find_by_payload(store.as_ref(), b"3").await;
    let can_move = h.corrupt(&store, moved.seq, Corruption::UnitMoved).await;

    // Rotation: relay signs with k2 but still accepts k1.
    let relay = outbox
        .relay()
        .signer(Signer::new(k2.clone()).accept(k1))
        .build()
        .unwrap();
    relay.run_once().await.unwrap();
    let got: Vec<_> = broker
        .published()
        .into_iter()
        .map(|e| e.message.payload)
        .collect();
    assert_eq!(got.len(), if can_move { 1 } else { 2 }, "{got:?}");
    assert!(
        !got.iter().any(|p| p.starts_with(b"2") || p == b"tampered"),
        "tampered row published"
    );
    if can_move {
        assert!(
            !got.iter().any(|p| p.starts_with(b"3")),
            "moved row published"
        );
        let row = store.get(moved.seq).await.unwrap().unwrap();
        assert!(row.last_error.unwrap_or_default().contains("Tampered"));
    }
    // Reported at least once (its short backoff may end before run_once stops, and then it is
    // refused again).
    assert!(events.count("tampered") >= 1);
    let row = store.get(victim.seq).await.unwrap().unwrap();
    assert_eq!(
        row.status,
        Status::Pending,
        "kept (keep-order head blocks, reported)"
    );
    assert!(row.last_error.unwrap_or_default().contains("Tampered"));

    // A relay that dropped k1 refuses k1's rows.
    let store2 = h.fresh().await;
    let broker2 = RecordingPublisher::new();
    let outbox2 = base(store2.clone(), broker2.clone())
        .signer(Signer::new(
            SigningKey::new("k1", b"first-secret-0123456789".to_vec()).unwrap(),
        ))
        .stream_strategy("s", KeepOrder::default())
        .dead_letter_keep_order(true)
        .build()
        .unwrap();
    h.transact(&store2, &outbox2, vec![msg("s", None, 1)], true)
        .await
        .unwrap()
        .dispatch();
    let strict = outbox2.relay().signer(Signer::new(k2)).build().unwrap();
    strict.run_once().await.unwrap();
    assert_eq!(broker2.count(), 0);
    assert_eq!(
        total(store2.as_ref()).await.dead,
        1,
        "refused row is dead-lettered when opted in"
    );
}

/// Contract point 9: A signature nobody can check is never trusted: a relay without keys refuses
/// signed rows (unverifiable); a relay with keys publishes unsigned rows only while
/// `require_signatures` is off.
pub async fn signature_policy<H: Harness>(h: &H) {
    let key = SigningKey::new("k1", b"policy-secret-0123456789".to_vec()).unwrap();
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let events = EventLog::default();
    let signing = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .signer(Signer::new(key.clone()))
        .build()
        .unwrap();
    let plain = base(store.clone(), broker.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    h.transact(&store, &signing, vec![msg("signed", None, 1)], true)
        .await
        .unwrap()
        .dispatch();
    h.transact(&store, &plain, vec![msg("unsigned", None, 2)], true)
        .await
        .unwrap()
        .dispatch();

    // No key: the unsigned row goes out, the signed one is unverifiable and stays.
    let keyless = Relay::builder(store.clone(), broker.clone())
        .retry(fast_retry(5))
        .observer(events.observer())
        .build()
        .unwrap();
    keyless.run_once().await.unwrap();
    let got: Vec<_> = broker
        .published()
        .into_iter()
        .map(|e| e.message.stream)
        .collect();
    assert_eq!(
        got,
        ["unsigned"],
        "a signed row was published without a key"
    );
    assert!(events.count("tampered") >= 1);
    let signed = find_by_payload(store.as_ref(), b"1").await;
    assert_eq!(signed.status, Status::Pending, "kept, blocking its unit");
    assert!(signed
        .last_error
        .unwrap_or_default()
        .contains("unverifiable"));

    // With the key, the signed row verifies (the unit unblocks once its backoff ends).
    let keyed = Relay::builder(store.clone(), broker.clone())
        .signer(Signer::new(key.clone()))
        .build()
        .unwrap();
    eventually(
        "the signed row is published with its key",
        DEADLINE,
        || async {
            keyed.run_once().await.unwrap();
            broker.count() == 2
        },
    )
    .await;

    // require_signatures refuses an unsigned row; without it, an unsigned row passes a keyed relay.
    h.transact(&store, &plain, vec![msg("late", None, 3)], true)
        .await
        .unwrap()
        .dispatch();
    let strict_events = EventLog::default();
    let strict = Relay::builder(store.clone(), broker.clone())
        .signer(Signer::new(key.clone()))
        .observer(strict_events.observer())
        .build()
        .unwrap();
    assert!(
        strict.config().require_signatures,
        "signer() requires signatures"
    );
    strict.run_once().await.unwrap();
    assert_eq!(
        broker.count(),
        2,
        "unsigned row published under require_signatures"
    );
    assert!(strict_events.count("tampered") >= 1);
    let lenient = Relay::builder(store.clone(), broker.clone())
        .signer(Signer::new(key))
        .require_signatures(false)
        .build()
        .unwrap();
    eventually(
        "the unsigned row passes a lenient relay",
        DEADLINE,
        || async {
            lenient.run_once().await.unwrap();
            broker.count() == 3
        },
    )
    .await;
    let e = Relay::builder(store.clone(), broker.clone())
        .require_signatures(true)
        .build()
        .err()
        .expect("require_signatures without a key is a config error");
    assert_eq!(e.kind(), ErrorKind::Config);
}
