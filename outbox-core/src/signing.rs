//! HMAC-SHA256 signatures over what will be published, with several verification keys for
//! rotation.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, ErrorKind, Result, Retry};
use crate::message::{to_millis, Envelope, Exhausted, Order, StoredMessage};

type HmacSha256 = Hmac<Sha256>;

/// A named secret. `Debug` never shows the secret.
#[derive(Clone)]
pub struct SigningKey {
    id: String,
    secret: Vec<u8>,
}

impl SigningKey {
    /// A key; `id` is stored with each signature so the verifier knows which key to use.
    pub fn new(id: impl Into<String>, secret: impl Into<Vec<u8>>) -> Result<Self> {
        let id = id.into();
        let secret = secret.into();
        if id.is_empty() || id.contains(':') {
            return Err(Error::config(
                "signing key id must be non-empty and without ':'",
            ));
        }
        if secret.len() < 16 {
            return Err(Error::config("signing secret must be at least 16 bytes"));
        }
        Ok(Self { id, secret })
    }

    /// The key id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A key from its text form `id:secret` (the form the `outbox` command reads from its
    /// keys file, `OUTBOX_SIGNING_KEYS` or its config file): the id up to the first `:`, and
    /// the secret's UTF-8 bytes after it, so `SigningKey::parse("k1:s3cret…")` equals
    /// `SigningKey::new("k1", "s3cret…")`. Errors never contain the secret.
    ///
    /// ```
    /// let key = outbox_core::SigningKey::parse("k1:0123456789abcdef-secret").unwrap();
    /// assert_eq!(key.id(), "k1");
    /// assert!(outbox_core::SigningKey::parse("no-colon-here").is_err());
    /// ```
    pub fn parse(spec: &str) -> Result<Self> {
        let Some((id, secret)) = spec.split_once(':') else {
            return Err(Error::config(
                "signing key must be written id:secret (no ':' found)",
            ));
        };
        Self::new(id.trim(), secret.as_bytes().to_vec())
            .map_err(|e| Error::config(format!("signing key {:?}: {e}", id.trim())))
    }

    fn mac(&self, envelope: &Envelope, signed: &Signed<'_>) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
        let m = &envelope.message;
        let mut field = |bytes: &[u8]| {
            mac.update(&(bytes.len() as u64).to_be_bytes());
            mac.update(bytes);
        };
        // Version 2: a domain label, then everything that decides what is published, where,
        // in which unit, in which order and under which strategy.
        field(b"outbox-mac-v2");
        field(signed.label.as_bytes());
        field(signed.scope.as_bytes());
        field(envelope.id.to_string().as_bytes());
        field(&to_millis(envelope.created_at).to_be_bytes());
        field(signed.plan.order.as_str().as_bytes());
        field(m.stream.as_bytes());
        field(m.destination.as_bytes());
        match &m.key {
            Some(k) => {
                field(b"1");
                field(k.as_bytes());
            }
            None => field(b"0"),
        }
        field(m.content_type.as_bytes());
        field(&(m.headers.len() as u64).to_be_bytes());
        for (k, v) in &m.headers {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        field(&m.payload);
        // Answers beyond the first schema's (a unit other than the key, an exhaustion
        // policy) follow, only when present, so signatures made before they existed verify.
        let unit_moved = signed.plan.order == Order::InUnit
            && signed.plan.unit != m.key.as_deref().unwrap_or("");
        if unit_moved || signed.plan.exhausted != Exhausted::Default {
            field(b"plan");
            field(signed.plan.unit.as_bytes());
            field(signed.plan.exhausted.as_stored().unwrap_or("").as_bytes());
        }
        mac
    }
}

/// The stored strategy answers a signature covers: a row moved to another unit, or made
/// unordered, or given another exhaustion policy, does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedPlan<'a> {
    /// How the row is claimed.
    pub order: Order,
    /// Its unit.
    pub unit: &'a str,
    /// Its exhaustion policy.
    pub exhausted: Exhausted,
}

/// What a signature binds besides the message: the strategy's answers, the signer's
/// deployment label and the store's scope (its table).
struct Signed<'a> {
    plan: &'a SignedPlan<'a>,
    label: &'a str,
    scope: &'a str,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Signs with one active key and verifies with the active key plus older ones.
///
/// A signature (`key-id:v2:hex`) covers the message id, `created_at`, strategy, stream,
/// destination, key, content type, headers and payload, the signer's
/// [`label`](Self::label) and the store's table: a row changed in any of these, or copied into
/// another outbox table or deployment, does not verify. Replaying a signed row in the same
/// table (after it was sent) is possible; consumers de-duplicate on the message id.
#[derive(Debug, Clone)]
pub struct Signer {
    active: SigningKey,
    previous: Vec<SigningKey>,
    label: String,
}

impl Signer {
    /// Sign and verify with `active`.
    pub fn new(active: SigningKey) -> Self {
        Self {
            active,
            previous: Vec::new(),
            label: String::new(),
        }
    }

    /// A signer over `keys`: the first signs and verifies, the others only verify (keys being
    /// retired). Fails on an empty list or a repeated key id.
    pub fn from_keys(keys: impl IntoIterator<Item = SigningKey>) -> Result<Self> {
        let mut keys = keys.into_iter();
        let Some(active) = keys.next() else {
            return Err(Error::config("no signing key given"));
        };
        let mut signer = Self::new(active);
        for key in keys {
            if signer.key_ids().any(|id| id == key.id) {
                return Err(Error::config(format!(
                    "signing key id {:?} is given twice",
                    key.id
                )));
            }
            signer.previous.push(key);
        }
        Ok(signer)
    }

    /// A deployment label bound into every signature (say `"billing-prod"`), so rows signed
    /// by one deployment never verify in another that shares the key. Default: empty.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// The ids of every key, the active one first (ids are not secret).
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        std::iter::once(&self.active)
            .chain(&self.previous)
            .map(|k| k.id.as_str())
    }

    /// Also accept signatures made with `key` (a retired key during rotation).
    pub fn accept(mut self, key: SigningKey) -> Self {
        self.previous.push(key);
        self
    }

    /// `key-id:v2:hex(hmac)` over the message, its `strategy`, this signer's label and `scope`
    /// (the store's [`signing_scope`](crate::Store::signing_scope)).
    pub fn sign(&self, envelope: &Envelope, plan: &SignedPlan<'_>, scope: &str) -> String {
        let signed = Signed {
            plan,
            label: &self.label,
            scope,
        };
        let tag = self.active.mac(envelope, &signed).finalize().into_bytes();
        let mut out = String::with_capacity(self.active.id.len() + 68);
        out.push_str(&self.active.id);
        out.push_str(":v2:");
        for b in tag {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// Check a stored signature; any failure is an [`ErrorKind::Tampered`] error. Signatures
    /// of the first format (`key-id:hex`, which covered neither strategy, time nor table)
    /// are refused.
    pub fn verify(
        &self,
        envelope: &Envelope,
        plan: &SignedPlan<'_>,
        scope: &str,
        signature: Option<&str>,
    ) -> Result<()> {
        let tampered = |why: &str| {
            Err(Error::new(
                ErrorKind::Tampered,
                Retry::Permanent,
                format!("message {}: {why}", envelope.id),
            ))
        };
        let Some(sig) = signature else {
            return tampered("no signature while signing is required");
        };
        let Some((key_id, rest)) = sig.split_once(':') else {
            return tampered("malformed signature");
        };
        let Some(hex) = rest.strip_prefix("v2:") else {
            return tampered("signature of an older format, which does not cover strategy, time and table: re-sign or requeue from the source");
        };
        let Some(key) = std::iter::once(&self.active)
            .chain(&self.previous)
            .find(|k| k.id == key_id)
        else {
            return tampered("signed with an unknown key");
        };
        let Some(bytes) = decode_hex(hex) else {
            return tampered("malformed signature");
        };
        let signed = Signed {
            plan,
            label: &self.label,
            scope,
        };
        // verify_slice compares in constant time.
        key.mac(envelope, &signed)
            .verify_slice(&bytes)
            .or_else(|_| tampered("signature does not match its content"))
    }
}

/// What a relay does with a message it is about to publish, given its keys (`signer`) and
/// whether it refuses unsigned messages (`require`): a signed message is verified; an
/// unsigned one passes unless `require`; a signed message with no key to check it is refused
/// as unverifiable (a signature nobody can check is not a reason to trust it). The polling
/// relay and the WAL relay both decide with this, so one rule covers both.
pub fn check_signature(
    signer: Option<&Signer>,
    require: bool,
    envelope: &Envelope,
    plan: &SignedPlan<'_>,
    scope: &str,
    signature: Option<&str>,
) -> Result<()> {
    match (signer, signature) {
        (Some(signer), Some(_)) => signer.verify(envelope, plan, scope, signature),
        (Some(_), None) if !require => Ok(()),
        (Some(signer), None) => signer.verify(envelope, plan, scope, None),
        (None, Some(_)) => Err(Error::new(
            ErrorKind::Tampered,
            Retry::Permanent,
            format!(
                "message {}: unverifiable: the row is signed but this relay has no verification key",
                envelope.id
            ),
        )),
        (None, None) => Ok(()),
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl StoredMessage {
    /// The strategy answers its signature covers.
    pub fn signed_plan(&self) -> SignedPlan<'_> {
        SignedPlan {
            order: self.order,
            unit: &self.unit,
            exhausted: self.exhausted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Message, MessageId};

    fn env() -> Envelope {
        Envelope {
            id: MessageId::new(),
            created_at: std::time::SystemTime::now(),
            message: Message::new("d", b"payload".to_vec())
                .key("k")
                .header("h", "v"),
        }
    }

    #[test]
    fn sign_verify_tamper_rotate() {
        let old = SigningKey::new("k1", b"0123456789abcdef-old".to_vec()).unwrap();
        let new = SigningKey::new("k2", b"0123456789abcdef-new".to_vec()).unwrap();
        let e = env();
        let ko = &SignedPlan {
            order: Order::InUnit,
            unit: "k",
            exhausted: Exhausted::Default,
        };
        let sig_old = Signer::new(old.clone()).sign(&e, ko, "outbox");
        assert!(sig_old.starts_with("k1:v2:"));

        let rotated = Signer::new(new.clone()).accept(old.clone());
        assert!(rotated.verify(&e, ko, "outbox", Some(&sig_old)).is_ok());
        assert!(rotated
            .verify(&e, ko, "outbox", Some(&rotated.sign(&e, ko, "outbox")))
            .is_ok());
        // Retired key dropped: old signatures are refused.
        let only_new = Signer::new(new);
        assert_eq!(
            only_new
                .verify(&e, ko, "outbox", Some(&sig_old))
                .unwrap_err()
                .kind(),
            ErrorKind::Tampered
        );

        for change in [
            |e: &mut Envelope| e.message.payload.push(b'!'),
            |e: &mut Envelope| e.message.destination.push('x'),
            |e: &mut Envelope| e.message.key = None,
            |e: &mut Envelope| e.message.stream.push('x'),
            |e: &mut Envelope| e.message.content_type.push('x'),
            |e: &mut Envelope| {
                e.message.headers.insert("h".into(), "w".into());
            },
            |e: &mut Envelope| e.id = MessageId::new(),
            |e: &mut Envelope| e.created_at -= std::time::Duration::from_secs(1),
        ] {
            let mut t = e.clone();
            change(&mut t);
            assert_eq!(
                rotated
                    .verify(&t, ko, "outbox", Some(&sig_old))
                    .unwrap_err()
                    .kind(),
                ErrorKind::Tampered
            );
        }
        // The strategy's answers, the table and the deployment label are bound too.
        for plan in [
            SignedPlan {
                order: Order::Unordered,
                ..*ko
            },
            SignedPlan {
                unit: "other-unit",
                ..*ko
            },
            SignedPlan {
                exhausted: Exhausted::DeadLetter,
                ..*ko
            },
        ] {
            assert!(rotated.verify(&e, &plan, "outbox", Some(&sig_old)).is_err());
        }
        let named = SignedPlan {
            unit: "tenant-7",
            exhausted: Exhausted::Block,
            ..*ko
        };
        let sig = rotated.sign(&e, &named, "outbox");
        assert!(rotated.verify(&e, &named, "outbox", Some(&sig)).is_ok());
        assert!(rotated.verify(&e, ko, "outbox", Some(&sig)).is_err());
        assert!(rotated
            .verify(&e, ko, "outbox_copy", Some(&sig_old))
            .is_err());
        let labelled = Signer::new(old.clone()).label("billing-prod");
        assert!(labelled.verify(&e, ko, "outbox", Some(&sig_old)).is_err());
        let sig = labelled.sign(&e, ko, "outbox");
        assert!(labelled.verify(&e, ko, "outbox", Some(&sig)).is_ok());
        assert!(Signer::new(old)
            .label("billing-staging")
            .verify(&e, ko, "outbox", Some(&sig))
            .is_err());
        // The first format is refused.
        let v1 = format!("k1:{}", &sig_old["k1:v2:".len()..]);
        let err = rotated.verify(&e, ko, "outbox", Some(&v1)).unwrap_err();
        assert!(err.to_string().contains("older format"), "{err}");

        assert!(rotated.verify(&e, ko, "outbox", None).is_err());
        assert!(rotated.verify(&e, ko, "outbox", Some("k1:v2:zz")).is_err());
        assert!(format!("{rotated:?}").contains("redacted"));
        assert!(!format!("{rotated:?}").contains("0123456789"));
        assert!(SigningKey::new("k", b"short".to_vec()).is_err());
    }

    /// Signatures written before strategies were a trait (and units a column) still verify:
    /// these vectors were made by that version's `Signer::sign`.
    #[test]
    fn signatures_of_earlier_rows_still_verify() {
        let e = Envelope {
            id: MessageId("0192e4a0-0000-7000-8000-000000000001".parse().unwrap()),
            created_at: crate::message::from_millis(1_730_000_000_000),
            message: Message::new("d", b"payload".to_vec())
                .key("k")
                .header("h", "v"),
        };
        let s = Signer::new(SigningKey::new("k1", b"0123456789abcdef-old".to_vec()).unwrap());
        let keep_order = SignedPlan {
            order: Order::InUnit,
            unit: "k",
            exhausted: Exhausted::Default,
        };
        let ko = "k1:v2:5fd429b23a15feb7f0f78bad319947dfc013ff90a206d10727dad601daf571a1";
        assert_eq!(s.sign(&e, &keep_order, "outbox"), ko);
        assert!(s.verify(&e, &keep_order, "outbox", Some(ko)).is_ok());
        // An unordered row's unit is not covered (0.x stored the key there; now it is empty).
        let oc = "k1:v2:d3d10ed2d40aa28ed00b03f99042c7eeb0636a499e05bcf47f9804260b6a4942";
        for unit in ["k", ""] {
            let plan = SignedPlan {
                order: Order::Unordered,
                unit,
                exhausted: Exhausted::Default,
            };
            assert!(s.verify(&e, &plan, "outbox", Some(oc)).is_ok());
        }
    }

    #[test]
    fn parse_keys_without_leaking_secrets() {
        let k = SigningKey::parse("k1:0123456789abcdef:with-colon").unwrap();
        assert_eq!(k.id(), "k1");
        assert_eq!(k.secret, b"0123456789abcdef:with-colon");
        for bad in ["k1", ":0123456789abcdef", "k1:short-secret"] {
            let e = SigningKey::parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
            assert!(!e.to_string().contains("short-secret"), "{e}");
            assert!(!e.to_string().contains("0123456789abcdef"), "{e}");
        }
        let a = SigningKey::parse("a:0123456789abcdef-a").unwrap();
        let b = SigningKey::parse("b:0123456789abcdef-b").unwrap();
        let s = Signer::from_keys([a.clone(), b]).unwrap();
        assert_eq!(s.key_ids().collect::<Vec<_>>(), ["a", "b"]);
        assert!(Signer::from_keys([a.clone(), a]).is_err());
        assert!(Signer::from_keys([]).is_err());
    }
}
