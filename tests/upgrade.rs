//! A gallery written by an earlier facematch (one operation per log frame,
//! index snapshot format 1: `tests/fixtures/gallery-v2-session7`) opens,
//! answers as it did, keeps its erasures and audit chain, takes new
//! (batched) frames after its old ones, and compacts into the new layout.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use facematch::compliance::{AgeBracket, ConsentBasis, ConsentRecord};
use facematch::engine::{verify_audit, Engine, EngineBuilder, Enrolment, Query, SearchOptions};
use facematch::index::SearchStrategy;
use facematch::store::MasterKey;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gallery-v2-session7")
}

/// Row `i` of the fixture's embeddings (see its README).
fn row(i: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..128).map(|j| (((i * 131 + j * 7) as f64) * 0.01).sin() as f32).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn top3(e: &Engine, i: usize) -> Vec<(String, u64)> {
    e.query(&ctx("door-access"), Query::identify(&row(i), 3).search(SearchOptions { strategy: SearchStrategy::Exact, ef: None }))
        .unwrap()
        .candidates
        .iter()
        .map(|c| (c.subject.to_string(), c.template))
        .collect()
}

/// What the old build answered (`search.jsonl`): subject and template of the top 3 per query.
fn recorded() -> Vec<Vec<(String, u64)>> {
    std::fs::read_to_string(fixture().join("search.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["candidates"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c["subject"].as_str().unwrap().to_string(), c["template"].as_u64().unwrap()))
                .collect()
        })
        .collect()
}

#[test]
fn a_gallery_from_before_batched_frames_opens_answers_and_keeps_its_erasures() {
    let t = tempfile::tempdir().unwrap();
    let g = t.path().join("g");
    copy_dir(&fixture().join("gallery"), &g);
    let key = MasterKey::from_file(&fixture().join("key.hex")).unwrap();
    let open = |g: &Path| EngineBuilder::new(g).key(key.clone()).open().unwrap();

    let e = open(&g);
    assert!(e.open_report().snapshot_used, "the format-1 index snapshot is read");
    assert_eq!(e.stats().templates, 29);
    let old = recorded();
    for (i, want) in old.iter().enumerate() {
        assert_eq!(&top3(&e, i), want, "query {i} answers differently from the build that wrote the gallery");
    }
    assert!(e.templates_of(&subject("p3")).is_empty(), "the withdrawn subject is back");
    assert!(top3(&e, 3).iter().all(|(s, _)| s != "p3"));

    // New frames (batched) after the old ones.
    let c =
        ConsentRecord::new("new-c", "newcomer", ConsentBasis::SeparateConsent, vec![purpose("door-access")], "clerk", AgeBracket::Adult);
    e.record_consents(&op(), vec![c]).unwrap();
    let mut v = row(100);
    v[0] += 0.5;
    let t_new = e.import_batch(&op(), vec![Enrolment::new(subject("newcomer"), "new-c", vec![purpose("door-access")], v)]).unwrap()[0];
    e.withdraw(&op(), &subject("p5")).unwrap();
    e.close().unwrap();

    let e = open(&g);
    assert_eq!(e.stats().templates, 29);
    assert!(e.template(t_new).is_ok());
    assert!(e.templates_of(&subject("p5")).is_empty());
    assert!(e.templates_of(&subject("p3")).is_empty());
    // Compaction rewrites everything in the new layout; nothing changes for queries.
    let before: Vec<_> = (0..30).map(|i| top3(&e, i)).collect();
    e.compact(&op()).unwrap();
    e.close().unwrap();
    drop(std::fs::remove_file(g.join("index.snap")));
    let e = open(&g);
    assert!(!e.open_report().snapshot_used);
    assert_eq!((0..30).map(|i| top3(&e, i)).collect::<Vec<_>>(), before);
    e.close().unwrap();
    assert!(verify_audit(&g, &key, None).unwrap().ok());
}
