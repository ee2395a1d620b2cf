//! `outbox relay`: open the store and the publisher (waiting for them with `--loop`), run
//! the relay once or until a stop signal, and the backlog gauges.

use super::*;

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("stop requested; finishing the batch in flight");
}

/// The store a relay serves (PostgreSQL: listening for commits unless `listen` is false).
async fn relay_store(url: &str, table: &str, listen: bool) -> Result<AnyStore, Error> {
    AnyStore::connect_with(
        url,
        outbox_sql::any::AnyOptions {
            table: table.into(),
            create: false,
            listen,
            ..Default::default()
        },
    )
    .await
}

pub(crate) async fn open_until_ready(
    url: &str,
    table: &str,
    listen: bool,
) -> Result<Option<AnyStore>, Error> {
    until_ready("store", url, "outbox_store", || async {
        let store = relay_store(url, table, listen).await?;
        match store.table_exists().await? {
            true => Ok(store),
            false => Err(Error::transient(format!(
                "table {table:?} does not exist yet (run `outbox migrate`)"
            ))),
        }
    })
    .await
}

/// The publisher at `url` once it answers (`None`: stopped before it did, which is logged).
pub(crate) async fn publisher_until_ready(
    url: &str,
) -> Result<Option<Arc<dyn outbox_core::Publisher>>, Error> {
    let p = until_ready("publisher", url, "outbox_publisher", || async {
        let p = open_publisher(url).await?;
        p.check().await?;
        Ok(p)
    })
    .await?;
    if p.is_none() {
        tracing::info!("stopped before the publisher was ready");
    }
    Ok(p)
}

/// Open something the relay needs (the store, the publisher) the way a service under
/// systemd or Kubernetes should: a transient failure is logged and tried again, with pauses
/// from 200 ms doubling to 30 s, until it works or the process is asked to stop (`None`); a
/// permanent one (a bad URL, a refused password) is returned. `gauge` gets `_up` (1 or 0)
/// and `_unavailable_total`.
pub(crate) async fn until_ready<T, F, Fut>(
    what: &str,
    url: &str,
    gauge: &'static str,
    mut open: F,
) -> Result<Option<T>, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut pause = Duration::from_millis(200);
    let shown = outbox_core::redact_url(url);
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let problem = match open().await {
            Ok(ready) => {
                metrics::gauge!(format!("{gauge}_up")).set(1.0);
                return Ok(Some(ready));
            }
            Err(e) if e.is_transient() => report::describe(&e),
            Err(e) => return Err(e),
        };
        metrics::gauge!(format!("{gauge}_up")).set(0.0);
        metrics::counter!(format!("{gauge}_unavailable_total")).increment(1);
        tracing::warn!(%what, url = %shown, %problem, retry_in = %humantime::format_duration(pause), "cannot use the {what} yet; retrying");
        tokio::select! {
            _ = &mut stop => return Ok(None),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// The publisher URL from `--publisher`, its file, or the config file.
pub(crate) fn publisher_url(args: &RelayArgs, file: &FileRelay) -> Result<String, Error> {
    first_of(
        args.publisher.clone(),
        &args.publisher_file,
        file.publisher.clone(),
        &file.publisher_file,
        "publisher",
    )?
    .ok_or_else(|| {
        Error::config(
            "no publisher: pass --publisher URL or --publisher-file PATH, set OUTBOX_PUBLISHER or OUTBOX_PUBLISHER_FILE, or set relay.publisher",
        )
    })
}

/// Every relay setting: flags, variables, the config file and defaults, with the signing
/// keys and whether unsigned rows are refused.
pub(crate) fn full_config(args: &RelayArgs, file: &FileRelay) -> Result<RelayConfig, Error> {
    let config = relay_config(args, file)?;
    let (signer, require_signatures) = signing_config(args, file)?;
    Ok(RelayConfig {
        delivery: outbox_core::Delivery {
            signer,
            ..config.delivery
        },
        require_signatures,
        ..config
    })
}

pub(crate) async fn relay(
    store_url: &str,
    table: &str,
    args: RelayArgs,
    file: FileRelay,
) -> Result<u8, Error> {
    let publisher_url = publisher_url(&args, &file)?;
    let metrics_addr = args.metrics_addr.or(file.metrics_addr);
    if let Some(addr) = metrics_addr {
        metrics_endpoint::serve(addr).await?;
        tracing::info!(%addr, "serving Prometheus metrics on GET /metrics");
    }
    // Once: an unreachable store is an error (exit 3). In a loop: it is waited for.
    let store = if args.run_loop {
        match open_until_ready(store_url, table, !args.no_listen).await? {
            Some(s) => s,
            None => {
                tracing::info!("stopped before the store was ready");
                return Ok(exit::OK);
            }
        }
    } else {
        let s = relay_store(store_url, table, !args.no_listen).await?;
        s.require_table().await?;
        s
    };
    // The same for the broker: a broker that is down during a deploy is waited for, not a
    // crash loop.
    let publisher = if args.run_loop {
        match publisher_until_ready(&publisher_url).await? {
            Some(p) => p,
            None => return Ok(exit::OK),
        }
    } else {
        open_publisher(&publisher_url).await?
    };
    let config = full_config(&args, &file)?;
    let require_signatures = config.require_signatures;
    if args.wal {
        return wal_relay(store_url, &store, &args.wal_names, publisher, config).await;
    }
    let s = store.store();
    let relay = Relay::builder(s.clone(), publisher)
        .config(config)
        .build()?;
    let verification = verification(relay.config().delivery.signer.as_ref(), require_signatures);
    tracing::info!(
        table = store.table(),
        owner = relay.owner(),
        signatures = %verification,
        "relay starting"
    );
    if !args.run_loop {
        let report = relay.run_once().await?;
        log_report(&report, "relay finished");
        let trouble = report.failed + report.dead + report.quarantined;
        if trouble > 0 {
            tracing::warn!(
                failed = report.failed,
                dead = report.dead,
                quarantined = report.quarantined,
                "partly done: some messages were not published (see `outbox dead list` and the log above)"
            );
            return Ok(exit::PARTIAL);
        }
        return Ok(exit::OK);
    }
    // The backlog gauges cost a whole-table stats query: only when someone reads them.
    let gauges = metrics_addr.map(|_| tokio::spawn(backlog_gauges(s.clone())));
    let report = relay.run(shutdown_signal()).await;
    if let Some(g) = gauges {
        g.abort();
    }
    log_report(&report, "relay stopped");
    Ok(exit::OK)
}

/// `outbox relay --wal`: the WAL relay over the slot, the table's relay alongside, until
/// stopped.
async fn wal_relay(
    store_url: &str,
    store: &AnyStore,
    names: &WalNames,
    publisher: Arc<dyn outbox_core::Publisher>,
    config: RelayConfig,
) -> Result<u8, Error> {
    let AnyStore::Postgres(pg) = store else {
        return Err(Error::config(
            "--wal reads PostgreSQL's write-ahead log: the store must be postgres://…",
        ));
    };
    let wal = if names.wal_rows {
        outbox_sql::postgres::wal::WalStore::rows(pg.clone())
    } else {
        outbox_sql::postgres::wal::WalStore::new(pg.clone(), &names.wal_prefix)?
    };
    if let StreamFilter::Only(_) = config.streams {
        return Err(Error::config(
            "--stream does not apply to --wal: the WAL relay publishes every stream of its slot (run a polling relay per stream set instead)",
        ));
    }
    let verification = verification(config.delivery.signer.as_ref(), config.require_signatures);
    let relay = outbox_sql::postgres::wal::WalRelay::builder(store_url, wal, publisher)
        .slot(&names.slot)
        .publication(&names.publication)
        .batch_size(config.batch_size)
        .delivery(config.delivery)
        .require_signatures(config.require_signatures)
        .build()?;
    tracing::info!(table = pg.table(), slot = %names.slot, publication = %names.publication, signatures = %verification, "WAL relay starting");
    relay.run(shutdown_signal()).await?;
    tracing::info!(stats = ?relay.stats(), "WAL relay stopped");
    Ok(exit::OK)
}

/// The relay's settings from its flags and variables, then the config file, then the
/// defaults (signing apart: [`signing_config`]).
fn relay_config(args: &RelayArgs, file: &FileRelay) -> Result<RelayConfig, Error> {
    let defaults = RelayConfig::default();
    let streams = if !args.streams.is_empty() {
        args.streams.clone()
    } else {
        file.streams.clone().unwrap_or_default()
    };
    Ok(RelayConfig {
        streams: if streams.is_empty() {
            StreamFilter::All
        } else {
            StreamFilter::Only(streams)
        },
        batch_size: args.batch.or(file.batch).unwrap_or(defaults.batch_size),
        concurrency: args
            .concurrency
            .or(file.concurrency)
            .unwrap_or(defaults.concurrency),
        lease: args
            .lease
            .or(duration("relay.lease", file.lease.clone())?)
            .unwrap_or(defaults.lease),
        poll_interval: args
            .interval
            .or(duration("relay.interval", file.interval.clone())?)
            .unwrap_or(defaults.poll_interval),
        store_timeout: args
            .store_timeout
            .or(duration("relay.store_timeout", file.store_timeout.clone())?)
            .unwrap_or(defaults.store_timeout),
        delivery: outbox_core::Delivery {
            publish_timeout: args
                .publish_timeout
                .or(duration(
                    "relay.publish_timeout",
                    file.publish_timeout.clone(),
                )?)
                .unwrap_or(defaults.delivery.publish_timeout),
            delete_after_send: args.delete_after_send || file.delete_after_send.unwrap_or(false),
            retry: RetryPolicy {
                max_attempts: args
                    .max_attempts
                    .or(file.max_attempts)
                    .unwrap_or(defaults.delivery.retry.max_attempts),
                initial: args
                    .retry_initial
                    .or(duration("relay.retry_initial", file.retry_initial.clone())?)
                    .unwrap_or(defaults.delivery.retry.initial),
                max: args
                    .retry_max
                    .or(duration("relay.retry_max", file.retry_max.clone())?)
                    .unwrap_or(defaults.delivery.retry.max),
                ..defaults.delivery.retry.clone()
            },
            ..defaults.delivery.clone()
        },
        ..defaults
    })
}

/// The verification keys, and whether unsigned rows are refused: with keys loaded, they are
/// unless `--allow-unsigned` says otherwise (with a warning).
fn signing_config(
    args: &RelayArgs,
    file: &FileRelay,
) -> Result<(Option<outbox_core::Signer>, bool), Error> {
    let signer = signing::load(
        args.signing_keys_file.as_deref(),
        std::env::var("OUTBOX_SIGNING_KEYS").ok().as_deref(),
        file.signing_keys_file.as_deref(),
        file.signing_keys.as_deref(),
    )?;
    let signer = match args.signing_label.clone().or(file.signing_label.clone()) {
        Some(label) => signer.map(|s| s.label(label)),
        None => signer,
    };
    let asked = args.require_signatures || file.require_signatures.unwrap_or(false);
    if asked && signer.is_none() {
        return Err(Error::config(
            "--require-signatures needs verification keys: --signing-keys-file, OUTBOX_SIGNING_KEYS or relay.signing_keys",
        ));
    }
    let allow_unsigned = args.allow_unsigned || file.allow_unsigned.unwrap_or(false);
    if asked && allow_unsigned {
        return Err(Error::config(
            "--require-signatures and --allow-unsigned (relay.require_signatures, relay.allow_unsigned) contradict each other",
        ));
    }
    // With keys loaded, unsigned rows are refused unless explicitly allowed.
    let require_signatures = signer.is_some() && !allow_unsigned;
    if signer.is_some() && allow_unsigned {
        tracing::warn!("--allow-unsigned: rows without a signature are published unverified; whoever can write the outbox table can strip a signature and change a row. Remove the flag once every writer signs");
    }
    Ok((signer, require_signatures))
}

/// How the start-up line describes signature checks.
fn verification(signer: Option<&outbox_core::Signer>, require_signatures: bool) -> String {
    match signer {
        None => "off: signed rows are refused as unverifiable".to_owned(),
        Some(signer) => format!(
            "{} key(s) loaded ({}); unsigned rows are {}",
            signer.key_ids().count(),
            signer.key_ids().collect::<Vec<_>>().join(", "),
            if require_signatures {
                "refused"
            } else {
                "published (--allow-unsigned)"
            }
        ),
    }
}

/// How often the backlog gauges are refreshed at most: one stats query, independent of the
/// poll interval (a relay woken by NOTIFY may poll only every minute).
pub(crate) const GAUGE_REFRESH: Duration = Duration::from_secs(5);

/// The stats query may take at most this share of the time (and of one connection): on a
/// large table, where it takes longer, the gauges are refreshed less often.
pub(crate) const GAUGE_DUTY: u32 = 20;

/// The pause after a stats query that took `took`: at least [`GAUGE_REFRESH`], and
/// [`GAUGE_DUTY`] times the query, so the gauges never cost more than 1/20 of the time.
pub(crate) fn gauge_pause(took: Duration) -> Duration {
    GAUGE_REFRESH
        .max(took * GAUGE_DUTY)
        .min(Duration::from_secs(600))
}

/// Per-stream gauge series are capped at this many streams (the largest backlogs); the rest
/// are summed under stream "(other)", so a table with 20 000 streams does not make 60 000 series.
pub(crate) const MAX_STREAM_SERIES: usize = 100;

/// Backlog gauges per stream, plus the total under stream "*" (present even on an empty
/// table, so dashboards and alerts see 0 rather than nothing). Series of streams that are
/// gone stop being refreshed and expire (see `metrics_endpoint`).
pub(crate) async fn backlog_gauges(store: Arc<dyn StoreAdmin>) {
    loop {
        let started = std::time::Instant::now();
        let stats = store.stats().await;
        let took = started.elapsed();
        metrics::gauge!("outbox_stats_query_seconds").set(took.as_secs_f64());
        if let Ok(stats) = stats {
            let now = SystemTime::now();
            for s in capped(stats) {
                let stream = printable(&s.stream).into_owned();
                metrics::gauge!("outbox_backlog", "stream" => stream.clone()).set(s.pending as f64);
                metrics::gauge!("outbox_dead", "stream" => stream.clone()).set(s.dead as f64);
                metrics::gauge!("outbox_oldest_pending_seconds", "stream" => stream)
                    .set(oldest_seconds(&s, now));
            }
        }
        tokio::time::sleep(gauge_pause(took)).await;
    }
}

/// The rows of a gauge family: the [`MAX_STREAM_SERIES`] largest (pending plus dead) by
/// name, the rest summed under "(other)", and the total under "*".
pub(crate) fn capped(stats: outbox_core::Stats) -> Vec<outbox_core::StreamStats> {
    let total = stats.total();
    let mut rows = stats.streams;
    rows.sort_by_key(|s| std::cmp::Reverse(s.pending + s.dead));
    let rest: Vec<_> = rows.split_off(rows.len().min(MAX_STREAM_SERIES));
    if !rest.is_empty() {
        rows.push(outbox_core::StreamStats {
            stream: "(other)".into(),
            ..outbox_core::Stats { streams: rest }.total()
        });
    }
    rows.push(total);
    rows
}

/// How old a row's oldest pending message is, in seconds (0 with none).
pub(crate) fn oldest_seconds(s: &outbox_core::StreamStats, now: SystemTime) -> f64 {
    s.oldest_pending
        .and_then(|t| now.duration_since(t).ok())
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stats query behind the gauges takes at most 1/20 of the time, however slow it is
    /// on a large table, and runs at most every 5 s.
    #[test]
    fn gauges_back_off_when_the_stats_query_is_slow() {
        assert_eq!(gauge_pause(Duration::from_millis(3)), GAUGE_REFRESH);
        assert_eq!(
            gauge_pause(Duration::from_millis(800)),
            Duration::from_secs(16)
        );
        assert_eq!(
            gauge_pause(Duration::from_secs(3600)),
            Duration::from_secs(600)
        );
    }
}
