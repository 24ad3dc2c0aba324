//! Property tests against a live server (face models loaded): whatever a
//! client sends, the answer is a success or a 4xx with a JSON error, never a
//! 5xx or a dead server. Seeds are fixed so CI runs are reproducible.
//! Raw requests (`facematch_server::client`), not the tests' `ureq` client:
//! the cases include GETs with bodies and non-ASCII header bytes, which a
//! well-behaved client refuses to send.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use common::*;
use facematch::pipeline::{FacePipeline, PipelineConfig};
use facematch_server::client::Client;
use facematch_server::ServerConfig;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// One server for every case: 16-d embedding gallery, face models for image bodies
/// (the gallery's model differs from the pipeline's, so images that decode and
/// show faces end as a clear 400, the rest as 413/422).
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let g = Box::leak(Box::new(gallery(50)));
        let pipeline = Arc::new(FacePipeline::new(PipelineConfig::default()).expect("models missing: run scripts/setup.sh"));
        let server = serve(Arc::clone(&g.engine), Some(pipeline), ServerConfig { max_body_bytes: 256 << 10, ..Default::default() });
        let addr = server.addr();
        std::mem::forget(server); // lives as long as the test process
        addr
    })
}

fn runner(cases: u32, seed: u8) -> TestRunner {
    TestRunner::new_with_rng(
        Config { cases, failure_persistence: None, ..Config::default() },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
    )
}

fn assert_clean(r: &facematch_server::client::Reply) -> Result<(), TestCaseError> {
    prop_assert!(r.status < 500, "status {} body {}", r.status, String::from_utf8_lossy(&r.body));
    if r.status >= 400 && r.status != 405 {
        prop_assert!(r.json()["error"].is_string(), "status {} without a JSON error: {}", r.status, String::from_utf8_lossy(&r.body));
    }
    Ok(())
}

/// A JSON body close to a real request: right or wrong field names, embeddings of any length and values.
fn json_body() -> impl Strategy<Value = Vec<u8>> {
    let number = prop_oneof![
        any::<f32>().prop_map(|x| x.to_string()),
        Just("1e39".to_string()),
        Just("-0".to_string()),
        Just("null".to_string()),
        Just("\"x\"".to_string())
    ];
    let embedding = prop::collection::vec(number, 0..40).prop_map(|v| format!("[{}]", v.join(",")));
    let field =
        prop_oneof![Just("embedding"), Just("k"), Just("subject"), Just("consent_id"), Just("purposes"), Just("template"), Just("bogus")];
    let value = prop_oneof![
        embedding,
        any::<i64>().prop_map(|k| k.to_string()),
        Just("\"p1\"".to_string()),
        Just("[\"door-access\"]".to_string()),
        Just("{}".to_string())
    ];
    prop::collection::vec((field, value), 0..5).prop_map(|kv| {
        let inner: Vec<String> = kv.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", inner.join(",")).into_bytes()
    })
}

#[test]
fn any_request_gets_a_clean_answer() {
    let addr = server();
    let path = prop_oneof![
        Just("/v1/identify"),
        Just("/v1/identify?k=3"),
        Just("/v1/identify?k=-1"),
        Just("/v1/verify"),
        Just("/v1/verify?subject=p1"),
        Just("/v1/enrol?subject=x&consent_id=c1&purposes=door-access"),
        Just("/v1/consents"),
        Just("/v1/anonymise"),
        Just("/v1/subjects/%00/withdraw"),
        Just("/v1/stats"),
    ];
    let ctype = prop_oneof![
        Just(Some("application/json")),
        Just(Some("image/jpeg")),
        Just(Some("application/octet-stream")),
        Just(Some("text/plain")),
        Just(None)
    ];
    let body = prop_oneof![json_body(), prop::collection::vec(any::<u8>(), 0..4096)];
    let headers =
        prop_oneof![Just(("door-access", "officer")), Just(("marketing", "officer")), Just(("door-access", "")), Just(("", "op\u{e9}"))];
    runner(300, 11)
        .run(&(path, ctype, body, headers, any::<bool>()), |(path, ct, body, (purpose, operator), post)| {
            let mut c = Client::new(addr).with_header("X-Facematch-Purpose", purpose).with_header("X-Facematch-Operator", operator);
            let r = c
                .request(if post { "POST" } else { "GET" }, path, ct, &body)
                .map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
            assert_clean(&r)
        })
        .unwrap();
}

#[test]
fn garbage_on_the_socket_never_stops_the_server() {
    let addr = server();
    let garbage = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048),
        "[A-Z]{1,8} /[ -~]{0,64} HTTP/1\\.[01]\r\n([A-Za-z-]{1,16}: [ -~]{0,32}\r\n){0,6}\r\n".prop_map(String::into_bytes),
        Just(b"POST /v1/identify HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n".to_vec()),
        Just(b"POST /v1/identify HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\nab".to_vec()),
    ];
    runner(200, 12)
        .run(&garbage, |bytes| {
            // Whatever comes back (an error status, a closed connection), the server must still serve.
            let mut raw = Client::new(addr);
            let _ = std::thread::spawn(move || raw.raw(&bytes)).join();
            let r = Client::new(addr).get("/v1/health").map_err(|e| TestCaseError::fail(format!("server gone: {e}")))?;
            prop_assert_eq!(r.status, 200);
            Ok(())
        })
        .unwrap();
}
