//! `outbox`: run the relay as a process (or a cron job), clean old rows, show counts, manage
//! dead letters, create the table.
//!
//! Settings come from flags, then `OUTBOX_*` environment variables, then an optional TOML
//! file (`--config`), then the defaults. Errors are one line on stderr and a non-zero exit.
#![forbid(unsafe_code)]

mod admin;
mod backends;
mod cli;
mod commands;
mod config;
mod doctor;
mod fleet_cmd;
mod json;
mod logging;
mod metrics_endpoint;
mod output;
mod relay_cmd;
mod report;
mod signing;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use outbox_core::{
    printable, Cleaner, Error, Relay, RelayConfig, RetryPolicy, Selector, Store, StoreAdmin,
    StreamFilter,
};
use serde::Deserialize;

use crate::backends::{open_publisher, AnyStore, CliStore};
use crate::cli::*;
use crate::config::*;
use crate::logging::*;
use crate::output::*;
use crate::report::{exit, Output};

#[tokio::main]
async fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match &cli.command {
        Command::Completions { shell } => {
            let mut text = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "outbox", &mut text);
            return write_out(&text, "the completion script");
        }
        Command::Man => {
            let mut text = Vec::new();
            if let Err(e) = clap_mangen::Man::new(Cli::command()).render(&mut text) {
                eprintln!("error: cannot render the manual page: {e}");
                return ExitCode::from(exit::FAILED);
            }
            return write_out(&text, "the manual page");
        }
        _ => {}
    }
    // JSON asked for (logs or output): errors are JSON too.
    let json_asked =
        cli.log_format == Some(LogFormat::Json) || cli.json || cli.output == Some(Output::Json);
    let file = match load_file(&cli.config) {
        Ok(f) => f,
        Err(e) => {
            report::print_error(&e, json_asked);
            return ExitCode::from(report::exit_code(&e));
        }
    };
    let log_format = cli
        .log_format
        .or(file.log_format)
        .unwrap_or(LogFormat::Human);
    let json_errors =
        json_asked || log_format == LogFormat::Json || file.output == Some(Output::Json);
    init_logging(log_format);
    warn_about_flag_secrets(&matches);
    match commands::run(cli, file).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            report::print_error(&e, json_errors);
            ExitCode::from(report::exit_code(&e))
        }
    }
}
