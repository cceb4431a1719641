//! Traces: the export of the server's `tracing` spans over OTLP (`--otlp-endpoint`), the span
//! of every gRPC request ([`RequestSpanLayer`]), and the links that make an operation's spans
//! children of the request that admitted it ([`OtelTraceLinks`]), also after a restart.
//!
//! The trace of a reimage is one tree: `grpc request` (the `Reimage` call) →
//! `operation` (each run of it; a run that resumes after a restart is a second child of the
//! same request) → `stage` (each attempt) → `provider call` (each call of the provider).

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Where and how much to export.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// The OTLP/gRPC endpoint of a collector, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// The fraction of new traces exported (0 to 1); a request that arrives with a sampled
    /// `traceparent` is always exported.
    pub sample_ratio: f64,
    /// `service.instance.id`: this process (the engine's lease owner).
    pub instance: String,
}

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The sample ratio is not within 0 to 1.
    #[error("--otlp-sample-ratio (BM_OTLP_SAMPLE_RATIO) must be within 0 and 1, not {0}")]
    SampleRatio(f64),
    /// The exporter refused its configuration (a malformed endpoint, say).
    #[error(
        "the OTLP exporter refused the endpoint {endpoint:?} (give a URL such as http://127.0.0.1:4317)"
    )]
    Exporter {
        /// The endpoint given.
        endpoint: String,
        /// The exporter's reason.
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The running export: a batch of ended spans goes to the collector every few seconds
/// (`OTEL_BSP_SCHEDULE_DELAY`, in ms; the other `OTEL_BSP_*` variables apply too).
#[derive(Debug)]
pub struct Otlp {
    provider: SdkTracerProvider,
}

impl Otlp {
    /// Builds the exporter; its calls run on `runtime` (the server's). The returned tracer
    /// goes into a `tracing_opentelemetry` layer.
    ///
    /// # Errors
    ///
    /// A sample ratio outside 0 to 1, or an endpoint the exporter refuses.
    pub fn start(
        config: &OtlpConfig,
        runtime: tokio::runtime::Handle,
    ) -> Result<(Otlp, opentelemetry_sdk::trace::Tracer), OtlpError> {
        if !(0.0..=1.0).contains(&config.sample_ratio) {
            return Err(OtlpError::SampleRatio(config.sample_ratio));
        }
        let exporter = {
            let _entered = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&config.endpoint)
                .with_timeout(Duration::from_secs(10))
                .build()
                .map_err(|source| OtlpError::Exporter {
                    endpoint: config.endpoint.clone(),
                    source,
                })?
        };
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("bm-server")
            .with_attributes([
                opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                opentelemetry::KeyValue::new("service.instance.id", config.instance.clone()),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(OnRuntime {
                exporter: Arc::new(exporter),
                runtime,
            })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let tracer = provider.tracer("bm-server");
        Ok((Otlp { provider }, tracer))
    }

    /// Exports the spans not sent yet and stops. Blocks: call it off the runtime's workers
    /// (`spawn_blocking`), since the export itself runs on the runtime.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "could not export the last spans");
        }
    }
}

/// The OTLP/gRPC exporter, run on the server's runtime: the SDK's batch processor calls an
/// exporter from a thread of its own, where tonic's client (it needs a Tokio reactor)
/// cannot run.
#[derive(Debug)]
struct OnRuntime {
    exporter: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let exporter = self.exporter.clone();
        self.runtime
            .spawn(async move { exporter.export(batch).await })
            .await
            .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.exporter.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.exporter.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // Called once, while the processor is built and before any export shares it.
        if let Some(exporter) = Arc::get_mut(&mut self.exporter) {
            exporter.set_resource(resource);
        }
    }
}

/// The engine's [`bm_workflow::TraceLinks`] over OpenTelemetry: a W3C `traceparent`.
#[derive(Debug, Default)]
pub struct OtelTraceLinks;

impl bm_workflow::TraceLinks for OtelTraceLinks {
    fn capture(&self) -> Option<String> {
        let cx = tracing::Span::current().context();
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        carrier.remove("traceparent")
    }

    fn adopt(&self, span: &tracing::Span, parent: &str) -> bool {
        let carrier = HashMap::from([("traceparent".to_owned(), parent.to_owned())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        let context = cx.span().span_context().clone();
        if !context.is_valid() {
            return false;
        }
        // Fails only for a span that already started; the engine adopts before.
        span.set_parent(cx).is_ok() && context.is_sampled()
    }
}

/// Puts every gRPC call in a `grpc request` span, a child of the caller's span when the
/// request carries a W3C `traceparent` header.
#[derive(Clone, Copy, Debug)]
pub struct RequestSpanLayer {
    on: bool,
}

impl RequestSpanLayer {
    /// Spans when `on` (traces are exported); otherwise does nothing.
    pub fn new(on: bool) -> Self {
        RequestSpanLayer { on }
    }
}

impl<S> tower::Layer<S> for RequestSpanLayer {
    type Service = RequestSpans<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSpans { inner, on: self.on }
    }
}

/// The service of [`RequestSpanLayer`].
#[derive(Clone, Debug)]
pub struct RequestSpans<S> {
    inner: S,
    on: bool,
}

impl<S, B, R> tower::Service<http::Request<B>> for RequestSpans<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !self.on {
            return Box::pin(self.inner.call(req));
        }
        let method = crate::grpc_metrics::method_label(req.uri().path());
        let span = tracing::info_span!(
            target: bm_workflow::TRACE_TARGET,
            "grpc request",
            otel.name = %method.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let parent = TraceContextPropagator::new().extract(&Headers(req.headers()));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
        let call = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let result = call.await;
                if let Ok(response) = &result {
                    // An error answered at once is in the headers; a stream's or a
                    // handler's late error comes in the trailers, after this span.
                    let code = crate::grpc_metrics::header_status(response.headers());
                    let span = tracing::Span::current();
                    span.record("rpc.grpc.status_code", code as i32);
                    if code != tonic::Code::Ok {
                        span.record("otel.status_code", "ERROR");
                    }
                }
                result
            }
            .instrument(span),
        )
    }
}

/// The headers of a request, as a propagator reads them.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
