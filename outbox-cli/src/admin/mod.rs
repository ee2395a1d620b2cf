//! `outbox admin`: a web console for operators, served by the binary itself (axum, HTML
//! rendered on the server, no script, every asset embedded), and the same data and actions as
//! a JSON API under `/api/`.
//!
//! Security: loopback unless a token is set (`--auth-token`); without a token only a `Host` of
//! the loopback names with the console's port is answered (a re-bound DNS name is refused);
//! with a token every request carries it (`Authorization: Bearer …`) or a session cookie that
//! a POST to `/login` exchanges it for (a random id, not the token); wrong tokens are answered
//! slowly, one at a time; every change is a POST from the console's own origin
//! (`Origin`, `Sec-Fetch-Site`) with its CSRF token; `--read-only` removes the actions;
//! `--hide-payloads` keeps payloads off pages and API; pages are `maud` templates, which
//! escape every value they interpolate, and the Content-Security-Policy forbids scripts, so a
//! payload holding `<script>` is text twice over.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{ConnectInfo, Extension, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use outbox_core::{
    Error, MessageFilter, MessageId, ParkedUnit, Selector, Status, StoreAdmin, StoredMessage,
    StreamStats,
};
use serde_json::{json, Value};

mod actions;
mod api;
mod pages;
mod render;
mod security;
mod stores;

use actions::*;
use api::*;
use pages::*;
use render::*;
use security::*;
pub use stores::Listed;
use stores::*;

/// Settings of the console.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Required on every request when set; required to listen beyond loopback.
    pub token: Option<String>,
    /// No actions.
    pub read_only: bool,
    /// No payloads, header values or last errors (a broker's or receiver's answer can quote
    /// the message) on pages or in the API: only names, sizes, counts and states.
    pub hide_payloads: bool,
    /// How often the overview's chart samples the counts.
    pub sample_every: Duration,
    /// The WAL relay's slot to show (a PostgreSQL pool and the slot's name).
    pub wal_slot: Option<(outbox_sql::postgres::sqlx::PgPool, String)>,
}

/// What the handlers of one store's pages share.
pub struct Admin {
    store: Arc<dyn StoreAdmin>,
    table: String,
    /// The store's URL with its password replaced.
    label: String,
    /// The store's name, when the console shows several.
    name: Option<String>,
    /// The path its pages are under: empty with one store, `/s/<name>` with several.
    base: String,
    samples: Mutex<VecDeque<Sample>>,
    gate: Arc<Gate>,
}

/// What every page of the console shares: its settings and who may use it (one token, one
/// session and one CSRF token for every store it shows).
pub struct Gate {
    options: AdminOptions,
    csrf: String,
    /// The port it listens on (the one bound, when `listen` asked for port 0).
    port: u16,
    /// Session ids handed out by `/login`, newest last.
    sessions: Mutex<VecDeque<String>>,
    /// Held while a wrong token is answered (slowly): guesses go one at a time.
    wrong_tokens: tokio::sync::Mutex<()>,
    /// The stores' names, when it shows several (for the picker).
    stores: Vec<String>,
}

/// Sessions kept at most (the oldest is dropped first).
const MAX_SESSIONS: usize = 1000;
/// How long a wrong token's answer takes; they are answered one at a time.
const WRONG_TOKEN_DELAY: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: SystemTime,
    pending: u64,
    dead: u64,
    sent: u64,
}

/// One hour of samples at most.
const WINDOW: Duration = Duration::from_secs(3600);

/// Check the options: beyond loopback, a token is required.
pub fn check(options: &AdminOptions) -> outbox_core::Result<()> {
    if !options.listen.ip().is_loopback() && options.token.is_none() {
        return Err(Error::config(format!(
            "admin: listening on {} (not loopback) needs --auth-token or OUTBOX_ADMIN_TOKEN",
            options.listen
        )));
    }
    if options.token.as_deref().is_some_and(|t| t.len() < 16) {
        return Err(Error::config(
            "admin: the auth token must be at least 16 characters",
        ));
    }
    Ok(())
}

/// Serve one store's pages until `shutdown` resolves.
pub async fn serve(
    store: Arc<dyn StoreAdmin>,
    table: &str,
    label: String,
    options: AdminOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> outbox_core::Result<()> {
    listen(options, Vec::new(), shutdown, |gate| {
        let admin = Arc::new(Admin::new(gate, store, table, label, None));
        tokio::spawn(sampler(Arc::downgrade(&admin)));
        router(admin)
    })
    .await
}

/// Serve several stores until `shutdown` resolves: a totals page at `/`, a picker on every
/// page, each store's pages under `/s/<name>/` (see [`stores`]).
pub async fn serve_stores(
    listed: Vec<Listed>,
    options: AdminOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> outbox_core::Result<()> {
    let names = listed.iter().map(|l| l.name.clone()).collect();
    listen(options, names, shutdown, |gate| {
        let stores = Arc::new(Stores::new(gate, listed));
        for admin in stores.open() {
            tokio::spawn(sampler(Arc::downgrade(admin)));
        }
        stores_router(stores)
    })
    .await
}

/// Bind, build the routes (`routes`, given the shared state), serve.
async fn listen(
    options: AdminOptions,
    stores: Vec<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    routes: impl FnOnce(Arc<Gate>) -> Router,
) -> outbox_core::Result<()> {
    check(&options)?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| {
            Error::config(format!("admin: cannot listen on {}", options.listen)).with_source(e)
        })?;
    let addr = listener.local_addr().ok();
    let port = addr.map_or(options.listen.port(), |a| a.port());
    let gate = Arc::new(Gate::new(options, port, stores));
    tracing::info!(address = %addr.unwrap_or(gate.options.listen), read_only = gate.options.read_only, hide_payloads = gate.options.hide_payloads, stores = gate.stores.len(), "admin console listening");
    // Printed for scripts and tests that listen on port 0.
    if let Some(a) = addr {
        println!("admin console on http://{a}/");
    }
    axum::serve(
        listener,
        routes(gate).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(|e| Error::transient("admin: server failed").with_source(e))
}

impl Gate {
    /// The shared state of a console listening on `port`, showing `stores` (empty: one).
    pub fn new(options: AdminOptions, port: u16, stores: Vec<String>) -> Self {
        Gate {
            options,
            csrf: random_token(),
            port,
            sessions: Mutex::new(VecDeque::new()),
            wrong_tokens: tokio::sync::Mutex::new(()),
            stores,
        }
    }
}

impl Admin {
    /// The pages of `store`, alone (`name` None: at the root) or as one of several.
    pub fn new(
        gate: Arc<Gate>,
        store: Arc<dyn StoreAdmin>,
        table: &str,
        label: String,
        name: Option<String>,
    ) -> Self {
        Admin {
            store,
            table: table.to_owned(),
            label,
            base: name
                .as_deref()
                .map_or_else(String::new, |n| format!("/s/{}", enc(n))),
            name,
            samples: Mutex::new(VecDeque::new()),
            gate,
        }
    }

    /// A path of this store's pages.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The navigation of this store's pages.
    pub(crate) fn nav(&self) -> Nav<'_> {
        Nav {
            base: &self.base,
            store: self.name.as_deref(),
            stores: &self.gate.stores,
        }
    }
}

fn random_token() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..32)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

/// One store's pages and API (paths from its root), without the security layer.
fn store_routes(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/messages", get(messages_page))
        .route("/messages/{seq}", get(message_page))
        .route("/messages/{seq}/payload", get(payload_download))
        .route("/actions", post(action_form))
        .route("/chart.svg", get(chart))
        .route("/api/stats", get(api_stats))
        .route("/api/messages", get(api_messages))
        .route("/api/messages/{seq}", get(api_message))
        .route("/api/parked", get(api_parked))
        .route("/api/csrf", get(api_csrf))
        .route("/api/actions", post(api_action))
        .with_state(admin)
}

/// What every console serves at its root: the login and the style sheet.
fn gate_routes(gate: Arc<Gate>) -> Router {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/style.css", get(style))
        .with_state(gate)
}

/// One store's console: its routes, behind the security layer.
pub fn router(admin: Arc<Admin>) -> Router {
    let gate = admin.gate.clone();
    store_routes(admin)
        .merge(gate_routes(gate.clone()))
        .layer(axum::middleware::from_fn_with_state(gate, security))
}

/// Samples the counts for the overview's chart.
async fn sampler(admin: std::sync::Weak<Admin>) {
    loop {
        let Some(a) = admin.upgrade() else { return };
        let every = a.gate.options.sample_every;
        if let Ok(stats) = a.store.stats().await {
            let t = stats.total();
            let mut s = a.samples.lock().unwrap_or_else(|p| p.into_inner());
            s.push_back(Sample {
                at: SystemTime::now(),
                pending: t.pending,
                dead: t.dead,
                sent: t.sent,
            });
            while s
                .front()
                .is_some_and(|f| f.at.elapsed().unwrap_or_default() > WINDOW)
            {
                s.pop_front();
            }
        }
        drop(a);
        tokio::time::sleep(every).await;
    }
}

/// A handler's error: a status and a clear message (HTML or JSON by route).
pub(crate) struct Failure(pub(crate) StatusCode, pub(crate) String);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        use outbox_core::ErrorKind::*;
        let status = match e.kind() {
            NotFound => StatusCode::NOT_FOUND,
            Config | InvalidMessage | InvalidIdentifier => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Failure(status, crate::report::describe(&e))
    }
}

pub(crate) fn bad(message: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, message.into())
}

pub(crate) fn page_error(f: Failure) -> Response {
    let body = layout(
        &Nav::default(),
        "Error",
        maud::html! {
            p.error { (f.0.as_u16()) " " (render::Shown(&f.1)) }
            p { a href="/" { "Overview" } }
        },
    );
    (f.0, Html(body)).into_response()
}

pub(crate) fn api_error(f: Failure) -> Response {
    (f.0, Json(json!({ "error": f.1, "status": f.0.as_u16() }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chart covers the time sampled (four minutes fill the width, not 38 px of an
    /// hour), draws the backlog and the rate on scales of their own, labels the latest
    /// values and the time axis, and says when it has too little to draw.
    #[test]
    fn the_chart_covers_its_samples_with_axes() {
        let now = SystemTime::now();
        assert!(chart_svg(&[], now).contains("Collecting samples (0 so far)"));
        let samples: Vec<Sample> = (0..=24)
            .map(|i| Sample {
                at: now - Duration::from_secs(240 - i * 10),
                pending: 3000 - i * 10,
                dead: 300,
                sent: i * 100,
            })
            .collect();
        let svg = chart_svg(&samples, now);
        assert!(
            svg.contains("pending 2760") && svg.contains("dead 300"),
            "{svg}"
        );
        assert!(svg.contains("published/min 600"), "{svg}");
        assert!(svg.contains("4m ago") && svg.contains(">now<"), "{svg}");
        // The first point sits on the value axis, the last at the right edge.
        let pending_line = svg.split("stroke=\"#1f5fbf\"").nth(1).unwrap();
        let points = pending_line.split("points=\"").nth(1).unwrap();
        let first_x: f64 = points.split(',').next().unwrap().parse().unwrap();
        let last_x: f64 = points
            .split('"')
            .next()
            .unwrap()
            .split(' ')
            .next_back()
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(first_x <= 57.0 && last_x >= 700.0, "{first_x} .. {last_x}");
    }

    #[test]
    fn escaping_and_tokens() {
        let shown = maud::html! {
            p title=(Shown("\"><script>")) { (Shown("<script>alert('x')</script>&\"\u{1b}[2J")) }
        }
        .into_string();
        assert_eq!(
            shown,
            "<p title=\"&quot;&gt;&lt;script&gt;\">&lt;script&gt;alert('x')&lt;/script&gt;&amp;&quot;\\u{1b}[2J</p>"
        );
        assert_eq!(enc("a b&c"), "a%20b%26c");
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
        let t = random_token();
        assert_eq!(t.len(), 64);
        assert_ne!(t, random_token());
        let opts = |listen: &str, token: Option<&str>| AdminOptions {
            listen: listen.parse().unwrap(),
            token: token.map(str::to_owned),
            read_only: false,
            hide_payloads: false,
            sample_every: Duration::from_secs(10),
            wal_slot: None,
        };
        assert!(check(&opts("127.0.0.1:0", None)).is_ok());
        assert!(check(&opts("0.0.0.0:8080", None)).is_err());
        assert!(check(&opts("0.0.0.0:8080", Some("short"))).is_err());
        assert!(check(&opts("0.0.0.0:8080", Some("0123456789abcdef"))).is_ok());
    }
}
