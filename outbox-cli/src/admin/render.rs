//! HTML helpers: escaping, URLs, the page layout, times, the CSRF field, unit buttons.

use super::*;

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
pub(crate) fn enc(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(crate) fn layout(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · outbox</title>\
         <link rel=\"stylesheet\" href=\"/style.css\"></head><body>\
         <nav><strong>outbox</strong> <a href=\"/\">Overview</a> <a href=\"/messages\">Messages</a> \
         <a href=\"/messages?status=dead\">Dead letters</a></nav><main><h1>{}</h1>{body}</main></body></html>",
        esc(title),
        esc(title)
    )
}

pub(crate) fn age(t: SystemTime) -> String {
    let d = SystemTime::now().duration_since(t).unwrap_or_default();
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

pub(crate) fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub(crate) async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("admin.css"),
    )
        .into_response()
}

pub(crate) fn csrf_field(admin: &Admin) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(&admin.csrf)
    )
}

pub(crate) fn unit_buttons(admin: &Admin, u: &ParkedUnit) -> String {
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
