//! A small Redfish client: one [`Bmc`] per BMC host with its credentials, TLS settings,
//! request timeout and concurrency limit, plus what the provider does with it (find the
//! system, power, boot override, virtual media, NICs).
//!
//! Every path comes from the BMC (`@odata.id`, action `target`) and is used verbatim: ids are
//! opaque and some BMCs compare paths literally, trailing slash included.

pub(crate) mod error;
pub(crate) mod nic;
pub(crate) mod power;
pub(crate) mod system;

use std::sync::Arc;
use std::time::Duration;

use bm_provider::ProviderError;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, IF_MATCH};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;

/// How to talk to one BMC host.
#[derive(Clone, Debug)]
pub(crate) struct BmcSettings {
    /// User and password, if the BMC wants them.
    pub(crate) auth: Option<(String, Secret)>,
    /// PEM CA certificates to trust instead of the system's.
    pub(crate) ca_pem: Option<Vec<u8>>,
    /// Skip certificate verification (labs).
    pub(crate) insecure: bool,
    /// Per-request timeout.
    pub(crate) timeout: Duration,
    /// Requests in flight at most.
    pub(crate) concurrency: usize,
}

/// What one `[redfish.bmc."..."]` section sets; `None` is inherited from a less specific
/// section (`host` for `host:port`), then from the defaults.
#[derive(Clone, Debug, Default)]
pub(crate) struct BmcOverrides {
    pub(crate) auth: Option<(String, Secret)>,
    pub(crate) ca_pem: Option<Vec<u8>>,
    pub(crate) insecure: Option<bool>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) concurrency: Option<usize>,
    /// `allow_plaintext`: whether `redfish+http://` may be used (decided by the table of
    /// BMC sections, not by the client).
    pub(crate) plaintext: Option<bool>,
}

impl BmcOverrides {
    /// These settings, each unset one taken from `fallback`.
    pub(crate) fn or(self, fallback: &BmcOverrides) -> BmcOverrides {
        BmcOverrides {
            auth: self.auth.or_else(|| fallback.auth.clone()),
            ca_pem: self.ca_pem.or_else(|| fallback.ca_pem.clone()),
            insecure: self.insecure.or(fallback.insecure),
            timeout: self.timeout.or(fallback.timeout),
            concurrency: self.concurrency.or(fallback.concurrency),
            plaintext: self.plaintext.or(fallback.plaintext),
        }
    }

    /// The settings of a BMC: these, each unset one taken from `default`.
    pub(crate) fn resolve(self, default: &BmcSettings) -> BmcSettings {
        BmcSettings {
            auth: self.auth.or_else(|| default.auth.clone()),
            ca_pem: self.ca_pem.or_else(|| default.ca_pem.clone()),
            insecure: self.insecure.unwrap_or(default.insecure),
            timeout: self.timeout.unwrap_or(default.timeout),
            concurrency: self.concurrency.unwrap_or(default.concurrency),
        }
    }
}

/// A resource read from the BMC.
#[derive(Clone, Debug)]
pub(crate) struct Resource {
    /// Its path, as used for the GET.
    pub(crate) path: String,
    /// The JSON body.
    pub(crate) body: Value,
    /// Its ETag (header or `@odata.etag`), for `If-Match`.
    pub(crate) etag: Option<String>,
}

impl Resource {
    /// The `@odata.id` of the link under `key`, e.g. `EthernetInterfaces`.
    pub(crate) fn link(&self, key: &str) -> Option<&str> {
        link(&self.body, key)
    }

    /// A string property.
    pub(crate) fn str(&self, key: &str) -> Option<&str> {
        self.body.get(key).and_then(Value::as_str)
    }
}

/// The `@odata.id` of `value[key]`.
pub(crate) fn link<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value
        .get(key)
        .and_then(|v| v.get("@odata.id"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// Redirects within the BMC's own origin are followed (a few, as reqwest does); one to
/// another scheme, host or port is not: the BMC's address was checked against the
/// configuration, the target of a redirect was not (and `https` must not become `http`).
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let same = attempt
            .previous()
            .first()
            .is_some_and(|first| first.origin() == attempt.url().origin());
        if !same {
            attempt.stop()
        } else if attempt.previous().len() > 5 {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    })
}

/// One request to a BMC, told to the BMC's observer (if any) when it is dropped: with the
/// answer's status once one came, else as unanswered.
struct Observed<'a> {
    bmc: &'a Bmc,
    sent: tokio::time::Instant,
    status: Option<u16>,
}

impl Drop for Observed<'_> {
    fn drop(&mut self) {
        if let Some(observer) = &self.bmc.observer {
            let took = self.sent.elapsed();
            observer.request(crate::PROVIDER_NAME, &self.bmc.name, took, self.status);
        }
    }
}

/// One BMC host: an HTTP client and a limit on requests in flight.
#[derive(Debug)]
pub(crate) struct Bmc {
    name: String,
    base: Url,
    client: reqwest::Client,
    auth: Option<(String, Secret)>,
    permits: Semaphore,
    timeout: Duration,
    observer: Option<Arc<dyn bm_provider::RequestObserver>>,
}

impl Bmc {
    /// A client for the BMC at `base` (`https://host:port/`), called `name` in messages;
    /// `observer` learns of each request.
    /// Building it may read the system's trust store: call it off the async runtime.
    ///
    /// # Errors
    ///
    /// A permanent error if the CA file does not hold a certificate or TLS cannot be set up.
    pub(crate) fn new(
        name: String,
        base: Url,
        settings: BmcSettings,
        observer: Option<Arc<dyn bm_provider::RequestObserver>>,
    ) -> Result<Self, ProviderError> {
        let mut builder = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .no_proxy()
            .redirect(same_origin_redirects())
            .user_agent(concat!("bm-provider-redfish/", env!("CARGO_PKG_VERSION")));
        if settings.insecure {
            builder = builder.tls_danger_accept_invalid_certs(true);
        } else if let Some(pem) = &settings.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                ProviderError::permanent(format!(
                    "the CA file for BMC {name} holds no usable PEM certificate"
                ))
                .with_source(e)
            })?;
            if certs.is_empty() {
                return Err(ProviderError::permanent(format!(
                    "the CA file for BMC {name} holds no PEM certificate"
                )));
            }
            builder = builder.tls_certs_only(certs);
        }
        let client = builder.build().map_err(|e| {
            ProviderError::permanent(format!("cannot set up an HTTP client for BMC {name}"))
                .with_source(e)
        })?;
        Ok(Bmc {
            name,
            base,
            client,
            auth: settings.auth,
            permits: Semaphore::new(settings.concurrency.max(1)),
            timeout: settings.timeout,
            observer,
        })
    }

    /// The BMC's name in messages (`host` or `host:port`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// `http` or `https`, as the endpoint says.
    pub(crate) fn scheme(&self) -> &str {
        self.base.scheme()
    }

    /// GETs a resource.
    pub(crate) async fn get(
        &self,
        cancel: &CancellationToken,
        path: &str,
    ) -> Result<Resource, ProviderError> {
        self.get_opt(cancel, path)
            .await?
            .ok_or_else(|| error::status_error(&self.name, "GET", path, 404, b""))
    }

    /// GETs a resource; `None` if the BMC has no such resource (404).
    pub(crate) async fn get_opt(
        &self,
        cancel: &CancellationToken,
        path: &str,
    ) -> Result<Option<Resource>, ProviderError> {
        let (status, headers, body) = self
            .send(cancel, Method::GET, path, None, None, self.timeout)
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(
                error::status_error(&self.name, "GET", path, status.as_u16(), &body)
                    .with_retry_after(error::retry_after(&headers)),
            );
        }
        let body: Value = serde_json::from_slice(&body).map_err(|e| {
            ProviderError::permanent(format!(
                "BMC {} answered GET {path} with a body that is not JSON",
                self.name
            ))
            .with_source(e)
        })?;
        let etag = headers
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| {
                body.get("@odata.etag")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
        Ok(Some(Resource {
            path: path.to_owned(),
            body,
            etag,
        }))
    }

    /// Sends a JSON body (a POST to an action target, a PATCH of a resource) and checks the
    /// answer is a success. `etag` goes in `If-Match`; `timeout` replaces the BMC's request
    /// timeout (a media insert may take minutes). Returns the task monitor to follow when
    /// the BMC answered 202 Accepted with a `Location` (it carries the request out later).
    pub(crate) async fn write(
        &self,
        cancel: &CancellationToken,
        method: Method,
        path: &str,
        body: &Value,
        etag: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<Option<String>, ProviderError> {
        self.write_or_refused(cancel, method, path, body, etag, timeout)
            .await?
    }

    /// [`Bmc::write`], except that an answer refusing the request's content (HTTP 400, 405
    /// or 409: a BMC that wants the request in another form) comes back as `Ok(Err(..))`,
    /// for the caller to try another form. Credentials, paths, preconditions and server
    /// errors are `Err` as always.
    pub(crate) async fn write_or_refused(
        &self,
        cancel: &CancellationToken,
        method: Method,
        path: &str,
        body: &Value,
        etag: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<Result<Option<String>, ProviderError>, ProviderError> {
        let timeout = timeout.unwrap_or(self.timeout);
        let (status, headers, resp) = self
            .send(cancel, method.clone(), path, Some(body), etag, timeout)
            .await?;
        if status == StatusCode::ACCEPTED {
            return Ok(Ok(headers
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)));
        }
        if status.is_success() {
            return Ok(Ok(None));
        }
        let error = error::status_error(&self.name, method.as_str(), path, status.as_u16(), &resp)
            .with_retry_after(error::retry_after(&headers));
        match status.as_u16() {
            400 | 405 | 409 => Ok(Err(error)),
            _ => Err(error),
        }
    }

    /// Reads a task monitor: `None` while the BMC still answers 202 (the task runs), else
    /// the task (or the result of the request, which some BMCs return instead).
    pub(crate) async fn poll_task(
        &self,
        cancel: &CancellationToken,
        path: &str,
    ) -> Result<Option<Value>, ProviderError> {
        let (status, headers, body) = self
            .send(cancel, Method::GET, path, None, None, self.timeout)
            .await?;
        if status == StatusCode::ACCEPTED {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(
                error::status_error(&self.name, "GET", path, status.as_u16(), &body)
                    .with_retry_after(error::retry_after(&headers)),
            );
        }
        Ok(Some(serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    /// The URL of a path the BMC gave; refuses links to another host (the credentials go
    /// with every request).
    fn url(&self, path: &str) -> Result<Url, ProviderError> {
        let url = self.base.join(path).map_err(|e| {
            ProviderError::permanent(format!(
                "BMC {} gave a link that is not a path: {path:?}",
                self.name
            ))
            .with_source(e)
        })?;
        if url.origin() != self.base.origin() {
            return Err(ProviderError::permanent(format!(
                "BMC {} links to another host ({path}); refusing to send it the credentials",
                self.name
            )));
        }
        Ok(url)
    }

    async fn send(
        &self,
        cancel: &CancellationToken,
        method: Method,
        path: &str,
        body: Option<&Value>,
        etag: Option<&str>,
        timeout: Duration,
    ) -> Result<(StatusCode, HeaderMap, Vec<u8>), ProviderError> {
        let url = self.url(path)?;
        let _permit = tokio::select! {
            p = self.permits.acquire() => p.map_err(|_| ProviderError::transient("the provider is shutting down"))?,
            () = cancel.cancelled() => return Err(ProviderError::canceled()),
        };
        let mut req = self
            .client
            .request(method.clone(), url)
            .timeout(timeout)
            .header(ACCEPT, "application/json")
            .header("OData-Version", "4.0");
        if let Some((user, password)) = &self.auth {
            req = req.basic_auth(user, Some(password.expose()));
        }
        if let Some(body) = body {
            // A byte body, so that reqwest sends Content-Length (some BMCs answer 411
            // without it) and can replay it on a 307 redirect.
            let bytes = serde_json::to_vec(body).unwrap_or_default();
            req = req.header(CONTENT_TYPE, "application/json").body(bytes);
        }
        if let Some(etag) = etag {
            req = req.header(IF_MATCH, etag);
        }
        // Reported however the request ends: answered, failed, canceled, or dropped by a
        // caller's timeout.
        let mut observed = Observed {
            bmc: self,
            sent: tokio::time::Instant::now(),
            status: None,
        };
        let exchange = async {
            let resp = req.send().await?;
            let status = resp.status();
            observed.status = Some(status.as_u16());
            let headers = resp.headers().clone();
            let bytes = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, bytes.to_vec()))
        };
        let result = tokio::select! {
            r = exchange => r,
            () = cancel.cancelled() => return Err(ProviderError::canceled()),
        };
        result.map_err(|e| self.transport_error(&method, path, timeout, e))
    }

    fn transport_error(
        &self,
        method: &Method,
        path: &str,
        timeout: Duration,
        e: reqwest::Error,
    ) -> ProviderError {
        let bmc = &self.name;
        let detail = error::chain_detail(&e);
        let lower = detail.to_ascii_lowercase();
        let port = self.base.port_or_known_default().unwrap_or_default();
        let err = if lower.contains("invalidcontenttype")
            || lower.contains("corrupt message")
            || lower.contains("wrong version number")
            || lower.contains("record overflow")
        {
            ProviderError::permanent(format!(
                "BMC {bmc} does not speak TLS on port {port} ({detail}): it likely answers plain HTTP there; use the BMC's https port in the endpoint, or redfish+http:// with allow_plaintext for a lab BMC"
            ))
        } else if lower.contains("invalid http version")
            || lower.contains("unexpected message from connection")
            || lower.contains("invalid status code")
            || lower.contains("invalid header")
            || lower.contains("invalid response")
        {
            ProviderError::permanent(format!(
                "port {port} of BMC {bmc} does not answer HTTP ({detail}): check the port in the machine's BMC endpoint"
            ))
        } else if lower.contains("certificate") || lower.contains("unknownissuer") {
            ProviderError::permanent(format!(
                "the TLS certificate of BMC {bmc} is not trusted ({detail}): set tls.ca_file to the CA that signed it, or insecure_skip_verify for this BMC in a lab"
            ))
        } else if e.is_timeout() {
            ProviderError::unavailable(format!(
                "BMC {bmc} did not answer {method} {path} within {}s",
                timeout.as_secs_f32()
            ))
        } else if e.is_connect() {
            ProviderError::unreachable(format!("cannot connect to BMC {bmc}: {detail}"))
        } else if e.is_redirect() {
            ProviderError::permanent(format!("BMC {bmc} redirects {method} {path} in a loop"))
        } else {
            ProviderError::transient(format!("{method} {path} on BMC {bmc} failed: {detail}"))
        };
        err.with_source(e)
    }
}
