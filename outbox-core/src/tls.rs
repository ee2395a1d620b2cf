//! Checks of TLS files named in a URL or a setting, at start-up: a missing, unreadable or
//! malformed CA bundle, certificate or key is a [`Config`](crate::ErrorKind::Config) error that
//! names the option and the file, not a handshake failure at the first message. The backends
//! hand the checked bytes to their TLS library (rustls, or OpenSSL inside librdkafka).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// CA bundle and client certificate files for a broker connection, named the way RabbitMQ's
/// URI spec names them: `cacertfile`, `certfile`, `keyfile` (the Redis and RabbitMQ publishers
/// read them from their URL's query).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM CA bundle that signs the server's certificate (default: the system's roots).
    pub ca: Option<PathBuf>,
    /// PEM client certificate (chain), for servers that require one; needs `key`.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert` (unencrypted; protect the file instead).
    pub key: Option<PathBuf>,
}

/// [`TlsFiles`] read and checked.
#[derive(Clone, Default)]
pub struct TlsMaterial {
    /// PEM CA bundle.
    pub ca: Option<Vec<u8>>,
    /// PEM client certificate and key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl TlsFiles {
    /// The names of the URL query parameters.
    pub const PARAMS: [&'static str; 3] = ["cacertfile", "certfile", "keyfile"];

    /// Take `cacertfile`, `certfile` and `keyfile` out of `url`'s query; returns the URL
    /// without them (for the client library) and the files.
    pub fn from_url(url: &str) -> (String, Self) {
        let (rest, params) = take_params(url, &Self::PARAMS);
        let mut files = Self::default();
        for (name, value) in params {
            let path = Some(PathBuf::from(value));
            match name.as_str() {
                "cacertfile" => files.ca = path,
                "certfile" => files.cert = path,
                _ => files.key = path,
            }
        }
        (rest, files)
    }

    /// True when no file is named.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Read and check every named file.
    pub fn load(&self) -> Result<TlsMaterial> {
        let [ca_name, cert_name, key_name] = Self::PARAMS;
        let ca = self
            .ca
            .as_deref()
            .map(|p| read_pem(ca_name, p, PemKind::Certificates))
            .transpose()?;
        let identity = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((
                read_pem(cert_name, c, PemKind::Certificates)?,
                read_pem(key_name, k, PemKind::PrivateKey)?,
            )),
            (None, None) => None,
            _ => {
                return Err(Error::config(format!(
                    "{cert_name} and {key_name} go together: give both or neither"
                )))
            }
        };
        Ok(TlsMaterial { ca, identity })
    }
}

/// Remove the query parameters called `names` from `url`; returns the URL without them and
/// their `(name, value)` pairs, values percent-decoded.
pub fn take_params(url: &str, names: &[&str]) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), Vec::new());
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if names.contains(&k) {
            taken.push((k.to_owned(), percent_decode(v)));
        } else {
            kept.push(pair);
        }
    }
    let mut out = base.to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    (out, taken)
}

/// Decode `%XX` escapes (URL query values: a password holding `&`, `=` or `#` is written
/// `%26`, `%3D`, `%23`).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a PEM file must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemKind {
    /// One or more `CERTIFICATE` blocks (a CA bundle or a certificate chain).
    Certificates,
    /// One unencrypted private key (`PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`).
    PrivateKey,
}

/// Read `path` (given as `option`) and check that it is PEM of `kind`; returns the bytes.
///
/// ```
/// use outbox_core::tls::{read_pem, PemKind};
/// let e = read_pem("sslrootcert", "/nonexistent/ca.pem".as_ref(), PemKind::Certificates).unwrap_err();
/// assert!(e.to_string().contains("sslrootcert"));
/// ```
pub fn read_pem(option: &str, path: &Path, kind: PemKind) -> Result<Vec<u8>> {
    let shown = path.display();
    let bytes = std::fs::read(path)
        .map_err(|e| Error::config(format!("{option}: cannot read {shown}: {e}")).with_source(e))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Error::config(format!("{option}: {shown} is not a PEM file")))?;
    let blocks = pem_blocks(text)
        .map_err(|why| Error::config(format!("{option}: {shown} is not valid PEM: {why}")))?;
    match kind {
        PemKind::Certificates => {
            if !blocks.iter().any(|(label, _)| label == "CERTIFICATE") {
                return Err(Error::config(format!(
                    "{option}: {shown} holds no PEM certificate"
                )));
            }
        }
        PemKind::PrivateKey => {
            if blocks
                .iter()
                .any(|(label, _)| label.starts_with("ENCRYPTED"))
            {
                return Err(Error::config(format!(
                    "{option}: {shown} holds an encrypted private key; decrypt it (openssl pkey) and protect the file instead"
                )));
            }
            let keys = blocks
                .iter()
                .filter(|(label, _)| label.ends_with("PRIVATE KEY"))
                .count();
            if keys != 1 {
                return Err(Error::config(format!(
                    "{option}: {shown} must hold exactly one private key (found {keys})"
                )));
            }
        }
    }
    Ok(bytes)
}

/// The `(label, DER)` blocks of a PEM text.
fn pem_blocks(text: &str) -> std::result::Result<Vec<(String, Vec<u8>)>, String> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        else {
            continue;
        };
        let end = format!("-----END {label}-----");
        let mut body = String::new();
        loop {
            match lines.next() {
                None => return Err(format!("no {end} line")),
                Some(l) if l == end => break,
                Some(l) if l.contains(':') => {} // RFC 1421 headers (Proc-Type, DEK-Info)
                Some(l) => body.push_str(l),
            }
        }
        let der = base64(&body).ok_or_else(|| format!("bad base64 in the {label} block"))?;
        if der.first() != Some(&0x30) {
            return Err(format!("the {label} block is not DER"));
        }
        blocks.push((label.to_owned(), der));
    }
    if blocks.is_empty() {
        return Err("no -----BEGIN block".into());
    }
    Ok(blocks)
}

fn base64(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_taken_out() {
        let (url, files) = TlsFiles::from_url(
            "amqps://u:p@h/%2f?heartbeat=10&cacertfile=/etc/ca%20dir/ca.pem&certfile=c&keyfile=k#x",
        );
        assert_eq!(url, "amqps://u:p@h/%2f?heartbeat=10#x");
        assert_eq!(files.ca.unwrap(), PathBuf::from("/etc/ca dir/ca.pem"));
        assert_eq!(
            (files.cert.unwrap(), files.key.unwrap()),
            ("c".into(), "k".into())
        );
        let (url, files) = TlsFiles::from_url("rediss://h:6380/0");
        assert_eq!(url, "rediss://h:6380/0");
        assert!(files.is_empty());
        let lone = TlsFiles {
            cert: Some("c".into()),
            ..Default::default()
        };
        assert!(lone.load().unwrap_err().to_string().contains("go together"));
    }

    #[test]
    fn base64_decodes() {
        assert_eq!(base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(base64("aGk=").unwrap(), b"hi");
        assert!(base64("a").is_none());
        assert!(base64("a$==").is_none());
    }

    #[test]
    fn files_are_checked_by_kind() {
        let dir = std::env::temp_dir().join(format!("outbox-pem-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        // "MAA=" is DER for an empty SEQUENCE: enough for the shape check.
        let cert = write(
            "c.pem",
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        );
        let key = write(
            "k.pem",
            "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n",
        );
        let enc = write(
            "e.pem",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMAA=\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let junk = write("j.pem", "not a certificate");
        let broken = write(
            "b.pem",
            "-----BEGIN CERTIFICATE-----\nM$A=\n-----END CERTIFICATE-----\n",
        );
        assert!(read_pem("ca", &cert, PemKind::Certificates).is_ok());
        assert!(read_pem("key", &key, PemKind::PrivateKey).is_ok());
        for (path, kind, says) in [
            (&key, PemKind::Certificates, "no PEM certificate"),
            (&cert, PemKind::PrivateKey, "exactly one private key"),
            (&enc, PemKind::PrivateKey, "encrypted"),
            (&junk, PemKind::Certificates, "not valid PEM"),
            (&broken, PemKind::Certificates, "bad base64"),
        ] {
            let e = read_pem("opt", path, kind).unwrap_err().to_string();
            assert!(e.contains("opt") && e.contains(says), "{e}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
