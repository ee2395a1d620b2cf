//! One redactor for every URL that reaches a log line, an error or a `Debug` output.

/// Query parameter names whose values are secrets (compared in lower case, as substrings).
const SECRET_PARAMS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "passphrase",
    "credential",
    "jaas",
    ".pem",
];

/// `url` with its secrets replaced by `***`: the password of the user info (whatever
/// characters it holds: `/ ? # @ :` included, since users paste generated passwords unencoded)
/// and the value of every query parameter whose name looks secret (`sasl.password`,
/// `ssl.key.password`, `token`, inline `*.pem`, ...). Host, port, path and other parameters are
/// kept so the result still says where a connection went. A string without `scheme://` is
/// kept when it is a path, `host:port` or a word, loses its user information, and is
/// `<redacted>` otherwise.
///
/// ```
/// use outbox_core::redact_url;
/// assert_eq!(redact_url("postgres://app:Abc/D?f#g@h@db:5432/shop?sslmode=require"),
///            "postgres://app:***@db:5432/shop?sslmode=require");
/// assert_eq!(redact_url("kafka://k1:9092?sasl.username=u&sasl.password=hunter2"),
///            "kafka://k1:9092?sasl.username=u&sasl.password=***");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL. A path, `host:port` or a word (`stdout`) is shown as it is: the user
        // needs to see what was wrong with it. User information (`user:password@host`) goes,
        // and so does anything else (`user:pw`, text with spaces: a password pasted into
        // the wrong place).
        if let Some((_, host)) = url.rsplit_once('@') {
            return format!("***@{host}");
        }
        let plain = url
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/~+-:".contains(c));
        let after_colon = url.rsplit_once(':').map(|(_, p)| p);
        let harmless = plain
            && (after_colon.is_none()
                || after_colon
                    .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                || url.contains(['/', '.']));
        return if harmless {
            url.to_owned()
        } else {
            "<redacted>".to_owned()
        };
    };
    if !is_scheme(scheme) {
        return "<redacted>".to_owned();
    }
    let with_userinfo = match rest.rfind('@') {
        Some(at) => {
            let (userinfo, host) = (&rest[..at], &rest[at + 1..]);
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                // NATS takes a lone user part as a token: a secret.
                None if matches!(scheme.to_ascii_lowercase().as_str(), "nats" | "tls") => {
                    format!("{scheme}://***@{host}")
                }
                None => format!("{scheme}://{userinfo}@{host}"),
            }
        }
        None => format!("{scheme}://{rest}"),
    };
    redact_params(&with_userinfo)
}

fn is_scheme(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Replace the value of every `?name=` / `&name=` parameter with a secret-looking name.
fn redact_params(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(['?', '&']) {
        out.push_str(&rest[..=i]);
        rest = &rest[i + 1..];
        let end = rest.find(['&', '#']).unwrap_or(rest.len());
        let param = &rest[..end];
        match param.split_once('=') {
            Some((name, _)) if is_secret_param(name) => {
                out.push_str(name);
                out.push_str("=***");
            }
            _ => out.push_str(param),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Whether a setting or parameter called `name` holds a secret (`sasl.password`,
/// `ssl.key.password`, `token`, inline `*.pem`, ...): its value is never printed.
pub fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS.iter().any(|p| name.contains(p))
}

/// `text` safe for a terminal or a log line: control characters (ESC sequences, CR, LF, ...)
/// are written as escapes (`\u{1b}`, `\r`, `\n`), everything else as is. Rows are input: a
/// stream name or an error written by someone else must not drive the operator's terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::{printable, redact_url};

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("orders"), "orders");
        assert_eq!(printable("a\u{1b}[31mred\r\n"), "a\\u{1b}[31mred\\r\\n");
        assert_eq!(printable("é🦀\ttab"), "é🦀\\ttab");
    }

    #[test]
    fn passwords_with_any_character_are_hidden() {
        for password in [
            "hunter2",
            "Abc/Def=",
            "p?ss",
            "p#ss",
            "p@ss",
            "a:b",
            "x/y?z#w@v:u",
        ] {
            let url =
                format!("postgres://app:{password}@db.internal:5432/shop?sslmode=verify-full");
            let r = redact_url(&url);
            assert_eq!(
                r, "postgres://app:***@db.internal:5432/shop?sslmode=verify-full",
                "{password}"
            );
        }
        assert_eq!(
            redact_url("nats://S3CRET-TOKEN@127.0.0.1:4222"),
            "nats://***@127.0.0.1:4222",
            "NATS takes a lone user part as a token"
        );
        assert_eq!(
            redact_url("postgres://app@db/shop"),
            "postgres://app@db/shop"
        );
        assert_eq!(
            redact_url("redis://:s3cret@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("mysql://root@127.0.0.1/test"),
            "mysql://root@127.0.0.1/test"
        );
        assert_eq!(redact_url("stdout"), "stdout");
        // Not URLs: what the user needs to see stays, what may be a secret goes.
        assert_eq!(redact_url("sqlite:app.db"), "sqlite:app.db");
        assert_eq!(redact_url("data/app.db"), "data/app.db");
        assert_eq!(redact_url("127.0.0.1:6379"), "127.0.0.1:6379");
        assert_eq!(redact_url("user:pw"), "<redacted>");
        assert_eq!(redact_url("app:s3cret@db:5432"), "***@db:5432");
        assert_eq!(redact_url("pw with spaces"), "<redacted>");
    }

    #[test]
    fn secret_parameters_are_hidden() {
        let r = redact_url(
            "kafka://k1:9092,k2:9092?security.protocol=sasl_ssl&sasl.username=svc&sasl.password=pw1&ssl.key.password=pw2&ssl.ca.location=/ca.pem",
        );
        assert_eq!(
            r,
            "kafka://k1:9092,k2:9092?security.protocol=sasl_ssl&sasl.username=svc&sasl.password=***&ssl.key.password=***&ssl.ca.location=/ca.pem"
        );
        // An '@' in a parameter must not make a secret parameter escape.
        let r = redact_url("kafka://k1:9092?sasl.username=a@b&sasl.password=pw3");
        assert!(!r.contains("pw3"), "{r}");
        let r = redact_url("amqps://u:pw4@mq/%2f?token=abc&heartbeat=10#frag");
        assert_eq!(r, "amqps://u:***@mq/%2f?token=***&heartbeat=10#frag");
        assert!(!redact_url("x://h?ssl.key.pem=-----BEGIN").contains("BEGIN"));
    }
}
