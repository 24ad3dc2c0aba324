//! Audit append throughput: fsync per record, group commit with 8 appending
//! threads, and no fsync (upper bound); full verification of a 10k-record
//! log; and `AuditLog::open` of a 100k-record log (what every engine open
//! pays).
//!
//! `cargo bench --bench audit`. Each `audit_append` iteration is one
//! `append` that has returned, i.e. one durable record under the named
//! durability.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use facematch::audit::*;
use facematch::clock::SystemClock;

fn event(i: u64) -> AuditEvent {
    AuditEvent::Query(QueryAudit {
        operator: "bench-operator".into(),
        purpose: "access-control".into(),
        mode: QueryMode::Identify,
        model_id: "sface-2021dec".into(),
        threshold: 0.363,
        threshold_version: 3,
        k: 5,
        faces_found: 2,
        faces_discarded: 1,
        decision: DecisionKind::Match,
        subject: Some(format!("subject-{}", i % 1000)),
        template: Some(i),
        top_score: Some(0.5 + (i % 100) as f32 / 1000.0),
        latency_us: 650,
    })
}

fn open(dir: &std::path::Path, durability: Durability) -> AuditLog {
    let cfg = AuditConfig { site: "bench".into(), device: "bench".into(), durability, ..Default::default() };
    AuditLog::open(dir, AuditKey::from_bytes([9; 32]), cfg, Arc::new(SystemClock)).unwrap().0
}

/// `iters` appends spread over `threads` threads; returns wall time.
fn run_threads(log: &Arc<AuditLog>, threads: u64, iters: u64) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let log = Arc::clone(log);
            let n = iters / threads + u64::from(t < iters % threads);
            s.spawn(move || {
                for i in 0..n {
                    log.append(event(t * 1_000_000 + i)).unwrap();
                }
            });
        }
    });
    start.elapsed()
}

fn bench_audit(c: &mut Criterion) {
    let mut g = c.benchmark_group("audit_append");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(4));

    let cases: [(&str, Durability, u64); 6] = [
        ("every_record_1_thread", Durability::EveryRecord, 1),
        ("group_commit_1_thread", Durability::default(), 1),
        ("group_commit_8_threads", Durability::default(), 8),
        ("group_commit_32_threads", Durability::default(), 32),
        ("off_1_thread", Durability::Off, 1),
        ("off_8_threads", Durability::Off, 8),
    ];
    for (name, durability, threads) in cases {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(open(dir.path(), durability));
        g.bench_function(name, |b| b.iter_custom(|iters| run_threads(&log, threads, iters)));
        drop(log);
    }
    g.finish();

    // Verifying (every hash, link and MAC) a 10,000-record log.
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path(), Durability::Off);
        for chunk in 0..100u64 {
            log.append_batch((0..100).map(|i| event(chunk * 100 + i)).collect()).unwrap();
        }
    }
    let key = AuditKey::from_bytes([9; 32]);
    let mut g = c.benchmark_group("audit_verify");
    g.throughput(Throughput::Elements(10_000));
    g.sample_size(10);
    g.bench_function("verify_10k_records", |b| b.iter(|| assert!(AuditLog::verify(dir.path(), &key).unwrap().ok())));
    g.finish();

    // Opening a log of 100,000 records in segments of OPEN_BENCH_SEGMENT
    // records (10 closed segments, the last one full: the worst case for
    // an open that reads the last segment in full). Only `open` is timed;
    // closing the log (writer thread join) happens outside the clock.
    let dir = tempfile::tempdir().unwrap();
    let open_cfg = AuditConfig {
        site: "bench".into(),
        device: "bench".into(),
        segment_max_records: OPEN_BENCH_SEGMENT,
        durability: Durability::Off,
        ..Default::default()
    };
    {
        let (log, _) = AuditLog::open(dir.path(), key.clone(), open_cfg.clone(), Arc::new(SystemClock)).unwrap();
        for chunk in 0..1000u64 {
            log.append_batch((0..100).map(|i| event(chunk * 100 + i)).collect()).unwrap();
        }
        log.close().unwrap();
    }
    let mut g = c.benchmark_group("audit_open");
    g.sample_size(10);
    g.bench_function("open_after_100k_records", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let (log, rep) = AuditLog::open(dir.path(), key.clone(), open_cfg.clone(), Arc::new(SystemClock)).unwrap();
                total += start.elapsed();
                assert_eq!(rep.records, 100_000);
                drop(log);
            }
            total
        })
    });
    g.finish();
}

/// Records per segment in the `open_after_100k_records` case.
const OPEN_BENCH_SEGMENT: u64 = 10_000;

criterion_group!(benches, bench_audit);
criterion_main!(benches);
