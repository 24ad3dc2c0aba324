//! The HTTP API end to end, in-process: answers, errors, credentials, and the
//! audit records behind every answer.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use facematch::audit::{AuditEvent, AuditFilter, AuditKey, AuditLog};
use facematch::store::MasterKey;
use facematch_server::ServerConfig;
use serde_json::json;

fn audit(dir: &std::path::Path, key: &MasterKey) -> Vec<facematch::audit::AuditRecord> {
    let akey = AuditKey::from_bytes(key.audit_key_bytes());
    let report = AuditLog::verify(&dir.join("audit"), &akey).unwrap();
    assert!(report.first_bad.is_none(), "{report:?}");
    AuditLog::read(&dir.join("audit"), &AuditFilter::default()).unwrap()
}

#[test]
fn consent_enrol_identify_verify_withdraw_over_http_each_answer_audited() {
    let g = gallery(0);
    let server = serve(Arc::clone(&g.engine), None, ServerConfig::default());
    let mut c = client(&server);

    assert_eq!(c.get("/v1/health").unwrap().json()["status"], "ok");
    let consent = json!({
        "consent_id": "form-9", "subject": "alice", "basis": {"type": "separate_consent"},
        "purposes": [PURPOSE], "given_at_ms": 0, "collected_by": "desk-1", "age_bracket": "adult", "guardian": null
    });
    let r = c.post_json("/v1/consents", &consent).unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let alice = vector(1);
    let r =
        c.post_json("/v1/enrol", &json!({"subject": "alice", "consent_id": "form-9", "purposes": [PURPOSE], "embedding": alice})).unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let template = r.json()["template"].as_u64().unwrap();

    let mut answered = Vec::new();
    let r = c.post_json("/v1/identify", &json!({"embedding": near(&alice, 5), "k": 3})).unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    let body = r.json();
    assert_eq!(body["decision"]["decision"], "match", "{body}");
    assert_eq!(body["candidates"][0]["template"], template);
    answered.push((body["audit_seq"].as_u64().unwrap(), "match"));

    let r = c.post_json("/v1/identify", &json!({"embedding": vector(99)})).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["decision"]["decision"], "no_match", "{}", r.json());
    answered.push((r.json()["audit_seq"].as_u64().unwrap(), "no_match"));

    let r = c.post_json("/v1/verify", &json!({"embedding": near(&alice, 6), "subject": "alice"})).unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["decision"]["decision"], "match");
    answered.push((r.json()["audit_seq"].as_u64().unwrap(), "match"));

    let stats = c.get("/v1/stats").unwrap().json();
    assert_eq!(stats["gallery"]["templates"], 1, "{stats}");
    assert_eq!(stats["images"], false);

    let r = c.request("POST", "/v1/subjects/alice/withdraw", None, b"").unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["templates"], json!([template]));
    let r = c.post_json("/v1/identify", &json!({"embedding": alice})).unwrap();
    assert_eq!(r.json()["decision"]["decision"], "no_match", "withdrawn consent still matches: {}", r.json());

    stop(server, g.engine);

    // Every answer has its record, with the operator from the header and the decision sent.
    let records = audit(&g.dir, &g.key);
    for (seq, decision) in answered {
        let rec = records.iter().find(|r| r.seq == seq).unwrap_or_else(|| panic!("no record {seq}"));
        let AuditEvent::Query(q) = &rec.event else { panic!("record {seq} is not a query: {rec:?}") };
        assert_eq!(q.operator, "officer-7");
        assert_eq!(q.purpose, PURPOSE);
        assert_eq!(serde_json::to_value(q.decision).unwrap(), json!(decision));
    }
    assert!(records.iter().any(|r| matches!(&r.event, AuditEvent::ConsentRecorded { operator, .. } if operator == "officer-7")));
    assert!(records.iter().any(|r| matches!(&r.event, AuditEvent::ConsentWithdrawn { .. })));
}

#[test]
fn bad_requests_get_clear_errors_and_nothing_of_the_probe_back() {
    let g = gallery(3);
    let server = serve(Arc::clone(&g.engine), None, ServerConfig { max_body_bytes: 64 << 10, ..Default::default() });
    let mut c = client(&server);
    let status = |r: std::io::Result<Reply>| {
        let r = r.unwrap();
        (r.status, r.json()["error"].as_str().unwrap_or("").to_string(), r.json()["message"].as_str().unwrap_or("").to_string())
    };

    let (s, kind, _) = status(c.post_json("/v1/identify", &json!({"embedding": vector(1)[..5]})));
    assert_eq!((s, kind.as_str()), (422, "wrong_dimension"));
    let mut huge: Vec<serde_json::Value> = vector(1).into_iter().map(|x| json!(x)).collect();
    huge[0] = json!(1e39f64); // no f32 holds it: infinity
    let (s, kind, _) = status(c.post_json("/v1/identify", &json!({"embedding": huge})));
    assert_eq!((s, kind.as_str()), (422, "invalid_embedding"));
    let (s, kind, _) = status(c.post_json("/v1/identify", &json!({"embedding": vec![0.0; DIM]})));
    assert_eq!((s, kind.as_str()), (422, "invalid_embedding"));
    // Malformed JSON: position only, never the values.
    let (s, kind, msg) = status(c.request("POST", "/v1/identify", Some("application/json"), b"{\"embedding\": [0.8123456, 0.25, oops]}"));
    assert_eq!((s, kind.as_str()), (400, "bad_request"));
    assert!(!msg.contains("0.8123456") && msg.contains("column"), "{msg}");
    let (s, _, msg) = status(c.request("POST", "/v1/identify", Some("application/json"), br#"{"embedding": "0.8123456"}"#));
    assert_eq!(s, 400);
    assert!(!msg.contains("0.8123456"), "{msg}");
    let (s, _, _) = status(c.post_json("/v1/identify", &json!({"embedding": vector(1), "k": 0})));
    assert_eq!(s, 400);
    let (s, _, _) = status(c.post_json("/v1/identify", &json!({"embedding": vector(1), "k": 1000})));
    assert_eq!(s, 400);
    let (s, _, _) = status(c.post_json("/v1/identify", &json!({"embedding": vector(1), "extra": 1})));
    assert_eq!(s, 400);
    let (s, kind, _) = status(c.post_json("/v1/verify", &json!({"embedding": vector(1), "subject": "nobody"})));
    assert_eq!((s, kind.as_str()), (404, "unknown_subject"));
    let (s, kind, _) = status(c.request("POST", "/v1/identify", Some("text/plain"), b"hello"));
    assert_eq!((s, kind.as_str()), (415, "unsupported_media_type"));
    let (s, kind, _) = status(c.request("POST", "/v1/identify", Some("image/jpeg"), b"\xff\xd8\xff"));
    assert_eq!((s, kind.as_str()), (415, "unsupported_media_type"), "no models loaded");
    let (s, kind, _) = status(c.request("POST", "/v1/identify", Some("image/jpeg"), &vec![7u8; 65 << 10]));
    assert_eq!((s, kind.as_str()), (413, "payload_too_large"));
    let (s, kind, _) = status(c.get("/v1/nothing"));
    assert_eq!((s, kind.as_str()), (404, "not_found"));
    assert_eq!(c.get("/v1/identify").unwrap().status, 405);

    // Who and why are required, and must be valid.
    let mut anon = Client::new(server.addr()).with_header("X-Facematch-Purpose", PURPOSE);
    let (s, _, msg) = status(anon.post_json("/v1/identify", &json!({"embedding": vector(1)})));
    assert_eq!(s, 400);
    assert!(msg.contains("operator"), "{msg}");
    let mut no_purpose = Client::new(server.addr()).with_header("X-Facematch-Operator", "officer-7");
    let (s, _, msg) = status(no_purpose.post_json("/v1/identify", &json!({"embedding": vector(1)})));
    assert_eq!(s, 400);
    assert!(msg.contains("purpose"), "{msg}");
    let mut undeclared =
        Client::new(server.addr()).with_header("X-Facematch-Operator", "officer-7").with_header("X-Facematch-Purpose", "marketing");
    let (s, kind, _) = status(undeclared.post_json("/v1/identify", &json!({"embedding": vector(1)})));
    assert_eq!((s, kind.as_str()), (403, "policy_violation"));

    // Malformed HTTP on a fresh connection: an error status, and the server keeps serving.
    let r = facematch_server::client::Client::new(server.addr()).raw(b"GARBAGE\r\n\r\n");
    assert!(r.map(|r| r.status >= 400).unwrap_or(true));
    let r = c.post_json("/v1/identify", &json!({"embedding": near(&vector(2), 3)})).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["decision"]["subject"], "p2", "{}", r.json());
    server.shutdown().unwrap();
}

#[test]
fn bearer_tokens_name_the_operator_in_the_audit_log() {
    let g = gallery(2);
    let tokens = BTreeMap::from([("t0k3n-for-gate-3-abcdef".to_string(), "gate-3".to_string())]);
    let server = serve(Arc::clone(&g.engine), None, ServerConfig { tokens, ..Default::default() });
    let probe = json!({"embedding": near(&vector(1), 8)});

    // The operator header is ignored when tokens are configured.
    let mut c = Client::new(server.addr()).with_header("X-Facematch-Purpose", PURPOSE).with_header("X-Facematch-Operator", "mallory");
    assert_eq!(c.post_json("/v1/identify", &probe).unwrap().status, 401);
    let mut wrong =
        Client::new(server.addr()).with_header("X-Facematch-Purpose", PURPOSE).with_header("Authorization", "Bearer not-a-token-at-all");
    assert_eq!(wrong.post_json("/v1/identify", &probe).unwrap().status, 401);
    assert_eq!(wrong.get("/v1/stats").unwrap().status, 401);
    assert_eq!(wrong.get("/v1/health").unwrap().status, 200, "health needs no credentials");
    let mut gate = Client::new(server.addr())
        .with_header("X-Facematch-Purpose", PURPOSE)
        .with_header("Authorization", "Bearer t0k3n-for-gate-3-abcdef");
    let r = gate.post_json("/v1/identify", &probe).unwrap();
    assert_eq!(r.status, 200, "{}", r.json());
    let seq = r.json()["audit_seq"].as_u64().unwrap();
    stop(server, g.engine);

    let records = audit(&g.dir, &g.key);
    let rec = records.iter().find(|r| r.seq == seq).unwrap();
    let AuditEvent::Query(q) = &rec.event else { panic!("{rec:?}") };
    assert_eq!(q.operator, "gate-3");
    assert!(!records.iter().any(|r| serde_json::to_string(&r.event).unwrap().contains("mallory")));
}

#[test]
fn concurrent_clients_share_commits_and_every_answer_is_durable() {
    let g = gallery(200);
    let server = serve(Arc::clone(&g.engine), None, ServerConfig::default());
    let before = g.engine.audit_stats().unwrap();
    let seqs: Vec<(u64, String)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..16u64)
            .map(|t| {
                let mut c = client(&server);
                s.spawn(move || {
                    (0..25u64)
                        .map(|i| {
                            let who = (t * 25 + i) % 200;
                            let r = c.post_json("/v1/identify", &json!({"embedding": near(&vector(who), t * 1000 + i)})).unwrap();
                            assert_eq!(r.status, 200, "{}", r.json());
                            assert_eq!(r.json()["decision"]["subject"], format!("p{who}"), "{}", r.json());
                            (r.json()["audit_seq"].as_u64().unwrap(), format!("p{who}"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let after = g.engine.audit_stats().unwrap();
    assert_eq!(after.records - before.records, 400);
    assert!(after.commits - before.commits <= 400, "{before:?} -> {after:?}");
    stop(server, g.engine);
    let records = audit(&g.dir, &g.key);
    for (seq, subject) in seqs {
        let AuditEvent::Query(q) = &records.iter().find(|r| r.seq == seq).unwrap().event else { panic!() };
        assert_eq!(q.subject.as_deref(), Some(subject.as_str()));
    }
}

#[test]
fn image_requests_enrol_identify_verify_and_anonymise_with_the_face_models() {
    use facematch::compliance::{AgeBracket, ConsentBasis, ConsentRecord, Operator, Purpose, PurposePolicy};
    use facematch::pipeline::{FacePipeline, PipelineConfig};
    let sample = |name: &str| {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/samples").join(name))
            .expect("samples missing: run scripts/setup.sh")
    };
    let tmp = tempfile::tempdir().unwrap();
    let door = Purpose::new(PURPOSE).unwrap();
    let mut cfg = facematch::config::GalleryConfig::default(); // the pipeline's model and dimension
    cfg.purposes.push(PurposePolicy::new(door.clone(), 365));
    let engine = Arc::new(
        facematch::engine::EngineBuilder::new(tmp.path().join("g")).key(MasterKey::generate()).allow_core_dumps(true).create(cfg).unwrap(),
    );
    engine
        .record_consent(
            &Operator::new("clerk").unwrap(),
            ConsentRecord::new("f1", "barack", ConsentBasis::SeparateConsent, vec![door], "clerk", AgeBracket::Adult),
        )
        .unwrap();
    let pipeline = Arc::new(FacePipeline::new(PipelineConfig::default()).expect("models missing: run scripts/setup.sh"));
    let server = serve(Arc::clone(&engine), Some(pipeline), ServerConfig::default());
    let mut c = client(&server);

    let r = c
        .request("POST", &format!("/v1/enrol?subject=barack&consent_id=f1&purposes={PURPOSE}"), Some("image/jpeg"), &sample("obama.jpg"))
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.json());
    let r = c.request("POST", "/v1/identify?k=3", Some("image/jpeg"), &sample("obama3.jpg")).unwrap();
    assert_eq!(r.status, 200, "{}", r.json());
    let body = r.json();
    assert_eq!(body["matches"][0]["identification"]["decision"]["subject"], "barack", "{body}");
    let r = c.request("POST", "/v1/verify?subject=barack", Some("image/jpeg"), &sample("obama2.jpg")).unwrap();
    assert_eq!(r.json()["verification"]["decision"]["decision"], "match", "{}", r.json());
    let r = c.request("POST", "/v1/verify?subject=barack", Some("image/jpeg"), &sample("biden.jpg")).unwrap();
    assert_ne!(r.json()["verification"]["decision"]["decision"], "match", "{}", r.json());
    let r = c.request("POST", "/v1/identify", Some("image/jpeg"), b"\xff\xd8\xffnot a jpeg").unwrap();
    assert_eq!((r.status, r.json()["error"].as_str()), (422, Some("bad_image")));

    let r = c.request("POST", "/v1/anonymise", Some("image/jpeg"), &sample("obama.jpg")).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert_eq!(r.header("x-facematch-faces"), Some("1"));
    assert!(r.body.starts_with(b"\x89PNG"));
    server.shutdown().unwrap();
}
