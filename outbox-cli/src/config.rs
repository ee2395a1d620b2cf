//! The `--config` TOML file, and the layering of a setting: flag or variable, its file,
//! the config file's value, the file the config file names, the default.

use super::*;

/// The TOML file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub(crate) store: Option<String>,
    pub(crate) store_file: Option<PathBuf>,
    pub(crate) table: Option<String>,
    pub(crate) log_format: Option<LogFormat>,
    pub(crate) output: Option<Output>,
    #[serde(default)]
    pub(crate) relay: FileRelay,
    #[serde(default)]
    pub(crate) clean: FileClean,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileRelay {
    pub(crate) publisher: Option<String>,
    pub(crate) store_timeout: Option<String>,
    pub(crate) retry_initial: Option<String>,
    pub(crate) retry_max: Option<String>,
    pub(crate) publisher_file: Option<PathBuf>,
    pub(crate) interval: Option<String>,
    pub(crate) streams: Option<Vec<String>>,
    pub(crate) batch: Option<usize>,
    pub(crate) concurrency: Option<usize>,
    pub(crate) lease: Option<String>,
    pub(crate) publish_timeout: Option<String>,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) delete_after_send: Option<bool>,
    pub(crate) metrics_addr: Option<SocketAddr>,
    pub(crate) signing_keys_file: Option<PathBuf>,
    pub(crate) signing_keys: Option<Vec<String>>,
    pub(crate) require_signatures: Option<bool>,
    pub(crate) allow_unsigned: Option<bool>,
    pub(crate) signing_label: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileClean {
    pub(crate) older_than: Option<String>,
    pub(crate) batch: Option<usize>,
}

pub(crate) fn load_file(path: &Option<PathBuf>) -> Result<FileConfig, Error> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::config(format!("cannot read config file {}", path.display())).with_source(e)
    })?;
    toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| format!(" (line {})", text[..s.start].lines().count().max(1)))
            .unwrap_or_default();
        Error::config(format!(
            "malformed config file {}{line}: {}",
            path.display(),
            without_values(e.message().trim())
        ))
    })
}

/// A TOML error message on one line without the values it quotes (`invalid type: string
/// "k1:s3cret", expected a sequence`: the value may be a secret). What the parser expected
/// and the names of keys (in backticks: `expected `"`, `'``, `unknown field `tabel``) are
/// kept: the user needs them.
pub(crate) fn without_values(message: &str) -> String {
    let chars: Vec<char> = message.chars().collect();
    let mut out = String::with_capacity(message.len());
    let mut in_value = false;
    for (i, &c) in chars.iter().enumerate() {
        // A quote in backticks is a token the parser expected, not a value.
        let token = i > 0 && chars[i - 1] == '`' && chars.get(i + 1) == Some(&'`');
        match c {
            '"' if in_value => {
                in_value = false;
                out.push_str("<value>");
            }
            _ if in_value => {}
            '"' if !token => in_value = true,
            '\n' => out.push_str("; "),
            c => out.push(c),
        }
    }
    out
}

/// A URL from, in order: the flag or its environment variable, the file named by the `-file`
/// flag or variable, the config file's value, the file the config file names. A URL read from
/// a file loses surrounding whitespace (a trailing newline).
pub(crate) fn first_of(
    value: Option<String>,
    value_file: &Option<PathBuf>,
    config_value: Option<String>,
    config_file: &Option<PathBuf>,
    what: &str,
) -> Result<Option<String>, Error> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| {
                Error::config(format!(
                    "cannot read the {what} URL file {}: {e}",
                    path.display()
                ))
            })
    };
    if value.is_some() {
        return Ok(value);
    }
    if let Some(p) = value_file {
        return read(p).map(Some);
    }
    if config_value.is_some() {
        return Ok(config_value);
    }
    config_file.as_ref().map(read).transpose()
}

pub(crate) fn duration(field: &str, value: Option<String>) -> Result<Option<Duration>, Error> {
    value
        .map(|v| {
            humantime::parse_duration(&v)
                .map_err(|e| Error::config(format!("{field} = {v:?}: {e}")))
        })
        .transpose()
}

#[cfg(test)]
mod toml_messages {
    use super::without_values;

    #[test]
    pub(crate) fn values_go_tokens_and_keys_stay() {
        assert_eq!(
            without_values("invalid type: string \"k1:s3cret\", expected a sequence"),
            "invalid type: string <value>, expected a sequence"
        );
        assert_eq!(
            without_values("invalid string\nexpected `\"`, `'`"),
            "invalid string; expected `\"`, `'`"
        );
        assert_eq!(
            without_values("unknown field `tabel`, expected one of `table`, `store`"),
            "unknown field `tabel`, expected one of `table`, `store`"
        );
    }
}
