//! Operators: parking, resuming, skipping, listing.

use super::*;

pub(super) fn payload_order(broker: &RecordingPublisher) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    broker
        .published()
        .into_iter()
        .filter(|e| seen.insert(e.id))
        .map(|e| String::from_utf8_lossy(&e.message.payload).into_owned())
        .collect()
}

/// Park: a keep-order head that exhausts its attempts under `Exhausted::Park` parks its unit
/// (with two relays running); the unit's rows, and rows written meanwhile, wait in order and
/// cost claims nothing; `resume` republishes them in order from the head, `skip` dead-letters
/// just the head and publishes the rest in order; other units never wait.
pub async fn park_resume_and_skip<H: Harness>(h: &H) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let healed = Arc::new(AtomicBool::new(false));
    let heal = healed.clone();
    let publisher = FaultyPublisher::new(broker.clone(), move |e: &Envelope| {
        match e.message.destination.as_str() {
            "flaky" if !heal.load(Ordering::SeqCst) => Some(Error::transient("broker says no")),
            "poison" => Some(Error::permanent("rejected")),
            _ => None,
        }
    });
    let events = EventLog::default();
    let outbox = base(store.clone(), publisher)
        .stream_strategy("p", KeepOrder::park())
        .observer(events.observer())
        .retry(fast_retry(3))
        .build()
        .unwrap();
    let m = |key: &str, n: usize, dest: &str| {
        Message::new(dest, format!("{key}{n}").into_bytes())
            .stream("p")
            .key(key)
    };
    h.transact(
        &store,
        &outbox,
        vec![
            m("k", 1, "flaky"),
            m("k", 2, "d"),
            m("s", 1, "poison"),
            m("k", 3, "d"),
            m("s", 2, "d"),
            m("j", 1, "d"),
            m("j", 2, "d"),
        ],
        true,
    )
    .await
    .unwrap()
    .dispatch();
    let relays: Vec<RunningRelay> = (0..2)
        .map(|_| {
            RunningRelay::spawn(
                outbox
                    .relay()
                    .poll_interval(Duration::from_millis(20))
                    .build()
                    .unwrap(),
            )
        })
        .collect();
    eventually("k and s parked, j published", DEADLINE, || async {
        let parked = store.parked_units(Some("p"), 10).await.unwrap();
        parked.len() == 2 && payload_order(&broker).len() == 2
    })
    .await;
    // Written while parked: queued behind the parked rows.
    h.transact(&store, &outbox, vec![m("k", 4, "d"), m("s", 3, "d")], true)
        .await
        .unwrap()
        .dispatch();
    let parked = store.parked_units(Some("p"), 10).await.unwrap();
    let k = parked.iter().find(|p| p.unit == "k").expect("k parked");
    let k1 = find_by_payload(store.as_ref(), b"k1").await;
    assert_eq!(k.head, Some(k1.seq));
    assert_eq!(k.pending, 4, "k1..k4 wait in the parked unit");
    let reason = k.reason.clone().unwrap_or_default();
    assert!(reason.contains("failed 3 times"), "{reason}");
    assert!(reason.contains("broker says no"), "{reason}");
    assert_eq!(k1.status, Status::Pending);
    assert_eq!(events.count("parked"), 2);
    assert!(store
        .parked_units(Some("other"), 10)
        .await
        .unwrap()
        .is_empty());
    // A parked unit costs a claim nothing: nothing is claimable now.
    let idle = outbox.relay().build().unwrap();
    assert_eq!(idle.run_once().await.unwrap().claimed, 0);
    assert_eq!(payload_order(&broker), ["j1", "j2"]);

    // Resume k once the broker is healed: k1..k4 in order, with the relays still running.
    healed.store(true, Ordering::SeqCst);
    outbox.resume_unit("p", "k").await.unwrap();
    eventually("k published after resume", DEADLINE, || async {
        payload_order(&broker)
            .iter()
            .filter(|p| p.starts_with('k'))
            .count()
            == 4
    })
    .await;
    // Skip s's head: s1 dead-lettered, s2 and s3 in order.
    let s1 = find_by_payload(store.as_ref(), b"s1").await;
    assert_eq!(outbox.skip_head("p", "s").await.unwrap(), Some(s1.seq));
    eventually("s published after skip", DEADLINE, || async {
        payload_order(&broker)
            .iter()
            .filter(|p| p.starts_with('s'))
            .count()
            == 2
    })
    .await;
    for r in relays {
        r.stop().await;
    }
    let got = payload_order(&broker);
    let ks: Vec<&String> = got.iter().filter(|p| p.starts_with('k')).collect();
    assert_eq!(ks, ["k1", "k2", "k3", "k4"]);
    let ss: Vec<&String> = got.iter().filter(|p| p.starts_with('s')).collect();
    assert_eq!(ss, ["s2", "s3"]);
    let s1 = store.get(s1.seq).await.unwrap().unwrap();
    assert_eq!(s1.status, Status::Dead);
    assert!(s1
        .last_error
        .unwrap_or_default()
        .contains("skipped by an operator"));
    assert!(store.parked_units(None, 10).await.unwrap().is_empty());
    assert_eq!(events.count("resumed"), 2);
}

/// Operators park any unit at any time: its rows and new writes wait in order until resumed.
/// Parking, resuming or skipping a unit that does not exist (or is not parked) is a typed
/// `NotFound` error and changes nothing.
pub async fn operators_park_any_unit<H: Harness>(h: &H) {
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let outbox = base(store.clone(), broker.clone())
        .stream_strategy("o", KeepOrder::default())
        .build()
        .unwrap();
    let m = |key: &str, n: usize| {
        Message::new("d", format!("{key}{n}").into_bytes())
            .stream("o")
            .key(key)
    };
    h.transact(&store, &outbox, vec![m("m", 1), m("m", 2), m("n", 1)], true)
        .await
        .unwrap()
        .dispatch();
    outbox
        .park_unit("o", "m", "checking the downstream ledger")
        .await
        .unwrap();
    // Parking again keeps the first reason.
    outbox.park_unit("o", "m", "again").await.unwrap();
    h.transact(&store, &outbox, vec![m("m", 3)], true)
        .await
        .unwrap()
        .dispatch();
    let relay = outbox.relay().build().unwrap();
    relay.run_once().await.unwrap();
    assert_eq!(payload_order(&broker), ["n1"]);
    let parked = store.parked_units(None, 10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(
        (parked[0].stream.as_str(), parked[0].unit.as_str()),
        ("o", "m")
    );
    assert_eq!(
        parked[0].reason.as_deref(),
        Some("checking the downstream ledger")
    );
    assert_eq!(parked[0].pending, 3);

    let before = total(store.as_ref()).await;
    for (what, result) in [
        ("park", outbox.park_unit("o", "nope", "x").await),
        ("park", outbox.park_unit("elsewhere", "m", "x").await),
        ("resume", outbox.resume_unit("o", "n").await),
        ("resume", outbox.resume_unit("o", "nope").await),
        ("skip", outbox.skip_head("o", "n").await.map(|_| ())),
    ] {
        let e = result.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::NotFound, "{what}: {e}");
    }
    let after = total(store.as_ref()).await;
    assert_eq!(
        (after.pending, after.dead, after.sent),
        (before.pending, before.dead, before.sent)
    );
    assert_eq!(store.parked_units(None, 10).await.unwrap().len(), 1);

    outbox.resume_unit("o", "m").await.unwrap();
    let e = outbox.resume_unit("o", "m").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "resumed twice: {e}");
    relay.run_once().await.unwrap();
    assert_eq!(payload_order(&broker), ["n1", "m1", "m2", "m3"]);
}

/// `StoreAdmin::messages`: newest first, every filter narrows, keyset pages cover every row once,
/// a page size out of range is a `Config` error.
pub async fn messages_are_listed_by_filter<H: Harness>(h: &H) {
    use crate::MessageFilter;
    let store = h.fresh().await;
    let broker = RecordingPublisher::new();
    let poison = FaultyPublisher::new(broker.clone(), |e: &Envelope| {
        (e.message.destination == "poison").then(|| Error::permanent("rejected"))
    });
    let outbox = base(store.clone(), poison)
        .stream_strategy("b", KeepOrder::default())
        .build()
        .unwrap();
    let mut msgs: Vec<Message> = (0..7).map(|i| msg("a", Some("ka"), i)).collect();
    msgs.push(Message::new("poison", b"p".to_vec()).stream("a"));
    msgs.extend((0..5).map(|i| msg("b", Some(if i % 2 == 0 { "even" } else { "odd" }), i)));
    h.transact(&store, &outbox, msgs, true)
        .await
        .unwrap()
        .publish()
        .await;
    let list = |f: MessageFilter| {
        let store = store.clone();
        async move { store.messages(&f).await.unwrap() }
    };
    let all = list(MessageFilter {
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(all.len(), 13);
    assert!(all.windows(2).all(|w| w[0].seq > w[1].seq), "newest first");
    // Pages of 4 cover every row once, in order.
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = list(MessageFilter {
            before,
            limit: 4,
            ..Default::default()
        })
        .await;
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 4);
        before = page.last().map(|m| m.seq);
        paged.extend(page.into_iter().map(|m| m.seq));
    }
    assert_eq!(paged, all.iter().map(|m| m.seq).collect::<Vec<_>>());
    let count =
        |f: MessageFilter| async move { list(MessageFilter { limit: 100, ..f }).await.len() };
    assert_eq!(
        count(MessageFilter {
            stream: Some("b".into()),
            ..Default::default()
        })
        .await,
        5
    );
    assert_eq!(
        count(MessageFilter {
            key: Some("even".into()),
            ..Default::default()
        })
        .await,
        3
    );
    assert_eq!(
        count(MessageFilter {
            status: Some(Status::Dead),
            ..Default::default()
        })
        .await,
        1
    );
    assert_eq!(
        count(MessageFilter {
            status: Some(Status::Sent),
            ..Default::default()
        })
        .await,
        7
    );
    assert_eq!(
        count(MessageFilter {
            destination: Some("poison".into()),
            ..Default::default()
        })
        .await,
        1
    );
    let one = &all[3];
    let by_id = list(MessageFilter {
        id: Some(one.envelope.id),
        ..Default::default()
    })
    .await;
    assert_eq!(by_id.len(), 1);
    assert_eq!(by_id[0].seq, one.seq);
    assert!(list(MessageFilter {
        id: Some(MessageId::new()),
        ..Default::default()
    })
    .await
    .is_empty());
    assert_eq!(
        count(MessageFilter {
            stream: Some("b".into()),
            key: Some("odd".into()),
            status: Some(Status::Pending),
            ..Default::default()
        })
        .await,
        2
    );
    for limit in [0, crate::MAX_PAGE + 1] {
        let e = store
            .messages(&MessageFilter {
                limit,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    }
}
