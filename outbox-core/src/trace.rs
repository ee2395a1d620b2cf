//! W3C trace context: what a `traceparent` header must look like for a consumer to continue
//! its trace. Always compiled: the inbox refuses a malformed one with or without the `otel`
//! feature, and the `otel` module continues the valid ones.

/// Whether `value` is a W3C `traceparent` this consumer can continue: version `00` (exactly
/// `00-<32 hex>-<16 hex>-<2 hex>`) or a later version (at least those fields), lower-case
/// hex, trace and parent ids not all zero, version not `ff`.
pub fn valid_traceparent(value: &str) -> bool {
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let parts: Vec<&str> = value.split('-').collect();
    if parts.len() < 4 || !hex(parts[0], 2) || parts[0] == "ff" {
        return false;
    }
    if parts[0] == "00" && (parts.len() != 4 || value.len() != 55) {
        return false;
    }
    hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}
