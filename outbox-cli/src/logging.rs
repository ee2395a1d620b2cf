//! Logs on stderr: human or JSON, with the caps that keep clients from logging credentials,
//! and the warnings about secrets given as flags.

use super::*;

pub(crate) fn init_logging(format: LogFormat) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Clients that log credentials at verbose levels are capped, whatever RUST_LOG asks (and
    // left alone when it asks for less): the AMQP client logs its handshake at trace, SASL
    // credentials included (capped at debug); the NATS client its CONNECT at debug (capped at
    // info). A directive is added only above the cap: it must never raise a level.
    let asked = filter.max_level_hint();
    for (targets, cap) in [
        (
            &[
                "lapin",
                "amq_protocol",
                "amq_protocol_tcp",
                "amq_protocol_types",
            ][..],
            tracing_subscriber::filter::LevelFilter::DEBUG,
        ),
        (
            &["async_nats"][..],
            tracing_subscriber::filter::LevelFilter::INFO,
        ),
    ] {
        if asked.is_some_and(|a| a > cap) {
            for target in targets {
                if let Ok(d) = format!("{target}={cap}").parse() {
                    filter = filter.add_directive(d);
                }
            }
        }
    }
    // PostgreSQL's "relation … already exists, skipping" notices of an idempotent migrate are
    // not news.
    if let Ok(d) = "sqlx::postgres::notice=warn".parse() {
        filter = filter.add_directive(d);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(report::colour())
        .with_writer(std::io::stderr);
    match format {
        // Flat fields, as the error line prints them.
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Human => builder.init(),
    }
}

/// Warn when a URL with a password came from a flag: flags show in `ps` and shell history.
pub(crate) fn warn_about_flag_secrets(matches: &clap::ArgMatches) {
    let check = |m: &clap::ArgMatches, id: &str, instead: &str| {
        let from_flag = m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        if let (true, Some(url)) = (from_flag, m.get_one::<String>(id)) {
            if outbox_core::redact_url(url) != *url {
                tracing::warn!(
                    "--{id} carries a password, which other users can read in the process list; use {instead}"
                );
            }
        }
    };
    check(matches, "store", "OUTBOX_STORE or --store-file");
    if let Some(("admin", admin)) = matches.subcommand() {
        if admin.value_source("auth_token") == Some(clap::parser::ValueSource::CommandLine) {
            tracing::warn!("--auth-token is on the command line, where other users of this machine can read it (ps): use OUTBOX_ADMIN_TOKEN or --auth-token-file");
        }
    }
    if let Some(("relay", relay)) = matches.subcommand() {
        check(relay, "publisher", "OUTBOX_PUBLISHER or --publisher-file");
    }
}
