//! HTML helpers: the page layout, text as shown, URLs, times, the CSRF field, unit buttons.
//! Pages are `maud` templates: text interpolated into them is escaped by the template
//! engine, not by each call site.

use maud::{html, Markup, Render, DOCTYPE};

use super::*;

/// Text from the store (names, errors, payloads) as a page shows it: escaped, and control
/// characters other than newline and tab made visible (`\u{1b}`), so a terminal escape
/// sequence in a stream name or a payload cannot hide or fake what follows it.
pub(crate) struct Shown<'a>(pub(crate) &'a str);

impl Render for Shown<'_> {
    fn render_to(&self, buffer: &mut String) {
        let mut out = maud::Escaper::new(buffer);
        for c in self.0.chars() {
            let _ = if c.is_control() && c != '\n' && c != '\t' {
                write!(out, "\\u{{{:x}}}", c as u32)
            } else {
                out.write_char(c)
            };
        }
    }
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

/// What a page's navigation links to: its store's pages (under `base`), and with several
/// stores, the totals page and a picker.
#[derive(Default)]
pub(crate) struct Nav<'a> {
    /// The path the store's pages are under: empty with one store, `/s/<name>` with several.
    pub(crate) base: &'a str,
    /// The store shown, with several.
    pub(crate) store: Option<&'a str>,
    /// Every store's name, with several (empty with one).
    pub(crate) stores: &'a [String],
}

impl Nav<'_> {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

pub(crate) fn layout(nav: &Nav<'_>, title: &str, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · outbox" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                nav {
                    strong { "outbox" } " "
                    @if !nav.stores.is_empty() {
                        a href="/" { "All stores" } " "
                        // No script: a GET form, answered by a redirect to the store's pages.
                        form method="get" action="/pick" class="inline" {
                            select name="store" #store aria-label="store" {
                                @for s in nav.stores {
                                    option value=(s) selected[nav.store == Some(s.as_str())] { (Shown(s)) }
                                }
                            }
                            " " button #pick { "Open" }
                        }
                        " "
                    }
                    @if nav.stores.is_empty() || nav.store.is_some() {
                        a href=(nav.url("/")) { "Overview" } " "
                        a href=(nav.url("/messages")) { "Messages" } " "
                        a href=(nav.url("/messages?status=dead")) { "Dead letters" }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
    .into_string()
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

pub(crate) fn csrf_field(admin: &Admin) -> Markup {
    html! { input type="hidden" name="csrf" value=(admin.gate.csrf); }
}

pub(crate) fn unit_buttons(admin: &Admin, u: &ParkedUnit) -> Markup {
    if admin.gate.options.read_only {
        return html! {};
    }
    html! {
        form method="post" action=(admin.url("/actions")) class="inline" {
            (csrf_field(admin))
            input type="hidden" name="stream" value=(u.stream);
            input type="hidden" name="unit" value=(u.unit);
            button name="action" value="resume" { "Resume" } " "
            button name="action" value="skip" { "Skip head" }
        }
    }
}
