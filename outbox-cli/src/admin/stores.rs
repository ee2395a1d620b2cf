//! A console over several stores (`outbox admin --stores FILE`): a totals page at `/` (each
//! store's counts, read at once, and their sum), a picker on every page (a GET form, no
//! script), and each store's own pages and API under `/s/<name>/`, answered by that store's
//! routes. One token, one session and one CSRF token serve them all; the security layer runs
//! once, in front of everything.

use maud::html;
use tower::ServiceExt as _;

use super::*;

/// One store of the list: its name, table, URL with the password replaced, and the store,
/// or why it could not be opened (shown on the totals page; its pages answer 503).
pub struct Listed {
    /// Its name in the list.
    pub name: String,
    /// Its outbox table.
    pub table: String,
    /// Its URL, password replaced.
    pub label: String,
    /// The store, or why it could not be opened (no secret in it).
    pub store: Result<Arc<dyn StoreAdmin>, String>,
}

/// A store's pages, or why there are none.
enum Slot {
    Open { admin: Arc<Admin>, pages: Router },
    Closed(String),
}

/// The stores, by name, with their tables.
pub(crate) struct Stores {
    gate: Arc<Gate>,
    by_name: BTreeMap<String, (String, Slot)>,
}

/// How long the totals page waits for one store's counts.
const STATS_DEADLINE: Duration = Duration::from_secs(10);

impl Stores {
    pub(crate) fn new(gate: Arc<Gate>, listed: Vec<Listed>) -> Self {
        let by_name = listed
            .into_iter()
            .map(|l| {
                let slot = match l.store {
                    Ok(store) => {
                        let admin = Arc::new(Admin::new(
                            gate.clone(),
                            store,
                            &l.table,
                            l.label,
                            Some(l.name.clone()),
                        ));
                        Slot::Open {
                            pages: store_routes(admin.clone()),
                            admin,
                        }
                    }
                    Err(why) => Slot::Closed(why),
                };
                (l.name, (l.table, slot))
            })
            .collect();
        Stores { gate, by_name }
    }

    /// The stores that opened.
    pub(crate) fn open(&self) -> impl Iterator<Item = &Arc<Admin>> {
        self.by_name.values().filter_map(|(_, slot)| match slot {
            Slot::Open { admin, .. } => Some(admin),
            Slot::Closed(_) => None,
        })
    }

    fn nav(&self) -> Nav<'_> {
        Nav {
            base: "",
            store: None,
            stores: &self.gate.stores,
        }
    }

    /// Every store's totals (read at once, each within [`STATS_DEADLINE`]), by name.
    async fn totals(&self) -> Vec<(&str, &str, Result<StreamStats, String>)> {
        let reads = self.by_name.iter().map(|(name, (table, slot))| async move {
            let total = match slot {
                Slot::Closed(why) => Err(why.clone()),
                Slot::Open { admin, .. } => {
                    match tokio::time::timeout(STATS_DEADLINE, admin.store.stats()).await {
                        Ok(Ok(stats)) => Ok(stats.total()),
                        Ok(Err(e)) => Err(crate::report::describe(&e)),
                        Err(_) => Err(format!("no answer within {} s", STATS_DEADLINE.as_secs())),
                    }
                }
            };
            (name.as_str(), table.as_str(), total)
        });
        futures_util::future::join_all(reads).await
    }
}

/// The routes of a console over several stores, behind the security layer.
pub(crate) fn stores_router(stores: Arc<Stores>) -> Router {
    let gate = stores.gate.clone();
    Router::new()
        .route("/", get(totals_page))
        .route("/api/stores", get(api_totals))
        .route("/pick", get(pick))
        .route("/s/{store}", axum::routing::any(to_store))
        .route("/s/{store}/", axum::routing::any(to_store))
        .route("/s/{store}/{*rest}", axum::routing::any(to_store))
        .with_state(stores)
        .merge(gate_routes(gate.clone()))
        .layer(axum::middleware::from_fn_with_state(gate, security))
}

/// A request under `/s/<name>/`: answered by that store's routes, with the path from its
/// root (`/s/<name>/messages?…` is its `/messages?…`).
async fn to_store(
    State(stores): State<Arc<Stores>>,
    Path(params): Path<HashMap<String, String>>,
    mut request: Request,
) -> Response {
    let name = params.get("store").map(String::as_str).unwrap_or("");
    let pages = match stores.by_name.get(name) {
        None => {
            return page_error(Failure(
                StatusCode::NOT_FOUND,
                format!("no store named {name:?} in this console's list"),
            ))
        }
        Some((_, Slot::Closed(why))) => {
            return page_error(Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("store {name:?} could not be opened: {why}"),
            ))
        }
        Some((_, Slot::Open { pages, .. })) => pages.clone(),
    };
    // The raw path (still percent-encoded) after `/s/<name>`.
    let path = request.uri().path();
    let after = path
        .strip_prefix("/s/")
        .and_then(|p| p.find('/').map(|i| &p[i..]))
        .unwrap_or("/");
    let query = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    match format!("{after}{query}").parse() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => return page_error(bad("this path cannot be read")),
    }
    match pages.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// The picker's GET form: to the store's pages.
async fn pick(
    State(stores): State<Arc<Stores>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let name = q.get("store").map(String::as_str).unwrap_or("");
    if !stores.by_name.contains_key(name) {
        return page_error(Failure(
            StatusCode::NOT_FOUND,
            format!("no store named {name:?} in this console's list"),
        ));
    }
    Redirect::to(&format!("/s/{}/", enc(name))).into_response()
}

/// `/`: each store's counts and the sum of them; a store that cannot be read says why, and
/// the others are shown.
async fn totals_page(State(stores): State<Arc<Stores>>) -> Response {
    let totals = stores.totals().await;
    let sum = sum_of(&totals);
    let failing = totals.iter().filter(|t| t.2.is_err()).count();
    let body = html! {
        p.muted {
            (totals.len()) " stores"
            @if failing > 0 { ", " strong { (failing) " cannot be read" } }
            @if stores.gate.options.read_only { " · read-only" }
            @if stores.gate.options.hide_payloads { " · payloads hidden" }
            ". Refreshes every 10 s."
        }
        table #stores {
            tr { th { "store" } th { "table" } th { "pending" } th { "sent" } th { "dead" } th { "oldest pending" } }
            @for (name, table, total) in &totals {
                tr {
                    td { a href={ "/s/" (enc(name)) "/" } { (Shown(name)) } }
                    td { code { (table) } }
                    @match total {
                        Ok(t) => {
                            td.n { a href={ "/s/" (enc(name)) "/messages?status=pending" } { (t.pending) } }
                            td.n { (t.sent) }
                            td.n { a href={ "/s/" (enc(name)) "/messages?status=dead" } { (t.dead) } }
                            td { (t.oldest_pending.map(age).unwrap_or_else(|| "-".into())) }
                        }
                        Err(why) => { td.error colspan="4" { (Shown(why)) } }
                    }
                }
            }
            tr #total {
                td { strong { "total" } } td {}
                td.n { (sum.pending) } td.n { (sum.sent) } td.n { (sum.dead) }
                td { (sum.oldest_pending.map(age).unwrap_or_else(|| "-".into())) }
            }
        }
    };
    (
        [(header::REFRESH, HeaderValue::from_static("10"))],
        Html(layout(&stores.nav(), "All stores", body)),
    )
        .into_response()
}

/// `GET /api/stores`: the totals page as JSON.
async fn api_totals(State(stores): State<Arc<Stores>>) -> Response {
    let now = SystemTime::now();
    let totals = stores.totals().await;
    let sum = sum_of(&totals);
    let list: Vec<Value> = totals
        .iter()
        .map(|(name, table, total)| match total {
            Ok(t) => json!({
                "name": name,
                "table": table,
                "total": crate::json::stream_stats(t, now),
            }),
            Err(why) => json!({ "name": name, "table": table, "error": why }),
        })
        .collect();
    Json(json!({
        "stores": list,
        "total": crate::json::stream_stats(&sum, now),
        "failing": totals.iter().filter(|t| t.2.is_err()).count(),
    }))
    .into_response()
}

/// The sum of the stores that could be read.
fn sum_of(totals: &[(&str, &str, Result<StreamStats, String>)]) -> StreamStats {
    outbox_core::Stats {
        streams: totals
            .iter()
            .filter_map(|t| t.2.as_ref().ok().cloned())
            .collect(),
    }
    .total()
}
