//! `search_1m`: one 1:N query against 1,000,000 templates of 128 dimensions
//! (face-like synthetic data, `synth::SynthConfig` defaults, seed 42), graph at a
//! few `ef` and the exact scan beside it, plus the `hnsw_rs` baseline with
//! `--features hnsw-rs-baseline`.
//!
//! Building the 1M-node graph takes minutes, so the built index is cached
//! (plaintext, it is synthetic) in `bench-data/search_1m.index` and reused.
//! Run: `cargo bench --bench search_1m` (set `FACEMATCH_BENCH_1M_N` for another size).

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use facematch::index::{IndexConfig, SearchParams, SearchStrategy, VectorIndex};
use facematch::synth::{generate, SynthConfig, SynthSet};

fn n() -> usize {
    std::env::var("FACEMATCH_BENCH_1M_N").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000)
}

fn data() -> SynthSet {
    generate(&SynthConfig { identities: n(), queries: 1000, ..Default::default() }).expect("synth")
}

fn index(set: &SynthSet) -> VectorIndex {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("bench-data/search_1m-{}.index", n()));
    if let Ok(f) = std::fs::File::open(&path) {
        if let Ok(ix) = VectorIndex::read_from(&mut std::io::BufReader::new(f)) {
            if ix.len() == n() {
                return ix;
            }
        }
    }
    let t = std::time::Instant::now();
    let mut ix = VectorIndex::new(set.dim, IndexConfig::default()).expect("index");
    ix.add_batch(&set.gallery).expect("build");
    eprintln!("search_1m: built {} x {} in {:.1} s", n(), set.dim, t.elapsed().as_secs_f64());
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(f) = std::fs::File::create(&path) {
        let _ = ix.write_to(&mut std::io::BufWriter::new(f));
    }
    ix
}

fn bench(c: &mut Criterion) {
    let set = data();
    let ix = index(&set);
    let dim = set.dim;
    let nq = set.queries.len() / dim;
    let mut g = c.benchmark_group("search_1m");
    g.sample_size(10);
    g.throughput(Throughput::Elements(nq as u64));
    for ef in [64usize, 128, 256] {
        let p = SearchParams::top(10).with_strategy(SearchStrategy::Graph).with_ef(ef);
        g.bench_with_input(BenchmarkId::new("graph_1000_queries", ef), &ef, |b, _| {
            b.iter(|| {
                for q in set.queries.chunks_exact(dim) {
                    ix.search(q, &p).expect("search");
                }
            })
        });
    }
    let p = SearchParams::top(10).with_strategy(SearchStrategy::Exact);
    g.bench_function("exact_batch_1000_queries", |b| b.iter(|| ix.search_batch(&set.queries, &p).expect("search")));
    g.finish();

    #[cfg(feature = "hnsw-rs-baseline")]
    {
        use hnsw_rs::prelude::*;
        let t = std::time::Instant::now();
        let h = Hnsw::<f32, DistDot>::new(16, n(), 16, 200, DistDot {});
        let rows: Vec<(&[f32], usize)> = set.gallery.chunks_exact(dim).enumerate().map(|(i, v)| (v, i)).collect();
        h.parallel_insert_slice(&rows);
        eprintln!("search_1m: hnsw_rs built in {:.1} s", t.elapsed().as_secs_f64());
        let mut g = c.benchmark_group("search_1m_hnsw_rs");
        g.sample_size(10);
        g.throughput(Throughput::Elements(nq as u64));
        for ef in [64usize, 128, 256] {
            g.bench_with_input(BenchmarkId::new("graph_1000_queries", ef), &ef, |b, &ef| {
                b.iter(|| {
                    for q in set.queries.chunks_exact(dim) {
                        h.search(q, 10, ef);
                    }
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
