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

struct Barack {
    e: facematch::engine::Engine,
    barack: SubjectId,
    ctx: QueryContext,
    template: u64,
}

/// A door-access gallery in `dir` with Barack enrolled from `obama.jpg` (one face, none discarded).
fn barack_enrolled(dir: &Path) -> Barack {
    let door = Purpose::new("door-access").unwrap();
    let mut cfg = GalleryConfig::default();
    cfg.purposes.push(PurposePolicy::new(door.clone(), 365));
    let e = EngineBuilder::new(dir).key(MasterKey::generate()).create(cfg).unwrap();
    let op = Operator::new("gate").unwrap();
    e.record_consent(
        &op,
        ConsentRecord::new("f1", "barack", ConsentBasis::SeparateConsent, vec![door.clone()], "clerk", AgeBracket::Adult),
    )
    .unwrap();
    let barack = SubjectId::new("barack").unwrap();
    let req = Enrolment::new(barack.clone(), "f1", vec![door.clone()], Vec::new());
    let (template, _, discarded) = facematch::probe::enrol_image(&e, pipeline(), &op, &sample("obama.jpg"), req).unwrap();
    assert_eq!(discarded, 0);
    let ctx = QueryContext::new(op, door);
    Barack { e, barack, ctx, template }
}

#[test]
fn image_queries_discard_unrelated_faces_and_store_no_image() {
    let d = tempfile::tempdir().unwrap();
    let obama = sample("obama.jpg");
    let Barack { e, barack, ctx, template: t } = barack_enrolled(d.path());

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

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Embeddings of `faces` (landmarks as detected on the original) taken from `img`.
fn embeddings_at(img: &facematch::image_io::DecodedImage, faces: &[facematch::pipeline::Face]) -> Vec<Vec<f32>> {
    let mut f = faces.to_vec();
    pipeline().embed_faces(img, &mut f).unwrap();
    f.into_iter().map(|f| f.embedding.unwrap()).collect()
}

/// Anonymised faces are gone for the detector, and what the recogniser sees where they were is
/// nobody: for each redaction, every face of the group photo scores below the model's
/// same-person threshold against its own original embedding (a fill far below).
#[test]
fn anonymised_faces_are_neither_detected_nor_recognisable() {
    use facematch::anonymise::{AnonymiseConfig, Redaction};
    let bytes = sample("t1.jpg");
    let orig = pipeline().decode_bytes(&bytes).unwrap();
    let faces = pipeline().detect(&orig).unwrap();
    assert_eq!(faces.len(), 6);
    let before = embeddings_at(&orig, &faces);
    // Bounds measured on this photo: filled faces score <= -0.07 against their originals, 4x4
    // mosaics <= 0.27 (2x2 to 6x6: <= 0.31); SFace's same-person threshold is 0.363.
    for (redaction, bound) in [(Redaction::Fill { rgb: [0, 0, 0] }, 0.1), (Redaction::Mosaic { cells: 4 }, 0.363)] {
        let cfg = AnonymiseConfig { redaction, ..Default::default() };
        let (img, boxes) = facematch::probe::anonymise_image(pipeline(), &bytes, &cfg).unwrap();
        assert_eq!(boxes.len(), 6);
        assert_ne!(img, orig);
        if matches!(redaction, Redaction::Fill { .. }) {
            assert!(pipeline().detect(&img).unwrap().is_empty(), "a filled face was detected");
        }
        let after = embeddings_at(&img, &faces);
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            let c = cos(a, b);
            assert!(c < bound, "{redaction:?}: face {i} still resembles itself (cos {c})");
        }
        // What leaves is an encoded image; it decodes to the redacted pixels (PNG is lossless).
        let png = facematch::image_io::encode(&img, facematch::image_io::OutputFormat::Png).unwrap();
        assert_eq!(pipeline().decode_bytes(&png).unwrap(), img);
    }
}

/// The redacted variants of the image queries hide exactly the faces that are not the service's:
/// identification hides every face that matched nobody and leaves a matched face as it was;
/// verification hides every face but the one compared.
#[test]
fn redacted_image_queries_hide_only_the_unrelated_faces() {
    use facematch::anonymise::AnonymiseConfig;
    let d = tempfile::tempdir().unwrap();
    let Barack { e, barack, ctx, .. } = barack_enrolled(d.path());
    let anon = AnonymiseConfig::default();

    // A matched face is left alone.
    let bytes = sample("obama3.jpg");
    let (r, img) = facematch::probe::identify_image_redacted(&e, pipeline(), &ctx, &bytes, 3, &anon).unwrap();
    assert_eq!(r.matches.len(), 1);
    assert_eq!(img, pipeline().decode_bytes(&bytes).unwrap());

    // Six strangers: all hidden.
    let (r, img) = facematch::probe::identify_image_redacted(&e, pipeline(), &ctx, &sample("t1.jpg"), 3, &anon).unwrap();
    assert_eq!((r.faces_found, r.faces_discarded), (6, 6));
    assert!(pipeline().detect(&img).unwrap().is_empty());

    // Verification on the group photo: the compared (largest) face stays, the five others go.
    let (v, img) = facematch::probe::verify_image_redacted(&e, pipeline(), &ctx, &sample("t1.jpg"), &barack, &anon).unwrap();
    assert_eq!(v.faces_discarded, 5);
    let left = pipeline().detect(&img).unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    let iou = |a: [f32; 4], b: [f32; 4]| {
        let (x0, y0) = (a[0].max(b[0]), a[1].max(b[1]));
        let (x1, y1) = ((a[0] + a[2]).min(b[0] + b[2]), (a[1] + a[3]).min(b[1] + b[3]));
        let i = (x1 - x0).max(0.0) * (y1 - y0).max(0.0);
        i / (a[2] * a[3] + b[2] * b[3] - i)
    };
    assert!(iou(left[0].bbox, v.face.bbox) > 0.8, "the face left is not the compared one");
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

/// A group photo must not enrol a stranger under someone's name: several faces of similar size
/// are refused unless the face is chosen; a face that does not look like the person's enrolled
/// templates is refused (and the refusal audited) unless forced.
#[test]
fn enrolment_takes_exactly_one_face_of_the_right_person() {
    let d = tempfile::tempdir().unwrap();
    let Barack { e, barack, ctx, .. } = barack_enrolled(d.path());
    let op = Operator::new("gate").unwrap();
    let door = Purpose::new("door-access").unwrap();
    let req = || Enrolment::new(barack.clone(), "f1", vec![door.clone()], Vec::new());
    let r = facematch::probe::enrol_image(&e, pipeline(), &op, &sample("t1.jpg"), req());
    assert!(matches!(r, Err(facematch::Error::PolicyViolation { rule: "one-face-enrolment", .. })), "{r:?}");
    // Chosen explicitly: the largest face of the group photo is a stranger, so it is refused as not Barack.
    let r = facematch::probe::enrol_image_face(&e, pipeline(), &op, &sample("t1.jpg"), req(), 0);
    assert!(matches!(r, Err(facematch::Error::PolicyViolation { rule: "enrolment-consistency", .. })), "{r:?}");
    // Another photo of Barack is accepted.
    facematch::probe::enrol_image(&e, pipeline(), &op, &sample("obama2.jpg"), req()).unwrap();
    // Forced, the stranger goes in (the operator's call, audited as an enrolment).
    let mut forced = req();
    forced.force = true;
    facematch::probe::enrol_image_face(&e, pipeline(), &op, &sample("t1.jpg"), forced, 0).unwrap();
    assert_eq!(e.templates_of(&barack).len(), 3);
    drop(ctx);
    let dir = e.audit_dir();
    e.close().unwrap();
    let recs = facematch::audit::AuditLog::read(&dir, &Default::default()).unwrap();
    assert!(recs.iter().any(|r| matches!(&r.event, facematch::audit::AuditEvent::Admin { action, .. } if action == "enrolment-refused")));
}
