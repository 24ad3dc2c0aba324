//! The engine's own batched search throughput on a gallery, for comparison
//! with `facematch search` (docs/PERFORMANCE.md, "Batch CLI").
//!
//! ```text
//! FACEMATCH_KEY=... cargo run --release --example batch_search -- GALLERY PURPOSE QUERIES.npy [K] [THREADS]
//! ```
//!
//! Opens the gallery once, then times over all queries, on a rayon pool of
//! THREADS (default 1), each pass after one warm-up pass:
//! - `engine batched`: `Engine::identify_batch_deferred`, blocks of 256, all
//!   answers waited for (records durable), no output;
//! - `engine per query, 256 in flight`: `Engine::query_deferred`;
//! - `run_embeddings`: the library batch path the CLI uses, without output.
//!
//! Prints one JSON line per measurement. Writes audit records like any query.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context};
use facematch::batch::{run_embeddings, EmbeddingOptions};
use facematch::compliance::{Operator, Purpose};
use facematch::engine::{EngineBuilder, Identify, Query, QueryContext};
use facematch::store::MasterKey;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        bail!("usage: batch_search GALLERY PURPOSE QUERIES.npy [K] [THREADS]");
    }
    let k: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let threads: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let e = EngineBuilder::new(&args[0]).key(MasterKey::from_env().context("FACEMATCH_KEY")?).open()?;
    let ctx = QueryContext::new(Operator::new("bench")?, Purpose::new(args[1].as_str())?);
    let q = facematch::npy::read_f32_matrix(&args[2])?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let report = |what: &str, secs: f64| {
        println!(
            "{}",
            serde_json::json!({"measure": what, "queries": q.rows, "threads": threads, "secs": secs, "qps": q.rows as f64 / secs})
        )
    };
    pool.install(|| -> anyhow::Result<()> {
        let batched = || -> anyhow::Result<f64> {
            let t = Instant::now();
            let mut in_flight = VecDeque::new();
            for start in (0..q.rows).step_by(256) {
                let end = (start + 256).min(q.rows);
                in_flight.push_back(e.identify_batch_deferred(&ctx, &q.data[start * q.cols..end * q.cols], Identify::top(k))?);
                if in_flight.len() > 8 {
                    in_flight.pop_front().map(|p| p.wait()).transpose()?;
                }
            }
            for p in in_flight {
                p.wait()?;
            }
            Ok(t.elapsed().as_secs_f64())
        };
        batched()?;
        report("engine batched (identify_batch_deferred, 256 per block)", batched()?);
        let per_query = || -> anyhow::Result<f64> {
            let t = Instant::now();
            let mut in_flight = VecDeque::new();
            for i in 0..q.rows {
                in_flight.push_back(e.query_deferred(&ctx, Query::identify(q.row(i), k))?);
                if in_flight.len() > 256 {
                    in_flight.pop_front().map(|p| p.wait()).transpose()?;
                }
            }
            for p in in_flight {
                p.wait()?;
            }
            Ok(t.elapsed().as_secs_f64())
        };
        report("engine per query (query_deferred, 256 in flight)", per_query()?);
        let stop = AtomicBool::new(false);
        let t = Instant::now();
        let opts = EmbeddingOptions { k, ..Default::default() };
        run_embeddings(&e, &ctx, (0..q.rows).map(|i| (i as u64, q.row(i).to_vec())), &opts, &stop, &mut |_| {}, &mut |_| Ok(()))?;
        report("library run_embeddings (the CLI's path, no output)", t.elapsed().as_secs_f64());
        Ok(())
    })?;
    e.close()?;
    Ok(())
}
