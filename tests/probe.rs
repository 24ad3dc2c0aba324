//! Image-level queries on the sample photos: the unrelated-faces rule and "no raw image stored".
//! Needs `scripts/setup.sh` (models, ONNX Runtime, samples).

use std::path::Path;
use std::sync::OnceLock;

use facematch::compliance::*;
use facematch::config::GalleryConfig;
use facematch::engine::{EngineBuilder, Enrolment, QueryContext};
use facematch::pipeline::{FacePipeline, PipelineConfig};
use facematch::store::MasterKey;

fn pipeline() -> &'static FacePipeline {
    static P: OnceLock<FacePipeline> = OnceLock::new();
    P.get_or_init(|| FacePipeline::new(PipelineConfig::default()).expect("models missing: run scripts/setup.sh"))
}

fn sample(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", p.display()))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn image_queries_discard_unrelated_faces_and_store_no_image() {
    let d = tempfile::tempdir().unwrap();
    let door = Purpose::new("door-access").unwrap();
    let mut cfg = GalleryConfig::default();
    cfg.purposes.push(PurposePolicy::new(door.clone(), 365));
    let e = EngineBuilder::new(d.path()).key(MasterKey::generate()).create(cfg).unwrap();
    let op = Operator::new("gate").unwrap();
    e.record_consent(&op, ConsentRecord::new("f1", "barack", ConsentBasis::SeparateConsent, vec![door.clone()], "clerk", AgeBracket::Adult)).unwrap();
    let barack = SubjectId::new("barack").unwrap();
    let req = Enrolment::new(barack.clone(), "f1", vec![door.clone()], Vec::new());
    let obama = sample("obama.jpg");
    let (t, _, discarded) = facematch::probe::enrol_image(&e, pipeline(), &op, &obama, req).unwrap();
    assert_eq!(discarded, 0);
    let ctx = QueryContext::new(op.clone(), door.clone());

    // Same person, another photo: a match; different person: no match.
    let v = facematch::probe::verify_image(&e, pipeline(), &ctx, &sample("obama2.jpg"), &barack).unwrap();
    assert!(v.verification.decision.is_match(), "{:?}", v.verification);
    let v = facematch::probe::verify_image(&e, pipeline(), &ctx, &sample("biden.jpg"), &barack).unwrap();
    assert!(!v.verification.decision.is_match());

    // Verification on a group photo compares only the largest face; the five others are never embedded.
    let v = facematch::probe::verify_image(&e, pipeline(), &ctx, &sample("t1.jpg"), &barack).unwrap();
    assert_eq!((v.faces_found, v.faces_discarded), (6, 5));

    // Identification: six strangers, all discarded, nothing returned.
    let r = facematch::probe::identify_image(&e, pipeline(), &ctx, &sample("t1.jpg"), 3).unwrap();
    assert_eq!((r.faces_found, r.faces_discarded), (6, 6));
    assert!(r.matches.is_empty());
    let r = facematch::probe::identify_image(&e, pipeline(), &ctx, &sample("obama3.jpg"), 3).unwrap();
    assert_eq!(r.matches.len(), 1);
    assert!(matches!(&r.matches[0].identification.decision, Decision::Match { template, .. } if *template == t));

    // No image, no crop stored: no JPEG/PNG signature, no run of the image's bytes anywhere in the store.
    e.checkpoint().unwrap();
    let mut raw = Vec::new();
    for f in walk(d.path()) {
        raw.extend(std::fs::read(f).unwrap());
    }
    assert!(!contains(&raw, &obama[..16]), "a JPEG header is in the store");
    assert!(!contains(&raw, &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]));
    assert!(!contains(&raw, &obama[1000..1064]));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
