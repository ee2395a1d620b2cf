//! Placeholder: implemented in the SQL stores issue.
#![forbid(unsafe_code)]

/// PostgreSQL store (feature `postgres`). Placeholder until the SQL stores issue.
#[cfg(feature = "postgres")]
pub mod postgres {}

/// MySQL / MariaDB store (feature `mysql`). Placeholder until the SQL stores issue.
#[cfg(feature = "mysql")]
pub mod mysql {}
