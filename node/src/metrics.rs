//! Prometheus metrics: the process-wide recorder, the HTTP middleware
//! (labels: method, matched route template, status class: bounded by
//! construction), and `GET /metrics`, which also refreshes hub gauges
//! (records per namespace, capped; mesh peers).

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::facade::AppState;

/// Most namespaces exported as distinct label values; the rest sum into `other`.
const MAX_NS_LABELS: usize = 32;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide Prometheus handle (installed on first use; several hubs
/// in one test process share it). `None` if another recorder was installed.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|()| handle)
        })
        .as_ref()
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Middleware counting requests and timing them per route template.
pub async fn track_http(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let resp = next.run(req).await;
    let status = match resp.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!("hubmesh_http_requests_total", "method" => method, "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!("hubmesh_http_request_duration_seconds", "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// `GET /metrics`: Prometheus text format.
pub async fn render(State(state): State<AppState>) -> Response {
    if let Ok(counts) = state.store.namespace_counts() {
        let mut other = 0u64;
        for (i, (ns, n)) in counts.into_iter().enumerate() {
            if i < MAX_NS_LABELS {
                metrics::gauge!("hubmesh_records", "ns" => ns).set(n as f64);
            } else {
                other += n;
            }
        }
        if other > 0 {
            metrics::gauge!("hubmesh_records", "ns" => "other").set(other as f64);
        }
    }
    if let Ok(peers) = state.mesh.peers().await {
        metrics::gauge!("hubmesh_mesh_peers").set(peers.len() as f64);
    }
    let body = match handle() {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => String::from("# metrics recorder unavailable\n"),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
