//! Synthetic embeddings: determinism and calibration against face-model statistics.

use facematch::synth::{generate, measure, SynthConfig, SynthKind};

fn small(kind: SynthKind, dim: usize) -> SynthConfig {
    SynthConfig { dim, identities: 3_000, queries: 2_000, kind, seed: 7, ..SynthConfig::default() }
}

#[test]
fn same_seed_same_bits_whatever_the_thread_count() {
    let cfg = SynthConfig { identities: 700, templates_per_identity: 2, queries: 300, ..small(SynthKind::Structured, 64) };
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| generate(&cfg).unwrap());
    let two = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(|| generate(&cfg).unwrap());
    assert_eq!(one.gallery, two.gallery);
    assert_eq!(one.queries, two.queries);
    assert_eq!(one.query_identity, two.query_identity);
    assert_eq!(one.gallery_identity, two.gallery_identity);

    let other = generate(&SynthConfig { seed: 8, ..cfg.clone() }).unwrap();
    assert_ne!(one.gallery, other.gallery);
}

#[test]
fn layout_and_unenrolled_fraction() {
    let cfg = SynthConfig {
        identities: 500,
        templates_per_identity: 3,
        queries: 400,
        unenrolled_fraction: 0.25,
        ..small(SynthKind::Structured, 32)
    };
    let set = generate(&cfg).unwrap();
    assert_eq!(set.gallery.len(), 1500 * 32);
    assert_eq!(set.gallery_identity.len(), 1500);
    assert_eq!(set.gallery_identity[0..4], [0, 0, 0, 1]);
    assert_eq!(set.queries.len(), 400 * 32);
    let unenrolled = set.query_identity.iter().filter(|q| q.is_none()).count();
    assert_eq!(unenrolled, 100);
    assert!(set.query_identity.iter().flatten().all(|&id| (id as usize) < 500));
    // unenrolled queries are spread over the query list, not all at the start
    assert!(set.query_identity[..100].iter().any(|q| q.is_some()));
}

#[test]
fn structured_matches_face_model_statistics() {
    for dim in [128, 512] {
        let set = generate(&small(SynthKind::Structured, dim)).unwrap();
        let s = measure(&set, 20_000, 1);
        eprintln!("structured dim {dim}: {s:?}");
        assert!(s.mate_pairs >= 1_500);
        assert!((s.mate_cos_median - 0.70).abs() < 0.03, "mate median {}", s.mate_cos_median);
        assert!((s.impostor_cos_mean - 0.05).abs() < 0.015, "impostor mean {}", s.impostor_cos_mean);
        assert!((s.impostor_cos_std - 0.10).abs() < 0.015, "impostor std {}", s.impostor_cos_std);
        assert!(s.mate_cos_p05 < s.mate_cos_median - 0.05, "mates should have a hard tail");
    }
}

#[test]
fn isotropic_is_random_directions() {
    let dim = 256;
    let set = generate(&small(SynthKind::Isotropic, dim)).unwrap();
    let s = measure(&set, 20_000, 1);
    eprintln!("isotropic: {s:?}");
    assert!((s.mate_cos_median - 0.70).abs() < 0.03, "mate median {}", s.mate_cos_median);
    assert!(s.impostor_cos_mean.abs() < 0.005, "impostor mean {}", s.impostor_cos_mean);
    let expect = 1.0 / (dim as f64).sqrt();
    assert!((s.impostor_cos_std - expect).abs() < 0.1 * expect, "impostor std {}", s.impostor_cos_std);
}
