//! The pages: the overview (streams, parked units, dead letters by error, the trend chart),
//! the messages listing and one message with its payload.

use maud::{html, Markup};

use super::*;

pub(crate) async fn overview(State(admin): State<Arc<Admin>>) -> Response {
    match overview_html(&admin).await {
        Ok(body) => (
            [(header::REFRESH, HeaderValue::from_static("10"))],
            Html(body),
        )
            .into_response(),
        Err(f) => page_error(f),
    }
}

pub(crate) async fn overview_html(admin: &Admin) -> Result<String, Failure> {
    let stats = admin.store.stats().await?;
    let parked = admin.store.parked_units(None, 100).await?;
    let mut rows = stats.streams.clone();
    rows.push(stats.total());
    let dead = if stats.total().dead > 0 {
        dead_by_error(admin, stats.total().dead).await?
    } else {
        html! {}
    };
    let wal = match &admin.gate.options.wal_slot {
        Some((pool, slot)) => Some(
            match outbox_sql::postgres::wal::slot_lag(pool, slot).await? {
                Some(lag) => crate::output::wal_line(slot, &lag),
                None => format!("WAL slot {slot} does not exist: run `outbox migrate --wal`"),
            },
        ),
        None => None,
    };
    let body = html! {
        p.muted {
            "Table " code { (admin.table) } " on " code { (admin.label) }
            @if admin.gate.options.read_only { " · read-only" }
            @if admin.gate.options.hide_payloads { " · payloads hidden" }
            ". Refreshes every 10 s."
        }
        h2 { "Streams" }
        table #streams {
            tr { th { "stream" } th { "pending" } th { "sent" } th { "dead" } th { "oldest pending" } }
            @for s in &rows {
                @let link = |status: &str, n: u64| {
                    let href = if s.stream == "*" {
                        format!("{}/messages?status={status}", admin.base)
                    } else {
                        format!("{}/messages?stream={}&status={status}", admin.base, enc(&s.stream))
                    };
                    html! { a href=(href) { (n) } }
                };
                tr {
                    td { @if s.stream == "*" { strong { "total" } } @else { (Shown(&s.stream)) } }
                    td.n { (link("pending", s.pending)) }
                    td.n { (link("sent", s.sent)) }
                    td.n { (link("dead", s.dead)) }
                    td { (s.oldest_pending.map(age).unwrap_or_else(|| "-".into())) }
                }
            }
        }
        @if let Some(line) = &wal {
            h2 { "WAL relay" }
            p #wal { (line) }
        }
        h2 { "Parked units (" (parked.len()) ")" }
        @if parked.is_empty() {
            p.muted { "None." }
        } @else {
            table #parked {
                tr { th { "stream" } th { "unit" } th { "parked" } th { "waiting" } th { "reason" } th {} }
                @for u in &parked {
                    tr {
                        td { (Shown(&u.stream)) }
                        td { (Shown(&u.unit)) }
                        td { (age(u.parked_at)) " ago" }
                        td.n { (u.pending) }
                        td { (Shown(u.reason.as_deref().unwrap_or(""))) }
                        td { (unit_buttons(admin, u)) }
                    }
                }
            }
        }
        (dead)
        h2 { "Trend" }
        p.muted { "Sampled while this console runs (at most the last hour)." }
        p { img src=(admin.url("/chart.svg")) alt="backlog (pending and dead rows) and publish rate over the time sampled" width="720" height="284"; }
    };
    Ok(layout(&admin.nav(), "Overview", body))
}

/// What the dead letters died of: the newest ones, grouped by their last error.
async fn dead_by_error(admin: &Admin, dead: u64) -> Result<Markup, Failure> {
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
        let error = if admin.gate.options.hide_payloads {
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
    Ok(html! {
        h2 { "Dead letters by error" }
        p.muted { "The newest " (newest.len()) " of " (dead) " dead letters." }
        table #errors {
            tr { th { "dead letters" } th { "last error" } th { "newest" } }
            @for (error, n, seq) in groups.iter().take(10) {
                tr {
                    td.n { (n) }
                    td { (Shown(error)) }
                    td { a href={ (admin.base) "/messages/" (seq) } { (seq) } }
                }
            }
        }
    })
}

/// Two panels over the time the console has samples for (at most the last hour): the
/// backlog (pending in blue, dead in red, each labelled with its latest value) and the
/// publish rate (sent rows per minute; rows deleted after send are not counted), each with
/// its own scale, a value axis and a time axis. Samples are kept while the console runs.
pub(crate) async fn chart(State(admin): State<Arc<Admin>>) -> Response {
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
pub(crate) type Series<'a> = (&'a str, &'a str, Vec<(SystemTime, f64)>);

/// The chart's geometry: width, panel height, left margin, gap between panels.
const W: f64 = 720.0;
const PANEL: f64 = 110.0;
const LEFT: f64 = 56.0;
const GAP: f64 = 34.0;

fn svg_text(x: f64, y: f64, anchor: &str, colour: &str, t: &str) -> String {
    html! {
        text x=(format!("{x:.1}")) y=(format!("{y:.1}")) font-size="11" font-family="sans-serif"
            text-anchor=(anchor) fill=(colour) { (t) }
    }
    .into_string()
}

pub(crate) fn chart_svg(samples: &[Sample], now: SystemTime) -> String {
    let h = PANEL * 2.0 + GAP + 30.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" viewBox=\"0 0 {W} {h}\"><rect width=\"100%\" height=\"100%\" fill=\"#fafafa\" stroke=\"#ccc\"/>"
    );
    if samples.len() < 2 {
        out.push_str(&svg_text(
            W / 2.0,
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
    let axis = TimeAxis::of(samples);
    out.push_str(&chart_panel(
        &axis,
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
    ));
    out.push_str(&chart_panel(
        &axis,
        16.0 + PANEL + GAP,
        "Published per minute",
        &[("published/min", "#2e8b57", rates(samples))],
    ));
    out.push_str(&axis.labels(16.0 + PANEL * 2.0 + GAP + 12.0, now));
    out.push_str("</svg>");
    out
}

/// Messages published per minute between consecutive samples.
fn rates(samples: &[Sample]) -> Vec<(SystemTime, f64)> {
    samples
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
        .collect()
}

/// The time axis: from the first sample to the last.
struct TimeAxis {
    first: SystemTime,
    last: SystemTime,
    span: f64,
}

impl TimeAxis {
    fn of(samples: &[Sample]) -> Self {
        let first = samples[0].at;
        let last = samples[samples.len() - 1].at;
        let span = last
            .duration_since(first)
            .unwrap_or_default()
            .as_secs_f64()
            .max(0.001);
        Self { first, last, span }
    }

    fn x(&self, t: SystemTime) -> f64 {
        let from_start = t
            .duration_since(self.first)
            .unwrap_or_default()
            .as_secs_f64();
        LEFT + (from_start / self.span) * (W - LEFT - 12.0)
    }

    /// Labels at the first sample, the middle and the last, as time ago.
    fn labels(&self, base: f64, now: SystemTime) -> String {
        let mut out = String::new();
        for (t, anchor) in [
            (self.first, "start"),
            (
                self.first + Duration::from_secs_f64(self.span / 2.0),
                "middle",
            ),
            (self.last, "end"),
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
            out.push_str(&svg_text(self.x(t), base, anchor, "#555", &label));
        }
        out
    }
}

/// One panel at `top`: axes, its scale, title, a line and a legend entry per series.
fn chart_panel(axis: &TimeAxis, top: f64, title: &str, series: &[Series]) -> String {
    let max = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(1.0);
    let y = |v: f64| top + PANEL - (v / max) * (PANEL - 8.0);
    let mut out = format!(
        "<line x1=\"{LEFT}\" y1=\"{top}\" x2=\"{LEFT}\" y2=\"{b}\" stroke=\"#999\"/><line x1=\"{LEFT}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#999\"/>",
        b = top + PANEL,
        r = W - 12.0
    );
    out.push_str(&svg_text(
        LEFT - 4.0,
        top + 10.0,
        "end",
        "#555",
        &format!("{max:.0}"),
    ));
    out.push_str(&svg_text(LEFT - 4.0, top + PANEL, "end", "#555", "0"));
    out.push_str(&svg_text(LEFT + 4.0, top - 4.0, "start", "#333", title));
    let mut legend = W - 12.0;
    for (name, colour, points) in series.iter().rev() {
        let pts: Vec<String> = points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", axis.x(*t), y(*v)))
            .collect();
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        ));
        let last = points.last().map_or(0.0, |p| p.1);
        let label = format!("{name} {last:.0}");
        out.push_str(&svg_text(legend, top - 4.0, "end", colour, &label));
        legend -= 8.0 * label.len() as f64;
    }
    out
}

/// The listing's filters from a query string; bad ones are a 400 with the reason.
pub(crate) fn filter_of(q: &HashMap<String, String>) -> Result<MessageFilter, Failure> {
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

pub(crate) fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

pub(crate) fn query_of(f: &MessageFilter, before: Option<i64>) -> String {
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

pub(crate) async fn messages_page(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match messages_html(&admin, &q).await {
        Ok(b) => Html(b).into_response(),
        Err(f) => page_error(f),
    }
}

pub(crate) async fn messages_html(
    admin: &Admin,
    q: &HashMap<String, String>,
) -> Result<String, Failure> {
    let f = filter_of(q)?;
    let rows = admin.store.messages(&f).await?;
    // The streams for the drop-down, and the counts that say how many match when the
    // filters are a stream and a status (the stats have them; other filters would need a
    // count of their own).
    let stats = admin.store.stats().await?;
    let selectable = !admin.gate.options.read_only && rows.iter().any(|m| m.status == Status::Dead);
    let listing = html! {
        (messages_table(admin, &rows, selectable))
        @if rows.is_empty() { p.muted { "No message matches." } }
        (count_line(&f, &stats, rows.len()))
    };
    let body = html! {
        (filter_form(admin, &f, &stats))
        @if selectable {
            form method="post" action=(admin.url("/actions")) {
                (csrf_field(admin))
                (listing)
                p {
                    button name="action" value="requeue" { "Requeue selected" } " "
                    button name="action" value="purge" { "Purge selected" }
                }
            }
        } @else {
            (listing)
        }
        @if rows.len() == f.limit {
            p { a #next href={ (admin.base) "/messages?" (query_of(&f, rows.last().map(|m| m.seq))) } { "Next page" } }
        }
        @if !admin.gate.options.read_only && f.status == Some(Status::Dead) {
            (all_matching_form(admin, &f))
        }
    };
    Ok(layout(&admin.nav(), "Messages", body))
}

/// The filters: a stream drop-down (every stream the stats know, and the one asked for),
/// status, key, id and destination.
fn filter_form(admin: &Admin, f: &MessageFilter, stats: &outbox_core::Stats) -> Markup {
    let mut streams: Vec<&str> = stats.streams.iter().map(|s| s.stream.as_str()).collect();
    if let Some(s) = f.stream.as_deref().filter(|s| !streams.contains(s)) {
        streams.push(s);
    }
    let id = f.id.map(|i| i.to_string()).unwrap_or_default();
    html! {
        form method="get" action=(admin.url("/messages")) class="filters" {
            select name="stream" #stream {
                option value="" { "any stream" }
                @for s in &streams {
                    option value=(s) selected[f.stream.as_deref() == Some(s)] { (Shown(s)) }
                }
            }
            select name="status" {
                option value="" { "any status" }
                @for s in ["pending", "sent", "dead"] {
                    option selected[f.status.map(|x| x.as_str()) == Some(s)] { (s) }
                }
            }
            input name="key" placeholder="key" value=(f.key.as_deref().unwrap_or(""));
            input name="id" placeholder="id" value=(id);
            input name="destination" placeholder="destination" value=(f.destination.as_deref().unwrap_or(""));
            button #filter { "Filter" }
        }
    }
}

/// The rows, a dead one with a check box when `selectable`.
fn messages_table(admin: &Admin, rows: &[StoredMessage], selectable: bool) -> Markup {
    html! {
        table #messages {
            tr {
                th {} th { "seq" } th { "stream" } th { "key" } th { "destination" } th { "status" }
                th { "attempts" } th { "created" } th { "last error" }
            }
            @for m in rows {
                @let msg = &m.envelope.message;
                tr {
                    td {
                        @if selectable && m.status == Status::Dead {
                            input type="checkbox" name="seq" value=(m.seq);
                        }
                    }
                    td { a href={ (admin.base) "/messages/" (m.seq) } { (m.seq) } }
                    td { (Shown(&msg.stream)) }
                    td { (Shown(msg.key.as_deref().unwrap_or(""))) }
                    td { (Shown(&msg.destination)) }
                    td class=(m.status.as_str()) { (m.status.as_str()) }
                    td.n { (m.attempts) }
                    td { (time(m.envelope.created_at)) }
                    td { (Shown(&short(&admin.last_error(m)))) }
                }
            }
        }
    }
}

/// "N shown of M", when the filters are a status and perhaps a stream (the stats count
/// those; other filters would need a count of their own). Nothing otherwise.
fn count_line(f: &MessageFilter, stats: &outbox_core::Stats, shown: usize) -> Markup {
    let only_stream_and_status = f.key.is_none() && f.id.is_none() && f.destination.is_none();
    let (Some(status), true) = (f.status, only_stream_and_status) else {
        return html! {};
    };
    let counts = match &f.stream {
        Some(s) => stats.streams.iter().find(|x| &x.stream == s).cloned(),
        None => Some(stats.total()),
    };
    let total = counts.map_or(0, |c| match status {
        Status::Pending => c.pending,
        Status::Sent => c.sent,
        Status::Dead => c.dead,
    });
    html! {
        p.muted #count {
            (shown) " shown of " (total) " " (status.as_str()) " messages"
            @if let Some(s) = &f.stream { " in stream " (Shown(s)) }
            "."
        }
    }
}

/// Requeue or purge every dead letter this page's filters match: each filter goes along.
fn all_matching_form(admin: &Admin, f: &MessageFilter) -> Markup {
    let scope = [
        ("stream", f.stream.clone()),
        ("destination", f.destination.clone()),
        ("key", f.key.clone()),
        ("id", f.id.map(|i| i.to_string())),
    ];
    html! {
        form method="post" action=(admin.url("/actions")) {
            (csrf_field(admin))
            input type="hidden" name="all" value="1";
            @for (name, value) in &scope {
                @if let Some(v) = value { input type="hidden" name=(name) value=(v); }
            }
            button name="action" value="requeue" #requeue-all { "Requeue all of them" } " "
            button name="action" value="purge" #purge-all { "Purge all of them" }
        }
    }
}

pub(crate) async fn message_page(
    State(admin): State<Arc<Admin>>,
    Path(seq): Path<String>,
) -> Response {
    match message_html(&admin, &seq).await {
        Ok(b) => Html(b).into_response(),
        Err(f) => page_error(f),
    }
}

pub(crate) fn parse_seq(seq: &str) -> Result<i64, Failure> {
    seq.parse::<i64>()
        .map_err(|_| bad(format!("{:?} is not a row number", short(seq))))
}

pub(crate) async fn fetch(admin: &Admin, seq: &str) -> Result<StoredMessage, Failure> {
    let seq = parse_seq(seq)?;
    admin
        .store
        .get(seq)
        .await?
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no row {seq}")))
}

/// The most of a payload a message page shows (bytes, then lines).
pub(crate) const SHOWN_PAYLOAD_BYTES: usize = 64 * 1024;
pub(crate) const SHOWN_PAYLOAD_LINES: usize = 2000;

/// The payload as it is, to download (not with `--hide-payloads`).
pub(crate) async fn payload_download(
    State(admin): State<Arc<Admin>>,
    Path(seq): Path<String>,
) -> Response {
    if admin.gate.options.hide_payloads {
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
pub(crate) fn payload_text(payload: &[u8]) -> (&'static str, String) {
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

pub(crate) async fn message_html(admin: &Admin, seq: &str) -> Result<String, Failure> {
    let m = fetch(admin, seq).await?;
    let msg = &m.envelope.message;
    let error = admin.last_error(&m);
    let hide = admin.gate.options.hide_payloads;
    let body = html! {
        table #message {
            tr { th { "seq" } td { (m.seq) } }
            tr { th { "id" } td { (m.envelope.id) } }
            tr { th { "stream" } td { (Shown(&msg.stream)) } }
            tr { th { "destination" } td { (Shown(&msg.destination)) } }
            tr { th { "key" } td { (Shown(msg.key.as_deref().unwrap_or("-"))) } }
            tr { th { "unit" } td { (Shown(&m.unit)) " (" (format!("{:?}", m.order)) ")" } }
            tr { th { "status" } td { (m.status.as_str()) } }
            tr { th { "attempts" } td { (m.attempts) } }
            tr { th { "created" } td { (time(m.envelope.created_at)) } }
            tr { th { "next attempt" } td { (time(m.next_attempt_at)) } }
            tr { th { "sent" } td { (m.sent_at.map(time).unwrap_or_else(|| "-".into())) } }
            tr { th { "last error" } td { @if error.is_empty() { "-" } @else { (Shown(&error)) } } }
            tr {
                th { "signature" }
                td {
                    @match &m.signature {
                        Some(s) => { "signed with key " (Shown(s.split(':').next().unwrap_or(""))) " (verified by the relay, not here)" }
                        None => { "unsigned" }
                    }
                }
            }
            tr { th { "content type" } td { (Shown(&msg.content_type)) } }
        }
        h2 { "Headers" }
        table #headers {
            @for (k, v) in &msg.headers {
                tr {
                    th { (Shown(k)) }
                    td { @if hide { span.muted { (v.len()) " bytes, hidden" } } @else { (Shown(v)) } }
                }
            }
        }
        h2 { "Payload" }
        @if hide {
            p.muted { "Hidden (--hide-payloads)." }
        } @else {
            (payload_shown(&admin.base, m.seq, &msg.payload))
        }
        @if !admin.gate.options.read_only && m.status == Status::Dead {
            form method="post" action=(admin.url("/actions")) {
                (csrf_field(admin))
                input type="hidden" name="seq" value=(m.seq);
                button name="action" value="requeue" #requeue { "Requeue" } " "
                button name="action" value="purge" { "Purge" }
            }
        }
    };
    Ok(layout(&admin.nav(), &format!("Message {}", m.seq), body))
}

/// A payload as a page shows it: a large one in part (a 500 KB JSON document made a
/// 42 000-line page), with the whole of it a download away.
fn payload_shown(base: &str, seq: i64, payload: &[u8]) -> Markup {
    let shown = &payload[..payload.len().min(SHOWN_PAYLOAD_BYTES)];
    let (kind, text) = payload_text(shown);
    let mut lines = text.lines();
    let mut text: String = lines
        .by_ref()
        .take(SHOWN_PAYLOAD_LINES)
        .collect::<Vec<_>>()
        .join("\n");
    let cut = shown.len() < payload.len() || lines.next().is_some();
    if cut {
        text.push_str("\n…");
    }
    html! {
        p.muted {
            (payload.len()) " bytes, shown as " (kind) @if cut { ", cut short" } " · "
            a #download href={ (base) "/messages/" (seq) "/payload" } { "download" }
        }
        pre #payload { (Shown(&text)) }
    }
}
