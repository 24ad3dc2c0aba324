//! The Python peers (hnswlib, faiss) run by scripts/index_peers.py.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use facematch::npy;
use facematch::synth::SynthSet;
use serde::Deserialize;

use crate::metrics::accuracy;
use crate::{Args, Row};

/// One JSON line printed by the script.
#[derive(Deserialize, Debug, Clone)]
pub struct PeerLine {
    backend: String,
    mode: String,
    ef: Option<usize>,
    threads: usize,
    build_s: f64,
    rss_delta_bytes: Option<i64>,
    index_bytes: Option<u64>,
    qps: f64,
    ids: String,
    scores: String,
}

/// Lines of one (backend, mode, ef), merged over thread counts.
pub struct PeerRow {
    first: PeerLine,
    qps: Vec<(usize, f64)>,
}

/// Run the script on the .npy files in `dir` and group its lines by setting.
pub fn run(python: &Path, dir: &Path, args: &Args) -> Result<Vec<PeerRow>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/index_peers.py");
    let join = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    eprintln!("[harness] running {} {}", python.display(), script.display());
    let mut child = Command::new(python)
        .arg(&script)
        .arg("--dir")
        .arg(dir)
        .args(["--m", &args.m.to_string(), "--efc", &args.efc.to_string()])
        .args(["--ef", &join(&args.ef), "--threads", &join(&args.threads)])
        .args(["--build-threads", &args.build_threads.to_string(), "--k", &args.k.to_string()])
        .args(["--min-secs", &args.min_secs.to_string(), "--backends", &args.peer_backends])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {} (run: bash scripts/setup.sh --with-peers)", python.display()))?;
    let stdout = child.stdout.take().context("no stdout from the peers script")?;
    let mut groups: Vec<PeerRow> = Vec::new();
    let mut index: HashMap<(String, String, Option<usize>), usize> = HashMap::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let parsed: PeerLine = serde_json::from_str(&line).with_context(|| format!("bad line from peers: {line}"))?;
        let key = (parsed.backend.clone(), parsed.mode.clone(), parsed.ef);
        match index.get(&key) {
            Some(&i) => groups[i].qps.push((parsed.threads, parsed.qps)),
            None => {
                index.insert(key, groups.len());
                groups.push(PeerRow { qps: vec![(parsed.threads, parsed.qps)], first: parsed });
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("peers script exited with {status}");
    }
    Ok(groups)
}

impl PeerRow {
    /// Load the result files and score them like any other backend.
    pub fn into_row(self, exact: &[Vec<(u32, f32)>], set: &SynthSet, args: &Args) -> Result<Row> {
        let (ishape, ids) = npy::read_array::<i64>(&self.first.ids)?;
        let (sshape, scores) = npy::read_array::<f32>(&self.first.scores)?;
        if ishape != sshape || ishape.len() != 2 || ishape[0] != set.query_rows() {
            bail!("peer results {} have shape {ishape:?} / {sshape:?}", self.first.ids);
        }
        let k = ishape[1];
        let results: Vec<Vec<(u32, f32)>> = ids
            .chunks_exact(k.max(1))
            .zip(scores.chunks_exact(k.max(1)))
            .map(|(i, s)| i.iter().zip(s).filter(|(&id, _)| id >= 0).map(|(&id, &sc)| (id as u32, sc)).collect())
            .collect();
        let acc = accuracy(&results, exact, &set.gallery_identity, &set.query_identity, args.k, args.threshold);
        Ok(Row {
            backend: self.first.backend,
            mode: self.first.mode,
            ef: self.first.ef,
            build_s: self.first.build_s,
            rss_delta_bytes: self.first.rss_delta_bytes,
            index_bytes: self.first.index_bytes,
            qps: self.qps,
            accuracy: acc,
            peer: true,
        })
    }
}
