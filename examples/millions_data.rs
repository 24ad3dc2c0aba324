//! Data for the millions harness (`scripts/millions.sh`): a face-like gallery
//! of N x 128 embeddings from the project's own generator
//! ([`facematch::synth`]), its subject ids, probes and their truth.
//!
//! ```text
//! cargo run --release --example millions_data -- --n 1000000 --queries 1000 --out DIR
//! ```
//! writes `DIR/gallery.npy` (N x 128 float32), `DIR/subjects.txt` (one id
//! per row, `p<identity>`), `DIR/queries.npy` and `DIR/truth.txt` (the
//! subject each probe is a mate of, `-` for a person not enrolled). Files
//! already there with the same parameters are kept (`DIR/params.txt`).

use std::io::Write;
use std::path::PathBuf;

use facematch::synth::{generate, SynthConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let n: usize = get("--n").unwrap_or_else(|| "1000000".into()).parse()?;
    let queries: usize = get("--queries").unwrap_or_else(|| "1000".into()).parse()?;
    let seed: u64 = get("--seed").unwrap_or_else(|| "42".into()).parse()?;
    let out = PathBuf::from(get("--out").ok_or("--out DIR is required")?);
    std::fs::create_dir_all(&out)?;
    let params = format!("n={n} queries={queries} seed={seed} dim=128 structured\n");
    if std::fs::read_to_string(out.join("params.txt")).ok().as_deref() == Some(params.as_str()) {
        eprintln!("millions_data: {} already holds this data", out.display());
        return Ok(());
    }
    let t = std::time::Instant::now();
    let cfg = SynthConfig { dim: 128, identities: n, templates_per_identity: 1, queries, seed, ..Default::default() };
    let set = generate(&cfg)?;
    facematch::npy::write_f32_matrix(out.join("gallery.npy"), &set.gallery, set.gallery_rows(), 128)?;
    facematch::npy::write_f32_matrix(out.join("queries.npy"), &set.queries, set.query_rows(), 128)?;
    let mut s = std::io::BufWriter::new(std::fs::File::create(out.join("subjects.txt"))?);
    for id in &set.gallery_identity {
        writeln!(s, "p{id}")?;
    }
    s.flush()?;
    let mut t2 = std::io::BufWriter::new(std::fs::File::create(out.join("truth.txt"))?);
    for q in &set.query_identity {
        match q {
            Some(id) => writeln!(t2, "p{id}")?,
            None => writeln!(t2, "-")?,
        }
    }
    t2.flush()?;
    std::fs::write(out.join("params.txt"), params)?;
    eprintln!("millions_data: {n} x 128 and {queries} probes in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}
