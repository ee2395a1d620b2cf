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
//! `--hide-payloads` keeps payloads off pages and API; all output is escaped, and the
//! Content-Security-Policy forbids scripts, so a payload holding `<script>` is text twice over.

use std::collections::{HashMap, VecDeque};
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
    Error, MessageFilter, MessageId, ParkedUnit, Selector, Status, Store, StoredMessage,
};
use serde_json::{json, Value};

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
}

/// What the handlers share.
pub struct Admin {
    store: Arc<dyn Store>,
    table: String,
    /// The store's URL with its password replaced.
    label: String,
    options: AdminOptions,
    csrf: String,
    samples: Mutex<VecDeque<Sample>>,
    /// The port it listens on (the one bound, when `listen` asked for port 0).
    port: u16,
    /// Session ids handed out by `/login`, newest last.
    sessions: Mutex<VecDeque<String>>,
    /// Held while a wrong token is answered (slowly): guesses go one at a time.
    wrong_tokens: tokio::sync::Mutex<()>,
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

/// Serve until `shutdown` resolves.
pub async fn serve(
    store: Arc<dyn Store>,
    table: &str,
    label: String,
    options: AdminOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> outbox_core::Result<()> {
    check(&options)?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| {
            Error::config(format!("admin: cannot listen on {}", options.listen)).with_source(e)
        })?;
    let addr = listener.local_addr().ok();
    let port = addr.map_or(options.listen.port(), |a| a.port());
    let admin = Arc::new(Admin::new(store, table, label, options, port));
    tokio::spawn(sampler(Arc::downgrade(&admin)));
    tracing::info!(address = %addr.map_or_else(|| options_listen(&admin), |a| a.to_string()), read_only = admin.options.read_only, hide_payloads = admin.options.hide_payloads, "admin console listening");
    // Printed for scripts and tests that listen on port 0.
    if let Some(a) = addr {
        println!("admin console on http://{a}/");
    }
    axum::serve(
        listener,
        router(admin).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(|e| Error::transient("admin: server failed").with_source(e))
}

impl Admin {
    /// The shared state of a console listening on `port`.
    pub fn new(
        store: Arc<dyn Store>,
        table: &str,
        label: String,
        options: AdminOptions,
        port: u16,
    ) -> Self {
        Admin {
            store,
            table: table.to_owned(),
            label,
            csrf: random_token(),
            samples: Mutex::new(VecDeque::new()),
            port,
            sessions: Mutex::new(VecDeque::new()),
            wrong_tokens: tokio::sync::Mutex::new(()),
            options,
        }
    }
}

fn options_listen(admin: &Admin) -> String {
    admin.options.listen.to_string()
}

fn random_token() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..32)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

/// The routes, behind the security layer.
pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/messages", get(messages_page))
        .route("/messages/{seq}", get(message_page))
        .route("/messages/{seq}/payload", get(payload_download))
        .route("/actions", post(action_form))
        .route("/login", get(login_page).post(login))
        .route("/style.css", get(style))
        .route("/chart.svg", get(chart))
        .route("/api/stats", get(api_stats))
        .route("/api/messages", get(api_messages))
        .route("/api/messages/{seq}", get(api_message))
        .route("/api/parked", get(api_parked))
        .route("/api/csrf", get(api_csrf))
        .route("/api/actions", post(api_action))
        .layer(axum::middleware::from_fn_with_state(
            admin.clone(),
            security,
        ))
        .with_state(admin)
}

/// Samples the counts for the overview's chart.
async fn sampler(admin: std::sync::Weak<Admin>) {
    loop {
        let Some(a) = admin.upgrade() else { return };
        let every = a.options.sample_every;
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

// ------------------------------------------------------------------ security

/// Who asked for a change, for the action log: how they were let in, and from where.
#[derive(Debug, Clone)]
pub struct Who(String);

/// Host check (without a token), same-origin check of every POST, token check (when set),
/// and headers on every response: no script, no framing, no caching.
async fn security(State(admin): State<Arc<Admin>>, mut request: Request, next: Next) -> Response {
    let headers = request.headers();
    if admin.options.token.is_none() && !host_allowed(headers, admin.options.listen, admin.port) {
        // A page on a DNS name re-bound to 127.0.0.1 is same-origin with the console: its
        // requests carry that name, never one of ours.
        return secure(
            (
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "421: without a token this console answers only to localhost, 127.0.0.1 or [::1] on port {} (Host {:?})\n",
                    admin.port,
                    short(headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or(""))
                ),
            )
                .into_response(),
        );
    }
    if request.method() == Method::POST {
        if let Err(why) = same_origin(headers) {
            return secure((StatusCode::FORBIDDEN, format!("403: {why}\n")).into_response());
        }
    }
    let from = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "an unknown address".to_owned(), |c| c.0.to_string());
    let is_login = request.uri().path() == "/login";
    let how = match &admin.options.token {
        None => "no token (loopback)",
        Some(_) if is_login => "logging in",
        Some(token) => match credential(headers) {
            Some(Credential::Bearer(given)) if same(given, token) => "the token",
            Some(Credential::Session(id)) if admin.has_session(id) => "a session",
            Some(_) => {
                // Wrong: answered slowly and one at a time, so guessing takes forever.
                let _one = admin.wrong_tokens.lock().await;
                tokio::time::sleep(WRONG_TOKEN_DELAY).await;
                return secure(unauthorized("wrong token or expired session"));
            }
            None => return secure(unauthorized("this console needs its token")),
        },
    };
    request
        .extensions_mut()
        .insert(Who(format!("{how}, from {from}")));
    secure(next.run(request).await)
}

fn unauthorized(what: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        format!("401: {what}: send `Authorization: Bearer <token>`, or log in at /login\n"),
    )
        .into_response()
}

/// Whether the `Host` names this console: `localhost`, `127.0.0.1`, `[::1]` or the address
/// it listens on, with its port.
fn host_allowed(headers: &HeaderMap, listen: SocketAddr, port: u16) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let (name, given_port) = match host.rsplit_once(':') {
        Some((n, p)) if !p.contains(']') => (n, p.parse::<u16>().ok()),
        _ => (host, Some(80)),
    };
    let listen_name = match listen.ip() {
        std::net::IpAddr::V4(ip) => ip.to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
    };
    given_port == Some(port)
        && (name.eq_ignore_ascii_case("localhost")
            || name == "127.0.0.1"
            || name == "[::1]"
            || name == listen_name)
}

/// A POST must come from the console's own pages (or from a client that is not a browser,
/// which sends neither header): `Sec-Fetch-Site` same-origin, `Origin` equal to the `Host`
/// (`null`, which privacy settings may send, only with `Sec-Fetch-Site: same-origin`).
fn same_origin(headers: &HeaderMap) -> Result<(), String> {
    let text = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    let site = text("sec-fetch-site");
    if let Some(site) = site {
        if site != "same-origin" && site != "none" {
            return Err(format!(
                "a change must come from this console's own pages (Sec-Fetch-Site {:?})",
                short(site)
            ));
        }
    }
    let origin = text("origin").filter(|o| !(*o == "null" && site == Some("same-origin")));
    if let Some(origin) = origin {
        let host = text("host").unwrap_or("");
        let ours = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| !host.is_empty() && o.eq_ignore_ascii_case(host));
        if !ours {
            return Err(format!(
                "a change must come from this console's own pages (Origin {:?})",
                short(origin)
            ));
        }
    }
    Ok(())
}

fn secure(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

enum Credential<'a> {
    Bearer(&'a str),
    Session(&'a str),
}

const SESSION_COOKIE: &str = "outbox_session";

fn credential(headers: &HeaderMap) -> Option<Credential<'_>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(b) = bearer {
        return Some(Credential::Bearer(b));
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
        .next()
        .map(Credential::Session)
}

impl Admin {
    /// A row's last error as shown: hidden with the payloads (it can quote them).
    fn last_error(&self, m: &StoredMessage) -> String {
        match (&m.last_error, self.options.hide_payloads) {
            (None, _) => String::new(),
            (Some(_), true) => "hidden (--hide-payloads)".into(),
            (Some(e), false) => e.clone(),
        }
    }

    fn has_session(&self, id: &str) -> bool {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.iter().any(|s| same(s, id))
    }

    fn new_session(&self) -> String {
        let id = random_token();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.push_back(id.clone());
        while sessions.len() > MAX_SESSIONS {
            sessions.pop_front();
        }
        id
    }
}

/// Compared in constant time.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The login form: the token goes in a POST body, never in a URL.
async fn login_page(State(admin): State<Arc<Admin>>) -> Response {
    if admin.options.token.is_none() {
        return Redirect::to("/").into_response();
    }
    Html(layout(
        "Log in",
        "<form method=\"post\" action=\"/login\"><label>Token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\"></label> \
         <button id=\"login\">Log in</button></form>",
    ))
    .into_response()
}

/// Exchanges the token for a session: a random id in an `HttpOnly`, `SameSite=Strict` cookie
/// (`Secure` behind a proxy that says it speaks HTTPS). The cookie is not the token.
async fn login(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let Some(token) = &admin.options.token else {
        return Redirect::to("/").into_response();
    };
    let given = fields
        .iter()
        .find(|(n, _)| n == "token")
        .map_or("", |(_, v)| v.trim());
    if !same(given, token) {
        let _one = admin.wrong_tokens.lock().await;
        tokio::time::sleep(WRONG_TOKEN_DELAY).await;
        return (
            StatusCode::UNAUTHORIZED,
            Html(layout(
                "Log in",
                "<p class=\"error\">401: wrong token. <a href=\"/login\">Try again</a></p>",
            )),
        )
            .into_response();
    }
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{SESSION_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/{}",
        admin.new_session(),
        if https { "; Secure" } else { "" }
    );
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

// ------------------------------------------------------------------ errors

/// A handler's error: a status and a clear message (HTML or JSON by route).
struct Failure(StatusCode, String);

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

fn bad(message: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, message.into())
}

fn page_error(f: Failure) -> Response {
    let body = layout(
        "Error",
        &format!(
            "<p class=\"error\">{} {}</p><p><a href=\"/\">Overview</a></p>",
            f.0.as_u16(),
            esc(&f.1)
        ),
    );
    (f.0, Html(body)).into_response()
}

fn api_error(f: Failure) -> Response {
    (f.0, Json(json!({ "error": f.1, "status": f.0.as_u16() }))).into_response()
}

// ------------------------------------------------------------------ rendering

/// HTML-escape text (element content and quoted attribute values).
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Percent-encode a query value.
fn enc(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn layout(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · outbox</title>\
         <link rel=\"stylesheet\" href=\"/style.css\"></head><body>\
         <nav><strong>outbox</strong> <a href=\"/\">Overview</a> <a href=\"/messages\">Messages</a> \
         <a href=\"/messages?status=dead\">Dead letters</a></nav><main><h1>{}</h1>{body}</main></body></html>",
        esc(title),
        esc(title)
    )
}

fn age(t: SystemTime) -> String {
    let d = SystemTime::now().duration_since(t).unwrap_or_default();
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("admin.css"),
    )
        .into_response()
}

fn csrf_field(admin: &Admin) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(&admin.csrf)
    )
}

fn unit_buttons(admin: &Admin, u: &ParkedUnit) -> String {
    if admin.options.read_only {
        return String::new();
    }
    let hidden = format!(
        "{}<input type=\"hidden\" name=\"stream\" value=\"{}\"><input type=\"hidden\" name=\"unit\" value=\"{}\">",
        csrf_field(admin),
        esc(&u.stream),
        esc(&u.unit)
    );
    format!(
        "<form method=\"post\" action=\"/actions\" class=\"inline\">{hidden}\
         <button name=\"action\" value=\"resume\">Resume</button> \
         <button name=\"action\" value=\"skip\">Skip head</button></form>"
    )
}

// ------------------------------------------------------------------ pages

async fn overview(State(admin): State<Arc<Admin>>) -> Response {
    match overview_html(&admin).await {
        Ok(body) => (
            [(header::REFRESH, HeaderValue::from_static("10"))],
            Html(body),
        )
            .into_response(),
        Err(f) => page_error(f),
    }
}

async fn overview_html(admin: &Admin) -> Result<String, Failure> {
    let stats = admin.store.stats().await?;
    let parked = admin.store.parked_units(None, 100).await?;
    let mut b = String::new();
    let _ = write!(
        b,
        "<p class=\"muted\">Table <code>{}</code> on <code>{}</code>{}{}. Refreshes every 10 s.</p>",
        esc(&admin.table),
        esc(&admin.label),
        if admin.options.read_only { " · read-only" } else { "" },
        if admin.options.hide_payloads { " · payloads hidden" } else { "" },
    );
    b.push_str("<h2>Streams</h2><table id=\"streams\"><tr><th>stream</th><th>pending</th><th>sent</th><th>dead</th><th>oldest pending</th></tr>");
    let mut rows = stats.streams.clone();
    rows.push(stats.total());
    for s in &rows {
        let link = |status: &str, n: u64| {
            if s.stream == "*" {
                format!("<a href=\"/messages?status={status}\">{n}</a>")
            } else {
                format!(
                    "<a href=\"/messages?stream={}&amp;status={status}\">{n}</a>",
                    esc(&enc(&s.stream))
                )
            }
        };
        let _ = write!(
            b,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            if s.stream == "*" { "<strong>total</strong>".into() } else { esc(&s.stream) },
            link("pending", s.pending),
            link("sent", s.sent),
            link("dead", s.dead),
            s.oldest_pending.map(age).unwrap_or_else(|| "-".into())
        );
    }
    b.push_str("</table>");
    let _ = write!(b, "<h2>Parked units ({})</h2>", parked.len());
    if parked.is_empty() {
        b.push_str("<p class=\"muted\">None.</p>");
    } else {
        b.push_str("<table id=\"parked\"><tr><th>stream</th><th>unit</th><th>parked</th><th>waiting</th><th>reason</th><th></th></tr>");
        for u in &parked {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{} ago</td><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
                esc(&u.stream),
                esc(&u.unit),
                age(u.parked_at),
                u.pending,
                esc(u.reason.as_deref().unwrap_or("")),
                unit_buttons(admin, u)
            );
        }
        b.push_str("</table>");
    }
    // What the dead letters died of: the newest ones, grouped by their last error.
    if stats.total().dead > 0 {
        let newest = admin
            .store
            .messages(&MessageFilter {
                status: Some(Status::Dead),
                limit: outbox_core::MAX_PAGE,
                ..Default::default()
            })
            .await?;
        let mut groups: Vec<(String, u64, i64)> = Vec::new();
        for m in &newest {
            let error = if admin.options.hide_payloads {
                "(hidden: --hide-payloads)".to_owned()
            } else {
                m.last_error
                    .as_deref()
                    .unwrap_or("(no error recorded)")
                    .chars()
                    .take(120)
                    .collect()
            };
            match groups.iter_mut().find(|g| g.0 == error) {
                Some(g) => g.1 += 1,
                None => groups.push((error, 1, m.seq)),
            }
        }
        groups.sort_by_key(|g| std::cmp::Reverse(g.1));
        let _ = write!(
            b,
            "<h2>Dead letters by error</h2><p class=\"muted\">The newest {} of {} dead letters.</p><table id=\"errors\"><tr><th>dead letters</th><th>last error</th><th>newest</th></tr>",
            newest.len(),
            stats.total().dead
        );
        for (error, n, seq) in groups.iter().take(10) {
            let _ = write!(
                b,
                "<tr><td class=\"n\">{n}</td><td>{}</td><td><a href=\"/messages/{seq}\">{seq}</a></td></tr>",
                esc(error)
            );
        }
        b.push_str("</table>");
    }
    b.push_str("<h2>Trend</h2><p class=\"muted\">Sampled while this console runs (at most the last hour).</p><p><img src=\"/chart.svg\" alt=\"backlog (pending and dead rows) and publish rate over the time sampled\" width=\"720\" height=\"284\"></p>");
    Ok(layout("Overview", &b))
}

/// Two panels over the time the console has samples for (at most the last hour): the
/// backlog (pending in blue, dead in red, each labelled with its latest value) and the
/// publish rate (sent rows per minute; rows deleted after send are not counted), each with
/// its own scale, a value axis and a time axis. Samples are kept while the console runs.
async fn chart(State(admin): State<Arc<Admin>>) -> Response {
    let samples: Vec<Sample> = admin
        .samples
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .collect();
    let svg = chart_svg(&samples, SystemTime::now());
    ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response()
}

/// One line of a chart panel: its name, colour and points.
type Series<'a> = (&'a str, &'a str, Vec<(SystemTime, f64)>);

fn chart_svg(samples: &[Sample], now: SystemTime) -> String {
    let (w, panel, left, gap) = (720.0f64, 110.0f64, 56.0f64, 34.0f64);
    let h = panel * 2.0 + gap + 30.0;
    let text = |x: f64, y: f64, anchor: &str, colour: &str, t: &str| {
        format!(
            "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"11\" font-family=\"sans-serif\" text-anchor=\"{anchor}\" fill=\"{colour}\">{}</text>",
            esc(t)
        )
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\"><rect width=\"100%\" height=\"100%\" fill=\"#fafafa\" stroke=\"#ccc\"/>"
    );
    if samples.len() < 2 {
        out.push_str(&text(
            w / 2.0,
            h / 2.0,
            "middle",
            "#555",
            &format!(
                "Collecting samples ({} so far): the chart appears after the second.",
                samples.len()
            ),
        ));
        out.push_str("</svg>");
        return out;
    }
    // The x range covers the samples (first to last), not the whole hour.
    let first = samples[0].at;
    let last = samples[samples.len() - 1].at;
    let span = last
        .duration_since(first)
        .unwrap_or_default()
        .as_secs_f64()
        .max(0.001);
    let x = |t: SystemTime| {
        let from_start = t.duration_since(first).unwrap_or_default().as_secs_f64();
        left + (from_start / span) * (w - left - 12.0)
    };
    let rates: Vec<(SystemTime, f64)> = samples
        .windows(2)
        .map(|p| {
            let dt = p[1]
                .at
                .duration_since(p[0].at)
                .unwrap_or_default()
                .as_secs_f64();
            let ds = p[1].sent.saturating_sub(p[0].sent) as f64;
            (p[1].at, if dt > 0.0 { ds / dt * 60.0 } else { 0.0 })
        })
        .collect();
    let mut panel_at = |top: f64, title: &str, series: &[Series]| {
        let max = series
            .iter()
            .flat_map(|s| s.2.iter().map(|p| p.1))
            .fold(0.0f64, f64::max)
            .max(1.0);
        let y = |v: f64| top + panel - (v / max) * (panel - 8.0);
        out.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{b}\" stroke=\"#999\"/><line x1=\"{left}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#999\"/>",
            b = top + panel,
            r = w - 12.0
        ));
        out.push_str(&text(
            left - 4.0,
            top + 10.0,
            "end",
            "#555",
            &format!("{max:.0}"),
        ));
        out.push_str(&text(left - 4.0, top + panel, "end", "#555", "0"));
        out.push_str(&text(left + 4.0, top - 4.0, "start", "#333", title));
        let mut legend = w - 12.0;
        for (name, colour, points) in series.iter().rev() {
            let pts: Vec<String> = points
                .iter()
                .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
                .collect();
            out.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
                pts.join(" ")
            ));
            let last = points.last().map_or(0.0, |p| p.1);
            let label = format!("{name} {last:.0}");
            out.push_str(&text(legend, top - 4.0, "end", colour, &label));
            legend -= 8.0 * label.len() as f64;
        }
    };
    panel_at(
        16.0,
        "Backlog (rows)",
        &[
            (
                "pending",
                "#1f5fbf",
                samples.iter().map(|s| (s.at, s.pending as f64)).collect(),
            ),
            (
                "dead",
                "#c0392b",
                samples.iter().map(|s| (s.at, s.dead as f64)).collect(),
            ),
        ],
    );
    panel_at(
        16.0 + panel + gap,
        "Published per minute",
        &[("published/min", "#2e8b57", rates)],
    );
    // The time axis: the first sample, the middle, now.
    let base = 16.0 + panel * 2.0 + gap + 12.0;
    for (t, anchor) in [
        (first, "start"),
        (first + Duration::from_secs_f64(span / 2.0), "middle"),
        (last, "end"),
    ] {
        let ago = now.duration_since(t).unwrap_or_default();
        let label = if ago.as_secs() == 0 {
            "now".to_owned()
        } else {
            format!(
                "{} ago",
                humantime::format_duration(Duration::from_secs(ago.as_secs()))
            )
        };
        out.push_str(&text(x(t), base, anchor, "#555", &label));
    }
    out.push_str("</svg>");
    out
}

/// The listing's filters from a query string; bad ones are a 400 with the reason.
fn filter_of(q: &HashMap<String, String>) -> Result<MessageFilter, Failure> {
    let text = |k: &str| q.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let mut f = MessageFilter {
        stream: text("stream").map(str::to_owned),
        key: text("key").map(str::to_owned),
        destination: text("destination").map(str::to_owned),
        ..Default::default()
    };
    if let Some(s) = text("status") {
        f.status = Some(
            s.parse::<Status>()
                .map_err(|_| bad(format!("status {:?}: use pending, sent or dead", short(s))))?,
        );
    }
    if let Some(id) = text("id") {
        f.id = Some(
            id.parse::<MessageId>()
                .map_err(|_| bad(format!("id {:?} is not a UUID", short(id))))?,
        );
    }
    if let Some(b) = text("before") {
        f.before = Some(
            b.parse::<i64>()
                .map_err(|_| bad(format!("before {:?} is not a row number", short(b))))?,
        );
    }
    if let Some(l) = text("limit") {
        f.limit = l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=outbox_core::MAX_PAGE).contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "limit {:?}: use 1 to {}",
                    short(l),
                    outbox_core::MAX_PAGE
                ))
            })?;
    }
    Ok(f)
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

fn query_of(f: &MessageFilter, before: Option<i64>) -> String {
    let mut parts = Vec::new();
    let mut add = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            parts.push(format!("{k}={}", enc(&v)));
        }
    };
    add("stream", f.stream.clone());
    add("status", f.status.map(|s| s.as_str().to_owned()));
    add("key", f.key.clone());
    add("id", f.id.map(|i| i.to_string()));
    add("destination", f.destination.clone());
    add("limit", Some(f.limit.to_string()));
    add("before", before.map(|b| b.to_string()));
    parts.join("&")
}

async fn messages_page(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match messages_html(&admin, &q).await {
        Ok(b) => Html(b).into_response(),
        Err(f) => page_error(f),
    }
}

async fn messages_html(admin: &Admin, q: &HashMap<String, String>) -> Result<String, Failure> {
    let f = filter_of(q)?;
    let rows = admin.store.messages(&f).await?;
    // The streams for the drop-down, and the counts that say how many match when the
    // filters are a stream and a status (the stats have them; other filters would need a
    // count of their own).
    let stats = admin.store.stats().await?;
    let v = |o: &Option<String>| esc(o.as_deref().unwrap_or(""));
    let mut streams: Vec<&str> = stats.streams.iter().map(|s| s.stream.as_str()).collect();
    if let Some(s) = f.stream.as_deref().filter(|s| !streams.contains(s)) {
        streams.push(s);
    }
    let stream_options: String = streams
        .iter()
        .map(|s| {
            format!(
                "<option value=\"{v}\"{sel}>{v}</option>",
                v = esc(s),
                sel = if f.stream.as_deref() == Some(*s) {
                    " selected"
                } else {
                    ""
                }
            )
        })
        .collect();
    let mut b = String::new();
    let _ = write!(
        b,
        "<form method=\"get\" action=\"/messages\" class=\"filters\">\
         <select name=\"stream\" id=\"stream\"><option value=\"\">any stream</option>{stream_options}</select>\
         <select name=\"status\"><option value=\"\">any status</option>{}</select>\
         <input name=\"key\" placeholder=\"key\" value=\"{}\">\
         <input name=\"id\" placeholder=\"id\" value=\"{}\">\
         <input name=\"destination\" placeholder=\"destination\" value=\"{}\">\
         <button id=\"filter\">Filter</button></form>",
        ["pending", "sent", "dead"]
            .iter()
            .map(|s| format!(
                "<option{}>{s}</option>",
                if f.status.map(|x| x.as_str()) == Some(*s) {
                    " selected"
                } else {
                    ""
                }
            ))
            .collect::<String>(),
        v(&f.key),
        esc(&f.id.map(|i| i.to_string()).unwrap_or_default()),
        v(&f.destination),
    );
    let selectable = !admin.options.read_only && rows.iter().any(|m| m.status == Status::Dead);
    if selectable {
        let _ = write!(
            b,
            "<form method=\"post\" action=\"/actions\">{}",
            csrf_field(admin)
        );
    }
    b.push_str("<table id=\"messages\"><tr><th></th><th>seq</th><th>stream</th><th>key</th><th>destination</th><th>status</th><th>attempts</th><th>created</th><th>last error</th></tr>");
    for m in &rows {
        let msg = &m.envelope.message;
        let check = if selectable && m.status == Status::Dead {
            format!("<input type=\"checkbox\" name=\"seq\" value=\"{}\">", m.seq)
        } else {
            String::new()
        };
        let _ = write!(
            b,
            "<tr><td>{check}</td><td><a href=\"/messages/{seq}\">{seq}</a></td><td>{}</td><td>{}</td><td>{}</td><td class=\"{status}\">{status}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(&msg.stream),
            esc(msg.key.as_deref().unwrap_or("")),
            esc(&msg.destination),
            m.attempts,
            time(m.envelope.created_at),
            esc(&short(&admin.last_error(m))),
            seq = m.seq,
            status = m.status.as_str(),
        );
    }
    b.push_str("</table>");
    if rows.is_empty() {
        b.push_str("<p class=\"muted\">No message matches.</p>");
    }
    let only_stream_and_status = f.key.is_none() && f.id.is_none() && f.destination.is_none();
    if let (Some(status), true) = (f.status, only_stream_and_status) {
        let counts = match &f.stream {
            Some(s) => stats.streams.iter().find(|x| &x.stream == s).cloned(),
            None => Some(stats.total()),
        };
        let total = counts.map_or(0, |c| match status {
            Status::Pending => c.pending,
            Status::Sent => c.sent,
            Status::Dead => c.dead,
        });
        let _ = write!(
            b,
            "<p class=\"muted\" id=\"count\">{} shown of {total} {} messages{}.</p>",
            rows.len(),
            status.as_str(),
            f.stream
                .as_deref()
                .map(|s| format!(" in stream {}", esc(s)))
                .unwrap_or_default()
        );
    }
    if selectable {
        b.push_str("<p><button name=\"action\" value=\"requeue\">Requeue selected</button> <button name=\"action\" value=\"purge\">Purge selected</button></p></form>");
    }
    if rows.len() == f.limit {
        let _ = write!(
            b,
            "<p><a id=\"next\" href=\"/messages?{}\">Next page</a></p>",
            esc(&query_of(&f, rows.last().map(|m| m.seq)))
        );
    }
    if !admin.options.read_only && f.status == Some(Status::Dead) {
        // "All" means every dead letter this page's filters match: each filter goes along.
        let mut scope = "<input type=\"hidden\" name=\"all\" value=\"1\">".to_owned();
        for (name, value) in [
            ("stream", f.stream.clone()),
            ("destination", f.destination.clone()),
            ("key", f.key.clone()),
            ("id", f.id.map(|i| i.to_string())),
        ] {
            if let Some(v) = value {
                let _ = write!(
                    scope,
                    "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
                    esc(&v)
                );
            }
        }
        let _ = write!(
            b,
            "<form method=\"post\" action=\"/actions\">{}{scope}\
             <button name=\"action\" value=\"requeue\" id=\"requeue-all\">Requeue all of them</button> \
             <button name=\"action\" value=\"purge\" id=\"purge-all\">Purge all of them</button></form>",
            csrf_field(admin)
        );
    }
    Ok(layout("Messages", &b))
}

async fn message_page(State(admin): State<Arc<Admin>>, Path(seq): Path<String>) -> Response {
    match message_html(&admin, &seq).await {
        Ok(b) => Html(b).into_response(),
        Err(f) => page_error(f),
    }
}

fn parse_seq(seq: &str) -> Result<i64, Failure> {
    seq.parse::<i64>()
        .map_err(|_| bad(format!("{:?} is not a row number", short(seq))))
}

async fn fetch(admin: &Admin, seq: &str) -> Result<StoredMessage, Failure> {
    let seq = parse_seq(seq)?;
    admin
        .store
        .get(seq)
        .await?
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no row {seq}")))
}

/// The most of a payload a message page shows (bytes, then lines).
const SHOWN_PAYLOAD_BYTES: usize = 64 * 1024;
const SHOWN_PAYLOAD_LINES: usize = 2000;

/// The payload as it is, to download (not with `--hide-payloads`).
async fn payload_download(State(admin): State<Arc<Admin>>, Path(seq): Path<String>) -> Response {
    if admin.options.hide_payloads {
        return page_error(Failure(
            StatusCode::FORBIDDEN,
            "payloads are hidden (--hide-payloads)".into(),
        ));
    }
    match fetch(&admin, &seq).await {
        Ok(m) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                ),
                (
                    header::CONTENT_DISPOSITION,
                    HeaderValue::from_str(&format!(
                        "attachment; filename=\"message-{}.bin\"",
                        m.seq
                    ))
                    .unwrap_or_else(|_| HeaderValue::from_static("attachment")),
                ),
            ],
            m.envelope.message.payload,
        )
            .into_response(),
        Err(f) => page_error(f),
    }
}

/// The payload as shown: pretty JSON, text, or a hex dump of the first 4 KiB.
fn payload_text(payload: &[u8]) -> (&'static str, String) {
    if let Ok(v) = serde_json::from_slice::<Value>(payload) {
        if let Ok(pretty) = serde_json::to_string_pretty(&v) {
            return ("json", pretty);
        }
    }
    if let Ok(text) = std::str::from_utf8(payload) {
        return ("text", text.to_owned());
    }
    let mut out = String::new();
    for (i, chunk) in payload
        .iter()
        .take(4096)
        .collect::<Vec<_>>()
        .chunks(16)
        .enumerate()
    {
        let _ = write!(out, "{:06x} ", i * 16);
        for b in chunk {
            let _ = write!(out, " {b:02x}");
        }
        out.push('\n');
    }
    if payload.len() > 4096 {
        let _ = write!(out, "… {} more bytes", payload.len() - 4096);
    }
    ("hex", out)
}

async fn message_html(admin: &Admin, seq: &str) -> Result<String, Failure> {
    let m = fetch(admin, seq).await?;
    let msg = &m.envelope.message;
    let mut b = String::new();
    let row = |k: &str, v: String| format!("<tr><th>{}</th><td>{v}</td></tr>", esc(k));
    b.push_str("<table id=\"message\">");
    b.push_str(&row("seq", m.seq.to_string()));
    b.push_str(&row("id", esc(&m.envelope.id.to_string())));
    b.push_str(&row("stream", esc(&msg.stream)));
    b.push_str(&row("destination", esc(&msg.destination)));
    b.push_str(&row("key", esc(msg.key.as_deref().unwrap_or("-"))));
    b.push_str(&row("unit", format!("{} ({:?})", esc(&m.unit), m.order)));
    b.push_str(&row("status", m.status.as_str().to_owned()));
    b.push_str(&row("attempts", m.attempts.to_string()));
    b.push_str(&row("created", time(m.envelope.created_at)));
    b.push_str(&row("next attempt", time(m.next_attempt_at)));
    b.push_str(&row(
        "sent",
        m.sent_at.map(time).unwrap_or_else(|| "-".into()),
    ));
    let error = admin.last_error(&m);
    b.push_str(&row(
        "last error",
        if error.is_empty() {
            "-".into()
        } else {
            esc(&error)
        },
    ));
    b.push_str(&row(
        "signature",
        match &m.signature {
            Some(s) => format!(
                "signed with key {} (verified by the relay, not here)",
                esc(s.split(':').next().unwrap_or(""))
            ),
            None => "unsigned".into(),
        },
    ));
    b.push_str(&row("content type", esc(&msg.content_type)));
    b.push_str("</table><h2>Headers</h2><table id=\"headers\">");
    for (k, v) in &msg.headers {
        b.push_str(&row(
            k,
            if admin.options.hide_payloads {
                format!("<span class=\"muted\">{} bytes, hidden</span>", v.len())
            } else {
                esc(v)
            },
        ));
    }
    b.push_str("</table><h2>Payload</h2>");
    if admin.options.hide_payloads {
        b.push_str("<p class=\"muted\">Hidden (--hide-payloads).</p>");
    } else {
        // A large payload is shown in part (a 500 KB JSON document made a 42 000-line
        // page), with the whole of it a download away.
        let shown = &msg.payload[..msg.payload.len().min(SHOWN_PAYLOAD_BYTES)];
        let (kind, text) = payload_text(shown);
        let mut lines = text.lines();
        let mut text: String = lines
            .by_ref()
            .take(SHOWN_PAYLOAD_LINES)
            .collect::<Vec<_>>()
            .join("\n");
        let cut = shown.len() < msg.payload.len() || lines.next().is_some();
        if cut {
            text.push_str("\n…");
        }
        let _ = write!(
            b,
            "<p class=\"muted\">{} bytes, shown as {kind}{} · <a id=\"download\" href=\"/messages/{}/payload\">download</a></p><pre id=\"payload\">{}</pre>",
            msg.payload.len(),
            if cut { ", cut short" } else { "" },
            m.seq,
            esc(&text)
        );
    }
    if !admin.options.read_only && m.status == Status::Dead {
        let _ = write!(
            b,
            "<form method=\"post\" action=\"/actions\">{}<input type=\"hidden\" name=\"seq\" value=\"{}\">\
             <button name=\"action\" value=\"requeue\" id=\"requeue\">Requeue</button> \
             <button name=\"action\" value=\"purge\">Purge</button></form>",
            csrf_field(admin),
            m.seq
        );
    }
    Ok(layout(&format!("Message {}", m.seq), &b))
}

// ------------------------------------------------------------------ actions

/// Which dead letters an action takes.
#[derive(Debug, Clone, PartialEq)]
enum Scope {
    /// These rows (those of them still dead).
    Seqs(Vec<i64>),
    /// Every dead letter matching every filter set (none set: every dead letter).
    Matching(MessageFilter),
}

impl Scope {
    /// One statement when the store can select the rows itself (nothing but a stream).
    fn selector(&self) -> Option<Selector> {
        match self {
            Scope::Seqs(q) => Some(Selector::Seqs(q.clone())),
            Scope::Matching(f) if f.destination.is_none() && f.key.is_none() && f.id.is_none() => {
                Some(f.stream.clone().map_or(Selector::All, Selector::Stream))
            }
            Scope::Matching(_) => None,
        }
    }

    /// In words: "dead letters of stream "emails" to destination "email.bounce"".
    fn words(&self) -> String {
        match self {
            Scope::Seqs(q) => format!(
                "seq {}",
                q.iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Scope::Matching(f) => {
                let mut parts = Vec::new();
                if let Some(s) = &f.stream {
                    parts.push(format!("stream {s:?}"));
                }
                if let Some(d) = &f.destination {
                    parts.push(format!("destination {d:?}"));
                }
                if let Some(k) = &f.key {
                    parts.push(format!("key {k:?}"));
                }
                if let Some(i) = &f.id {
                    parts.push(format!("id {i}"));
                }
                if parts.is_empty() {
                    "every stream".to_owned()
                } else {
                    parts.join(", ")
                }
            }
        }
    }

    /// How many dead letters it takes now, and the first `show` of them (newest first).
    async fn preview(
        &self,
        store: &dyn Store,
        show: usize,
    ) -> Result<(u64, Vec<StoredMessage>), Failure> {
        let mut first = Vec::new();
        let mut count = 0u64;
        match self {
            Scope::Seqs(q) => {
                for seq in q {
                    if let Some(m) = store.get(*seq).await? {
                        if m.status == Status::Dead {
                            count += 1;
                            if first.len() < show {
                                first.push(m);
                            }
                        }
                    }
                }
            }
            Scope::Matching(f) => {
                let mut page = Some(self.page(f, None));
                while let Some(p) = page.take() {
                    let rows = store.messages(&p).await?;
                    count += rows.len() as u64;
                    if rows.len() == p.limit {
                        page = Some(self.page(f, rows.last().map(|m| m.seq)));
                    }
                    first.extend(rows.into_iter().take(show - first.len()));
                }
            }
        }
        Ok((count, first))
    }

    fn page(&self, f: &MessageFilter, before: Option<i64>) -> MessageFilter {
        MessageFilter {
            status: Some(Status::Dead),
            before,
            limit: outbox_core::MAX_PAGE,
            ..f.clone()
        }
    }

    /// Requeue (or purge) them: one statement when the store can select them, else a page
    /// at a time (each page's rows by seq). The count changed.
    async fn apply(&self, store: &dyn Store, purge: bool) -> Result<u64, Failure> {
        let run = |sel: Selector| async move {
            if purge {
                store.purge_dead(&sel).await
            } else {
                store.requeue(&sel).await
            }
        };
        if let Some(sel) = self.selector() {
            return Ok(run(sel).await?);
        }
        let Scope::Matching(f) = self else {
            return Ok(0);
        };
        let mut changed = 0;
        let mut before = None;
        loop {
            let p = self.page(f, before);
            let rows = store.messages(&p).await?;
            if rows.is_empty() {
                return Ok(changed);
            }
            before = rows.last().map(|m| m.seq);
            changed += run(Selector::Seqs(rows.iter().map(|m| m.seq).collect())).await?;
            if rows.len() < p.limit {
                return Ok(changed);
            }
        }
    }
}

/// One action on the store.
#[derive(Debug)]
enum Action {
    Requeue(Scope),
    Purge(Scope),
    Resume(String, String),
    Skip(String, String),
    Park(String, String, String),
}

impl Action {
    /// Its name, as the API and the command take it.
    fn name(&self) -> &'static str {
        match self {
            Action::Requeue(_) => "requeue",
            Action::Purge(_) => "purge",
            Action::Resume(..) => "resume",
            Action::Skip(..) => "skip",
            Action::Park(..) => "park",
        }
    }

    /// From form fields or a JSON body: `action`, and the dead letters (`seq`, repeatable;
    /// or `all` and any of the filters `stream`, `destination`, `key`, `id`), or a unit
    /// (`stream` + `unit`).
    fn parse(fields: &[(String, String)]) -> Result<Self, Failure> {
        let one = |k: &str| {
            fields
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.trim())
                .filter(|v| !v.is_empty())
        };
        let seqs = fields
            .iter()
            .filter(|(n, _)| n == "seq")
            .map(|(_, v)| parse_seq(v.trim()))
            .collect::<Result<Vec<i64>, _>>()?;
        let scope = || -> Result<Scope, Failure> {
            let all = matches!(one("all"), Some("1" | "true"));
            let f = MessageFilter {
                stream: one("stream").map(str::to_owned),
                destination: one("destination").map(str::to_owned),
                key: one("key").map(str::to_owned),
                id: match one("id") {
                    Some(id) => Some(
                        id.parse::<MessageId>()
                            .map_err(|_| bad(format!("id {:?} is not a UUID", short(id))))?,
                    ),
                    None => None,
                },
                status: Some(Status::Dead),
                ..Default::default()
            };
            let filtered =
                f.stream.is_some() || f.destination.is_some() || f.key.is_some() || f.id.is_some();
            if !seqs.is_empty() {
                if filtered || all {
                    return Err(bad(
                        "give either seq or filters (all, stream, destination, key, id), not both",
                    ));
                }
                Ok(Scope::Seqs(seqs.clone()))
            } else if filtered || all {
                Ok(Scope::Matching(f))
            } else {
                Err(bad(
                    "choose the dead letters: seq, or all with any of stream, destination, key, id",
                ))
            }
        };
        let unit = || -> Result<(String, String), Failure> {
            match (one("stream"), one("unit")) {
                (Some(s), Some(u)) => Ok((s.to_owned(), u.to_owned())),
                _ => Err(bad("name the unit: stream and unit")),
            }
        };
        match one("action") {
            Some("requeue") => Ok(Action::Requeue(scope()?)),
            Some("purge") => Ok(Action::Purge(scope()?)),
            Some("resume") => unit().map(|(s, u)| Action::Resume(s, u)),
            Some("skip") => unit().map(|(s, u)| Action::Skip(s, u)),
            Some("park") => unit().map(|(s, u)| {
                let reason = one("reason").unwrap_or("parked from the admin console");
                Action::Park(s, u, reason.to_owned())
            }),
            Some(other) => Err(bad(format!(
                "unknown action {:?}: requeue, purge, resume, skip or park",
                short(other)
            ))),
            None => Err(bad("no action given")),
        }
    }

    /// The question the confirmation asks, with what the action takes now: the count and
    /// the first rows of a requeue or purge, the head a skip dead-letters.
    async fn question(
        &self,
        store: &dyn Store,
    ) -> Result<(String, Vec<StoredMessage>, u64), Failure> {
        const SHOWN: usize = 10;
        Ok(match self {
            Action::Requeue(s) | Action::Purge(s) => {
                let (n, first) = s.preview(store, SHOWN).await?;
                let verb = if matches!(self, Action::Purge(_)) {
                    "Delete for good"
                } else {
                    "Requeue"
                };
                (
                    format!("{verb} {n} dead letter(s) ({})", s.words()),
                    first,
                    n,
                )
            }
            Action::Resume(s, u) => (format!("Resume unit {u:?} of stream {s:?}"), vec![], 0),
            Action::Skip(s, u) => {
                let head = store
                    .parked_units(Some(s), outbox_core::MAX_PAGE)
                    .await?
                    .into_iter()
                    .find(|p| &p.unit == u)
                    .and_then(|p| p.head);
                let head = match head {
                    Some(seq) => store.get(seq).await?,
                    None => None,
                };
                match head {
                    Some(m) => (
                        format!(
                            "Dead-letter seq {} (the head of unit {u:?} of stream {s:?}) and resume the rest",
                            m.seq
                        ),
                        vec![m],
                        1,
                    ),
                    None => (
                        format!("Unit {u:?} of stream {s:?} has no pending head: resume it"),
                        vec![],
                        0,
                    ),
                }
            }
            Action::Park(s, u, _) => (format!("Park unit {u:?} of stream {s:?}"), vec![], 0),
        })
    }

    /// Run it: the number of rows changed, and a sentence (also what the log records).
    async fn run(&self, store: &dyn Store) -> Result<(u64, String), Failure> {
        Ok(match self {
            Action::Requeue(s) => {
                let n = s.apply(store, false).await?;
                (n, format!("Requeued {n} dead letter(s) ({}).", s.words()))
            }
            Action::Purge(s) => {
                let n = s.apply(store, true).await?;
                (n, format!("Purged {n} dead letter(s) ({}).", s.words()))
            }
            Action::Resume(s, u) => {
                store.resume_unit(s, u).await?;
                (1, format!("Resumed unit {u:?} of stream {s:?}."))
            }
            Action::Skip(s, u) => {
                let head = store.skip_head(s, u).await?;
                let n = u64::from(head.is_some());
                (
                    n,
                    match head {
                        Some(seq) => format!(
                            "Dead-lettered seq {seq} and resumed unit {u:?} of stream {s:?}."
                        ),
                        None => {
                            format!("Unit {u:?} of stream {s:?} had no pending message; resumed.")
                        }
                    },
                )
            }
            Action::Park(s, u, reason) => {
                store.park_unit(s, u, reason).await?;
                (1, format!("Parked unit {u:?} of stream {s:?}."))
            }
        })
    }
}

/// Whether a change may run: not on a read-only console, and only with its CSRF token
/// (`missing` says how to send it).
fn may_change(admin: &Admin, csrf: &str, missing: &str) -> Result<(), Failure> {
    if admin.options.read_only {
        return Err(Failure(
            StatusCode::FORBIDDEN,
            "this console is read-only (--read-only)".into(),
        ));
    }
    if !same(csrf, &admin.csrf) {
        return Err(Failure(StatusCode::FORBIDDEN, missing.into()));
    }
    Ok(())
}

/// A few rows for a confirmation: what will change, before it does.
fn rows_table(admin: &Admin, rows: &[StoredMessage], total: u64) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut b = String::from("<table id=\"affected\"><tr><th>seq</th><th>stream</th><th>key</th><th>destination</th><th>attempts</th><th>last error</th></tr>");
    for m in rows {
        let msg = &m.envelope.message;
        let _ = write!(
            b,
            "<tr><td><a href=\"/messages/{seq}\">{seq}</a></td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            esc(&msg.stream),
            esc(msg.key.as_deref().unwrap_or("")),
            esc(&msg.destination),
            m.attempts,
            esc(&short(&admin.last_error(m))),
            seq = m.seq,
        );
    }
    b.push_str("</table>");
    if total > rows.len() as u64 {
        let _ = write!(
            b,
            "<p class=\"muted\">… and {} more.</p>",
            total - rows.len() as u64
        );
    }
    b
}

async fn action_form(
    State(admin): State<Arc<Admin>>,
    Extension(who): Extension<Who>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let result = async {
        let csrf = fields
            .iter()
            .find(|(n, _)| n == "csrf")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        may_change(
            &admin,
            csrf,
            "missing or stale form token: reload the page and try again",
        )?;
        let action = Action::parse(&fields)?;
        if !fields.iter().any(|(n, v)| n == "confirm" && v == "yes") {
            // Ask first: what it takes now, and the same fields again with the confirmation.
            let (question, rows, total) = action.question(admin.store.as_ref()).await?;
            let mut hidden = String::new();
            for (n, v) in &fields {
                let _ = write!(
                    hidden,
                    "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                    esc(n),
                    esc(v)
                );
            }
            return Ok(layout(
                "Confirm",
                &format!(
                    "<p id=\"question\">{}?</p>{}<form method=\"post\" action=\"/actions\">{hidden}\
                     <input type=\"hidden\" name=\"confirm\" value=\"yes\">\
                     <button id=\"confirm\">Yes, do it</button> <a href=\"/\">Cancel</a></form>",
                    esc(&question),
                    rows_table(&admin, &rows, total),
                ),
            ));
        }
        let (changed, sentence) = action.run(admin.store.as_ref()).await?;
        tracing::info!(action = %sentence, changed, by = %who.0, "admin action");
        Ok(layout(
            "Done",
            &format!(
                "<p id=\"result\">{}</p><p><a href=\"/\">Overview</a> · <a href=\"/messages?status=dead\">Dead letters</a></p>",
                esc(&sentence)
            ),
        ))
    }
    .await;
    match result {
        Ok(b) => Html(b).into_response(),
        Err(f) => page_error(f),
    }
}

// ------------------------------------------------------------------ API

async fn api_stats(State(admin): State<Arc<Admin>>) -> Response {
    match admin.store.stats().await {
        Ok(stats) => {
            Json(crate::json::stats(&admin.table, &stats, SystemTime::now())).into_response()
        }
        Err(e) => api_error(e.into()),
    }
}

async fn api_messages(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let f = filter_of(&q)?;
        let rows = admin.store.messages(&f).await?;
        Ok::<_, Failure>(crate::json::messages(
            &rows,
            f.limit,
            admin.options.hide_payloads,
        ))
    }
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(f) => api_error(f),
    }
}

async fn api_message(State(admin): State<Arc<Admin>>, Path(seq): Path<String>) -> Response {
    match fetch(&admin, &seq).await {
        Ok(m) => Json(crate::json::message(&m, admin.options.hide_payloads)).into_response(),
        Err(f) => api_error(f),
    }
}

async fn api_parked(State(admin): State<Arc<Admin>>) -> Response {
    match admin.store.parked_units(None, 1000).await {
        Ok(units) => Json(crate::json::parked(&units)).into_response(),
        Err(e) => api_error(e.into()),
    }
}

async fn api_csrf(State(admin): State<Arc<Admin>>) -> Response {
    Json(json!({ "csrf": admin.csrf })).into_response()
}

async fn api_action(
    State(admin): State<Arc<Admin>>,
    Extension(who): Extension<Who>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let result = async {
        let csrf = headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        may_change(
            &admin,
            csrf,
            "missing or wrong X-CSRF-Token header (GET /api/csrf)",
        )?;
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
        let Value::Object(map) = v else {
            return Err(bad("the body must be a JSON object"));
        };
        let mut fields = Vec::new();
        for (k, v) in map {
            match (k.as_str(), v) {
                ("seqs", Value::Array(a)) => {
                    for s in a {
                        fields.push(("seq".to_owned(), s.to_string()));
                    }
                }
                (_, Value::String(s)) => fields.push((k, s)),
                (_, Value::Bool(b)) => fields.push((k, b.to_string())),
                (_, other) => fields.push((k, other.to_string())),
            }
        }
        let action = Action::parse(&fields)?;
        let (changed, sentence) = action.run(admin.store.as_ref()).await?;
        tracing::info!(action = %sentence, changed, by = %who.0, "admin API action");
        Ok(crate::json::action(action.name(), changed, &sentence))
    }
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(f) => api_error(f),
    }
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
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
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
        };
        assert!(check(&opts("127.0.0.1:0", None)).is_ok());
        assert!(check(&opts("0.0.0.0:8080", None)).is_err());
        assert!(check(&opts("0.0.0.0:8080", Some("short"))).is_err());
        assert!(check(&opts("0.0.0.0:8080", Some("0123456789abcdef"))).is_ok());
    }
}
