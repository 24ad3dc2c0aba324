//! The server binary killed with SIGKILL under load: after restart the audit
//! log verifies (at most a torn tail, repaired on open) and every query the
//! server answered has its record. Also: SIGTERM stops it cleanly.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use facematch::audit::{AuditEvent, AuditFilter, AuditKey, AuditLog};
use facematch::engine::EngineBuilder;
use facematch::store::MasterKey;
use serde_json::json;

const PEOPLE: u64 = 500;

/// Start the server binary on `dir`; returns the child and its address.
fn start(dir: &Path, key: &MasterKey) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_facematch-server"))
        .args(["--gallery", dir.to_str().unwrap(), "--no-images", "--listen", "127.0.0.1:0", "--workers", "2"])
        .env("FACEMATCH_KEY", key.to_hex())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).parse().unwrap();
    (child, addr)
}

/// `threads` clients identify until the server goes away; returns every answered (seq, subject).
fn load_until_gone(addr: SocketAddr, threads: u64, stop: &AtomicBool) -> Vec<(u64, String)> {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut c = Client::new(addr).with_header("X-Facematch-Operator", "load").with_header("X-Facematch-Purpose", PURPOSE);
                    let mut got = Vec::new();
                    for i in 0u64.. {
                        let who = (t * 7919 + i) % PEOPLE;
                        match c.post_json("/v1/identify", &json!({"embedding": near(&vector(who), i)})) {
                            Ok(r) if r.status == 200 => got.push((r.json()["audit_seq"].as_u64().unwrap(), format!("p{who}"))),
                            Ok(r) => panic!("status {} {}", r.status, r.json()),
                            Err(_) => break, // killed
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    got
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn sigkill_under_load_loses_no_answered_query_and_sigterm_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = (tmp.path().join("g"), MasterKey::generate());
    let e = create(&dir, &key);
    enrol_people(&e, PEOPLE);
    e.close().unwrap();

    let mut answered_total = 0;
    for round in 0..3u64 {
        let (mut child, addr) = start(&dir, &key);
        let stop = AtomicBool::new(false);
        let answered = std::thread::scope(|s| {
            let load = s.spawn(|| load_until_gone(addr, 8, &stop));
            std::thread::sleep(Duration::from_millis(300 + 250 * round));
            child.kill().unwrap(); // SIGKILL, mid-load
            child.wait().unwrap();
            stop.store(true, Ordering::Relaxed);
            load.join().unwrap()
        });
        assert!(!answered.is_empty(), "round {round}: no query answered before the kill");
        answered_total += answered.len();

        // Before anything repairs it: intact, or only a torn tail.
        let akey = AuditKey::from_bytes(key.audit_key_bytes());
        let report = AuditLog::verify(&dir.join("audit"), &akey).unwrap();
        assert!(report.first_bad.is_none(), "round {round}: {report:?}");

        // Open repairs; every answered query has its record with the subject answered.
        let e = EngineBuilder::new(&dir).key(key.clone()).allow_core_dumps(true).open().unwrap();
        let report = AuditLog::verify(&dir.join("audit"), &akey).unwrap();
        assert!(report.first_bad.is_none() && !report.torn_tail, "round {round} after open: {report:?}");
        e.close().unwrap();
        let records = AuditLog::read(&dir.join("audit"), &AuditFilter::default()).unwrap();
        let by_seq: std::collections::HashMap<u64, &AuditEvent> = records.iter().map(|r| (r.seq, &r.event)).collect();
        for (seq, subject) in &answered {
            let Some(AuditEvent::Query(q)) = by_seq.get(seq) else { panic!("round {round}: answered query {seq} has no record") };
            assert_eq!(q.subject.as_deref(), Some(subject.as_str()), "round {round}: record {seq}");
        }
    }
    assert!(answered_total > 100, "too little load to mean anything: {answered_total}");

    // SIGTERM: answers what is in flight, closes the gallery, exits 0.
    let (mut child, addr) = start(&dir, &key);
    let mut c = Client::new(addr).with_header("X-Facematch-Operator", "load").with_header("X-Facematch-Purpose", PURPOSE);
    let r = c.post_json("/v1/identify", &json!({"embedding": near(&vector(3), 1)})).unwrap();
    assert_eq!(r.json()["decision"]["subject"], "p3", "{}", r.json());
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let t0 = Instant::now();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(30));
    let report = AuditLog::verify(&dir.join("audit"), &AuditKey::from_bytes(key.audit_key_bytes())).unwrap();
    assert!(report.first_bad.is_none() && !report.torn_tail, "{report:?}");
}
