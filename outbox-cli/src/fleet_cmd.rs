//! `outbox relay --stores FILE` and `outbox stats --stores FILE`: many stores (a database or
//! schema per tenant, shards) in one process, from a TOML list that is read again while the
//! relay runs.
//!
//! ```toml
//! [[store]]
//! name = "tenant-a"
//! url_file = "/run/secrets/tenant-a-db"   # or url = "postgres://relay@db-a/shop"
//! table = "outbox"                        # default: --table
//! ```

use std::collections::BTreeMap;

use std::path::Path;

use super::*;
use crate::relay_cmd::shutdown_signal;
use outbox_core::{Fleet, MemberState};

/// One entry of the stores file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    url: Option<String>,
    url_file: Option<PathBuf>,
    table: Option<String>,
    max_connections: Option<u32>,
    listen: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoresFile {
    #[serde(default)]
    store: Vec<Entry>,
}

/// A store of the list: its URL (a secret: never printed whole) and table.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) url: String,
    pub(crate) table: String,
    /// Its pool's size (PostgreSQL, MySQL).
    max_connections: u32,
    /// PostgreSQL: whether its relay holds a `LISTEN` connection (else it polls).
    listen: bool,
}

/// A member's pool (PostgreSQL, MySQL) unless its entry says otherwise: its relay runs one
/// batch at a time, and a hundred tenants should not hold five hundred connections.
const MEMBER_CONNECTIONS: u32 = 2;

/// Read the list: names unique and printable, each with exactly one of `url` and
/// `url_file`. Errors name the store and the file, never a URL.
pub(crate) fn load(path: &Path, default_table: &str) -> Result<BTreeMap<String, Member>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::config(format!("cannot read the stores file {}", path.display())).with_source(e)
    })?;
    let file: StoresFile = toml::from_str(&text).map_err(|e| {
        // toml's message quotes the offending line, which may hold a URL: keep its position.
        let at = e
            .span()
            .map(|s| format!(" (at byte {})", s.start))
            .unwrap_or_default();
        Error::config(format!(
            "the stores file {} is not a valid list of [[store]] entries{at}: each has name, url or url_file, and optionally table, max_connections and listen",
            path.display()
        ))
    })?;
    let mut out = BTreeMap::new();
    for e in file.store {
        check_name(&e.name, &format!("the stores file {}", path.display()))?;
        let url = match (e.url, &e.url_file) {
            (Some(u), None) => u,
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|err| {
                    Error::config(format!(
                        "store {:?}: cannot read its url_file {}",
                        e.name,
                        f.display()
                    ))
                    .with_source(err)
                })?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned(),
            _ => {
                return Err(Error::config(format!(
                    "store {:?} in {}: give exactly one of url and url_file",
                    e.name,
                    path.display()
                )))
            }
        };
        let table = e.table.unwrap_or_else(|| default_table.to_owned());
        outbox_core::validate_identifier(&table)?;
        let max_connections = e.max_connections.unwrap_or(MEMBER_CONNECTIONS);
        if max_connections == 0 || max_connections > 100 {
            return Err(Error::config(format!(
                "store {:?} in {}: max_connections must be 1 to 100",
                e.name,
                path.display()
            )));
        }
        let member = Member {
            url,
            table,
            max_connections,
            listen: e.listen.unwrap_or(true),
        };
        if out.insert(e.name.clone(), member).is_some() {
            return Err(Error::config(format!(
                "store {:?} is listed twice in {}",
                e.name,
                path.display()
            )));
        }
    }
    Ok(out)
}

/// Where the list of stores comes from.
#[derive(Clone)]
pub(crate) enum Source {
    /// A TOML file of `[[store]]` entries.
    File(PathBuf),
    /// A query against a catalog database: rows of (name, url) or (name, url, table).
    Query { catalog: String, sql: String },
}

impl Source {
    /// From `--stores FILE`, or `--stores-catalog URL` with `--stores-query SQL`.
    pub(crate) fn of(list: &StoresList) -> Result<Self, Error> {
        match (&list.stores, &list.stores_catalog, &list.stores_query) {
            (Some(f), None, None) => Ok(Source::File(f.clone())),
            (None, Some(catalog), Some(sql)) => Ok(Source::Query {
                catalog: catalog.clone(),
                sql: sql.clone(),
            }),
            _ => Err(Error::config(
                "name the stores with --stores FILE, or with both --stores-catalog URL and --stores-query SQL",
            )),
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Query { catalog, .. } => {
                format!("query on {}", outbox_core::redact_url(catalog))
            }
        }
    }

    /// The stores it names now.
    pub(crate) async fn read(
        &self,
        default_table: &str,
    ) -> Result<BTreeMap<String, Member>, Error> {
        match self {
            Source::File(p) => load(p, default_table),
            Source::Query { catalog, sql } => {
                let rows = catalog_rows(catalog, sql).await?;
                let mut out = BTreeMap::new();
                for (name, url, table) in rows {
                    check_name(&name, "the catalog query")?;
                    let table = table.unwrap_or_else(|| default_table.to_owned());
                    outbox_core::validate_identifier(&table)?;
                    let member = Member {
                        url,
                        table,
                        max_connections: MEMBER_CONNECTIONS,
                        listen: true,
                    };
                    if out.insert(name.clone(), member).is_some() {
                        return Err(Error::config(format!(
                            "the catalog query names store {:?} twice",
                            printable(&name)
                        )));
                    }
                }
                Ok(out)
            }
        }
    }
}

fn check_name(name: &str, origin: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(Error::config(format!(
            "{origin}: a store name must be 1-200 printable characters ({:?})",
            printable(name)
        )));
    }
    Ok(())
}

/// The catalog query's rows: (name, url) or (name, url, table), as text.
async fn catalog_rows(
    catalog: &str,
    sql: &str,
) -> Result<Vec<(String, String, Option<String>)>, Error> {
    use outbox_sql::sqlx::{self, Row};
    let shape = || {
        Error::config("the catalog query must return text columns name, url and optionally table")
    };
    // sqlx rows of either database as (name, url, table).
    macro_rules! text_rows {
        ($rows:expr) => {
            $rows
                .iter()
                .map(|r| {
                    let text = |i: usize| r.try_get::<Option<String>, _>(i).map_err(|_| shape());
                    Ok((
                        text(0)?.ok_or_else(shape)?,
                        text(1)?.ok_or_else(shape)?,
                        if r.len() > 2 { text(2)? } else { None },
                    ))
                })
                .collect()
        };
    }
    match AnyStore::open(catalog, "outbox", false).await? {
        AnyStore::Sqlite(s) => {
            let conn = s.connect()?;
            let mut stmt = conn.prepare(sql).map_err(outbox_sqlite::map_err)?;
            let columns = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        if columns > 2 {
                            r.get::<_, Option<String>>(2)?
                        } else {
                            None
                        },
                    ))
                })
                .map_err(|_| shape())?;
            rows.collect::<Result<_, _>>().map_err(|_| shape())
        }
        AnyStore::Postgres(s) => {
            let rows = sqlx::query(sql)
                .fetch_all(s.pool())
                .await
                .map_err(outbox_sql::postgres::map_err)?;
            text_rows!(rows)
        }
        AnyStore::MySql(s) => {
            let rows = sqlx::query(sql)
                .fetch_all(s.pool())
                .await
                .map_err(outbox_sql::mysql::map_err)?;
            text_rows!(rows)
        }
    }
}

impl Member {
    /// The store at its URL (its pool of `max_connections`), once its table exists.
    pub(crate) async fn open(&self) -> Result<AnyStore, Error> {
        let store = AnyStore::connect_with(
            &self.url,
            outbox_sql::any::AnyOptions {
                table: self.table.clone(),
                create: false,
                max_connections: self.max_connections,
                listen: self.listen,
            },
        )
        .await?;
        store.require_table().await?;
        Ok(store)
    }
}

/// The stores the fleet has opened, by name: read by the backlog gauges.
type Opened = Arc<std::sync::Mutex<BTreeMap<String, Arc<AnyStore>>>>;

/// How the fleet opens a member; what it opens is also kept in `opened`.
fn connector(name: &str, m: &Member, opened: &Opened) -> outbox_core::OpenStore {
    let (name, m, opened) = (name.to_owned(), m.clone(), opened.clone());
    Arc::new(move || {
        let (name, m, opened) = (name.clone(), m.clone(), opened.clone());
        Box::pin(async move {
            let store = Arc::new(m.open().await?);
            opened
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name, store.clone());
            Ok(store as Arc<dyn Store>)
        })
    })
}

/// Backlog gauges per store (`outbox_store_backlog`, `outbox_store_dead`,
/// `outbox_store_oldest_pending_seconds`, label `store`): the stores opened, read at once
/// (each within 10 s; one that cannot be read keeps its last values until they expire), the
/// 100 largest by name, the rest under "(other)", the sum under "*". Paced like the
/// single-store gauges: the reads take at most 1/20 of the time.
async fn store_gauges(opened: Opened) {
    loop {
        let started = std::time::Instant::now();
        let stores: Vec<(String, Arc<AnyStore>)> = opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        let reads = stores.iter().map(|(name, store)| async move {
            match tokio::time::timeout(Duration::from_secs(10), store.stats()).await {
                Ok(Ok(stats)) => Some(outbox_core::StreamStats {
                    stream: name.clone(),
                    ..stats.total()
                }),
                _ => None,
            }
        });
        let rows: Vec<_> = futures_util::future::join_all(reads)
            .await
            .into_iter()
            .flatten()
            .collect();
        let took = started.elapsed();
        let now = SystemTime::now();
        for s in crate::relay_cmd::capped(outbox_core::Stats { streams: rows }) {
            let store = printable(&s.stream).into_owned();
            metrics::gauge!("outbox_store_backlog", "store" => store.clone()).set(s.pending as f64);
            metrics::gauge!("outbox_store_dead", "store" => store.clone()).set(s.dead as f64);
            metrics::gauge!("outbox_store_oldest_pending_seconds", "store" => store)
                .set(crate::relay_cmd::oldest_seconds(&s, now));
        }
        tokio::time::sleep(crate::relay_cmd::gauge_pause(took)).await;
    }
}

/// With `--no-listen` (`listen` false), no store of the list listens.
fn polling(mut members: BTreeMap<String, Member>, listen: bool) -> BTreeMap<String, Member> {
    if !listen {
        for m in members.values_mut() {
            m.listen = false;
        }
    }
    members
}

/// `outbox relay --stores FILE`: serve every store of the list until stopped, reading the
/// list again every `--stores-refresh`.
pub(crate) async fn relay(
    source: Source,
    table: &str,
    args: RelayArgs,
    file: FileRelay,
) -> Result<u8, Error> {
    if args.wal {
        return Err(Error::config(
            "--stores and --wal do not go together: the WAL relay serves one database",
        ));
    }
    let listen = !args.no_listen;
    let members = polling(source.read(table).await?, listen);
    let publisher_url = crate::relay_cmd::publisher_url(&args, &file)?;
    let opened = Opened::default();
    let metrics_addr = args.metrics_addr.or(file.metrics_addr);
    if let Some(addr) = metrics_addr {
        metrics_endpoint::serve(addr).await?;
        tracing::info!(%addr, "serving Prometheus metrics on GET /metrics");
    }
    let config = crate::relay_cmd::full_config(&args, &file)?;
    // A broker that is down during a deploy is waited for, as by `relay --loop`.
    let Some(publisher) = crate::relay_cmd::publisher_until_ready(&publisher_url).await? else {
        return Ok(exit::OK);
    };
    let fleet = Arc::new(
        Fleet::builder(publisher)
            .config(config)
            .max_batches(args.max_batches)
            .build()?,
    );
    let gauges = metrics_addr.map(|_| tokio::spawn(store_gauges(opened.clone())));
    let mut current = BTreeMap::new();
    apply(&fleet, &opened, &mut current, members).await;
    tracing::info!(
        stores = current.len(),
        list = %source.describe(),
        max_batches = args.max_batches,
        "relay starting for every store of the list"
    );
    let refresh = {
        let (fleet, source, table) = (fleet.clone(), source.clone(), table.to_owned());
        let opened = opened.clone();
        let every = args.stores_refresh;
        tokio::spawn(async move {
            let mut states: BTreeMap<String, MemberState> = BTreeMap::new();
            let mut last_read = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(500).min(every)).await;
                report_changes(&fleet, &mut states);
                if last_read.elapsed() < every {
                    continue;
                }
                last_read = std::time::Instant::now();
                match source.read(&table).await {
                    Ok(members) => {
                        apply(&fleet, &opened, &mut current, polling(members, listen)).await
                    }
                    Err(e) => {
                        tracing::warn!(error = %report::describe(&e), "cannot read the list of stores again; serving the stores of the last good read")
                    }
                }
            }
        })
    };
    fleet.run(shutdown_signal()).await;
    refresh.abort();
    if let Some(g) = gauges {
        g.abort();
    }
    tracing::info!("relay stopped");
    Ok(exit::OK)
}

/// Make the fleet serve `wanted`: new names added, missing ones removed (their batch in
/// flight finishes), changed ones (URL or table) replaced.
async fn apply(
    fleet: &Fleet,
    opened: &Opened,
    current: &mut BTreeMap<String, Member>,
    wanted: BTreeMap<String, Member>,
) {
    let gone: Vec<String> = current
        .iter()
        .filter(|(name, m)| wanted.get(*name) != Some(m))
        .map(|(name, _)| name.clone())
        .collect();
    for name in gone {
        fleet.remove(&name).await;
        opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        current.remove(&name);
        tracing::info!(store = %printable(&name), "store left the list (or changed): no longer served");
    }
    for (name, m) in wanted {
        if current.contains_key(&name) {
            continue;
        }
        match fleet.add_with(&name, connector(&name, &m, opened)) {
            Ok(()) => {
                tracing::info!(store = %printable(&name), url = %outbox_core::redact_url(&m.url), table = %m.table, "serving store");
                current.insert(name, m);
            }
            Err(e) => tracing::error!(store = %printable(&name), error = %e, "cannot serve store"),
        }
    }
}

/// Log each member that starts failing (with its error) or recovers.
fn report_changes(fleet: &Fleet, states: &mut BTreeMap<String, MemberState>) {
    let status = fleet.status();
    for s in &status {
        let before = states.insert(s.name.clone(), s.state);
        if before == Some(s.state) {
            continue;
        }
        match s.state {
            MemberState::Failing => tracing::warn!(
                store = %printable(&s.name),
                error = s.last_error.as_deref().unwrap_or(""),
                "store failing; retried with backoff, the others go on"
            ),
            MemberState::Running if before == Some(MemberState::Failing) => {
                tracing::info!(store = %printable(&s.name), "store recovered")
            }
            _ => {}
        }
    }
    states.retain(|name, _| status.iter().any(|s| &s.name == name));
}

/// `outbox stats --stores FILE`: one line per store (its totals, or why it cannot be read),
/// the stores read at once, each within 10 s. Exit 1 when one could not be read.
pub(crate) async fn stats(source: Source, table: &str, json: bool) -> Result<u8, Error> {
    let members = source.read(table).await?;
    let now = SystemTime::now();
    let reads = members.iter().map(|(name, m)| async move {
        let read = async {
            let store = AnyStore::open(&m.url, &m.table, false).await?;
            store.require_table().await?;
            store.stats().await
        };
        let r = match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                outbox_core::ErrorKind::Timeout,
                outbox_core::Retry::Transient,
                "no answer within 10 s",
            )),
        };
        (name.clone(), m.table.clone(), r)
    });
    let results = futures_util::future::join_all(reads).await;
    let failed = results.iter().filter(|(_, _, r)| r.is_err()).count();
    if json {
        let stores: Vec<serde_json::Value> = results
            .iter()
            .map(|(name, table, r)| match r {
                Ok(stats) => serde_json::json!({
                    "name": name,
                    "table": table,
                    "total": json::stream_stats(&stats.total(), now),
                }),
                Err(e) => serde_json::json!({
                    "name": name,
                    "table": table,
                    "error": report::describe(e),
                }),
            })
            .collect();
        println!("{}", serde_json::json!({ "stores": stores }));
    } else {
        println!(
            "{:<24} {:>10} {:>10} {:>10}  oldest pending",
            "store", "pending", "sent", "dead"
        );
        for (name, _, r) in &results {
            match r {
                Ok(stats) => {
                    let t = stats.total();
                    let age = t
                        .oldest_pending
                        .and_then(|o| now.duration_since(o).ok())
                        .map(|d| {
                            humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
                        })
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<24} {:>10} {:>10} {:>10}  {age}",
                        printable(name),
                        t.pending,
                        t.sent,
                        t.dead
                    );
                }
                Err(e) => println!("{:<24} error: {}", printable(name), report::describe(e)),
            }
        }
    }
    Ok(if failed > 0 { exit::FAILED } else { exit::OK })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `listen = false` in an entry, and `--no-listen` for every entry.
    #[test]
    fn listen_comes_from_the_entry_or_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("stores.toml");
        std::fs::write(
            &list,
            "[[store]]\nname = \"a\"\nurl = \"postgres://h/a\"\nlisten = false\n\n\
             [[store]]\nname = \"b\"\nurl = \"postgres://h/b\"\n",
        )
        .unwrap();
        let members = load(&list, "outbox").unwrap();
        assert!(!members["a"].listen);
        assert!(members["b"].listen, "listens by default");
        let all = polling(members.clone(), true);
        assert!(!all["a"].listen && all["b"].listen);
        let none = polling(members, false);
        assert!(!none["a"].listen && !none["b"].listen);
    }
}
