//! The bytes a table-less writer puts in the WAL: one logical message per `enqueue` call,
//! holding that call's rows in order. What the relay reads back is input like any row: every
//! length is checked against what is left before anything is allocated, and a message that
//! does not decode is a typed reason, never a panic.
//!
//! ```text
//! batch  := "OBX1" u32:count record*
//! record := str:id i64:created_ms u8:order u8:exhausted str:unit str:stream str:destination
//!           opt<str>:key str:content_type u32:n (str str)*n bytes:payload opt<str>:signature
//!           u64:delay_ms opt<i64>:not_before_ms
//! str    := u32:len utf-8     bytes := u32:len raw     opt<T> := u8:0 | u8:1 T
//! ```
//! Integers are big-endian.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use outbox_core::{
    from_millis, to_millis, Envelope, Exhausted, Message, NewMessage, Order, PublishedBy, Status,
};

const MAGIC: &[u8; 4] = b"OBX1";

/// Encode `rows` as one logical message.
pub(crate) fn encode(rows: &[NewMessage]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        8 + rows
            .iter()
            .map(|r| 128 + r.envelope.message.payload.len())
            .sum::<usize>(),
    );
    out.extend_from_slice(MAGIC);
    put_u32(&mut out, rows.len());
    for row in rows {
        let m = &row.envelope.message;
        put_str(&mut out, &row.envelope.id.to_string());
        out.extend_from_slice(&to_millis(row.envelope.created_at).to_be_bytes());
        out.push(match row.order {
            Order::Unordered => 0,
            Order::InUnit => 1,
        });
        out.push(match row.exhausted {
            Exhausted::Default => 0,
            Exhausted::DeadLetter => 1,
            Exhausted::Block => 2,
            Exhausted::Park => 3,
        });
        put_str(&mut out, &row.unit);
        put_str(&mut out, &m.stream);
        put_str(&mut out, &m.destination);
        put_opt(&mut out, m.key.as_deref());
        put_str(&mut out, &m.content_type);
        put_u32(&mut out, m.headers.len());
        for (k, v) in &m.headers {
            put_str(&mut out, k);
            put_str(&mut out, v);
        }
        put_bytes(&mut out, &m.payload);
        put_opt(&mut out, row.signature.as_deref());
        let delay = u64::try_from(row.retry_after.as_millis()).unwrap_or(u64::MAX);
        out.extend_from_slice(&delay.to_be_bytes());
        match row.not_before {
            None => out.push(0),
            Some(t) => {
                out.push(1);
                out.extend_from_slice(&to_millis(t).to_be_bytes());
            }
        }
    }
    out
}

/// Decode one logical message back into the rows it holds, in order: pending, for the relay
/// to publish, with no attempt made yet.
#[cfg(test)]
pub(crate) fn decode(bytes: &[u8]) -> Result<Vec<NewMessage>, String> {
    let mut rows = Vec::new();
    decode_each(bytes, |row| rows.push(row))?;
    Ok(rows)
}

/// [`decode`] without the intermediate `Vec`: each row goes to `each` as it is read (the
/// relay's hot path). On an error some rows may have been given already: the caller takes
/// them back, since a message counts whole or not at all.
pub(crate) fn decode_each(bytes: &[u8], mut each: impl FnMut(NewMessage)) -> Result<(), String> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4)? != MAGIC {
        return Err("not an outbox WAL message (bad magic or version)".into());
    }
    let count = r.u32()? as usize;
    // Each record takes at least 40 bytes: a count beyond that is a lie.
    if count > bytes.len() / 40 {
        return Err(format!("claims {count} records in {} bytes", bytes.len()));
    }
    for i in 0..count {
        each(record(&mut r).map_err(|e| format!("record {i}: {e}"))?);
    }
    if r.at != bytes.len() {
        return Err(format!(
            "{} bytes after the last record",
            bytes.len() - r.at
        ));
    }
    Ok(())
}

fn record(r: &mut Reader<'_>) -> Result<NewMessage, String> {
    let id = r.str_ref("id")?;
    let id = id
        .parse()
        .map_err(|_| format!("id {:?} is not a UUID", printable(id)))?;
    let created_at = from_millis(r.i64()?);
    let order = match r.u8()? {
        0 => Order::Unordered,
        1 => Order::InUnit,
        n => return Err(format!("unknown order {n}")),
    };
    let exhausted = match r.u8()? {
        0 => Exhausted::Default,
        1 => Exhausted::DeadLetter,
        2 => Exhausted::Block,
        3 => Exhausted::Park,
        n => return Err(format!("unknown exhaustion policy {n}")),
    };
    let unit = r.str("unit")?;
    let stream = r.str("stream")?;
    let destination = r.str("destination")?;
    let key = r.opt_str("key")?;
    let content_type = r.str("content_type")?;
    let n = r.u32()? as usize;
    // A header takes at least 8 bytes.
    if n > r.left() / 8 {
        return Err(format!("claims {n} headers in {} bytes", r.left()));
    }
    let mut headers = BTreeMap::new();
    for _ in 0..n {
        let k = r.str("header name")?;
        let v = r.str("header value")?;
        headers.insert(k, v);
    }
    let payload = r.bytes()?.to_vec();
    let signature = r.opt_str("signature")?;
    let delay = Duration::from_millis(r.u64()?);
    let not_before = match r.u8()? {
        0 => None,
        1 => Some(from_millis(r.i64()?)),
        n => return Err(format!("bad option tag {n} for not_before")),
    };
    Ok(NewMessage {
        envelope: Envelope {
            id,
            created_at,
            message: Message {
                stream,
                destination,
                key,
                payload,
                content_type,
                headers,
                schedule: None,
            },
        },
        order,
        unit,
        exhausted,
        published_by: PublishedBy::Relay,
        signature,
        status: Status::Pending,
        attempts: 0,
        retry_after: delay,
        not_before,
        last_error: None,
        lease: None,
    })
}

/// Whether a decoded row asks to wait (a schedule): the WAL relay hands those to the table.
pub(crate) fn scheduled(row: &NewMessage, now: SystemTime) -> bool {
    !row.retry_after.is_zero() || row.not_before.is_some_and(|t| t > now)
}

fn printable(s: &str) -> String {
    s.chars().take(64).collect()
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.left() {
            return Err(format!(
                "truncated: {n} bytes wanted at offset {}, {} left",
                self.at,
                self.left()
            ));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    fn i64(&mut self) -> Result<i64, String> {
        Ok(self.u64()? as i64)
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn str_ref(&mut self, what: &str) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn str(&mut self, what: &str) -> Result<String, String> {
        self.str_ref(what).map(str::to_owned)
    }

    fn opt_str(&mut self, what: &str) -> Result<Option<String>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.str(what).map(Some),
            n => Err(format!("bad option tag {n} for {what}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox_core::MessageId;

    fn row(i: usize) -> NewMessage {
        NewMessage {
            envelope: Envelope {
                id: MessageId::new(),
                created_at: from_millis(1_700_000_000_000 + i as i64),
                message: Message::new("orders", format!("payload {i}"))
                    .stream("s")
                    .key("k")
                    .header("traceparent", "00-x")
                    .content_type("text/plain"),
            },
            order: Order::InUnit,
            unit: "k".into(),
            exhausted: Exhausted::Park,
            published_by: PublishedBy::Relay,
            signature: Some("sig".into()),
            status: Status::Pending,
            attempts: 0,
            retry_after: Duration::from_millis(5),
            not_before: Some(from_millis(1_800_000_000_000)),
            last_error: None,
            lease: None,
        }
    }

    #[test]
    fn rows_come_back_as_written_and_in_order() {
        let rows: Vec<_> = (0..3).map(row).collect();
        let back = decode(&encode(&rows)).unwrap();
        assert_eq!(back.len(), 3);
        for (a, b) in rows.iter().zip(&back) {
            assert_eq!(a.envelope, b.envelope);
            assert_eq!(
                (a.order, &a.unit, a.exhausted),
                (b.order, &b.unit, b.exhausted)
            );
            assert_eq!(
                (&a.signature, a.retry_after, a.not_before),
                (&b.signature, b.retry_after, b.not_before)
            );
        }
    }

    #[test]
    fn every_truncation_and_corruption_is_a_reason_not_a_panic() {
        let bytes = encode(&[row(1), row(2)]);
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "truncated at {n} decoded");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode(&extra)
            .unwrap_err()
            .contains("after the last record"));
        // Flip each byte: decoding may succeed (a changed letter) but must never panic.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = decode(&b);
        }
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&huge).unwrap_err().contains("claims"));
        assert!(decode(b"JSON{}").unwrap_err().contains("magic"));
    }
}
