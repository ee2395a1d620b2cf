//! The pages: the overview (streams, parked units, dead letters by error, the trend chart),
//! the messages listing and one message with its payload.

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
    format!(
        "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"11\" font-family=\"sans-serif\" text-anchor=\"{anchor}\" fill=\"{colour}\">{}</text>",
        esc(t)
    )
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
    let mut b = filter_form(&f, &stats);
    let selectable = !admin.options.read_only && rows.iter().any(|m| m.status == Status::Dead);
    if selectable {
        let _ = write!(
            b,
            "<form method=\"post\" action=\"/actions\">{}",
            csrf_field(admin)
        );
    }
    b.push_str(&messages_table(admin, &rows, selectable));
    if rows.is_empty() {
        b.push_str("<p class=\"muted\">No message matches.</p>");
    }
    b.push_str(&count_line(&f, &stats, rows.len()));
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
        b.push_str(&all_matching_form(admin, &f));
    }
    Ok(layout("Messages", &b))
}

/// The filters: a stream drop-down (every stream the stats know, and the one asked for),
/// status, key, id and destination.
fn filter_form(f: &MessageFilter, stats: &outbox_core::Stats) -> String {
    let v = |o: &Option<String>| esc(o.as_deref().unwrap_or(""));
    let mut streams: Vec<&str> = stats.streams.iter().map(|s| s.stream.as_str()).collect();
    if let Some(s) = f.stream.as_deref().filter(|s| !streams.contains(s)) {
        streams.push(s);
    }
    let selected = |yes: bool| if yes { " selected" } else { "" };
    let stream_options: String = streams
        .iter()
        .map(|s| {
            format!(
                "<option value=\"{v}\"{sel}>{v}</option>",
                v = esc(s),
                sel = selected(f.stream.as_deref() == Some(s))
            )
        })
        .collect();
    let status_options: String = ["pending", "sent", "dead"]
        .iter()
        .map(|s| {
            format!(
                "<option{}>{s}</option>",
                selected(f.status.map(|x| x.as_str()) == Some(*s))
            )
        })
        .collect();
    format!(
        "<form method=\"get\" action=\"/messages\" class=\"filters\">\
         <select name=\"stream\" id=\"stream\"><option value=\"\">any stream</option>{stream_options}</select>\
         <select name=\"status\"><option value=\"\">any status</option>{status_options}</select>\
         <input name=\"key\" placeholder=\"key\" value=\"{}\">\
         <input name=\"id\" placeholder=\"id\" value=\"{}\">\
         <input name=\"destination\" placeholder=\"destination\" value=\"{}\">\
         <button id=\"filter\">Filter</button></form>",
        v(&f.key),
        esc(&f.id.map(|i| i.to_string()).unwrap_or_default()),
        v(&f.destination),
    )
}

/// The rows, a dead one with a check box when `selectable`.
fn messages_table(admin: &Admin, rows: &[StoredMessage], selectable: bool) -> String {
    let mut b = String::from("<table id=\"messages\"><tr><th></th><th>seq</th><th>stream</th><th>key</th><th>destination</th><th>status</th><th>attempts</th><th>created</th><th>last error</th></tr>");
    for m in rows {
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
    b
}

/// "N shown of M", when the filters are a status and perhaps a stream (the stats count
/// those; other filters would need a count of their own). Empty otherwise.
fn count_line(f: &MessageFilter, stats: &outbox_core::Stats, shown: usize) -> String {
    let only_stream_and_status = f.key.is_none() && f.id.is_none() && f.destination.is_none();
    let (Some(status), true) = (f.status, only_stream_and_status) else {
        return String::new();
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
    format!(
        "<p class=\"muted\" id=\"count\">{shown} shown of {total} {} messages{}.</p>",
        status.as_str(),
        f.stream
            .as_deref()
            .map(|s| format!(" in stream {}", esc(s)))
            .unwrap_or_default()
    )
}

/// Requeue or purge every dead letter this page's filters match: each filter goes along.
fn all_matching_form(admin: &Admin, f: &MessageFilter) -> String {
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
    format!(
        "<form method=\"post\" action=\"/actions\">{}{scope}\
         <button name=\"action\" value=\"requeue\" id=\"requeue-all\">Requeue all of them</button> \
         <button name=\"action\" value=\"purge\" id=\"purge-all\">Purge all of them</button></form>",
        csrf_field(admin)
    )
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
