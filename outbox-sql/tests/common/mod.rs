//! What the PostgreSQL and MariaDB test files share: the conformance harness and the tests
//! every SQL store runs, generated per dialect.

/// Generates, for one SQL store: `url()`, a conformance `Harness` named `$harness`, the whole
/// conformance suite, and the SQL-store tests (config errors and password redaction,
/// concurrent writers of one key, concurrent migrations).
macro_rules! sql_store_tests {
    (
        harness: $harness:ident,
        store: $store:ident,
        options: $options:ident,
        module: $module:ident,
        url_env: $env:literal,
        default_url: $default:literal,
        unreachable_url: $unreachable:literal,
        business_ddl: $business_ddl:literal,
        business_insert: $business_insert:literal,
        tamper: $tamper:literal,
        session_id: $session_id:literal,
        lock_wait: $lock_wait:literal,
        relay_poll: $relay_poll:expr,
        corrupt: $corrupt:expr $(,)?
    ) => {
        use std::sync::Arc;

        use outbox_core::conformance::Harness;
        use outbox_core::{
            async_trait, AfterCommit, ErrorKind, Message, Outbox, RecordingPublisher, Relay,
            Result, KeepOrder,
        };
        use outbox_sql::$module::{map_err, $options, $store};

        fn url() -> String {
            std::env::var($env).unwrap_or_else(|_| $default.into())
        }

        async fn connect(table: &str) -> $store {
            $store::connect_with(
                &url(),
                $options {
                    table: table.into(),
                    ..Default::default()
                },
            )
            .await
            .expect("the database must be reachable (scripts/setup.sh starts it)")
        }

        struct $harness;

        #[async_trait]
        impl Harness for $harness {
            type Store = $store;

            async fn fresh(&self) -> Arc<$store> {
                let table = format!("outbox_t{}", uuid::Uuid::now_v7().simple());
                let store = connect(&table).await;
                outbox_core::Store::migrate(&store).await.unwrap();
                sqlx::query(&format!(
                    "CREATE TABLE {table}_business ({})",
                    $business_ddl
                ))
                .execute(store.pool())
                .await
                .unwrap();
                Arc::new(store)
            }

            async fn reopen(&self, store: &$store) -> Arc<$store> {
                Arc::new(store.reopen().await.unwrap())
            }

            async fn transact(
                &self,
                store: &$store,
                outbox: &Outbox<Arc<$store>>,
                messages: Vec<Message>,
                commit: bool,
            ) -> Result<AfterCommit> {
                let mut tx = store.pool().begin().await.map_err(map_err)?;
                sqlx::query(&format!($business_insert, store.table()))
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                match outbox.enqueue(&mut tx, messages).await {
                    Ok(pending) if commit => {
                        tx.commit().await.map_err(map_err)?;
                        Ok(pending)
                    }
                    Ok(_) => {
                        tx.rollback().await.map_err(map_err)?;
                        Ok(AfterCommit::empty())
                    }
                    Err(e) => {
                        tx.commit().await.map_err(map_err)?;
                        Err(e)
                    }
                }
            }

            async fn business_rows(&self, store: &$store) -> i64 {
                sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {}_business", store.table()))
                    .fetch_one(store.pool())
                    .await
                    .unwrap()
            }

            async fn tamper(&self, store: &$store, seq: i64) {
                let r = sqlx::query(&format!($tamper, store.table()))
                    .bind(seq)
                    .execute(store.pool())
                    .await
                    .unwrap();
                assert_eq!(r.rows_affected(), 1);
            }

            async fn corrupt(
                &self,
                store: &$store,
                seq: i64,
                kind: outbox_core::conformance::Corruption,
            ) -> bool {
                let set: Option<&str> = ($corrupt)(kind);
                let Some(set) = set else { return false };
                let sql = format!("UPDATE {} SET {set} WHERE seq = {seq}", store.table());
                // A typed or checked column may refuse the value: then the store cannot hold
                // such a row.
                match sqlx::query(&sql).execute(store.pool()).await {
                    Ok(r) => r.rows_affected() == 1,
                    Err(_) => false,
                }
            }

            async fn execute_sql(&self, store: &$store, sql: &str) -> bool {
                let t = store.table();
                // MySQL's index names are per table.
                let sql = match sql.strip_prefix("DROP INDEX ") {
                    Some(index) if $env == "OUTBOX_MYSQL_URL" => format!(
                        "ALTER TABLE {t}_due DROP INDEX {}",
                        index.replace("{t}_due_", "due_")
                    ),
                    _ => sql.replace("{t}", t),
                };
                sqlx::query(&sql).execute(store.pool()).await.unwrap();
                true
            }
        }

        outbox_core::conformance_tests!($harness);

        #[tokio::test]
        async fn bad_config_is_a_typed_error_and_never_leaks_the_password() {
            let e = $store::connect("not a url").await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
            let e = $store::connect_with(
                &url(),
                $options {
                    table: "x; drop table y".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidIdentifier);
            // A name whose companion tables' and indexes' names would not fit is refused; the
            // longest one accepted works end to end.
            let id = uuid::Uuid::now_v7().simple().to_string();
            let long = |n: usize| format!("t{id}{}", "x".repeat(n - 1 - id.len()));
            let e = $store::connect_with(
                &url(),
                $options {
                    table: long(63),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidIdentifier);
            let mut n = 63;
            let longest = loop {
                n -= 1;
                if let Ok(s) = $store::connect_with(
                    &url(),
                    $options {
                        table: long(n),
                        ..Default::default()
                    },
                )
                .await
                {
                    break s;
                }
            };
            outbox_core::Store::migrate(&longest).await.unwrap();
            let broker = RecordingPublisher::new();
            let outbox = Outbox::builder(longest.clone(), broker.clone())
                .strategy(KeepOrder::default())
                .build()
                .unwrap();
            let mut tx = longest.pool().begin().await.unwrap();
            let pending = outbox
                .enqueue(&mut tx, [Message::new("d", b"x".to_vec()).key("k")])
                .await
                .unwrap();
            outbox_sql::$module::commit(tx, pending).await.unwrap();
            let report = outbox.relay().build().unwrap().run_once().await.unwrap();
            assert_eq!((n > 50, report.published), (true, 1));
            // Nothing listens on port 1.
            let e = $store::connect_with(
                $unreachable,
                $options {
                    acquire_timeout: std::time::Duration::from_secs(2),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Store);
            assert!(e.is_transient());
            let text = format!("{e} {e:?}");
            assert!(!text.contains("hunter2secret"), "{text}");
            assert!(text.contains("app:***@127.0.0.1:1"), "{text}");
        }

        /// Two transactions write the same key concurrently; the first to enqueue commits
        /// last. The unit lock makes the second wait until the first commits, so seq order
        /// is commit order and the relay publishes the first writer's message first.
        ///
        /// Deterministic, no timing: the second writer's enqueue and commit run in a task
        /// while the first transaction stays open, and the test waits until the database
        /// reports the second session waiting for a lock, or the task finishes. Without the
        /// unit lock the task finishes (the second writer commits first, out of `seq` order)
        /// and the test fails on the spot.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_writers_of_one_key_publish_in_commit_order() {
            use outbox_core::conformance::eventually;
            let store = $harness.fresh().await;
            let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
                .strategy(KeepOrder::default())
                .build()
                .unwrap();
            // The unit exists already (its lock row too): the writers below must wait on its
            // lock, not merely on the insert of a new unit.
            let mut t0 = store.pool().begin().await.unwrap();
            drop(
                outbox
                    .enqueue(&mut t0, [Message::new("d", b"t0".to_vec()).key("k")])
                    .await
                    .unwrap(),
            );
            t0.commit().await.unwrap();

            let mut t1 = store.pool().begin().await.unwrap();
            drop(
                outbox
                    .enqueue(&mut t1, [Message::new("d", b"t1".to_vec()).key("k")])
                    .await
                    .unwrap(),
            );
            let (session_tx, session_rx) = tokio::sync::oneshot::channel::<i64>();
            let (s2, o2) = (store.clone(), outbox.clone());
            let t2 = tokio::spawn(async move {
                let mut t2 = s2.pool().begin().await.unwrap();
                let id: i64 = sqlx::query_scalar($session_id)
                    .fetch_one(&mut *t2)
                    .await
                    .unwrap();
                session_tx.send(id).unwrap();
                drop(
                    o2.enqueue(&mut t2, [Message::new("d", b"t2".to_vec()).key("k")])
                        .await
                        .unwrap(),
                );
                t2.commit().await.unwrap();
            });
            let session = session_rx.await.unwrap();
            eventually(
                "the second writer of the key waits for the first's lock (it must not commit first)",
                std::time::Duration::from_secs(20),
                || async {
                    assert!(
                        !t2.is_finished(),
                        "the second writer committed while the first was still open"
                    );
                    let waiting: i64 = sqlx::query_scalar($lock_wait)
                        .bind(session)
                        .fetch_one(store.pool())
                        .await
                        .unwrap();
                    waiting > 0
                },
            )
            .await;
            t1.commit().await.unwrap();
            t2.await.unwrap();

            let broker = RecordingPublisher::new();
            Relay::builder(store.clone(), broker.clone())
                .build()
                .unwrap()
                .run_once()
                .await
                .unwrap();
            let published: Vec<String> = broker
                .published()
                .into_iter()
                .map(|e| String::from_utf8(e.message.payload).unwrap())
                .collect();
            assert_eq!(
                published,
                vec!["t0", "t1", "t2"],
                "published in commit order"
            );
        }

        /// Writers of different units never wait for each other, new units included. Three
        /// units the store has never seen fall in one gap of the lock table: writer A enqueues
        /// the first and stays open, writer B enqueues and commits the second, then A enqueues
        /// the third. A locking read of a missing lock row (MariaDB, REPEATABLE READ) locked
        /// that gap: B then waited for A, and A's second unit deadlocked with B.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn writers_of_new_units_never_wait_for_each_other() {
            use outbox_core::conformance::eventually;
            let store = $harness.fresh().await;
            let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
                .strategy(KeepOrder::default())
                .build()
                .unwrap();
            let unit = |k: &str| Message::new("d", k.as_bytes().to_vec()).key(k);
            let mut a = store.pool().begin().await.unwrap();
            drop(outbox.enqueue(&mut a, [unit("n1")]).await.unwrap());
            let (session_tx, session_rx) = tokio::sync::oneshot::channel::<i64>();
            let (s2, o2) = (store.clone(), outbox.clone());
            let b = tokio::spawn(async move {
                let mut b = s2.pool().begin().await.unwrap();
                let id: i64 = sqlx::query_scalar($session_id)
                    .fetch_one(&mut *b)
                    .await
                    .unwrap();
                session_tx.send(id).unwrap();
                drop(o2.enqueue(&mut b, [unit("n2")]).await.unwrap());
                b.commit().await.unwrap();
            });
            let session = session_rx.await.unwrap();
            eventually(
                "the writer of another unit commits while the first writer is open",
                std::time::Duration::from_secs(20),
                || async {
                    let waiting: i64 = sqlx::query_scalar($lock_wait)
                        .bind(session)
                        .fetch_one(store.pool())
                        .await
                        .unwrap();
                    assert_eq!(waiting, 0, "a writer of unit n2 waits for the writer of n1");
                    b.is_finished()
                },
            )
            .await;
            b.await.unwrap();
            drop(outbox.enqueue(&mut a, [unit("n3")]).await.expect("no deadlock"));
            a.commit().await.unwrap();
            let report = Relay::builder(store.clone(), RecordingPublisher::new())
                .build()
                .unwrap()
                .run_once()
                .await
                .unwrap();
            assert_eq!(report.published, 3);
        }

        /// A relay's settle locks its own units only, found by primary key: never a writer's
        /// unit of the same stream. Forty units are claimed and published while a writer
        /// holds a new unit of that stream open; the settle must not wait for it. An OR-list
        /// of units (MariaDB plans it as a scan of the stream's units) waited on the writer's
        /// row until the lock timeout, and the published batch stayed leased, to be published
        /// again.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn settling_never_waits_for_a_writer_of_another_unit() {
            let store = $harness.fresh().await;
            let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
                .strategy(KeepOrder::default())
                .build()
                .unwrap();
            let mut setup = store.pool().begin().await.unwrap();
            let units: Vec<Message> = (0..40)
                .map(|k| Message::new("d", vec![k]).stream("s").key(format!("k{k:02}")))
                .collect();
            drop(outbox.enqueue(&mut setup, units).await.unwrap());
            setup.commit().await.unwrap();
            let mut writer = store.pool().begin().await.unwrap();
            let open = Message::new("d", b"open".to_vec()).stream("s").key("zz");
            drop(outbox.enqueue(&mut writer, [open]).await.unwrap());
            let impatient = $store::connect_with(
                &url(),
                $options {
                    table: store.table().into(),
                    lock_timeout: std::time::Duration::from_secs(1),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let broker = RecordingPublisher::new();
            let relay = Relay::builder(impatient, broker.clone())
                .lease(std::time::Duration::from_secs(3))
                .publish_timeout(std::time::Duration::from_secs(1))
                .build()
                .unwrap();
            let report = relay.step().await.expect("the settle does not wait for the writer");
            assert_eq!((report.claimed, report.published), (40, 40), "{report:?}");
            let stats = outbox_core::StoreAdmin::stats(store.as_ref()).await.unwrap().total();
            assert_eq!((stats.sent, stats.pending), (40, 0), "{stats:?}");
            writer.commit().await.unwrap();
        }

        /// Contract point 16: nothing is published before the outermost commit. A
        /// publish-on-commit message enqueued in a savepoint is refused (typed, nothing
        /// written), whether the savepoint is then released and rolled back with its parent,
        /// or rolled back alone; the commit helper refuses a savepoint carrying a handle; a
        /// keep-order message in a savepoint lives and dies with it.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn savepoints_publish_nothing_before_the_outermost_commit() {
            use sqlx::Connection;
            let store = $harness.fresh().await;
            let broker = RecordingPublisher::new();
            let outbox = Outbox::builder(store.clone(), broker.clone())
                .stream_strategy("ordered", KeepOrder::default())
                .build()
                .unwrap();
            let on_commit = || Message::new("d", b"oc".to_vec()).stream("s");
            // Released, then rolled back with its parent.
            let mut outer = store.pool().begin().await.unwrap();
            let mut nested = outer.begin().await.unwrap();
            let e = outbox.enqueue(&mut nested, [on_commit()]).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Savepoint, "{e}");
            nested.commit().await.unwrap();
            outer.rollback().await.unwrap();
            // Rolled back alone, the parent committed.
            let mut outer = store.pool().begin().await.unwrap();
            let mut nested = outer.begin().await.unwrap();
            let e = outbox.enqueue(&mut nested, [on_commit()]).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Savepoint, "{e}");
            nested.rollback().await.unwrap();
            outer.commit().await.unwrap();
            // A handle from the outer transaction, committed through a savepoint: refused,
            // nothing published; the outer transaction still commits it.
            let mut outer = store.pool().begin().await.unwrap();
            let after = outbox.enqueue(&mut outer, [on_commit()]).await.unwrap();
            let nested = outer.begin().await.unwrap();
            let e = outbox_sql::$module::commit(nested, after).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Savepoint, "{e}");
            outer.rollback().await.unwrap();
            // Keep-order in a savepoint: rolled back alone (its row goes), then one released
            // and committed with its parent (published once, by the relay).
            let mut outer = store.pool().begin().await.unwrap();
            let mut nested = outer.begin().await.unwrap();
            let ordered = |p: &str| Message::new("d", p.as_bytes().to_vec()).stream("ordered").key("k");
            let after = outbox.enqueue(&mut nested, [ordered("gone")]).await.unwrap();
            assert!(after.is_empty());
            nested.rollback().await.unwrap();
            let mut nested = outer.begin().await.unwrap();
            let after = outbox.enqueue(&mut nested, [ordered("kept")]).await.unwrap();
            outbox_sql::$module::commit(nested, after).await.unwrap();
            outbox_sql::$module::commit(outer, AfterCommit::empty()).await.unwrap();
            outbox.shutdown(std::time::Duration::from_secs(5)).await.unwrap();
            let report = Relay::builder(store.clone(), broker.clone())
                .build()
                .unwrap()
                .run_once()
                .await
                .unwrap();
            let published: Vec<Vec<u8>> = broker
                .published()
                .into_iter()
                .map(|e| e.message.payload)
                .collect();
            assert_eq!(published, vec![b"kept".to_vec()], "{report:?}");
            let stats = outbox_core::StoreAdmin::stats(store.as_ref()).await.unwrap().total();
            assert_eq!((stats.pending, stats.sent, stats.dead), (0, 1, 0), "{stats:?}");
        }

        /// Several processes may run `migrate` at once on a new table.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_migrations_are_safe() {
            let table = format!("outbox_m{}", uuid::Uuid::now_v7().simple());
            let mut handles = Vec::new();
            for _ in 0..4 {
                let table = table.clone();
                handles.push(tokio::spawn(async move {
                    outbox_core::Store::migrate(&connect(&table).await).await
                }));
            }
            for h in handles {
                h.await.unwrap().expect("concurrent migrate");
            }
            let store = connect(&table).await;
            assert!(store.table_exists().await.unwrap());
            assert_eq!(
                outbox_core::StoreAdmin::schema(&store).await.unwrap(),
                outbox_core::SchemaReport {
                    version: Some(outbox_core::SCHEMA_VERSION),
                    ..Default::default()
                },
                "one whole schema, its version recorded"
            );
        }

        /// A store whose pool holds one connection relays: its claims, settles and
        /// background work share it, and PostgreSQL's `LISTEN` has a connection of its own
        /// (taken from the pool, it left the claims none and the relay stalled). The relay
        /// polls every `relay_poll` (PostgreSQL: 120 s, so each commit is heard by NOTIFY).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_pool_of_one_connection_relays_and_hears_commits() {
            use outbox_core::conformance::eventually;
            use std::time::Duration;

            let h = $harness;
            let writer = h.fresh().await;
            let relay_side = $store::connect_with(
                &url(),
                $options {
                    table: writer.table().to_owned(),
                    max_connections: 1,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let broker = RecordingPublisher::new();
            let outbox = Outbox::builder(writer.clone(), RecordingPublisher::new())
                .strategy(KeepOrder::default())
                .build()
                .unwrap();
            let relay = Relay::builder(relay_side, broker.clone())
                .poll_interval($relay_poll)
                .build()
                .unwrap();
            let running = outbox_core::conformance::RunningRelay::spawn(relay);
            for i in 0..3usize {
                let msg = Message::new("d", i.to_string().into_bytes());
                // Dropped: no in-process wake-up.
                drop(h.transact(&writer, &outbox, vec![msg], true).await.unwrap());
                eventually("published", Duration::from_secs(15), || async {
                    broker.count() == i + 1
                })
                .await;
            }
            running.stop().await;
        }
    };
}
