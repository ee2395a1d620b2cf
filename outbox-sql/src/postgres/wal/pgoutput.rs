//! The two `pgoutput` (protocol 1) messages table mode reads: a relation's description
//! (`R`) and an inserted row (`I`), with column values in text format. Everything else
//! (updates, deletes, truncates, types, origins) is skipped. The bytes come from the server,
//! but they are still checked like any input: lengths against what is left, never a panic.

/// A change the relay cares about.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Change<'a> {
    /// A relation: its id, schema, name and column names.
    Relation {
        id: u32,
        name: &'a str,
        columns: Vec<&'a str>,
    },
    /// An inserted row: its relation's id and its columns' text values (`None`: NULL or not
    /// sent).
    Insert {
        relation: u32,
        values: Vec<Option<&'a [u8]>>,
    },
    /// Anything else.
    Other,
}

pub(crate) fn parse(data: &[u8]) -> Result<Change<'_>, String> {
    let mut r = Reader { b: data, at: 0 };
    match r.u8()? {
        b'R' => {
            let id = r.u32()?;
            let _namespace = r.cstr()?;
            let name = r.cstr()?;
            let _identity = r.u8()?;
            let n = r.u16()? as usize;
            let mut columns = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let _flags = r.u8()?;
                columns.push(r.cstr()?);
                let _type = r.u32()?;
                let _typmod = r.u32()?;
            }
            Ok(Change::Relation { id, name, columns })
        }
        b'I' => {
            let relation = r.u32()?;
            if r.u8()? != b'N' {
                return Err("an insert without its new tuple".into());
            }
            let n = r.u16()? as usize;
            let mut values = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                values.push(match r.u8()? {
                    b'n' | b'u' => None,
                    b't' | b'b' => {
                        let len = r.u32()? as usize;
                        Some(r.take(len)?)
                    }
                    k => return Err(format!("unknown column kind {k:#x}")),
                });
            }
            Ok(Change::Insert { relation, values })
        }
        _ => Ok(Change::Other),
    }
}

/// A `bytea` in text format (`\x` and hex digits) as bytes.
pub(crate) fn bytea(text: &[u8]) -> Result<Vec<u8>, String> {
    let hex = text
        .strip_prefix(b"\\x")
        .ok_or("a bytea value not in hex format")?;
    if hex.len() % 2 != 0 {
        return Err("a bytea value with an odd number of hex digits".into());
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("{:?} is not a hex digit", c as char)),
    };
    hex.chunks(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.b.len() - self.at {
            return Err(format!("truncated at offset {}", self.at));
        }
        let out = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn cstr(&mut self) -> Result<&'a str, String> {
        let rest = &self.b[self.at..];
        let end = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or("a name without its terminating zero")?;
        self.at += end + 1;
        std::str::from_utf8(&rest[..end]).map_err(|_| "a name that is not UTF-8".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relations_inserts_and_byteas_decode_and_garbage_does_not_panic() {
        let mut rel = vec![b'R'];
        rel.extend(16385u32.to_be_bytes());
        rel.extend(b"public\0outbox_wal\0d");
        rel.extend(2u16.to_be_bytes());
        for name in ["seq", "batch"] {
            rel.push(1);
            rel.extend(name.as_bytes());
            rel.push(0);
            rel.extend(20u32.to_be_bytes());
            rel.extend(u32::MAX.to_be_bytes());
        }
        assert_eq!(
            parse(&rel).unwrap(),
            Change::Relation {
                id: 16385,
                name: "outbox_wal",
                columns: vec!["seq", "batch"]
            }
        );
        let mut ins = vec![b'I'];
        ins.extend(16385u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(2u16.to_be_bytes());
        ins.push(b't');
        ins.extend(2u32.to_be_bytes());
        ins.extend(b"42");
        ins.push(b't');
        ins.extend(6u32.to_be_bytes());
        ins.extend(b"\\x00fF");
        let Change::Insert { relation, values } = parse(&ins).unwrap() else {
            panic!()
        };
        assert_eq!(relation, 16385);
        assert_eq!(values[0], Some(&b"42"[..]));
        assert_eq!(bytea(values[1].unwrap()).unwrap(), vec![0x00, 0xff]);
        for msg in [&rel, &ins] {
            for n in 1..msg.len() {
                let _ = parse(&msg[..n]);
            }
        }
        assert!(bytea(b"00").is_err());
        assert!(bytea(b"\\x0").is_err());
        assert!(bytea(b"\\xzz").is_err());
        assert_eq!(parse(b"B").unwrap(), Change::Other);
    }
}
