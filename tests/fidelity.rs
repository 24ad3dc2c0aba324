//! Fidelity of the int8 models (`models/*-int8.onnx`, made by
//! `scripts/quantize_models.py` at set-up) against the f32 ones, on every face
//! of the sample photos: embedding cosine, detections and landmarks, the
//! decisions of every same-person and different-person pair at the shipped
//! thresholds (f32 against int8 too), and OpenCV's reference fixture. The
//! bounds asserted are the ones measured and stated in `docs/MODELS.md`. A
//! model is the default only if it meets the bar (cosine >= 0.99 on every
//! face, landmarks within 1.5 px): the int8 SFace does, and is the default
//! under the f32 model id; the int8 YuNet does not, and stays opt-in.
//!
//! Needs the set-up (`scripts/setup.sh`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use facematch::detect::{DetectorConfig, Face};
use facematch::embed::{cosine, RecognizerConfig};
use facematch::pipeline::{FacePipeline, PipelineConfig};
use facematch::runtime::Precision;
use serde::Deserialize;

/// The bar for int8 as the default: every face's int8 embedding this close to its f32 one.
const DEFAULT_COSINE: f32 = 0.99;
/// The bar for the int8 detector as the default, in image pixels.
const DEFAULT_LANDMARK_PX: f32 = 1.5;
/// What the int8 SFace keeps on the samples (measured: min 0.9941, median 0.9975; docs/MODELS.md): the bar.
const INT8_COSINE: f32 = DEFAULT_COSINE;
/// What the int8 YuNet keeps, as a share of the eye distance (measured: up to 13.6%, 12.2 px; docs/MODELS.md).
/// A regression guard, not a recommendation: the int8 detector is not the fast path.
const INT8_LANDMARK_EYE_SHARE: f32 = 0.15;
/// The fitted detector input against the full one, as a share of the eye distance (measured: see the test).
const FIT_LANDMARK_EYE_SHARE: f32 = 0.10;
/// With the int8 detector too, against OpenCV: its landmark shifts move the crop (measured: min 0.812 on
/// t1's smallest face, 0.930 next). A regression guard that shows why the int8 detector is not for
/// recognition (docs/MODELS.md): at most for detection alone (anonymising).
const INT8_DETECTOR_COSINE: f32 = 0.80;
/// Shipped thresholds (`PurposePolicy`: verify 0.363, identify 0.50).
const THRESHOLDS: [f32; 2] = [0.363, 0.50];

fn samples() -> Vec<(String, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/samples");
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh first)", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    v.sort();
    assert_eq!(v.len(), 13, "13 sample photos (run scripts/setup.sh)");
    v
}

/// f32 pipeline, int8 recogniser with the f32 detector, and both int8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Setup {
    F32,
    Int8Recognizer,
    Int8,
    /// The default: int8 recogniser, f32 detector run at the letterboxed size (`fit_input`).
    Int8RecognizerFit,
}

const SETUPS: [Setup; 4] = [Setup::F32, Setup::Int8Recognizer, Setup::Int8, Setup::Int8RecognizerFit];

fn pipeline(s: Setup) -> &'static FacePipeline {
    static P: OnceLock<HashMap<Setup, FacePipeline>> = OnceLock::new();
    let all = P.get_or_init(|| {
        SETUPS
            .into_iter()
            .map(|s| {
                let mut cfg = PipelineConfig::default();
                // One session per model: three pipelines share two cores.
                cfg.detector.session.pool_size = 1;
                cfg.recognizer.session.pool_size = 1;
                // The whole 640x640 detector input except for the fitted setup (the default).
                cfg.detector.fit_input = s == Setup::Int8RecognizerFit;
                match s {
                    Setup::F32 => cfg.set_precision(Precision::F32, Precision::F32),
                    Setup::Int8Recognizer | Setup::Int8RecognizerFit => cfg.set_precision(Precision::Int8, Precision::F32),
                    Setup::Int8 => cfg.set_precision(Precision::Int8, Precision::Int8),
                }
                let p = FacePipeline::new(cfg).unwrap_or_else(|e| panic!("{s:?} pipeline (run scripts/setup.sh first): {e}"));
                (s, p)
            })
            .collect()
    });
    &all[&s]
}

/// (file name, faces with embeddings) for every sample photo, in name order.
type Samples = Vec<(String, Vec<Face>)>;

/// Faces with embeddings for every sample, per setup.
fn results(s: Setup) -> &'static Samples {
    static R: OnceLock<HashMap<Setup, Samples>> = OnceLock::new();
    let all = R.get_or_init(|| {
        let samples = samples();
        let paths: Vec<PathBuf> = samples.iter().map(|(_, p)| p.clone()).collect();
        SETUPS
            .into_iter()
            .map(|s| {
                let out = pipeline(s).process_paths(&paths, true);
                let v = samples.iter().zip(out).map(|((n, _), r)| (n.clone(), r.unwrap_or_else(|e| panic!("{n}: {e}")).faces)).collect();
                (s, v)
            })
            .collect()
    });
    &all[&s]
}

fn emb(f: &Face) -> &[f32] {
    f.embedding.as_deref().expect("embedding requested")
}

fn landmark_delta(a: &Face, b: &Face) -> f32 {
    a.landmarks.iter().zip(&b.landmarks).map(|(p, q)| (p[0] - q[0]).abs().max((p[1] - q[1]).abs())).fold(0.0, f32::max)
}

fn stats(mut v: Vec<f32>) -> (f32, f32) {
    v.sort_by(f32::total_cmp);
    (v[v.len() / 2], v[0])
}

#[test]
fn int8_embeddings_stay_close_to_f32_on_the_same_crops() {
    // Same faces (f32 detector), so only the recogniser differs.
    let f32s = results(Setup::F32);
    let int8 = results(Setup::Int8Recognizer);
    let mut cos = Vec::new();
    for ((name, a), (_, b)) in f32s.iter().zip(int8) {
        assert_eq!(a.len(), b.len(), "{name}: the same detector must find the same faces");
        for (i, (fa, fb)) in a.iter().zip(b).enumerate() {
            assert_eq!(fa.landmarks, fb.landmarks, "{name} face {i}: same detector, same landmarks");
            let c = cosine(emb(fa), emb(fb));
            eprintln!("{name} face {i}: int8 vs f32 cosine {c:.4}");
            assert!(c >= INT8_COSINE, "{name} face {i}: int8 vs f32 cosine {c} < {INT8_COSINE}");
            cos.push(c);
        }
    }
    assert_eq!(cos.len(), 18, "18 faces in the samples");
    let (median, min) = stats(cos);
    eprintln!("int8 SFace vs f32 over 18 faces: median {median:.4}, min {min:.4}");
    // Interchangeable (every face at the bar): the default, under the f32 model id.
    let interchangeable = min >= DEFAULT_COSINE;
    assert_eq!(
        RecognizerConfig::default().precision == Precision::Int8,
        interchangeable,
        "int8 is the default iff every face reaches {DEFAULT_COSINE}"
    );
    assert_eq!(
        RecognizerConfig::sface(Precision::Int8).model_id == RecognizerConfig::sface(Precision::F32).model_id,
        interchangeable,
        "int8 shares the f32 model id iff every face reaches {DEFAULT_COSINE}"
    );
}

#[test]
fn int8_detector_finds_the_same_faces_with_close_landmarks() {
    let f32s = results(Setup::F32);
    let int8 = results(Setup::Int8);
    let mut worst_px: f32 = 0.0;
    for ((name, a), (_, b)) in f32s.iter().zip(int8) {
        assert_eq!(a.len(), b.len(), "{name}: number of faces");
        for (i, fa) in a.iter().enumerate() {
            let fb = b.iter().min_by(|x, y| landmark_delta(fa, x).total_cmp(&landmark_delta(fa, y))).expect("a face");
            let d = landmark_delta(fa, fb);
            let eye = ((fa.landmarks[0][0] - fa.landmarks[1][0]).powi(2) + (fa.landmarks[0][1] - fa.landmarks[1][1]).powi(2)).sqrt();
            eprintln!(
                "{name} face {i}: landmarks {d:.2} px ({:.1}% of the eye distance), score {:.3} -> {:.3}",
                100.0 * d / eye,
                fa.score,
                fb.score
            );
            assert!(d <= INT8_LANDMARK_EYE_SHARE * eye, "{name} face {i}: int8 landmarks {d} px off (eye distance {eye})");
            worst_px = worst_px.max(d);
        }
    }
    eprintln!("int8 YuNet vs f32: largest landmark difference {worst_px:.2} px");
    if worst_px > DEFAULT_LANDMARK_PX {
        assert_eq!(
            DetectorConfig::default().precision,
            Precision::F32,
            "the int8 detector may be the default only within {DEFAULT_LANDMARK_PX} px"
        );
    }
}

/// Every single-face sample by identity, plus t1's six faces (six more people).
fn labelled(s: Setup) -> Vec<(String, String, &'static [f32])> {
    let identities = [
        ("person_a", &["person_a_1.jpg", "person_a_2.jpg"][..]),
        ("person_b", &["person_b_1.jpg", "person_b_2.jpg"][..]),
        ("obama", &["impostor_1.jpg", "obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg", "obama_partial_face2.jpg"][..]),
        ("sunak", &["impostor_2.jpg"][..]),
        ("biden", &["biden.jpg"][..]),
    ];
    let r: HashMap<&str, &Vec<Face>> = results(s).iter().map(|(n, f)| (n.as_str(), f)).collect();
    let mut out = Vec::new();
    for (id, files) in identities {
        for f in files {
            assert_eq!(r[f].len(), 1, "{f}: one face");
            out.push((id.to_string(), f.to_string(), emb(&r[f][0])));
        }
    }
    for (i, f) in r["t1.jpg"].iter().enumerate() {
        out.push((format!("t1-{i}"), format!("t1.jpg#{i}"), emb(f)));
    }
    out
}

/// Pair decisions checked against the f32 reference, and the margins seen.
struct Pairs {
    same_min: f32,
    diff_max: f32,
    count: usize,
}

impl Pairs {
    fn new() -> Self {
        Pairs { same_min: f32::MAX, diff_max: f32::MIN, count: 0 }
    }

    /// `got` (the cosine under test) must fall on the same side of both shipped
    /// thresholds as `reference` (f32 against f32), and decide rightly.
    fn check(&mut self, label: &str, same: bool, reference: f32, got: f32) {
        for t in THRESHOLDS {
            assert_eq!(reference >= t, got >= t, "{label}: f32 {reference:.4} and int8 {got:.4} fall on different sides of {t}");
        }
        assert_eq!(same, got >= THRESHOLDS[0], "{label}: int8 cosine {got:.4} decides wrongly (same person: {same})");
        if same {
            self.same_min = self.same_min.min(got);
        } else {
            self.diff_max = self.diff_max.max(got);
        }
        self.count += 1;
    }
}

#[test]
fn every_pair_keeps_its_decision_at_the_shipped_thresholds() {
    let reference = labelled(Setup::F32);
    // F32 against itself: its own margins, for comparison.
    for s in SETUPS {
        let other = labelled(s);
        let mut pairs = Pairs::new();
        for i in 0..reference.len() {
            for j in i + 1..reference.len() {
                let label = format!("{:?}: {} vs {}", s, reference[i].1, reference[j].1);
                let same = reference[i].0 == reference[j].0;
                pairs.check(&label, same, cosine(reference[i].2, reference[j].2), cosine(other[i].2, other[j].2));
            }
        }
        let Pairs { same_min, diff_max, count } = pairs;
        eprintln!("{s:?}: {count} pairs keep their decisions; lowest same-person {same_min:.4}, highest different-person {diff_max:.4}");
    }
}

#[test]
fn f32_templates_and_int8_probes_decide_alike() {
    // One model id for both precisions means a gallery enrolled with f32 is
    // queried with int8 (and the other way round): every pair, one side each,
    // with the int8 side at the whole detector input and at the default fitted one.
    let f32s = labelled(Setup::F32);
    for s in [Setup::Int8Recognizer, Setup::Int8RecognizerFit] {
        let int8 = labelled(s);
        let mut pairs = Pairs::new();
        for i in 0..f32s.len() {
            for j in (0..f32s.len()).filter(|&j| j != i) {
                let label = format!("{s:?}: f32 {} vs int8 {}", f32s[i].1, int8[j].1);
                let same = f32s[i].0 == f32s[j].0;
                pairs.check(&label, same, cosine(f32s[i].2, f32s[j].2), cosine(f32s[i].2, int8[j].2));
            }
        }
        let own: Vec<f32> = f32s.iter().zip(&int8).map(|(a, b)| cosine(a.2, b.2)).collect();
        let (median, min) = stats(own.clone());
        let Pairs { same_min, diff_max, count } = pairs;
        eprintln!(
            "f32 x {s:?}: {count} ordered pairs keep their decisions; lowest same-person {same_min:.4}, highest different-person {diff_max:.4}; same face f32 vs int8 median {median:.4}, min {min:.4}"
        );
        for (i, c) in own.into_iter().enumerate() {
            assert!(c >= DEFAULT_COSINE, "{s:?} face {i} ({}): f32 vs int8 {c}", f32s[i].1);
        }
    }
}

#[derive(Deserialize)]
struct Reference {
    images: Vec<RefImage>,
}

#[derive(Deserialize)]
struct RefImage {
    image: String,
    faces: Vec<RefFace>,
}

#[derive(Deserialize)]
struct RefFace {
    landmarks: [[f32; 2]; 5],
    embedding: Vec<f32>,
    #[serde(default)]
    near_ties: Vec<RefFace>,
}

#[test]
fn int8_paths_match_the_opencv_reference_within_stated_bounds() {
    // OpenCV runs the shipped (block-quantised, in effect f32) models. With the
    // f32 detector: landmarks within 1 px as in tests/pipeline.rs, cosine within
    // the int8 recogniser's own bound less 0.01 (the f32 path's own distance to
    // OpenCV on images above 640 px, tests/pipeline.rs). With the int8 detector:
    // landmarks within its bound (+1 px) and INT8_DETECTOR_COSINE.
    let text = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference.json")).expect("fixture");
    let reference: Reference = serde_json::from_str(&text).expect("parse fixture");
    for s in [Setup::Int8Recognizer, Setup::Int8RecognizerFit, Setup::Int8] {
        let ours: HashMap<&str, &Vec<Face>> = results(s).iter().map(|(n, f)| (n.as_str(), f)).collect();
        let mut cos_all = Vec::new();
        for r in &reference.images {
            let faces = ours[r.image.as_str()];
            assert_eq!(faces.len(), r.faces.len(), "{s:?} {}: number of faces", r.image);
            for (i, main) in r.faces.iter().enumerate() {
                let dist = |f: &Face, rf: &RefFace| {
                    f.landmarks.iter().zip(&rf.landmarks).map(|(a, b)| (a[0] - b[0]).abs().max((a[1] - b[1]).abs())).fold(0.0, f32::max)
                };
                let (rf, f) = std::iter::once(main)
                    .chain(&main.near_ties)
                    .flat_map(|rf| faces.iter().map(move |f| (rf, f)))
                    .min_by(|(ra, fa), (rb, fb)| dist(fa, ra).total_cmp(&dist(fb, rb)))
                    .expect("a face");
                let lm = dist(f, rf);
                let eye = ((rf.landmarks[0][0] - rf.landmarks[1][0]).powi(2) + (rf.landmarks[0][1] - rf.landmarks[1][1]).powi(2)).sqrt();
                let c = cosine(emb(f), &rf.embedding);
                let lm_bound = if s == Setup::Int8 { INT8_LANDMARK_EYE_SHARE * eye + 1.0 } else { 1.0 };
                assert!(lm <= lm_bound, "{s:?} {} face {i}: landmarks {lm} px from OpenCV's (bound {lm_bound})", r.image);
                let cos_bound = if s == Setup::Int8 { INT8_DETECTOR_COSINE } else { INT8_COSINE - 0.01 };
                assert!(c >= cos_bound, "{s:?} {} face {i}: cosine with OpenCV {c} < {cos_bound}", r.image);
                cos_all.push(c);
            }
        }
        let (median, min) = stats(cos_all);
        eprintln!("{s:?} vs OpenCV: cosine median {median:.4}, min {min:.4}");
    }
}

#[test]
fn a_gallery_takes_either_precision_and_refuses_another_model() {
    use facematch::compliance::*;
    use facematch::config::GalleryConfig;
    use facematch::engine::{EngineBuilder, Enrolment, QueryContext};
    use facematch::store::MasterKey;

    let d = tempfile::tempdir().unwrap();
    let door = Purpose::new("door-access").unwrap();
    let mut cfg = GalleryConfig::default(); // model id sface-2021dec: SFace, f32 or int8
    cfg.purposes.push(PurposePolicy::new(door.clone(), 365));
    let e = EngineBuilder::new(d.path()).key(MasterKey::generate()).create(cfg).unwrap();
    let op = Operator::new("gate").unwrap();
    let consent = ConsentRecord::new("f1", "barack", ConsentBasis::SeparateConsent, vec![door.clone()], "clerk", AgeBracket::Adult);
    e.record_consent(&op, consent).unwrap();
    let read = |n: &str| std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/samples").join(n)).expect(n);
    let barack = facematch::compliance::SubjectId::new("barack").unwrap();
    let req = || Enrolment::new(barack.clone(), "f1", vec![door.clone()], Vec::new());

    // Enrolled with f32, verified with int8 (and f32): the same decisions.
    facematch::probe::enrol_image(&e, pipeline(Setup::F32), &op, &read("obama.jpg"), req()).expect("f32 enrolment");
    let ctx = QueryContext::new(op.clone(), door.clone());
    for (probe, same) in [("obama2.jpg", true), ("biden.jpg", false)] {
        let photo = read(probe);
        let by = |s: Setup| facematch::probe::verify_image(&e, pipeline(s), &ctx, &photo, &barack).expect("verify");
        let (a, b) = (by(Setup::F32).verification, by(Setup::Int8Recognizer).verification);
        let matched = |d: &Decision| matches!(d, Decision::Match { .. });
        assert_eq!((matched(&a.decision), matched(&b.decision)), (same, same), "{probe}: f32 {a:?} int8 {b:?}");
        let (sa, sb) = (a.score.expect("score"), b.score.expect("score"));
        assert!((sa - sb).abs() < 0.02, "{probe}: f32 score {sa} int8 {sb}");
    }

    // Another model id (here session 9's opt-in int8 id) is refused, by name.
    let mut other = PipelineConfig::default();
    other.recognizer.model_id = "sface-2021dec-int8".into();
    other.detector.session.pool_size = 1;
    other.recognizer.session.pool_size = 1;
    let other = FacePipeline::new(other).expect("pipeline");
    let err = facematch::probe::enrol_image(&e, &other, &op, &read("obama2.jpg"), req()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("sface-2021dec-int8") && msg.contains("sface-2021dec "), "{msg}");
    let err = facematch::probe::verify_image(&e, &other, &ctx, &read("obama2.jpg"), &barack).unwrap_err();
    assert!(err.to_string().contains("sface-2021dec-int8"), "{err}");
}

#[test]
fn fitted_detector_input_finds_the_same_faces() {
    // The same f32 YuNet at the letterboxed size (a multiple of 32) instead of 640x640:
    // less black padding below or beside the image. Same faces; a face within one stride
    // of an edge the smaller input moved (obama_partial_face2: 8.5 px off without it)
    // makes the image run again at 640x640 (docs/MODELS.md).
    let full = results(Setup::Int8Recognizer);
    let fit = results(Setup::Int8RecognizerFit);
    let (mut worst, mut cos) = (0f32, Vec::new());
    for ((name, a), (_, b)) in full.iter().zip(fit) {
        assert_eq!(a.len(), b.len(), "{name}: number of faces");
        for (i, fa) in a.iter().enumerate() {
            let fb = b.iter().min_by(|x, y| landmark_delta(fa, x).total_cmp(&landmark_delta(fa, y))).expect("a face");
            let d = landmark_delta(fa, fb);
            let eye = ((fa.landmarks[0][0] - fa.landmarks[1][0]).powi(2) + (fa.landmarks[0][1] - fa.landmarks[1][1]).powi(2)).sqrt();
            let c = cosine(emb(fa), emb(fb));
            eprintln!(
                "{name} face {i}: fitted input moves landmarks {d:.2} px ({:.1}% of the eye distance), cosine {c:.4}",
                100.0 * d / eye
            );
            assert!(d <= FIT_LANDMARK_EYE_SHARE * eye, "{name} face {i}: {d} px");
            worst = worst.max(d);
            cos.push(c);
        }
    }
    let (median, min) = stats(cos);
    eprintln!("fitted vs 640x640 input: largest landmark difference {worst:.2} px, cosine median {median:.4}, min {min:.4}");
    if worst > DEFAULT_LANDMARK_PX {
        assert!(!DetectorConfig::default().fit_input, "fit_input may be the default only within {DEFAULT_LANDMARK_PX} px");
    }
    // What the fitted setup runs is what a default pipeline runs.
    let mut default = PipelineConfig::default();
    default.detector.session.pool_size = 1;
    default.recognizer.session.pool_size = 1;
    assert_eq!(&default, pipeline(Setup::Int8RecognizerFit).config(), "the fitted setup is the default");
}
