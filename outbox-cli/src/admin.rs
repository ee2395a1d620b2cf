//! `outbox admin`: a web console for operators, served by the binary itself (axum, HTML
//! rendered on the server, no script, every asset embedded), and the same data and actions as
//! a JSON API under `/api/`.
//!
//! Security: loopback unless a token is set (`--auth-token`); with a token every request
//! carries it (`Authorization: Bearer …`, or the cookie `/login?token=…` sets); every change is
//! a POST with the console's CSRF token; `--read-only` removes the actions; `--hide-payloads`
//! keeps payloads off pages and API; all output is escaped, and the Content-Security-Policy
//! forbids scripts, so a payload holding `<script>` is text twice over.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use outbox_core::{
    to_millis, Error, MessageFilter, MessageId, ParkedUnit, Selector, Status, Store, StoredMessage,
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
    /// No payloads on pages or in the API.
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
}

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
    let admin = Arc::new(Admin {
        store,
        table: table.to_owned(),
        label,
        csrf: random_token(),
        samples: Mutex::new(VecDeque::new()),
        options,
    });
    tokio::spawn(sampler(Arc::downgrade(&admin)));
    tracing::info!(address = ?addr, read_only = admin.options.read_only, hide_payloads = admin.options.hide_payloads, "admin console listening");
    // Printed for scripts and tests that listen on port 0.
    if let Some(a) = addr {
        println!("admin console on http://{a}/");
    }
    axum::serve(listener, router(admin))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::transient("admin: server failed").with_source(e))
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
        .route("/actions", post(action_form))
        .route("/login", get(login))
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

/// Token check (when set), and headers on every response: no script, no framing, no caching.
async fn security(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    let is_login = request.uri().path() == "/login";
    if let (Some(token), false) = (&admin.options.token, is_login) {
        if !has_token(request.headers(), token) {
            return secure(
                (
                    StatusCode::UNAUTHORIZED,
                    "401: this console needs its token: send `Authorization: Bearer <token>`, or open /login?token=<token> once\n",
                )
                    .into_response(),
            );
        }
    }
    secure(next.run(request).await)
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
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

fn has_token(headers: &HeaderMap, token: &str) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix("outbox_admin="))
        .next();
    bearer.or(cookie).is_some_and(|given| same(given, token))
}

/// Compared in constant time.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn login(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match (&admin.options.token, q.get("token")) {
        (Some(token), Some(given)) if same(given, token) => {
            let mut r = Redirect::to("/").into_response();
            let cookie = format!("outbox_admin={token}; HttpOnly; SameSite=Strict; Path=/");
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        (None, _) => Redirect::to("/").into_response(),
        _ => (StatusCode::UNAUTHORIZED, "401: wrong token\n").into_response(),
    }
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
    b.push_str("<h2>Last hour</h2><p><img src=\"/chart.svg\" alt=\"pending and dead rows, and publish rate, over the last hour\" width=\"720\" height=\"200\"></p>");
    Ok(layout("Overview", &b))
}

/// Pending (blue), dead (red) and the publish rate (green, sent rows per minute: rows deleted
/// after send are not counted), sampled while the console runs.
async fn chart(State(admin): State<Arc<Admin>>) -> Response {
    let samples: Vec<Sample> = admin
        .samples
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .collect();
    let (w, h) = (720.0f64, 200.0f64);
    let now = SystemTime::now();
    let x = |t: SystemTime| {
        let ago = now.duration_since(t).unwrap_or_default().as_secs_f64();
        w - (ago / WINDOW.as_secs_f64()) * w
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
    let top = samples
        .iter()
        .map(|s| s.pending.max(s.dead) as f64)
        .chain(rates.iter().map(|r| r.1))
        .fold(1.0f64, f64::max);
    let y = |v: f64| h - 10.0 - (v / top) * (h - 20.0);
    let line = |points: Vec<(f64, f64)>, colour: &str| {
        let pts: Vec<String> = points
            .iter()
            .map(|(a, b)| format!("{a:.1},{b:.1}"))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        )
    };
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\
         <rect width=\"100%\" height=\"100%\" fill=\"#fafafa\" stroke=\"#ccc\"/>\
         {}{}{}\
         <text x=\"6\" y=\"14\" font-size=\"11\" font-family=\"sans-serif\">max {top:.0} · \
         <tspan fill=\"#1f5fbf\">pending</tspan> · <tspan fill=\"#c0392b\">dead</tspan> · \
         <tspan fill=\"#2e8b57\">published/min</tspan> · {} samples</text></svg>",
        line(samples.iter().map(|s| (x(s.at), y(s.pending as f64))).collect(), "#1f5fbf"),
        line(samples.iter().map(|s| (x(s.at), y(s.dead as f64))).collect(), "#c0392b"),
        line(rates.iter().map(|(t, r)| (x(*t), y(*r))).collect(), "#2e8b57"),
        samples.len()
    );
    ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response()
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
    let v = |o: &Option<String>| esc(o.as_deref().unwrap_or(""));
    let mut b = String::new();
    let _ = write!(
        b,
        "<form method=\"get\" action=\"/messages\" class=\"filters\">\
         <input name=\"stream\" placeholder=\"stream\" value=\"{}\">\
         <select name=\"status\"><option value=\"\">any status</option>{}</select>\
         <input name=\"key\" placeholder=\"key\" value=\"{}\">\
         <input name=\"id\" placeholder=\"id\" value=\"{}\">\
         <input name=\"destination\" placeholder=\"destination\" value=\"{}\">\
         <button id=\"filter\">Filter</button></form>",
        v(&f.stream),
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
            esc(&short(m.last_error.as_deref().unwrap_or(""))),
            seq = m.seq,
            status = m.status.as_str(),
        );
    }
    b.push_str("</table>");
    if rows.is_empty() {
        b.push_str("<p class=\"muted\">No message matches.</p>");
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
        let scope = match &f.stream {
            Some(s) => format!(
                "<input type=\"hidden\" name=\"stream\" value=\"{}\">",
                esc(s)
            ),
            None => "<input type=\"hidden\" name=\"all\" value=\"1\">".into(),
        };
        let _ = write!(
            b,
            "<form method=\"post\" action=\"/actions\">{}{scope}\
             <button name=\"action\" value=\"requeue\">Requeue all of them</button> \
             <button name=\"action\" value=\"purge\">Purge all of them</button></form>",
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
    b.push_str(&row(
        "last error",
        esc(m.last_error.as_deref().unwrap_or("-")),
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
        b.push_str(&row(k, esc(v)));
    }
    b.push_str("</table><h2>Payload</h2>");
    if admin.options.hide_payloads {
        b.push_str("<p class=\"muted\">Hidden (--hide-payloads).</p>");
    } else {
        let (kind, text) = payload_text(&msg.payload);
        let _ = write!(
            b,
            "<p class=\"muted\">{} bytes, shown as {kind}</p><pre id=\"payload\">{}</pre>",
            msg.payload.len(),
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

/// One action on the store.
#[derive(Debug)]
enum Action {
    Requeue(Selector),
    Purge(Selector),
    Resume(String, String),
    Skip(String, String),
    Park(String, String, String),
}

impl Action {
    /// From form fields or a JSON body (`action`, and `seq` (repeatable) or `stream` or
    /// `all`, or `stream` + `unit`).
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
        let selector = || -> Result<Selector, Failure> {
            if !seqs.is_empty() {
                Ok(Selector::Seqs(seqs.clone()))
            } else if let Some(s) = one("stream") {
                Ok(Selector::Stream(s.to_owned()))
            } else if one("all") == Some("1") || one("all") == Some("true") {
                Ok(Selector::All)
            } else {
                Err(bad("choose the dead letters: seq, stream or all"))
            }
        };
        let unit = || -> Result<(String, String), Failure> {
            match (one("stream"), one("unit")) {
                (Some(s), Some(u)) => Ok((s.to_owned(), u.to_owned())),
                _ => Err(bad("name the unit: stream and unit")),
            }
        };
        match one("action") {
            Some("requeue") => Ok(Action::Requeue(selector()?)),
            Some("purge") => Ok(Action::Purge(selector()?)),
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

    fn describe(&self) -> String {
        let what = |s: &Selector| match s {
            Selector::All => "every dead letter".to_owned(),
            Selector::Stream(st) => format!("the dead letters of stream {:?}", st),
            Selector::Seqs(q) => format!(
                "{} dead letter(s): seq {}",
                q.len(),
                q.iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        match self {
            Action::Requeue(s) => format!("Requeue {}", what(s)),
            Action::Purge(s) => format!("Delete {} for good", what(s)),
            Action::Resume(s, u) => format!("Resume unit {u:?} of stream {s:?}"),
            Action::Skip(s, u) => {
                format!("Dead-letter the head of unit {u:?} of stream {s:?} and resume the rest")
            }
            Action::Park(s, u, _) => format!("Park unit {u:?} of stream {s:?}"),
        }
    }

    /// Run it: the number of rows changed, and a sentence.
    async fn run(&self, store: &dyn Store) -> Result<(u64, String), Failure> {
        Ok(match self {
            Action::Requeue(s) => {
                let n = store.requeue(s).await?;
                (n, format!("Requeued {n} dead letter(s)."))
            }
            Action::Purge(s) => {
                let n = store.purge_dead(s).await?;
                (n, format!("Purged {n} dead letter(s)."))
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
                        Some(seq) => format!("Dead-lettered seq {seq} and resumed unit {u:?}."),
                        None => format!("Unit {u:?} had no pending message; resumed."),
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

async fn action_form(
    State(admin): State<Arc<Admin>>,
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
            // Ask first: the same fields again, with the confirmation.
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
                    "<p id=\"question\">{}?</p><form method=\"post\" action=\"/actions\">{hidden}\
                     <input type=\"hidden\" name=\"confirm\" value=\"yes\">\
                     <button id=\"confirm\">Yes, do it</button> <a href=\"/\">Cancel</a></form>",
                    esc(&action.describe())
                ),
            ));
        }
        let (_, sentence) = action.run(admin.store.as_ref()).await?;
        tracing::info!(action = ?action, %sentence, "admin action");
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

fn message_json(m: &StoredMessage, hide: bool) -> Value {
    let msg = &m.envelope.message;
    let payload = if hide {
        Value::Null
    } else {
        match std::str::from_utf8(&msg.payload) {
            Ok(t) => json!({ "text": t }),
            Err(_) => json!({
                "hex": msg.payload.iter().map(|b| format!("{b:02x}")).collect::<String>()
            }),
        }
    };
    json!({
        "seq": m.seq,
        "id": m.envelope.id.to_string(),
        "stream": msg.stream,
        "destination": msg.destination,
        "key": msg.key,
        "unit": m.unit,
        "status": m.status.as_str(),
        "attempts": m.attempts,
        "created_at_ms": to_millis(m.envelope.created_at),
        "next_attempt_at_ms": to_millis(m.next_attempt_at),
        "sent_at_ms": m.sent_at.map(to_millis),
        "last_error": m.last_error,
        "content_type": msg.content_type,
        "headers": msg.headers,
        "signed": m.signature.is_some(),
        "payload": payload,
    })
}

async fn api_stats(State(admin): State<Arc<Admin>>) -> Response {
    match admin.store.stats().await {
        Ok(stats) => {
            let doc = |s: &outbox_core::StreamStats| {
                json!({
                    "stream": s.stream, "pending": s.pending, "sent": s.sent, "dead": s.dead,
                    "oldest_pending_ms": s.oldest_pending.map(to_millis),
                })
            };
            Json(json!({
                "table": admin.table,
                "streams": stats.streams.iter().map(doc).collect::<Vec<_>>(),
                "total": doc(&stats.total()),
            }))
            .into_response()
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
        let next = (rows.len() == f.limit)
            .then(|| rows.last().map(|m| m.seq))
            .flatten();
        Ok::<_, Failure>(json!({
            "messages": rows.iter().map(|m| message_json(m, admin.options.hide_payloads)).collect::<Vec<_>>(),
            "next_before": next,
        }))
    }
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(f) => api_error(f),
    }
}

async fn api_message(State(admin): State<Arc<Admin>>, Path(seq): Path<String>) -> Response {
    match fetch(&admin, &seq).await {
        Ok(m) => Json(message_json(&m, admin.options.hide_payloads)).into_response(),
        Err(f) => api_error(f),
    }
}

async fn api_parked(State(admin): State<Arc<Admin>>) -> Response {
    match admin.store.parked_units(None, 1000).await {
        Ok(units) => Json(json!({
            "parked": units.iter().map(|u| json!({
                "stream": u.stream, "unit": u.unit, "parked_at_ms": to_millis(u.parked_at),
                "reason": u.reason, "head_seq": u.head, "pending": u.pending,
            })).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(e) => api_error(e.into()),
    }
}

async fn api_csrf(State(admin): State<Arc<Admin>>) -> Response {
    Json(json!({ "csrf": admin.csrf })).into_response()
}

async fn api_action(
    State(admin): State<Arc<Admin>>,
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
        tracing::info!(action = ?action, %sentence, "admin API action");
        Ok(json!({ "changed": changed, "message": sentence }))
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
