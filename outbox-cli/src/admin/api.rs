//! The JSON API under `/api/`: the same data and actions as the pages.

use super::*;

pub(crate) async fn api_stats(State(admin): State<Arc<Admin>>) -> Response {
    let stats = match admin.store.stats().await {
        Ok(stats) => stats,
        Err(e) => return api_error(e.into()),
    };
    let mut out = crate::json::stats(&admin.table, &stats, SystemTime::now());
    if let Some((pool, slot)) = &admin.gate.options.wal_slot {
        match outbox_sql::postgres::wal::slot_lag(pool, slot).await {
            Ok(lag) => out["wal"] = crate::json::wal(slot, lag.as_ref()),
            Err(e) => return api_error(e.into()),
        }
    }
    Json(out).into_response()
}

pub(crate) async fn api_messages(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let f = filter_of(&q)?;
        let rows = admin.store.messages(&f).await?;
        Ok::<_, Failure>(crate::json::messages(
            &rows,
            f.limit,
            admin.gate.options.hide_payloads,
        ))
    }
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(f) => api_error(f),
    }
}

pub(crate) async fn api_message(
    State(admin): State<Arc<Admin>>,
    Path(seq): Path<String>,
) -> Response {
    match fetch(&admin, &seq).await {
        Ok(m) => Json(crate::json::message(&m, admin.gate.options.hide_payloads)).into_response(),
        Err(f) => api_error(f),
    }
}

pub(crate) async fn api_parked(State(admin): State<Arc<Admin>>) -> Response {
    match admin.store.parked_units(None, 1000).await {
        Ok(units) => Json(crate::json::parked(&units)).into_response(),
        Err(e) => api_error(e.into()),
    }
}

pub(crate) async fn api_csrf(State(admin): State<Arc<Admin>>) -> Response {
    Json(json!({ "csrf": admin.gate.csrf })).into_response()
}

pub(crate) async fn api_action(
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
