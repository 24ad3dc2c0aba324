//! Engine-level costs: encryption at rest on open and on search, and auditing on vs off.
//!
//! - `engine_open/encrypted_gallery`: open a 20k x 128 gallery (key check, mmap +
//!   authenticate + decrypt the template log, decrypt and load the index snapshot);
//!   `engine_open/plaintext_index_load`: loading the same index from plaintext bytes
//!   already in memory: the difference is the price of encryption + replay on open.
//! - `engine_query/*`: one 1:N identification through the engine (purpose check,
//!   decision, audit record made durable) with the audit log's group commit, with
//!   `Durability::Off`, and the bare index search the engine wraps, on 1 and 8
//!   threads. Templates are decrypted into memory on open, so search itself pays
//!   nothing for encryption: `index_only` vs `audit_off` shows the engine's own overhead.
//!   Group commit shares one fsync among concurrent queries, so its cost falls with concurrency (64 threads).
//! - `engine_query/*_pipelined/{1,2}`: 1 or 2 threads, each keeping 32 queries in
//!   flight with `query_deferred` (answers released once their record is durable);
//!   `*_pipelined_deep/2`: 128 in flight each. 4,000 queries per iteration so that
//!   the final drain is amortised as in a server. `audit_off` batches records
//!   exactly like group commit but never fsyncs: the difference is durability.
//! - Each side has [`ENGINES`] identical engines and iterations take them in
//!   turn: two identical engines in one process were measured up to 8% apart
//!   for good (memory placement, `examples/audit_load --paired 8 --engines 1
//!   --control`), a bias one engine per side would book as audit cost.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use facematch::audit::Durability;
use facematch::compliance::*;
use facematch::config::GalleryConfig;
use facematch::engine::{Engine, EngineBuilder, Enrolment, Query, QueryContext};
use facematch::index::{SearchParams, SearchStrategy, VectorIndex};
use facematch::store::MasterKey;
use facematch::synth::{generate, SynthConfig};

const N: usize = 20_000;
/// Engines per side of the audit comparison (see the module docs).
const ENGINES: usize = 3;

fn gallery(dir: &std::path::Path, key: &MasterKey, durability: Durability) -> (Engine, Vec<f32>) {
    let set = generate(&SynthConfig { identities: N, queries: 200, ..Default::default() }).unwrap();
    let door = Purpose::new("door-access").unwrap();
    let mut cfg = GalleryConfig::default();
    cfg.purposes.push(PurposePolicy::new(door.clone(), 365));
    cfg.audit.durability = durability;
    let e = EngineBuilder::new(dir).key(key.clone()).create(cfg).unwrap();
    let op = Operator::new("bench").unwrap();
    let consents = (0..N)
        .map(|i| {
            ConsentRecord::new(
                format!("c{i}"),
                &format!("s{i}"),
                ConsentBasis::SeparateConsent,
                vec![door.clone()],
                "bench",
                AgeBracket::Adult,
            )
        })
        .collect();
    e.record_consents(&op, consents).unwrap();
    let mut batch = Vec::new();
    for i in 0..N {
        let s = format!("s{i}");
        batch.push(Enrolment::new(
            SubjectId::new(s).unwrap(),
            format!("c{i}"),
            vec![door.clone()],
            set.gallery[i * 128..(i + 1) * 128].to_vec(),
        ));
        if batch.len() == 5000 {
            e.enrol_batch(&op, std::mem::take(&mut batch)).unwrap();
        }
    }
    e.enrol_batch(&op, batch).unwrap();
    e.checkpoint().unwrap();
    (e, set.queries)
}

fn bench_open(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let (e, _) = gallery(dir.path(), &key, Durability::Off);
    // The plaintext the snapshot holds, for the comparison.
    let mut plain = Vec::new();
    {
        let cfg = e.config();
        let mut ix = VectorIndex::new(cfg.dim, cfg.index.clone()).unwrap();
        // Rebuild an identical index from the exported templates.
        let exp = dir.path().join("export");
        e.export(&Operator::new("bench").unwrap(), None, &exp).unwrap();
        let m = facematch::npy::read_f32_matrix(exp.join("templates.npy")).unwrap();
        ix.add_batch(&m.data).unwrap();
        ix.write_to(&mut plain).unwrap();
        std::fs::remove_dir_all(&exp).unwrap();
    }
    e.close().unwrap();
    let mut g = c.benchmark_group("engine_open");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("encrypted_gallery", |b| b.iter(|| EngineBuilder::new(dir.path()).key(key.clone()).open().unwrap()));
    g.bench_function("plaintext_index_load", |b| b.iter(|| VectorIndex::read_from(&mut plain.as_slice()).unwrap()));
    g.finish();
}

/// One side of the audit comparison: its engines (kept with their directories).
struct Side {
    name: &'static str,
    engines: Vec<Arc<Engine>>,
    _dirs: Vec<tempfile::TempDir>,
}

fn bench_query(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_query");
    g.sample_size(20);
    let door = Purpose::new("door-access").unwrap();
    let mut queries = Vec::new();
    let mut sides = Vec::new();
    for (name, durability) in [("audit_group_commit", Durability::default()), ("audit_off", Durability::Off)] {
        let mut side = Side { name, engines: Vec::new(), _dirs: Vec::new() };
        for _ in 0..ENGINES {
            let dir = tempfile::tempdir().unwrap();
            let (e, q) = gallery(dir.path(), &MasterKey::generate(), durability);
            side.engines.push(Arc::new(e));
            side._dirs.push(dir);
            queries = q;
        }
        sides.push(side);
    }
    let ctx = QueryContext::new(Operator::new("bench").unwrap(), door.clone());
    let nq = queries.len() / 128;
    // Each configuration runs its two sides back to back, so that drift of
    // the machine over the minutes of the whole group stays out of the pair.
    for threads in [1usize, 8, 64] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        g.throughput(Throughput::Elements(nq as u64));
        for side in &sides {
            g.bench_with_input(BenchmarkId::new(side.name, threads), &threads, |b, _| {
                let mut turn = 0usize;
                b.iter(|| {
                    let e = &side.engines[turn % ENGINES];
                    turn += 1;
                    pool.install(|| {
                        use rayon::prelude::*;
                        (0..nq).into_par_iter().for_each(|i| {
                            e.query(&ctx, Query::identify(&queries[i * 128..(i + 1) * 128], 10)).unwrap();
                        })
                    })
                })
            });
        }
    }
    // Pipelined: each thread keeps up to `window` queries in flight
    // (query_deferred) and releases the oldest answer when the window
    // is full, as a server with many connections per thread would.
    // 4,000 queries per iteration (20 passes over the probes): a window
    // is drained only at the end of an iteration, as a server drains
    // only when it stops, so the drain's last fsync is amortised.
    const PIPELINED: usize = 4000;
    for (label, window, threads) in [("pipelined", 32usize, 1usize), ("pipelined", 32, 2), ("pipelined_deep", 128, 2)] {
        g.throughput(Throughput::Elements(PIPELINED as u64));
        for side in &sides {
            g.bench_with_input(BenchmarkId::new(format!("{}_{label}", side.name), threads), &threads, |b, &threads| {
                let mut turn = 0usize;
                b.iter(|| {
                    let e = &side.engines[turn % ENGINES];
                    turn += 1;
                    std::thread::scope(|s| {
                        for t in 0..threads {
                            let (ctx, queries) = (&ctx, &queries);
                            s.spawn(move || {
                                let mut inflight = std::collections::VecDeque::with_capacity(window);
                                for i in (t..PIPELINED).step_by(threads) {
                                    if inflight.len() == window {
                                        let p: facematch::engine::Pending<_> = inflight.pop_front().unwrap();
                                        p.wait().unwrap();
                                    }
                                    let j = i % nq;
                                    inflight
                                        .push_back(e.query_deferred(ctx, Query::identify(&queries[j * 128..(j + 1) * 128], 10)).unwrap());
                                }
                                for p in inflight {
                                    p.wait().unwrap();
                                }
                            });
                        }
                    })
                })
            });
        }
    }
    // The bare index the engine wraps, same queries.
    let e = &sides[1].engines[0];
    let cfg = e.config();
    let exp_dir = tempfile::tempdir().unwrap();
    let exp = exp_dir.path().join("export");
    e.export(&Operator::new("bench").unwrap(), None, &exp).unwrap();
    let m = facematch::npy::read_f32_matrix(exp.join("templates.npy")).unwrap();
    let mut ix = VectorIndex::new(cfg.dim, cfg.index.clone()).unwrap();
    ix.add_batch(&m.data).unwrap();
    for threads in [1usize, 8] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        g.throughput(Throughput::Elements(nq as u64));
        g.bench_with_input(BenchmarkId::new("index_only", threads), &threads, |b, _| {
            b.iter(|| {
                pool.install(|| {
                    use rayon::prelude::*;
                    (0..nq).into_par_iter().for_each(|i| {
                        let p = SearchParams { k: 10, ef: None, strategy: SearchStrategy::Auto, filter: None };
                        ix.search(&queries[i * 128..(i + 1) * 128], &p).unwrap();
                    })
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_open, bench_query);
criterion_main!(benches);
