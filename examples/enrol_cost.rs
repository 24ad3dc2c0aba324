//! What integrity costs an enrolment: write-ahead audit record, template log
//! append and the authenticated manifest rebound after every change, each
//! fsynced. Prints one JSON line.
//!
//! ```text
//! cargo run --release --example enrol_cost -- [--dir DIR] [--single N] [--batches B] [--batch-size S]
//! ```
//! Defaults: a temporary directory under the current one (a real disk, not
//! tmpfs), 200 single enrolments, 10 batches of 1,000.

use std::time::Instant;

use facematch::compliance::*;
use facematch::config::GalleryConfig;
use facematch::engine::{EngineBuilder, Enrolment};
use facematch::store::MasterKey;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut dir, mut single, mut batches, mut size) = (None, 200usize, 10usize, 1000usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--dir" => dir = Some(std::path::PathBuf::from(v()?)),
            "--single" => single = v()?.parse()?,
            "--batches" => batches = v()?.parse()?,
            "--batch-size" => size = v()?.parse()?,
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    let tmp = tempfile::tempdir_in(dir.unwrap_or_else(|| ".".into()))?;
    let door = Purpose::new("door-access")?;
    let mut cfg = GalleryConfig::default();
    cfg.purposes.push(PurposePolicy::new(door.clone(), 365));
    let e = EngineBuilder::new(tmp.path().join("g")).key(MasterKey::generate()).create(cfg)?;
    let op = Operator::new("bench")?;
    let set = facematch::synth::generate(&facematch::synth::SynthConfig {
        dim: 128,
        identities: single + batches * size,
        queries: 1,
        ..Default::default()
    })?;
    let row = |i: usize| set.gallery[i * 128..(i + 1) * 128].to_vec();
    let mut consents = Vec::new();
    for i in 0..single + batches * size {
        consents.push(ConsentRecord::new(
            format!("c{i}"),
            format!("p{i}").as_str(),
            ConsentBasis::SeparateConsent,
            vec![door.clone()],
            "bench",
            AgeBracket::Adult,
        ));
    }
    for c in consents.chunks(10_000) {
        e.record_consents(&op, c.to_vec())?;
    }
    let t = Instant::now();
    for i in 0..single {
        e.enrol(&op, Enrolment::new(SubjectId::new(format!("p{i}"))?, format!("c{i}"), vec![door.clone()], row(i)))?;
    }
    let single_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for b in 0..batches {
        let reqs = (0..size)
            .map(|j| {
                let i = single + b * size + j;
                Ok(Enrolment::new(SubjectId::new(format!("p{i}"))?, format!("c{i}"), vec![door.clone()], row(i)))
            })
            .collect::<facematch::Result<Vec<_>>>()?;
        e.enrol_batch(&op, reqs)?;
    }
    let batch_s = t.elapsed().as_secs_f64();
    e.close()?;
    println!(
        "{}",
        serde_json::json!({
            "single_enrolments": single, "single_ms_each": 1e3 * single_s / single.max(1) as f64,
            "batched_templates": batches * size, "batch_size": size, "batched_per_s": (batches * size) as f64 / batch_s,
        })
    );
    Ok(())
}
