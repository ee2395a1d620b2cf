//! Signature verification keys for the relay, from a file, the environment or the config
//! file: never from a flag (flags show in `ps` and shell history), never printed.

use std::path::Path;

use outbox_core::{Error, Signer, SigningKey};

/// The keys of the first source that is set, in the order the CLI reads settings: the keys
/// file named by `--signing-keys-file` / `OUTBOX_SIGNING_KEYS_FILE`, then
/// `OUTBOX_SIGNING_KEYS` (entries separated by whitespace or commas), then the config file's
/// `relay.signing_keys_file`, then its `relay.signing_keys` list. Each key is `id:secret`,
/// the active key first. `None` when no source is set.
pub fn load(
    file_flag: Option<&Path>,
    env_keys: Option<&str>,
    config_file: Option<&Path>,
    config_keys: Option<&[String]>,
) -> Result<Option<Signer>, Error> {
    if let Some(path) = file_flag {
        return read_file(path).map(Some);
    }
    if let Some(text) = env_keys {
        let entries = text
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|e| !e.is_empty());
        return from_entries(entries, "OUTBOX_SIGNING_KEYS").map(Some);
    }
    if let Some(path) = config_file {
        return read_file(path).map(Some);
    }
    config_keys
        .map(|keys| from_entries(keys.iter().map(String::as_str), "relay.signing_keys"))
        .transpose()
}

fn read_file(path: &Path) -> Result<Signer, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::config(format!("cannot read signing keys file {}", path.display())).with_source(e)
    })?;
    warn_if_readable_by_others(path);
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        keys.push(SigningKey::parse(line).map_err(|e| {
            Error::config(format!(
                "signing keys file {} line {}: {e}",
                path.display(),
                n + 1
            ))
        })?);
    }
    Signer::from_keys(keys)
        .map_err(|e| Error::config(format!("signing keys file {}: {e}", path.display())))
}

fn from_entries<'a>(entries: impl Iterator<Item = &'a str>, source: &str) -> Result<Signer, Error> {
    let keys = entries
        .enumerate()
        .map(|(i, entry)| {
            SigningKey::parse(entry)
                .map_err(|e| Error::config(format!("{source} entry {}: {e}", i + 1)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Signer::from_keys(keys).map_err(|e| Error::config(format!("{source}: {e}")))
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "signing keys file is readable by other users; chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_in_order_and_errors_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(
            &path,
            "# rotation\nk2:second-secret-0123456789\n\nk1:first-secret-0123456789\n",
        )
        .unwrap();
        let ids = |s: Option<Signer>| s.unwrap().key_ids().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            ids(load(Some(&path), None, None, None).unwrap()),
            ["k2", "k1"]
        );
        // The flag's file wins over the environment; the environment over the config file.
        let env = "e1:env-secret-0123456789, e2:env2-secret-0123456789";
        assert_eq!(
            ids(load(Some(&path), Some(env), None, None).unwrap()),
            ["k2", "k1"]
        );
        assert_eq!(
            ids(load(None, Some(env), Some(&path), None).unwrap()),
            ["e1", "e2"]
        );
        let listed = vec!["c1:config-secret-0123456789".to_owned()];
        assert_eq!(ids(load(None, None, None, Some(&listed)).unwrap()), ["c1"]);
        assert!(load(None, None, None, None).unwrap().is_none());

        std::fs::write(&path, "k1:too-short\n").unwrap();
        let e = load(Some(&path), None, None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("line 1") && !e.contains("too-short"), "{e}");
        let e = load(None, Some("k1 k2:s"), None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("OUTBOX_SIGNING_KEYS entry 1"), "{e}");
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(load(Some(&path), None, None, None).is_err());
        assert!(load(Some(&dir.path().join("missing")), None, None, None).is_err());
    }
}
