//! Bad input never panics: property tests that feed damaged files and random bytes to every
//! reader a user can reach (embedding matrices, the gallery's log, snapshot and manifest, the
//! audit log, images) and accept only a clear error or a sound result. The seed is fixed so CI
//! is reproducible; 600 cases per property with other seeds passed locally (raise `cases`
//! and change the seed to explore further). A random-seed run found the truncated-log case in
//! `gallery_open_survives_damaged_files` (now refused with `DataCorruption`).

mod common;
use common::*;

use proptest::prelude::*;

use facematch::audit::{AuditKey, AuditLog};
use facematch::engine::Query;
use facematch::image_io::{decode_bytes, ImageLimits};
use facematch::store::MasterKey;

/// Apply `edits` (position fraction, byte) and an optional truncation to `bytes`.
fn damage(bytes: &mut Vec<u8>, edits: &[(f64, u8)], cut: Option<f64>) {
    for &(at, b) in edits {
        if !bytes.is_empty() {
            let i = ((bytes.len() - 1) as f64 * at) as usize;
            bytes[i] ^= b | 1;
        }
    }
    if let Some(c) = cut {
        bytes.truncate((bytes.len() as f64 * c) as usize);
    }
}

/// A small closed gallery: (dir, key).
fn gallery() -> (tempfile::TempDir, MasterKey) {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create(d.path(), &key, clock());
    for i in 0..12u64 {
        enrol(&e, &format!("s{i}"), &["door-access"], vector(i));
    }
    e.withdraw(&op(), &subject("s3")).unwrap();
    e.close().unwrap();
    (d, key)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_fa11), .. ProptestConfig::default() })]

    /// A damaged .npy gives an error or a matrix whose shape matches its data.
    #[test]
    fn npy_reader_survives_damage(edits in proptest::collection::vec((0.0f64..1.0, any::<u8>()), 0..6), cut in proptest::option::of(0.0f64..1.0)) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.npy");
        facematch::npy::write_f32_matrix(&p, &[0.5f32; 4 * 8], 4, 8).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        damage(&mut bytes, &edits, cut);
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(m) = facematch::npy::read_f32_matrix(&p) {
            prop_assert_eq!(m.rows * m.cols, m.data.len());
        }
    }

    /// Random bytes, some behind an image signature, decode to an error or an image, never a panic.
    #[test]
    fn image_decoder_survives_random_bytes(body in proptest::collection::vec(any::<u8>(), 0..2048), magic in 0usize..4) {
        let prefix: &[u8] = [&b""[..], b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"RIFF\0\0\0\0WEBP"][magic];
        let bytes = [prefix, &body[..]].concat();
        let _ = decode_bytes(&bytes, &ImageLimits::default());
    }

    /// A damaged template log, snapshot or manifest: open fails with an error, or opens a
    /// gallery whose answers are sound (the withdrawn subject never comes back).
    #[test]
    fn gallery_open_survives_damaged_files(file in 0usize..3, edits in proptest::collection::vec((0.0f64..1.0, any::<u8>()), 1..4), cut in proptest::option::of(0.05f64..1.0)) {
        let (d, key) = gallery();
        let name = ["templates.log", "index.snap", "gallery.json"][file];
        let p = d.path().join(name);
        let mut bytes = std::fs::read(&p).unwrap();
        damage(&mut bytes, &edits, cut);
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(e) = open(d.path(), &key, clock()) {
            let r = e.query(&ctx("door-access"), Query::identify(&vector(3), 5)).unwrap();
            prop_assert!(r.candidates.iter().all(|c| c.subject.as_str() != "s3"));
            prop_assert!(e.query(&ctx("door-access"), Query::verify(&vector(3), &subject("s3"))).is_err());
        }
    }

    /// A damaged audit segment: verify names the damage (or errs), read errs or returns records; no panic.
    #[test]
    fn audit_readers_survive_damage(edits in proptest::collection::vec((0.0f64..1.0, any::<u8>()), 1..4), cut in proptest::option::of(0.05f64..1.0)) {
        let (d, key) = gallery();
        let adir = d.path().join("audit");
        let seg = std::fs::read_dir(&adir).unwrap().filter_map(|e| e.ok()).map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("seg-"))).unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        let before = bytes.clone();
        damage(&mut bytes, &edits, cut);
        std::fs::write(&seg, &bytes).unwrap();
        let akey = AuditKey::from_bytes(key.audit_key_bytes());
        let report = AuditLog::verify(&adir, &akey);
        if bytes != before {
            // Any change to a segment is caught (the 1,000-mutation test in tests/audit.rs goes further).
            prop_assert!(report.as_ref().map_or(true, |r| !r.ok()), "undetected damage: {:?}", report);
        }
        let _ = AuditLog::read(&adir, &Default::default());
    }
}
