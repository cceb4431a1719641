//! The gRPC side of the metrics: [`GrpcMetricsLayer`] counts every call by method and
//! status code in [`Metrics`].

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// Counts every gRPC call in [`Metrics`]: its method (the request's path) and the status
/// code the response's headers carry (an error answered at once; `OK` otherwise, since a
/// successful call's status comes in its trailers), timed to the response's headers.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    metrics: Option<Arc<Metrics>>,
}

impl GrpcMetricsLayer {
    /// Counts in `metrics`; with `None`, does nothing.
    pub fn new(metrics: Option<Arc<Metrics>>) -> Self {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`GrpcMetricsLayer`].
#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Option<Arc<Metrics>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
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
        let Some(metrics) = self.metrics.clone() else {
            return Box::pin(self.inner.call(req));
        };
        let method = method_label(req.uri().path());
        let started = Instant::now();
        let call = self.inner.call(req);
        Box::pin(async move {
            let result = call.await;
            if let Ok(response) = &result {
                let code = bm_proto::code_name(header_status(response.headers()));
                metrics.grpc(&method, code, started.elapsed());
            }
            result
        })
    }
}

/// The status code in a response's headers: an error answered at once; `OK` otherwise,
/// since a successful call's status (or a stream's late error) comes in its trailers.
pub(crate) fn header_status(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from)
}

/// The `method` label of a call: its path when it is a method the server has (the API's,
/// health's, reflection's), else `unknown`, so that no peer creates series at will.
pub(crate) fn method_label(path: &str) -> String {
    const OTHERS: [&str; 4] = [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ];
    let known = crate::auth::role_table().iter().any(|(p, _)| *p == path) || OTHERS.contains(&path);
    if known { path } else { "unknown" }.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_servers_methods_are_labels() {
        assert_eq!(
            method_label("/baremetal.v1.MachineService/GetMachine"),
            "/baremetal.v1.MachineService/GetMachine"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(method_label("/baremetal.v1.MachineService/Nope"), "unknown");
        assert_eq!(method_label("/x/y"), "unknown");
    }
}
