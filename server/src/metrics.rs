//! Counters for `GET /metrics`, rendered in the Prometheus text format.
//!
//! Labels are the route's template (never the path a client sent: a
//! withdrawal's path names a subject) and the status code; nothing else a
//! request carries is recorded.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use facematch::engine::Engine;

/// Upper bounds of the latency histogram's buckets, in seconds.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// The routes, as labels; anything else is `unmatched`.
const ROUTES: [&str; 10] = [
    "/v1/health",
    "/v1/ready",
    "/v1/stats",
    "/v1/identify",
    "/v1/verify",
    "/v1/anonymise",
    "/v1/consents",
    "/v1/enrol",
    "/v1/subjects/{subject}/withdraw",
    "/metrics",
];

/// The label for a request path: one of [`ROUTES`] or `unmatched`.
pub(crate) fn route_label(path: &str) -> &'static str {
    if let Some(r) = ROUTES.iter().find(|r| **r == path) {
        return r;
    }
    match path.strip_prefix("/v1/subjects/").and_then(|p| p.strip_suffix("/withdraw")) {
        Some(id) if !id.is_empty() && !id.contains('/') => ROUTES[8],
        _ => "unmatched",
    }
}

#[derive(Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The server's own counters (the engine's are read when rendering).
#[derive(Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    pub(crate) in_flight: AtomicI64,
    pub(crate) open_connections: AtomicI64,
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) connections_timed_out: AtomicU64,
    pub(crate) tls_handshake_failures: AtomicU64,
    pub(crate) body_timeouts: AtomicU64,
    pub(crate) operator_limited: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// Count one answered request.
    pub(crate) fn record(&self, route: &'static str, status: u16, took: Duration) {
        *lock(&self.requests).entry((route, status)).or_default() += 1;
        let secs = took.as_secs_f64();
        let mut lat = lock(&self.latency);
        let h = lat.entry(route).or_default();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                h.buckets[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// The text exposition (format 0.0.4).
    pub(crate) fn render(&self, engine: &Engine) -> String {
        let mut out = String::with_capacity(4096);
        let o = &mut out;
        help(o, "facematch_http_requests_total", "counter", "Requests answered, by route template and status.");
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(o, "facematch_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        help(
            o,
            "facematch_http_request_duration_seconds",
            "histogram",
            "Time from the request's header to its answer (audit record durable), by route template.",
        );
        for (route, h) in lock(&self.latency).iter() {
            for (le, n) in BUCKETS.iter().zip(h.buckets) {
                let _ = writeln!(o, "facematch_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{le}\"}} {n}");
            }
            let _ = writeln!(o, "facematch_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(o, "facematch_http_request_duration_seconds_sum{{route=\"{route}\"}} {}", h.sum);
            let _ = writeln!(o, "facematch_http_request_duration_seconds_count{{route=\"{route}\"}} {}", h.count);
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            o,
            "facematch_http_requests_in_flight",
            "Requests being read, computed or awaiting their audit record.",
            self.in_flight.load(Ordering::Relaxed),
        );
        gauge(o, "facematch_http_open_connections", "Open client connections.", self.open_connections.load(Ordering::Relaxed));
        counter(o, "facematch_http_connections_accepted_total", "Connections accepted.", load(&self.connections_accepted));
        counter(
            o,
            "facematch_http_connections_refused_total",
            "Connections closed at once because max_connections were open.",
            load(&self.connections_refused),
        );
        counter(
            o,
            "facematch_http_connections_timed_out_total",
            "Connections closed for a header, handshake or idle timeout.",
            load(&self.connections_timed_out),
        );
        counter(
            o,
            "facematch_http_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out.",
            load(&self.tls_handshake_failures),
        );
        counter(
            o,
            "facematch_http_body_timeouts_total",
            "Requests cut off because their body did not arrive within body_timeout.",
            load(&self.body_timeouts),
        );
        counter(
            o,
            "facematch_http_operator_limited_total",
            "Requests refused (429) by per_operator_concurrency.",
            load(&self.operator_limited),
        );
        match engine.audit_stats() {
            Ok(a) => {
                gauge(o, "facematch_audit_up", "1 when the audit log is open.", 1);
                counter(o, "facematch_audit_commits_total", "Audit log commits (one write and one fsync each).", a.commits);
                counter(o, "facematch_audit_records_total", "Audit records committed.", a.records);
                counter(o, "facematch_audit_awaited_commits_total", "Commits made at once because a caller waited.", a.awaited);
                help(o, "facematch_audit_sync_seconds_total", "counter", "Time spent writing and fsyncing audit commits.");
                let _ = writeln!(o, "facematch_audit_sync_seconds_total {}", a.sync_micros as f64 / 1e6);
                help(o, "facematch_audit_linger_seconds", "gauge", "Current group-commit linger.");
                let _ = writeln!(o, "facematch_audit_linger_seconds {}", a.linger_micros as f64 / 1e6);
            }
            Err(_) => gauge(o, "facematch_audit_up", "1 when the audit log is open.", 0),
        }
        let s = engine.stats();
        gauge(o, "facematch_gallery_templates", "Live templates.", s.templates);
        gauge(o, "facematch_gallery_people", "Distinct people with a live template.", s.people);
        gauge(o, "facematch_gallery_filing_threshold", "People at which a filing is required.", s.filing_threshold);
        gauge(
            o,
            "facematch_gallery_filing_notice",
            "1 once the filing notice is raised (file within 30 working days).",
            u64::from(s.filing_notice_ms.is_some()),
        );
        gauge(o, "facematch_gallery_deleted_fraction", "Share of slots deleted and awaiting compaction.", s.deleted_fraction);
        out
    }
}

fn help(o: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(o, "# HELP {name} {text}\n# TYPE {name} {kind}");
}

fn gauge(o: &mut String, name: &str, text: &str, v: impl std::fmt::Display) {
    help(o, name, "gauge", text);
    let _ = writeln!(o, "{name} {v}");
}

fn counter(o: &mut String, name: &str, text: &str, v: u64) {
    help(o, name, "counter", text);
    let _ = writeln!(o, "{name} {v}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_never_carry_a_subject() {
        assert_eq!(route_label("/v1/identify"), "/v1/identify");
        assert_eq!(route_label("/v1/subjects/alice/withdraw"), "/v1/subjects/{subject}/withdraw");
        assert_eq!(route_label("/v1/subjects/a/b/withdraw"), "unmatched");
        assert_eq!(route_label("/alice"), "unmatched");
    }
}
