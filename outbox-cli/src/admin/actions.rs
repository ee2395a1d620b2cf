//! The actions (requeue, purge, resume, skip, park): their scope, the confirmation that says
//! what they take, and the form that runs them.

use maud::{html, Markup};

use super::*;

/// Which dead letters an action takes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scope {
    /// These rows (those of them still dead).
    Seqs(Vec<i64>),
    /// Every dead letter matching every filter set (none set: every dead letter).
    Matching(MessageFilter),
}

impl Scope {
    /// One statement when the store can select the rows itself (nothing but a stream).
    pub(crate) fn selector(&self) -> Option<Selector> {
        match self {
            Scope::Seqs(q) => Some(Selector::Seqs(q.clone())),
            Scope::Matching(f) if f.destination.is_none() && f.key.is_none() && f.id.is_none() => {
                Some(f.stream.clone().map_or(Selector::All, Selector::Stream))
            }
            Scope::Matching(_) => None,
        }
    }

    /// In words: "dead letters of stream "emails" to destination "email.bounce"".
    pub(crate) fn words(&self) -> String {
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
    pub(crate) async fn preview(
        &self,
        store: &dyn StoreAdmin,
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

    pub(crate) fn page(&self, f: &MessageFilter, before: Option<i64>) -> MessageFilter {
        MessageFilter {
            status: Some(Status::Dead),
            before,
            limit: outbox_core::MAX_PAGE,
            ..f.clone()
        }
    }

    /// Requeue (or purge) them: one statement when the store can select them, else a page
    /// at a time (each page's rows by seq). The count changed.
    pub(crate) async fn apply(&self, store: &dyn StoreAdmin, purge: bool) -> Result<u64, Failure> {
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
pub(crate) enum Action {
    Requeue(Scope),
    Purge(Scope),
    Resume(String, String),
    Skip(String, String),
    Park(String, String, String),
}

impl Action {
    /// Its name, as the API and the command take it.
    pub(crate) fn name(&self) -> &'static str {
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
    pub(crate) fn parse(fields: &[(String, String)]) -> Result<Self, Failure> {
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
    pub(crate) async fn question(
        &self,
        store: &dyn StoreAdmin,
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
    pub(crate) async fn run(&self, store: &dyn StoreAdmin) -> Result<(u64, String), Failure> {
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
pub(crate) fn may_change(admin: &Admin, csrf: &str, missing: &str) -> Result<(), Failure> {
    if admin.gate.options.read_only {
        return Err(Failure(
            StatusCode::FORBIDDEN,
            "this console is read-only (--read-only)".into(),
        ));
    }
    if !same(csrf, &admin.gate.csrf) {
        return Err(Failure(StatusCode::FORBIDDEN, missing.into()));
    }
    Ok(())
}

/// A few rows for a confirmation: what will change, before it does.
pub(crate) fn rows_table(admin: &Admin, rows: &[StoredMessage], total: u64) -> Markup {
    if rows.is_empty() {
        return html! {};
    }
    html! {
        table #affected {
            tr { th { "seq" } th { "stream" } th { "key" } th { "destination" } th { "attempts" } th { "last error" } }
            @for m in rows {
                @let msg = &m.envelope.message;
                tr {
                    td { a href={ (admin.base) "/messages/" (m.seq) } { (m.seq) } }
                    td { (Shown(&msg.stream)) }
                    td { (Shown(msg.key.as_deref().unwrap_or(""))) }
                    td { (Shown(&msg.destination)) }
                    td.n { (m.attempts) }
                    td { (Shown(&short(&admin.last_error(m)))) }
                }
            }
        }
        @if total > rows.len() as u64 {
            p.muted { "… and " (total - rows.len() as u64) " more." }
        }
    }
}

pub(crate) async fn action_form(
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
            return Ok(layout(
                &admin.nav(),
                "Confirm",
                html! {
                    p #question { (Shown(&question)) "?" }
                    (rows_table(&admin, &rows, total))
                    form method="post" action=(admin.url("/actions")) {
                        @for (n, v) in &fields { input type="hidden" name=(n) value=(v); }
                        input type="hidden" name="confirm" value="yes";
                        button #confirm { "Yes, do it" } " "
                        a href=(admin.url("/")) { "Cancel" }
                    }
                },
            ));
        }
        let (changed, sentence) = action.run(admin.store.as_ref()).await?;
        tracing::info!(action = %sentence, changed, by = %who.0, store = admin.name.as_deref().unwrap_or(""), "admin action");
        Ok(layout(
            &admin.nav(),
            "Done",
            html! {
                p #result { (Shown(&sentence)) }
                p { a href=(admin.url("/")) { "Overview" } " · " a href=(admin.url("/messages?status=dead")) { "Dead letters" } }
            },
        ))
    }
    .await;
    match result {
        Ok(b) => Html(b).into_response(),
        Err(f) => page_error(f),
    }
}
