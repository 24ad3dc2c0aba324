//! Shared helpers for the gallery/compliance integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use facematch::clock::ManualClock;
use facematch::compliance::*;
use facematch::config::GalleryConfig;
use facematch::engine::{Engine, EngineBuilder, Enrolment, QueryContext};
use facematch::store::MasterKey;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const DIM: usize = 16;

pub fn purpose(s: &str) -> Purpose {
    Purpose::new(s).unwrap()
}

pub fn op() -> Operator {
    Operator::new("tester").unwrap()
}

pub fn subject(s: &str) -> SubjectId {
    SubjectId::new(s).unwrap()
}

pub fn config() -> GalleryConfig {
    let mut cfg = GalleryConfig { dim: DIM, model_id: "test-model".into(), ..Default::default() };
    cfg.purposes.push(PurposePolicy::new(purpose("door-access"), 30));
    cfg.purposes.push(PurposePolicy::new(purpose("payment"), 365));
    let mut assist = PurposePolicy::new(purpose("social-assistance"), 365);
    assist.assist_only = true;
    cfg.purposes.push(assist);
    cfg
}

pub fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_750_000_000)))
}

pub fn create(dir: &Path, key: &MasterKey, clock: Arc<ManualClock>) -> Engine {
    EngineBuilder::new(dir).key(key.clone()).clock(clock).create(config()).unwrap()
}

pub fn open(dir: &Path, key: &MasterKey, clock: Arc<ManualClock>) -> facematch::Result<Engine> {
    EngineBuilder::new(dir).key(key.clone()).clock(clock).open()
}

/// A seeded unit vector.
pub fn vector(seed: u64) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..DIM).map(|_| r.gen_range(-1.0f32..1.0)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// A noisy copy of `v` (same person, another photo).
pub fn near(v: &[f32], seed: u64, noise: f32) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37);
    let w: Vec<f32> = v.iter().map(|x| x + noise * r.gen_range(-1.0f32..1.0)).collect();
    let n = w.iter().map(|x| x * x).sum::<f32>().sqrt();
    w.into_iter().map(|x| x / n).collect()
}

pub fn consent(e: &Engine, who: &str, purposes: &[&str], age: AgeBracket) -> facematch::Result<String> {
    let id = format!("consent-{who}");
    let c = ConsentRecord::new(id.clone(), who, ConsentBasis::SeparateConsent, purposes.iter().map(|p| purpose(p)).collect(), "clerk", age);
    e.record_consent(&op(), c)?;
    Ok(id)
}

/// Record consent and enrol one template for `who`.
pub fn enrol(e: &Engine, who: &str, purposes: &[&str], v: Vec<f32>) -> u64 {
    let cid = consent(e, who, purposes, AgeBracket::Adult).unwrap();
    e.enrol(&op(), Enrolment::new(subject(who), cid, purposes.iter().map(|p| purpose(p)).collect(), v)).unwrap()
}

pub fn ctx(p: &str) -> QueryContext {
    QueryContext::new(op(), purpose(p))
}

/// All bytes of every file under `dir`.
pub fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.extend(std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir` (links as their target text), for byte-for-byte comparisons.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            let p = e.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_symlink() {
                out.insert(p.clone(), std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes());
            } else if e.file_name() != "LOCK" {
                // LOCK files hold nothing; taking a lock may create one.
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The files that differ between two snapshots (names only: contents may be templates).
pub fn changed(a: &BTreeMap<PathBuf, Vec<u8>>, b: &BTreeMap<PathBuf, Vec<u8>>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = a.iter().filter(|(p, v)| b.get(*p) != Some(v)).map(|(p, _)| p.clone()).collect();
    out.extend(b.keys().filter(|p| !a.contains_key(*p)).cloned());
    out
}

/// Copy a gallery directory (lock files left out), as a backup or a fresh test copy would.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else if e.file_name() != "LOCK" {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}
