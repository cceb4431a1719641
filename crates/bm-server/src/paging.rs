//! Page sizes, page byte limits and opaque page tokens (AIP-158).
//!
//! A token carries where the previous page ended and a fingerprint of the filters it was
//! made with, so a token reused with other filters is refused instead of silently skipping
//! or repeating items. Tokens are hex, so they survive any transport.
//!
//! A page is bounded by its encoded size as well as by its count: standard gRPC clients
//! refuse responses over 4 MiB, and a hundred machines with 64 KiB network configurations
//! are 6.5 MB. [`fit`] ends a page early (with a token for the rest) at [`MAX_PAGE_BYTES`].

use crate::error::ApiError;

/// The page size when the client asks for none.
pub(crate) const DEFAULT_PAGE_SIZE: usize = 100;
/// The largest page served.
pub(crate) const MAX_PAGE_SIZE: usize = 1000;

/// The most encoded bytes in one page, well under the 4 MiB that standard clients accept.
/// A page always has at least one item; the largest item (a machine with every field at
/// its limit) is far below this (see the tests).
pub(crate) const MAX_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// Keeps the longest prefix of `items` that encodes to at most [`MAX_PAGE_BYTES`] (at
/// least one item); true if it dropped some, so that the page needs a next token.
pub(crate) fn fit<T: prost::Message>(items: &mut Vec<T>) -> bool {
    fit_within(items, MAX_PAGE_BYTES)
}

fn fit_within<T: prost::Message>(items: &mut Vec<T>, max_bytes: usize) -> bool {
    let mut total = 0usize;
    for (i, item) in items.iter().enumerate() {
        let len = item.encoded_len();
        // The repeated field's tag (one byte for fields 1-15) and the length prefix.
        let len = 1 + prost::length_delimiter_len(len) + len;
        if i > 0 && total + len > max_bytes {
            items.truncate(i);
            return true;
        }
        total += len;
    }
    false
}

/// The page size to serve for a requested one.
pub(crate) fn page_size(requested: i32) -> Result<usize, ApiError> {
    match requested {
        n if n < 0 => Err(ApiError::invalid(format!(
            "page_size: must not be negative (got {n})"
        ))),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as usize).min(MAX_PAGE_SIZE)),
    }
}

/// FNV-1a: a stable fingerprint of the filters (not a security measure).
fn fingerprint(filters: &str) -> u64 {
    filters.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A token that resumes a listing of `kind` after `key`, for these `filters`.
pub(crate) fn encode(kind: &str, key: &str, filters: &str) -> String {
    let raw = format!(
        "v1\u{1f}{kind}\u{1f}{key}\u{1f}{:016x}",
        fingerprint(filters)
    );
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The key a token resumes after, if it was made for this `kind` and these `filters`;
/// `None` for the empty token (the first page).
pub(crate) fn decode(token: &str, kind: &str, filters: &str) -> Result<Option<String>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        ApiError::invalid(
            "page_token: not a token of this listing with these filters; start again without a page_token",
        )
    };
    if !token.len().is_multiple_of(2) || token.len() > 1024 {
        return Err(bad());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    let raw = String::from_utf8(bytes).map_err(|_| bad())?;
    let parts: Vec<&str> = raw.split('\u{1f}').collect();
    match parts.as_slice() {
        ["v1", k, key, fp] if *k == kind && *fp == format!("{:016x}", fingerprint(filters)) => {
            Ok(Some((*key).to_owned()))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_are_bound_to_their_filters() {
        let t = encode("machines", "machine-42", "phase=READY");
        assert_eq!(
            decode(&t, "machines", "phase=READY").unwrap().as_deref(),
            Some("machine-42")
        );
        assert!(decode(&t, "machines", "phase=MAINTENANCE").is_err());
        assert!(decode(&t, "operations", "phase=READY").is_err());
        assert_eq!(decode("", "machines", "").unwrap(), None);
        for garbage in ["zz", "abc", "00ff", &"a".repeat(2000)] {
            let e = decode(garbage, "machines", "").unwrap_err().to_string();
            assert!(e.starts_with("page_token:"), "{e}");
        }
    }

    #[test]
    fn pages_end_early_at_their_byte_limit_with_at_least_one_item() {
        let op = |error_bytes: usize| bm_proto::v1::Operation {
            id: "op-01JD3F5Q2W8Y4ZP0N7R6T9V3KM".into(),
            error: "e".repeat(error_bytes),
            ..Default::default()
        };
        let mut ops: Vec<_> = (0..10).map(|_| op(1000)).collect();
        assert!(fit_within(&mut ops, 3500));
        assert_eq!(ops.len(), 3, "three of about 1040 bytes fit in 3500");
        let mut small: Vec<_> = (0..10).map(|_| op(10)).collect();
        assert!(!fit_within(&mut small, 3500));
        assert_eq!(small.len(), 10);
        let mut huge = vec![op(10_000), op(10)];
        assert!(fit_within(&mut huge, 3500));
        assert_eq!(
            huge.len(),
            1,
            "an item larger than the limit still goes alone"
        );
        let mut none: Vec<bm_proto::v1::Operation> = Vec::new();
        assert!(!fit(&mut none));
        // The whole response fits: the page plus a token.
        let mut ops: Vec<_> = (0..3000).map(|_| op(1000)).collect();
        assert!(fit(&mut ops));
        let response = bm_proto::v1::ListOperationsResponse {
            operations: ops,
            next_page_token: encode("operations", &"x".repeat(100), "filters"),
        };
        assert!(prost::Message::encoded_len(&response) <= MAX_PAGE_BYTES + 1024);
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7).unwrap(), 7);
        assert_eq!(page_size(50_000).unwrap(), MAX_PAGE_SIZE);
        assert!(page_size(-1).is_err());
    }
}
