//! Bulk loads and large-gallery opens (issue 17), in small: the deferred
//! graph, batched frames, snapshots older than the log, and erasures that
//! hold through all of it.

mod common;
use common::*;

use facematch::compliance::{AgeBracket, ConsentBasis, ConsentRecord};
use facematch::engine::{Engine, EngineBuilder, Enrolment, Query, SearchOptions};
use facematch::index::SearchStrategy;
use facematch::store::MasterKey;

/// A gallery whose `Auto` search uses the graph from 50 templates on.
fn create_graph(dir: &std::path::Path, key: &MasterKey) -> Engine {
    let mut cfg = config();
    cfg.index.exact_below = 50;
    EngineBuilder::new(dir).key(key.clone()).clock(clock()).create(cfg).unwrap()
}

/// Consents and enrolments of people `from..to` (one template each) in one bulk batch.
fn import(e: &Engine, from: u64, to: u64) -> Vec<u64> {
    let consents: Vec<ConsentRecord> = (from..to)
        .map(|i| {
            ConsentRecord::new(
                format!("c{i}"),
                &format!("p{i}"),
                ConsentBasis::SeparateConsent,
                vec![purpose("door-access")],
                "clerk",
                AgeBracket::Adult,
            )
        })
        .collect();
    e.record_consents(&op(), consents).unwrap();
    let batch =
        (from..to).map(|i| Enrolment::new(subject(&format!("p{i}")), format!("c{i}"), vec![purpose("door-access")], vector(i))).collect();
    e.import_batch(&op(), batch).unwrap()
}

/// Top-10 (template, score) of 30 probes near people 0..30.
fn answers(e: &Engine, strategy: SearchStrategy) -> Vec<Vec<(u64, f32)>> {
    (0..30u64)
        .map(|i| {
            e.query(&ctx("door-access"), Query::identify(&near(&vector(i), i, 0.2), 10).search(SearchOptions { strategy, ef: None }))
                .unwrap()
                .candidates
                .iter()
                .map(|c| (c.template, c.score))
                .collect()
        })
        .collect()
}

#[test]
fn bulk_import_defers_the_graph_and_answers_exactly_until_it_is_built() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create_graph(d.path(), &key);
    import(&e, 0, 1500);
    assert_eq!(e.stats().graph_pending, 1500);
    let exact = answers(&e, SearchStrategy::Exact);
    // No partial graph: Auto and even Graph scan while the graph is behind.
    assert_eq!(answers(&e, SearchStrategy::Auto), exact);
    assert_eq!(answers(&e, SearchStrategy::Graph), exact);
    e.close().unwrap();

    // The snapshot keeps the pending state; the answers are the same.
    let e = open(d.path(), &key, clock()).unwrap();
    assert!(e.open_report().snapshot_used);
    assert_eq!(e.stats().graph_pending, 1500);
    assert_eq!(answers(&e, SearchStrategy::Auto), exact);

    assert_eq!(e.build_graph().unwrap(), 1500);
    assert_eq!(e.stats().graph_pending, 0);
    assert_eq!(answers(&e, SearchStrategy::Exact), exact);
    let graph = answers(&e, SearchStrategy::Graph);
    let agree = graph.iter().zip(&exact).filter(|(g, x)| g.first() == x.first()).count();
    assert!(agree >= 28, "graph top-1 agrees with the exact scan on {agree} of 30");
    // An enrolment after the build goes into the graph at once (a bulk one waits for the next build).
    enrol(&e, "after", &["door-access"], vector(9000));
    assert_eq!(e.stats().graph_pending, 0);
    import(&e, 1500, 1502);
    assert_eq!(e.stats().graph_pending, 2);
    assert_eq!(e.build_graph().unwrap(), 2);
    let (exact, graph) = (answers(&e, SearchStrategy::Exact), answers(&e, SearchStrategy::Graph));
    e.close().unwrap();

    // Reopened: the graph comes from the snapshot (nothing pending), answers unchanged.
    let e = open(d.path(), &key, clock()).unwrap();
    assert!(e.open_report().snapshot_used);
    assert_eq!(e.stats().graph_pending, 0);
    assert_eq!(answers(&e, SearchStrategy::Exact), exact);
    assert_eq!(answers(&e, SearchStrategy::Graph), graph);
}

#[test]
fn frames_after_the_snapshot_are_replayed_and_erasures_hold() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create_graph(d.path(), &key);
    import(&e, 0, 1200);
    e.checkpoint().unwrap();
    // After the snapshot: more enrolments (bulk and one by one), a deletion, a withdrawal.
    import(&e, 1200, 1300);
    let late = enrol(&e, "late", &["door-access"], vector(5000));
    e.delete(&op(), &[3], "test").unwrap();
    e.withdraw(&op(), &subject("p7")).unwrap();
    let exact = answers(&e, SearchStrategy::Exact);
    let templates = e.stats().templates;
    // Dropped without close: the snapshot is older than the log.
    drop(e);

    for snapshot in [true, false] {
        if !snapshot {
            std::fs::remove_file(d.path().join("index.snap")).unwrap();
        }
        let e = open(d.path(), &key, clock()).unwrap();
        assert_eq!(e.open_report().snapshot_used, snapshot);
        assert_eq!(e.stats().templates, templates);
        assert_eq!(answers(&e, SearchStrategy::Exact), exact);
        assert!(e.template(late).is_ok());
        assert!(e.template(3).is_err(), "a deleted template came back");
        assert!(e.templates_of(&subject("p7")).is_empty(), "a withdrawn subject came back");
        let hit = e.query(&ctx("door-access"), Query::identify(&vector(7), 1)).unwrap();
        assert!(hit.candidates.iter().all(|c| c.subject != subject("p7")));
        drop(e);
    }
}

#[test]
fn metadata_is_kept_exactly_through_compaction_and_reopen() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create_graph(d.path(), &key);
    let ids = import(&e, 0, 300);
    let before: Vec<_> = ids.iter().map(|&t| e.template(t).unwrap()).collect();
    assert_eq!(before[5].subject, subject("p5"));
    assert_eq!(before[5].consent_id, "c5");
    assert_eq!(before[5].model_id, "test-model");
    e.delete(&op(), &ids[..10], "test").unwrap();
    e.compact(&op()).unwrap();
    e.close().unwrap();
    let e = open(d.path(), &key, clock()).unwrap();
    for (t, m) in ids.iter().zip(&before).skip(10) {
        assert_eq!(&e.template(*t).unwrap(), m);
    }
    assert!(e.template(ids[0]).is_err());
    assert_eq!(e.consents_of(&subject("p5")).len(), 1);
}

#[test]
fn a_tampered_or_truncated_log_of_batched_frames_is_refused_and_left_alone() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create_graph(d.path(), &key);
    import(&e, 0, 2500);
    e.close().unwrap();
    let log = d.path().join("templates.log");
    let good = std::fs::read(&log).unwrap();
    // A byte inside the first batched frame (consents) and one inside the enrolments.
    for at in [200, good.len() / 2] {
        let mut bad = good.clone();
        bad[at] ^= 0x20;
        std::fs::write(&log, &bad).unwrap();
        assert!(open(d.path(), &key, clock()).is_err(), "flip at {at} was accepted");
        assert_eq!(std::fs::read(&log).unwrap(), bad, "opening changed the log");
    }
    // Cut inside the last frame: the manifest proves it was written.
    std::fs::write(&log, &good[..good.len() - 100]).unwrap();
    assert!(open(d.path(), &key, clock()).is_err());
    std::fs::write(&log, &good).unwrap();
    let e = open(d.path(), &key, clock()).unwrap();
    assert_eq!(e.stats().templates, 2500);
}

#[test]
fn the_snapshot_holds_the_graph_and_the_log_the_vectors_whatever_its_header_says() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create_graph(d.path(), &key);
    import(&e, 0, 400);
    e.build_graph().unwrap();
    e.delete(&op(), &[5], "test").unwrap();
    let exact = answers(&e, SearchStrategy::Exact);
    let graph = answers(&e, SearchStrategy::Graph);
    e.close().unwrap();
    let snap = d.path().join("index.snap");
    let bytes = std::fs::read(&snap).unwrap();
    // Version 3: the body is the graph without the vectors (400 x 128 f32 would be 200 KiB).
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 3);
    assert!(bytes.len() < 400 * 128 * 4 / 2, "snapshot of {} bytes", bytes.len());
    let reopen = |expect_snapshot: bool| {
        let e = open(d.path(), &key, clock()).unwrap();
        assert_eq!(e.open_report().snapshot_used, expect_snapshot);
        assert_eq!(answers(&e, SearchStrategy::Exact), exact);
        assert!(e.template(5).is_err(), "a deleted template came back");
        if expect_snapshot {
            // The same graph, not one built again.
            assert_eq!(answers(&e, SearchStrategy::Graph), graph);
        }
        drop(e); // no close: the snapshot on disk stays as it is
    };
    reopen(true);
    // A header edited to say "the vectors are inside": the body is refused and the index rebuilt.
    let mut edited = bytes.clone();
    edited[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&snap, &edited).unwrap();
    reopen(false);
    // A flipped byte in the body: refused, rebuilt, same answers.
    let mut flipped = bytes.clone();
    let at = flipped.len() - 40;
    flipped[at] ^= 1;
    std::fs::write(&snap, &flipped).unwrap();
    reopen(false);
}
