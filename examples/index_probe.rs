//! Measure the vector index on seeded synthetic data: build time, memory,
//! recall@1 against the exact scan, mate@1, single-thread QPS per ef, and
//! the exact scan's QPS (one query at a time and batched).
//!
//! ```text
//! cargo run --release --example index_probe -- --n 100000 --dim 128 --kind clustered --storage int8 --ef 32,64,128
//! ```
//! `--save FILE` / `--load FILE` write or read the built index (same data args).
//! `--dump PATH` also writes gallery and queries as raw little-endian f32
//! (`PATH.gallery.f32`, `PATH.queries.f32`, `PATH.mates.u32`) for side-by-side runs.

use std::time::Instant;

use facematch::index::{IndexConfig, SearchParams, SearchStrategy, VectorIndex, VectorStorage};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
}

fn unit(rng: &mut impl Rng, dim: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..dim).map(|_| rng.sample(StandardNormal)).collect();
    normalize(&mut v);
    v
}

/// Gallery (n x dim) and queries (nq x dim) with their mate slot (None = not enrolled).
fn data(kind: &str, n: usize, dim: usize, nq: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<Option<u32>>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut g = Vec::with_capacity(n * dim);
    let centres: Vec<Vec<f32>> = (0..(n / 100).max(1)).map(|_| unit(&mut rng, dim)).collect();
    for _ in 0..n {
        let v = match kind {
            "clustered" => {
                let c = &centres[rng.gen_range(0..centres.len())];
                let nz = unit(&mut rng, dim);
                let mut v: Vec<f32> = c.iter().zip(&nz).map(|(a, b)| 0.6 * a + 0.8 * b).collect();
                normalize(&mut v);
                v
            }
            _ => unit(&mut rng, dim),
        };
        g.extend(v);
    }
    let mut q = Vec::with_capacity(nq * dim);
    let mut mates = Vec::with_capacity(nq);
    for i in 0..nq {
        if i % 10 == 9 {
            q.extend(unit(&mut rng, dim));
            mates.push(None);
        } else {
            let m = rng.gen_range(0..n);
            let c: f32 = rng.gen_range(0.55..0.85);
            let nz = unit(&mut rng, dim);
            let mut v: Vec<f32> = g[m * dim..(m + 1) * dim].iter().zip(&nz).map(|(a, b)| c * a + (1.0 - c * c).sqrt() * b).collect();
            normalize(&mut v);
            q.extend(v);
            mates.push(Some(m as u32));
        }
    }
    (g, q, mates)
}

/// CPU seconds used by this process so far (user + system, from /proc; 0 elsewhere).
/// Reported beside wall time because the machine is shared.
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    let Some(rest) = stat.rsplit(')').next() else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn write_raw(path: &str, bytes: impl Iterator<Item = [u8; 4]>) {
    let v: Vec<u8> = bytes.flatten().collect();
    std::fs::write(path, v).expect("write dump");
}

fn main() -> facematch::Result<()> {
    let n: usize = arg("--n", 100_000);
    let dim: usize = arg("--dim", 128);
    let nq: usize = arg("--nq", 1000);
    let kind: String = arg("--kind", "clustered".to_string());
    let storage: String = arg("--storage", "int8".to_string());
    let efs: String = arg("--ef", "16,32,64,128".to_string());
    let m: usize = arg("--m", 16);
    let efc: usize = arg("--efc", 200);
    let rerank: usize = arg("--rerank", 64);
    let dump: String = arg("--dump", String::new());
    let (g, q, mates) = data(&kind, n, dim, nq, 42);
    if !dump.is_empty() {
        write_raw(&format!("{dump}.gallery.f32"), g.iter().map(|x| x.to_le_bytes()));
        write_raw(&format!("{dump}.queries.f32"), q.iter().map(|x| x.to_le_bytes()));
        write_raw(&format!("{dump}.mates.u32"), mates.iter().map(|m| m.unwrap_or(u32::MAX).to_le_bytes()));
    }
    let pool1 = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
    // exact baseline
    let cfg = IndexConfig {
        m,
        ef_construction: efc,
        rerank,
        storage: if storage == "f32" { VectorStorage::F32 } else { VectorStorage::Int8 },
        ..Default::default()
    };
    let load: String = arg("--load", String::new());
    let save: String = arg("--save", String::new());
    let mut ix = VectorIndex::new(dim, cfg)?;
    let t = Instant::now();
    let c0 = cpu_secs();
    if load.is_empty() {
        ix.add_batch(&g)?;
    } else {
        let mut f = std::io::BufReader::new(std::fs::File::open(&load).map_err(|e| facematch::Error::io(&load, e))?);
        ix = VectorIndex::read_from(&mut f)?;
    }
    if !save.is_empty() {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&save).map_err(|e| facematch::Error::io(&save, e))?);
        ix.write_to(&mut f)?;
    }
    let build = t.elapsed().as_secs_f64();
    let build_cpu = cpu_secs() - c0;
    println!(
        "data={kind} n={n} dim={dim} storage={storage} m={m} efc={efc} rerank={rerank} build_s={build:.2} build_cpu_s={build_cpu:.2} threads={} memory_mb={:.1}",
        rayon::current_num_threads(),
        ix.memory_bytes() as f64 / 1e6
    );
    let exact_p = SearchParams::top(1).with_strategy(SearchStrategy::Exact);
    let (t, c0) = (Instant::now(), cpu_secs());
    let truth = pool1.install(|| ix.search_batch(&q, &exact_p))?;
    let batched = nq as f64 / t.elapsed().as_secs_f64();
    let batched_cpu = nq as f64 / (cpu_secs() - c0).max(0.01);
    let ns = nq.min(200);
    let (t, c0) = (Instant::now(), cpu_secs());
    for i in 0..ns {
        std::hint::black_box(ix.search(&q[i * dim..(i + 1) * dim], &exact_p)?);
    }
    let single = ns as f64 / t.elapsed().as_secs_f64();
    let single_cpu = ns as f64 / (cpu_secs() - c0).max(0.01);
    let enrolled = mates.iter().filter(|m| m.is_some()).count();
    let mate1 = |res: &[Vec<facematch::index::Hit>]| {
        res.iter().zip(&mates).filter(|(r, m)| m.is_some() && r.first().map(|h| h.slot) == **m).count() as f64 / enrolled as f64
    };
    println!(
        "exact: qps_single_1t={single:.0} (per cpu-s {single_cpu:.0}) qps_batched_1t={batched:.0} (per cpu-s {batched_cpu:.0}) mate@1={:.4}",
        mate1(&truth)
    );
    for ef in efs.split(',').filter_map(|e| e.parse::<usize>().ok()) {
        let p = SearchParams::top(1).with_strategy(SearchStrategy::Graph).with_ef(ef);
        let mut res = Vec::with_capacity(nq);
        let (t, c0) = (Instant::now(), cpu_secs());
        for i in 0..nq {
            res.push(ix.search(&q[i * dim..(i + 1) * dim], &p)?);
        }
        let qps = nq as f64 / t.elapsed().as_secs_f64();
        let qps_cpu = nq as f64 / (cpu_secs() - c0).max(0.01);
        let rec = res.iter().zip(&truth).filter(|(a, b)| a.first().map(|h| h.slot) == b.first().map(|h| h.slot)).count() as f64 / nq as f64;
        println!("graph ef={ef}: recall@1_vs_exact={rec:.4} mate@1={:.4} qps_1t={qps:.0} (per cpu-s {qps_cpu:.0})", mate1(&res));
    }
    Ok(())
}
