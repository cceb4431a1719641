//! HTTP failures of a BMC as [`ProviderError`]s a person can act on: the kind decides whether
//! the engine retries, the message says what to fix and quotes the BMC's own words.

use std::time::Duration;

use bm_provider::ProviderError;
use serde_json::Value;

/// The longest piece of a BMC's error body quoted in a message.
const MAX_QUOTE: usize = 300;

/// The error for an HTTP answer with a non-success `status`.
///
/// 401 is bad credentials, 404 a wrong path (both permanent); 502, 503 and 504 are a BMC
/// that is unavailable for now (rebooting itself, updating its firmware: retried for
/// minutes); 408, 429 and other 5xx are transient; other 4xx (405 included) are permanent.
pub(crate) fn status_error(
    bmc: &str,
    method: &str,
    path: &str,
    status: u16,
    body: &[u8],
) -> ProviderError {
    let said = bmc_message(body)
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    match status {
        401 => ProviderError::permanent(format!(
            "bad credentials for BMC {bmc} (HTTP 401 on {method} {path}): check the username and password configured for it"
        )),
        403 => ProviderError::permanent(format!(
            "BMC {bmc} refused {method} {path} (HTTP 403, the configured user lacks a privilege){said}"
        )),
        404 => ProviderError::permanent(format!(
            "wrong system path: BMC {bmc} has no {path} (HTTP 404 on {method}){said}"
        )),
        502..=504 => ProviderError::unavailable(format!(
            "BMC {bmc} is unavailable for now: it answered {method} {path} with HTTP {status}{said} (rebooting, updating its firmware or overloaded)"
        )),
        408 | 429 | 500..=599 => ProviderError::transient(format!(
            "BMC {bmc} answered {method} {path} with HTTP {status}{said}"
        )),
        _ => ProviderError::permanent(format!(
            "BMC {bmc} answered {method} {path} with HTTP {status}{said}"
        )),
    }
}

/// The wait a `Retry-After` header asks for, in seconds (the HTTP-date form is not used by
/// BMCs and is ignored).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// What the BMC said in an error body: the `Message`s of `error.@Message.ExtendedInfo`,
/// else `error.message`, else a short plain-text body (some BMCs answer plain text labelled
/// JSON). `None` for an empty body or an HTML page.
pub(crate) fn bmc_message(body: &[u8]) -> Option<String> {
    if let Ok(json) = serde_json::from_slice::<Value>(body) {
        let err = json.get("error").unwrap_or(&json);
        let extended: Vec<&str> = err
            .get("@Message.ExtendedInfo")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|i| i.get("Message").and_then(Value::as_str))
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .collect();
        if !extended.is_empty() {
            return Some(shorten(&extended.join("; ")));
        }
        return err
            .get("message")
            .or_else(|| err.get("Message"))
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(shorten);
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() || text.starts_with('<') {
        return None;
    }
    Some(shorten(text))
}

/// One line of at most [`MAX_QUOTE`] characters.
fn shorten(s: &str) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= MAX_QUOTE {
        one_line
    } else {
        let mut cut: String = one_line.chars().take(MAX_QUOTE).collect();
        cut.push('…');
        cut
    }
}

/// The innermost messages of an error chain, for a transport failure (reqwest's own
/// message is only "error sending request"). `io::Error` hides its inner error from
/// `source()`, so it is opened by hand.
pub(crate) fn chain_detail(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let msg = e.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner),
            None => e.source(),
        };
    }
    // The outermost messages are generic; the last two say what happened.
    let n = parts.len();
    parts[n.saturating_sub(2)..].join(": ")
}

#[cfg(test)]
mod tests {
    use bm_provider::ErrorKind;

    use super::*;

    fn check(status: u16, body: &str, kind: ErrorKind, want: &str) {
        let e = status_error(
            "10.0.0.5",
            "POST",
            "/redfish/v1/Systems/1",
            status,
            body.as_bytes(),
        );
        assert_eq!(e.kind(), kind, "{status} {body}: {e}");
        assert!(e.to_string().contains(want), "{status} {body}: {e}");
    }

    #[test]
    fn maps_status_and_body() {
        use ErrorKind::{Permanent, Transient};
        check(401, "", Permanent, "bad credentials for BMC 10.0.0.5");
        check(
            404,
            "",
            Permanent,
            "wrong system path: BMC 10.0.0.5 has no /redfish/v1/Systems/1",
        );
        check(403, "", Permanent, "HTTP 403");
        let sushy = r#"{"error":{"code":"Base.1.0.GeneralError","message":"The requested Reset is not supported","@Message.ExtendedInfo":[{"@odata.type":"/redfish/v1/$metadata#Message.1.0.0.Message","MessageId":"Base.1.0.GeneralError"}]}}"#;
        check(
            501,
            sushy,
            Transient,
            "HTTP 501: The requested Reset is not supported",
        );
        let extended = r#"{"error":{"code":"Base.1.8.GeneralError","message":"A general error has occurred. See ExtendedInfo for more information.","@Message.ExtendedInfo":[{"MessageId":"Base.1.8.PropertyValueNotInList","Message":"The value Bogus for the property ResetType is not in the list of acceptable values."},{"Message":"Second."}]}}"#;
        check(
            400,
            extended,
            Permanent,
            "HTTP 400: The value Bogus for the property ResetType is not in the list of acceptable values.; Second.",
        );
        check(503, "", ErrorKind::Unavailable, "is unavailable for now");
        check(500, "", Transient, "HTTP 500");
        check(405, "", Permanent, "HTTP 405");
        check(429, "slow down", Transient, "HTTP 429: slow down");
        check(409, "{}", Permanent, "HTTP 409");
        // Plain text labelled JSON, as sushy does for some 400s.
        check(
            400,
            "PATCH only works for Boot and IndicatorLED elements",
            Permanent,
            "HTTP 400: PATCH only works for Boot and IndicatorLED elements",
        );
        // An HTML error page is not quoted.
        let e = status_error("b", "GET", "/x", 500, b"<html><body>Internal</body></html>");
        assert_eq!(e.to_string(), "BMC b answered GET /x with HTTP 500");
    }

    #[test]
    fn long_bodies_are_cut() {
        let body = "x".repeat(1000);
        let m = bmc_message(body.as_bytes()).unwrap();
        assert_eq!(m.chars().count(), MAX_QUOTE + 1);
        assert_eq!(bmc_message(b"  \n "), None);
        assert_eq!(bmc_message(br#"{"error":{}}"#), None);
        assert_eq!(
            bmc_message(b"line one\n  line two").as_deref(),
            Some("line one line two")
        );
    }

    #[test]
    fn chain_detail_opens_io_errors() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let io = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        let d = chain_detail(&Outer(io));
        assert!(d.contains("UnknownIssuer"), "{d}");
    }
}
