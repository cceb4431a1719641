//! Notices (repair tickets): a JSON POST to the operator's webhook, idempotent per operation
//! through an `Idempotency-Key` header, or only a log line when no webhook is configured.

use std::time::Duration;

use bm_provider::{ActionContext, Notice, NoticeKind, ProviderError};
use reqwest::Url;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde_json::{Value, json};

use crate::config::{ConfigError, NotifyConfig};
use crate::redfish::error::{bmc_message, chain_detail};

/// The log tag of notices.
const TAG: &str = "ticket";

/// Sends notices.
#[derive(Debug)]
pub(crate) struct Notifier {
    webhook: Option<(Url, reqwest::Client)>,
    timeout: Duration,
}

impl Notifier {
    pub(crate) fn new(config: &NotifyConfig) -> Result<Self, ConfigError> {
        let webhook = match &config.webhook_url {
            None => None,
            Some(u) => {
                let url = Url::parse(u).map_err(|e| {
                    ConfigError::invalid("notify.webhook_url", format!("{u:?} is not a URL: {e}"))
                })?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(ConfigError::invalid(
                        "notify.webhook_url",
                        format!("{u:?} must be an http:// or https:// URL"),
                    ));
                }
                let client = reqwest::Client::builder()
                    .timeout(config.timeout)
                    .build()
                    .map_err(|e| ConfigError::Http(Box::new(e)))?;
                Some((url, client))
            }
        };
        Ok(Notifier {
            webhook,
            timeout: config.timeout,
        })
    }

    /// Sends the notice; returns the ticket's reference.
    pub(crate) async fn send(
        &self,
        ctx: &ActionContext<'_>,
        notice: &Notice,
    ) -> Result<String, ProviderError> {
        let op = ctx.operation_id.to_string();
        let fallback = format!("notice-{op}");
        let kind = match notice.kind {
            NoticeKind::RmaTicket => "rma_ticket",
        };
        let Some((url, client)) = &self.webhook else {
            ctx.log.line(
                TAG,
                format!(
                    "no ticket webhook configured; {kind} for {}: {} (reference {fallback})",
                    ctx.machine.id, notice.summary
                ),
            );
            return Ok(fallback);
        };
        let body = json!({
            "kind": kind,
            "summary": notice.summary,
            "machine_id": ctx.machine.id.as_str(),
            "operation_id": op,
            "bmc_endpoint": ctx.machine.spec.bmc_endpoint,
            "labels": ctx.machine.labels,
        });
        ctx.log
            .line(TAG, format!("opening ticket: {}", notice.summary));
        let req = client
            .post(url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .header("Idempotency-Key", &op)
            .body(serde_json::to_vec(&body).unwrap_or_default());
        let exchange = async {
            let resp = req.send().await?;
            let status = resp.status();
            let bytes = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, bytes))
        };
        let (status, bytes) = tokio::select! {
            r = exchange => r.map_err(|e| self.transport_error(url, e))?,
            () = ctx.cancel.cancelled() => return Err(ProviderError::canceled()),
        };
        if !status.is_success() {
            let said = bmc_message(&bytes)
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            let msg = format!(
                "the ticket webhook {} answered HTTP {}{said}",
                origin(url),
                status.as_u16()
            );
            return Err(match status.as_u16() {
                408 | 429 | 500..=599 => ProviderError::transient(msg),
                _ => ProviderError::permanent(msg),
            });
        }
        let reference = reference_from(&bytes).unwrap_or(fallback);
        ctx.log.line(TAG, format!("ticket {reference}"));
        Ok(reference)
    }

    /// The error for a webhook request that got no answer. reqwest errors carry the whole
    /// URL, whose path may be a secret: it is cut from the error before the error is shown
    /// or kept as the source.
    fn transport_error(&self, url: &Url, e: reqwest::Error) -> ProviderError {
        let e = e.without_url();
        let what = if e.is_timeout() {
            format!("did not answer within {}s", self.timeout.as_secs())
        } else {
            format!("failed: {}", chain_detail(&e))
        };
        ProviderError::transient(format!("the ticket webhook {} {what}", origin(url)))
            .with_source(e)
    }
}

/// `scheme://host[:port]` of a URL (its path may hold a secret token).
fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// The ticket's reference from the webhook's answer: the first string among `reference`,
/// `id`, `key` and `ticket` of a JSON object.
pub(crate) fn reference_from(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    ["reference", "id", "key", "ticket"]
        .iter()
        .find_map(|k| match v.get(k)? {
            Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(
            reference_from(br#"{"reference":"RMA-7"}"#).as_deref(),
            Some("RMA-7")
        );
        assert_eq!(reference_from(br#"{"id":42}"#).as_deref(), Some("42"));
        assert_eq!(
            reference_from(br#"{"key":"OPS-1","id":3}"#).as_deref(),
            Some("3")
        );
        assert_eq!(reference_from(b"ok"), None);
        assert_eq!(reference_from(br#"{"id":""}"#), None);
    }
}
