//! What operators run the server with: TLS (a certificate made in the test),
//! bearer tokens kept off plain HTTP, `/metrics` in the Prometheus text
//! format (and nothing about subjects in it), `/v1/ready`.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use facematch_server::{Server, ServerConfig};
use serde_json::json;
use tokio_rustls::rustls;

const TOKEN: &str = "0123456789abcdef-gate";

/// A self-signed certificate for `localhost` and 127.0.0.1, as PEM files.
fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key, ck.cert.der().to_vec())
}

/// One HTTPS request trusting only `ca`; the whole response as text.
fn https(addr: std::net::SocketAddr, ca: &[u8], request: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(ca.to_vec())).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break, // closed without close_notify
            Err(e) => panic!("TLS read: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn tls_round_trip_with_a_generated_certificate_and_plain_http_to_the_tls_port_fails_cleanly() {
    let g = gallery(3);
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key, der) = certificate(tmp.path());
    let tokens = BTreeMap::from([(TOKEN.to_string(), "gate-7".to_string())]);
    let cfg = ServerConfig {
        tls_cert: Some(cert),
        tls_key: Some(key),
        tokens,
        header_read_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let server = serve(Arc::clone(&g.engine), None, cfg);
    let addr = server.addr();

    let body = serde_json::to_string(&json!({"embedding": vector(1), "k": 2})).unwrap();
    let req = format!(
        "POST /v1/identify HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nX-Facematch-Purpose: {PURPOSE}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let reply = https(addr, &der, &req);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"audit_seq\""), "{reply}");

    // Plain HTTP to the TLS port: no HTTP answer, the connection closed, the server unharmed.
    let mut plain = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    plain.write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match plain.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => {
                assert!(
                    !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
                    "plain HTTP to the TLS port was left hanging"
                );
                break;
            }
        }
    }
    assert!(!got.starts_with(b"HTTP/"), "plain HTTP was answered in clear: {}", String::from_utf8_lossy(&got));
    let reply = https(addr, &der, "GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    stop(server, g.engine);
}

#[test]
fn bearer_tokens_are_refused_over_plain_http_off_loopback() {
    let g = gallery(0);
    let tokens = BTreeMap::from([(TOKEN.to_string(), "gate-7".to_string())]);
    // Refused before anything is bound.
    let cfg = ServerConfig { listen: "0.0.0.0:0".into(), workers: 1, tokens: tokens.clone(), ..Default::default() };
    let err = Server::start(Arc::clone(&g.engine), None, cfg).unwrap_err();
    assert!(err.to_string().contains("clear text"), "{err}");
    // On loopback they are fine.
    let server = serve(Arc::clone(&g.engine), None, ServerConfig { tokens, ..Default::default() });
    stop(server, g.engine);
}

/// Check every line of a Prometheus text exposition; the samples by series.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()))
    };
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut w = rest.splitn(3, ' ');
            let (kw, name, tail) = (w.next().unwrap(), w.next().unwrap_or(""), w.next().unwrap_or(""));
            assert!(name_ok(name), "bad comment line {line:?}");
            match kw {
                "HELP" => {}
                "TYPE" => assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&tail), "bad TYPE line {line:?}"),
                _ => panic!("bad comment line {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let name = match series.split_once('{') {
            None => series,
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line:?}"));
                    assert!(name_ok(k), "bad label name in {line:?}");
                    assert!(!v.trim_end_matches('"').contains('"'), "unescaped quote in {line:?}");
                }
                name
            }
        };
        assert!(name_ok(name), "bad metric name in {line:?}");
        assert!(samples.insert(series.to_string(), v).is_none(), "series twice: {line:?}");
    }
    samples
}

#[test]
fn metrics_parse_as_prometheus_text_move_with_requests_and_name_no_subject() {
    let g = gallery(3);
    let server = serve(Arc::clone(&g.engine), None, ServerConfig::default());
    let mut c = client(&server);
    let before = parse_prometheus(&String::from_utf8(c.get("/metrics").unwrap().body).unwrap());

    // A subject with a name easy to find, enrolled, queried and withdrawn over HTTP.
    let consent = json!({
        "consent_id": "form-zq", "subject": "zq-subject-4711", "basis": {"type": "separate_consent"},
        "purposes": [PURPOSE], "given_at_ms": 0, "collected_by": "desk-1", "age_bracket": "adult", "guardian": null
    });
    assert_eq!(c.post_json("/v1/consents", &consent).unwrap().status, 201);
    let v = vector(4711);
    assert_eq!(
        c.post_json("/v1/enrol", &json!({"subject": "zq-subject-4711", "consent_id": "form-zq", "purposes": [PURPOSE], "embedding": v}))
            .unwrap()
            .status,
        201
    );
    for _ in 0..3 {
        assert_eq!(c.post_json("/v1/identify", &json!({"embedding": near(&v, 1)})).unwrap().status, 200);
    }
    assert_eq!(c.post_json("/v1/verify", &json!({"embedding": near(&v, 2), "subject": "zq-subject-4711"})).unwrap().status, 200);
    assert_eq!(c.get("/v1/zq-subject-4711").unwrap().status, 404);
    assert_eq!(c.request("POST", "/v1/subjects/zq-subject-4711/withdraw", None, b"").unwrap().status, 200);

    let r = c.get("/metrics").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(r.body).unwrap();
    assert!(!text.contains("zq-subject") && !text.contains("4711") && !text.contains("form-zq"), "a subject in the metrics:\n{text}");
    let after = parse_prometheus(&text);
    let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    let identify = "facematch_http_requests_total{route=\"/v1/identify\",status=\"200\"}";
    assert_eq!(get(&after, identify) - get(&before, identify), 3.0, "{text}");
    assert_eq!(get(&after, "facematch_http_requests_total{route=\"/v1/subjects/{subject}/withdraw\",status=\"200\"}"), 1.0, "{text}");
    assert_eq!(get(&after, "facematch_http_requests_total{route=\"unmatched\",status=\"404\"}"), 1.0, "{text}");
    assert_eq!(get(&after, "facematch_http_request_duration_seconds_count{route=\"/v1/identify\"}"), 3.0, "{text}");
    assert!(get(&after, "facematch_audit_commits_total") > get(&before, "facematch_audit_commits_total"), "{text}");
    assert!(get(&after, "facematch_audit_records_total") > get(&before, "facematch_audit_records_total"), "{text}");
    assert_eq!(get(&after, "facematch_gallery_people"), 3.0, "{text}");
    assert_eq!(get(&after, "facematch_gallery_filing_notice"), 0.0, "{text}");
    assert_eq!(get(&after, "facematch_http_requests_in_flight"), 1.0, "the /metrics request itself: {text}");
    assert!(get(&after, "facematch_http_open_connections") >= 1.0, "{text}");

    assert_eq!(c.get("/v1/ready").unwrap().json()["status"], "ready");
    stop(server, g.engine);
}

#[test]
fn metrics_need_credentials_on_the_main_listener_and_none_on_their_own() {
    let g = gallery(1);
    let tokens = BTreeMap::from([(TOKEN.to_string(), "gate-7".to_string())]);
    let server = serve(Arc::clone(&g.engine), None, ServerConfig { tokens: tokens.clone(), ..Default::default() });
    let mut anon = Client::new(server.addr());
    assert_eq!(anon.get("/metrics").unwrap().status, 401);
    assert_eq!(anon.get("/v1/ready").unwrap().status, 200);
    let mut authed = Client::new(server.addr()).with_header("Authorization", &format!("Bearer {TOKEN}"));
    assert_eq!(authed.get("/metrics").unwrap().status, 200);
    server.shutdown().unwrap();

    let cfg = ServerConfig { tokens, metrics_listen: Some("127.0.0.1:0".into()), ..Default::default() };
    let server = serve(Arc::clone(&g.engine), None, cfg);
    let mut m = Client::new(server.metrics_addr().unwrap());
    let r = m.get("/metrics").unwrap();
    assert_eq!(r.status, 200);
    parse_prometheus(&String::from_utf8(r.body).unwrap());
    assert_eq!(m.get("/v1/stats").unwrap().status, 404, "only /metrics on the metrics address");
    let mut authed = Client::new(server.addr()).with_header("Authorization", &format!("Bearer {TOKEN}"));
    assert_eq!(authed.get("/metrics").unwrap().status, 404, "not on the main listener when it has its own");
    stop(server, g.engine);
}
