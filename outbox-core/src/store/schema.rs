//! The schema as a store reports it, and its numbered steps.

use crate::error::{Error, Result};

/// What [`StoreAdmin::schema`](crate::StoreAdmin::schema) found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaReport {
    /// Tables and indexes `migrate` makes that are not there (`table.index` where index
    /// names are per table, as on MySQL).
    pub missing: Vec<String>,
    /// Objects of an older version that `migrate` removes.
    pub legacy: Vec<String>,
    /// The schema version the table records (`<table>_schema`); `None` for a table made
    /// before versions were recorded, or without one. [`SCHEMA_VERSION`] when current.
    pub version: Option<u32>,
}

/// One numbered step of the outbox schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaStep {
    /// Its number: steps apply in this order, each once.
    pub version: u32,
    /// What it makes or changes.
    pub name: &'static str,
}

/// The outbox schema, step by step, oldest first. Every store's `migrate` applies the steps
/// after the version its table records in `<table>_schema`, recording each with its time, so
/// a change of the schema is a new step here and in each store, never an edit of an old one.
/// A table made before versions were recorded has none: step 1 brings any such table (every
/// shape an earlier build made) up to the first recorded version, losing no row.
pub const SCHEMA_STEPS: &[SchemaStep] = &[SchemaStep {
    version: 1,
    name: "the outbox tables, indexes and columns (brings a table made before schema versions up to date)",
}];

/// The schema version this build makes: the last of [`SCHEMA_STEPS`].
pub const SCHEMA_VERSION: u32 = SCHEMA_STEPS[SCHEMA_STEPS.len() - 1].version;

impl SchemaStep {
    /// The steps a table that records `found` still needs (`None`: none recorded), in order.
    /// A table newer than this build is an error: an older build must not run against a
    /// schema it does not know.
    pub fn after(table: &str, found: Option<u32>) -> Result<Vec<SchemaStep>> {
        let found = found.unwrap_or(0);
        if found > SCHEMA_VERSION {
            return Err(Error::new(
                crate::ErrorKind::Config,
                crate::Retry::Permanent,
                format!(
                    "table {table} has schema version {found}, newer than this build knows ({SCHEMA_VERSION}): run a newer outbox against it"
                ),
            ));
        }
        Ok(SCHEMA_STEPS
            .iter()
            .copied()
            .filter(|s| s.version > found)
            .collect())
    }
}

impl SchemaReport {
    /// Which of `expected` are missing and which of `legacy` are there, asking `exists`; and
    /// the version `table`'s versions table (`<table>_schema`, itself expected) records,
    /// asking `version` when it is there.
    pub async fn check<F, Fut, V, VFut>(
        table: &str,
        expected: &[String],
        legacy: &[String],
        exists: F,
        version: V,
    ) -> Result<Self>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
        V: FnOnce() -> VFut,
        VFut: std::future::Future<Output = Result<Option<i64>>>,
    {
        let mut report = Self::default();
        for name in expected {
            if !exists(name.clone()).await? {
                report.missing.push(name.clone());
            }
        }
        for name in legacy {
            if exists(name.clone()).await? {
                report.legacy.push(name.clone());
            }
        }
        let versions = format!("{table}_schema");
        if exists(versions.clone()).await? {
            report.version = version().await?.map(|v| v.clamp(0, u32::MAX as i64) as u32);
        } else {
            report.missing.push(versions);
        }
        Ok(report)
    }
}
