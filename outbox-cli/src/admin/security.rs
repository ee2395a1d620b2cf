//! Who may use the console: the Host and Origin checks, the token, sessions and login,
//! and the headers every response carries.

use super::*;

/// Who asked for a change, for the action log: how they were let in, and from where.
#[derive(Debug, Clone)]
pub struct Who(pub(crate) String);

/// Host check (without a token), same-origin check of every POST, token check (when set),
/// and headers on every response: no script, no framing, no caching.
pub(crate) async fn security(
    State(admin): State<Arc<Gate>>,
    mut request: Request,
    next: Next,
) -> Response {
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

pub(crate) fn unauthorized(what: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        format!("401: {what}: send `Authorization: Bearer <token>`, or log in at /login\n"),
    )
        .into_response()
}

/// Whether the `Host` names this console: `localhost`, `127.0.0.1`, `[::1]` or the address
/// it listens on, with its port.
pub(crate) fn host_allowed(headers: &HeaderMap, listen: SocketAddr, port: u16) -> bool {
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
pub(crate) fn same_origin(headers: &HeaderMap) -> Result<(), String> {
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

pub(crate) fn secure(mut response: Response) -> Response {
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

pub(crate) enum Credential<'a> {
    Bearer(&'a str),
    Session(&'a str),
}

pub(crate) const SESSION_COOKIE: &str = "outbox_session";

pub(crate) fn credential(headers: &HeaderMap) -> Option<Credential<'_>> {
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
    pub(crate) fn last_error(&self, m: &StoredMessage) -> String {
        match (&m.last_error, self.gate.options.hide_payloads) {
            (None, _) => String::new(),
            (Some(_), true) => "hidden (--hide-payloads)".into(),
            (Some(e), false) => e.clone(),
        }
    }
}

impl Gate {
    pub(crate) fn has_session(&self, id: &str) -> bool {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.iter().any(|s| same(s, id))
    }

    pub(crate) fn new_session(&self) -> String {
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
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The login form: the token goes in a POST body, never in a URL.
pub(crate) async fn login_page(State(admin): State<Arc<Gate>>) -> Response {
    if admin.options.token.is_none() {
        return Redirect::to("/").into_response();
    }
    Html(layout(
        &Nav::default(),
        "Log in",
        maud::html! {
            form method="post" action="/login" {
                label { "Token " input type="password" name="token" #token autocomplete="current-password"; }
                " "
                button #login { "Log in" }
            }
        },
    ))
    .into_response()
}

/// Exchanges the token for a session: a random id in an `HttpOnly`, `SameSite=Strict` cookie
/// (`Secure` behind a proxy that says it speaks HTTPS). The cookie is not the token.
pub(crate) async fn login(
    State(admin): State<Arc<Gate>>,
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
                &Nav::default(),
                "Log in",
                maud::html! { p.error { "401: wrong token. " a href="/login" { "Try again" } } },
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
