//! One test per obligation of ../shared/REGULATION.md that the engine can enforce.
//! Each is named after the obligation and fails if the rule is broken.

mod common;
use common::*;

use std::time::Duration;

use facematch::compliance::*;
use facematch::engine::{Enrolment, Identify, Pending, Query, SearchOptions};
use facematch::index::SearchStrategy;
use facematch::store::{forensic_dump, MasterKey};
use facematch::Error;

#[test]
fn specific_purpose_query_with_undeclared_purpose_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let e = create(d.path(), &MasterKey::generate(), clock());
    enrol(&e, "alice", &["door-access"], vector(1));
    let r = e.query(&ctx("marketing"), Query::identify(&vector(1), 5));
    assert!(matches!(r, Err(Error::PolicyViolation { rule: "specific-purpose", .. })), "{r:?}");
    let r = e.query(&ctx("marketing"), Query::verify(&vector(1), &subject("alice")));
    assert!(matches!(r, Err(Error::PolicyViolation { .. })));
    // A purpose name that is not even well-formed cannot be built at all.
    assert!(Purpose::new("").is_err());
}

#[test]
fn specific_purpose_query_for_a_never_returns_template_enrolled_only_for_b() {
    let d = tempfile::tempdir().unwrap();
    let e = create(d.path(), &MasterKey::generate(), clock());
    for i in 0..40u64 {
        let p = if i % 2 == 0 { "door-access" } else { "payment" };
        enrol(&e, &format!("p{i}"), &[p], vector(i));
    }
    for strategy in [SearchStrategy::Auto, SearchStrategy::Exact, SearchStrategy::Graph] {
        for i in 0..40u64 {
            let r = e.query(&ctx("door-access"), Query::identify(&vector(i), 10).search(SearchOptions { strategy, ef: None })).unwrap();
            for c in &r.candidates {
                let n: u64 = c.subject.as_str()[1..].parse().unwrap();
                assert_eq!(n % 2, 0, "door-access query returned {} enrolled only for payment", c.subject);
            }
            if let Decision::Match { subject, .. } | Decision::NeedsHumanReview { subject, .. } = &r.decision {
                let n: u64 = subject.as_str()[1..].parse().unwrap();
                assert_eq!(n % 2, 0, "a payment-only person matched a door-access query");
            }
        }
    }
    // Verification for the wrong purpose never matches either.
    let v = e.query(&ctx("door-access"), Query::verify(&vector(1), &subject("p1"))).unwrap();
    assert!(!v.decision.is_match());
}

#[test]
fn consent_required_before_enrolment() {
    let d = tempfile::tempdir().unwrap();
    let e = create(d.path(), &MasterKey::generate(), clock());
    let r = e.enrol(&op(), Enrolment::new(subject("bob"), "no-such-consent", vec![purpose("door-access")], vector(2)));
    assert!(matches!(r, Err(Error::PolicyViolation { rule: "consent-required", .. })), "{r:?}");
    // Consent for one purpose does not cover another.
    let cid = consent(&e, "bob", &["door-access"], AgeBracket::Adult).unwrap();
    let r = e.enrol(&op(), Enrolment::new(subject("bob"), cid.clone(), vec![purpose("payment")], vector(2)));
    assert!(matches!(r, Err(Error::PolicyViolation { .. })), "{r:?}");
    // Someone else's consent does not count.
    let r = e.enrol(&op(), Enrolment::new(subject("carol"), cid, vec![purpose("door-access")], vector(3)));
    assert!(matches!(r, Err(Error::PolicyViolation { .. })), "{r:?}");
    assert_eq!(e.stats().templates, 0);
}

#[test]
fn guardian_consent_minor_under_14_without_guardian_cannot_be_enrolled() {
    let d = tempfile::tempdir().unwrap();
    let e = create(d.path(), &MasterKey::generate(), clock());
    let r = consent(&e, "kid", &["door-access"], AgeBracket::Under14);
    assert!(matches!(r, Err(Error::PolicyViolation { rule: "guardian-consent-under-14", .. })), "{r:?}");
    let r = e.enrol(&op(), Enrolment::new(subject("kid"), "consent-kid", vec![purpose("door-access")], vector(4)));
    assert!(r.is_err());
    // With a guardian's consent it is allowed.
    let mut c =
        ConsentRecord::new("consent-kid", "kid", ConsentBasis::SeparateConsent, vec![purpose("door-access")], "clerk", AgeBracket::Under14);
    c.guardian = Some(GuardianConsent { guardian: "guardian-of-kid".into(), relationship: "father".into() });
    e.record_consent(&op(), c).unwrap();
    e.enrol(&op(), Enrolment::new(subject("kid"), "consent-kid", vec![purpose("door-access")], vector(4))).unwrap();
}

#[test]
fn consent_withdrawal_erases_every_template_at_once() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create(d.path(), &key, clock());
    let base = vector(5);
    let cid = consent(&e, "dana", &["door-access", "payment"], AgeBracket::Adult).unwrap();
    for s in 0..3 {
        e.enrol(&op(), Enrolment::new(subject("dana"), cid.clone(), vec![purpose("door-access"), purpose("payment")], near(&base, s, 0.1)))
            .unwrap();
    }
    for i in 10..30u64 {
        enrol(&e, &format!("x{i}"), &["door-access"], vector(i));
    }
    assert!(e.query(&ctx("door-access"), Query::identify(&base, 5)).unwrap().decision.is_match());
    let r = e.withdraw(&op(), &subject("dana")).unwrap();
    assert_eq!(r.templates.len(), 3);
    for strategy in [SearchStrategy::Exact, SearchStrategy::Graph, SearchStrategy::Auto] {
        let id = e.query(&ctx("door-access"), Query::identify(&base, 20).search(SearchOptions { strategy, ef: None })).unwrap();
        assert!(id.candidates.iter().all(|c| c.subject.as_str() != "dana"));
    }
    assert!(matches!(e.query(&ctx("door-access"), Query::verify(&base, &subject("dana"))), Err(Error::UnknownSubject(_))));
    // The consent record stays (audit trail), marked withdrawn, and no longer allows enrolment.
    let cs = e.consents_of(&subject("dana"));
    assert!(cs.iter().all(|c| c.withdrawn_at_ms.is_some()));
    assert!(e.enrol(&op(), Enrolment::new(subject("dana"), cid, vec![purpose("door-access")], base.clone())).is_err());
    // After reopening, still gone.
    drop(e);
    let e = open(d.path(), &key, clock()).unwrap();
    assert!(e.templates_of(&subject("dana")).is_empty());
}

#[test]
fn erasure_after_compaction_template_bytes_are_in_no_file_of_the_store() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create(d.path(), &key, clock());
    let victim = vector(77);
    enrol(&e, "erin", &["door-access"], victim.clone());
    for i in 100..120u64 {
        enrol(&e, &format!("y{i}"), &["door-access"], vector(i));
    }
    e.checkpoint().unwrap();
    let stored = facematch::engine::normalise(DIM, &victim).unwrap();
    let needle = f32_bytes(&stored);
    let (plain, raw) = forensic_dump(d.path(), &key).unwrap();
    assert!(contains(&plain, &needle), "positive control: the decrypted store must hold the template before erasure");
    assert!(!contains(&raw, &needle), "plaintext template bytes on disk before erasure");
    e.withdraw(&op(), &subject("erin")).unwrap();
    e.compact(&op()).unwrap();
    let (plain, raw) = forensic_dump(d.path(), &key).unwrap();
    assert!(!contains(&plain, &needle[..16]), "erased template still in the decrypted store");
    assert!(!contains(&raw, &needle[..16]), "erased template bytes in a store file");
    assert!(!contains(&plain, &f32_bytes(&victim)[..16]));
}

#[test]
fn retention_expired_templates_are_purged_and_never_matched() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let c = clock();
    let e = create(d.path(), &key, c.clone());
    let v = vector(8);
    enrol(&e, "fay", &["door-access"], v.clone()); // 30 days
    enrol(&e, "gus", &["payment"], vector(9)); // 365 days
    let both = vector(10);
    enrol(&e, "hoa", &["door-access", "payment"], both.clone()); // each purpose on its own retention
    c.advance(Duration::from_secs(31 * 86_400));
    // Expired but not yet purged: never matched.
    let id = e.query(&ctx("door-access"), Query::identify(&v, 5)).unwrap();
    assert!(id.candidates.is_empty(), "{:?}", id.candidates);
    // Door access has expired for hoa too, payment has not: kept, matched for payment only.
    assert!(e.query(&ctx("door-access"), Query::identify(&both, 5)).unwrap().candidates.is_empty());
    assert!(!e.query(&ctx("door-access"), Query::verify(&both, &subject("hoa"))).unwrap().decision.is_match());
    assert!(e.query(&ctx("payment"), Query::identify(&both, 1)).unwrap().decision.is_match());
    assert!(e.query(&ctx("payment"), Query::verify(&both, &subject("hoa"))).unwrap().decision.is_match());
    let r = e.purge_expired(&op()).unwrap();
    assert_eq!(r.templates.len(), 1, "only fay's template has no purpose left");
    assert_eq!(e.stats().templates, 2);
    // The engine also purges on open.
    c.advance(Duration::from_secs(400 * 86_400));
    drop(e);
    let e = open(d.path(), &key, c.clone()).unwrap();
    assert_eq!(e.open_report().purged_on_open, 2);
    assert_eq!(e.stats().templates, 0);
}

#[test]
fn encryption_at_rest_no_plaintext_embedding_bytes_anywhere_in_the_store() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create(d.path(), &key, clock());
    let mut vs = Vec::new();
    for i in 0..30u64 {
        let v = vector(1000 + i);
        enrol(&e, &format!("z{i}"), &["door-access"], v.clone());
        vs.push(v);
    }
    e.checkpoint().unwrap();
    e.query(&ctx("door-access"), Query::identify(&vs[0], 3)).unwrap();
    drop(e);
    let raw = all_bytes(d.path());
    for v in &vs {
        let n = facematch::engine::normalise(DIM, v).unwrap();
        assert!(!contains(&raw, &f32_bytes(&n)[..12]));
        assert!(!contains(&raw, &f32_bytes(v)[..12]));
    }
    // The key is not in the store either.
    assert!(!contains(&raw, key.to_hex().as_bytes()));
}

#[test]
fn encryption_wrong_key_is_refused_and_touches_nothing() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create(d.path(), &key, clock());
    enrol(&e, "hal", &["door-access"], vector(10));
    e.close().unwrap();
    let before = all_bytes(d.path());
    let r = open(d.path(), &MasterKey::generate(), clock());
    assert!(matches!(r, Err(Error::Key(_))), "{:?}", r.err());
    assert_eq!(before, all_bytes(d.path()), "a wrong key changed the store");
    assert!(open(d.path(), &key, clock()).is_ok());
}

#[test]
fn encryption_key_rotation_re_encrypts_the_store() {
    let d = tempfile::tempdir().unwrap();
    let old = MasterKey::generate();
    let e = create(d.path(), &old, clock());
    let v = vector(11);
    enrol(&e, "ida", &["door-access"], v.clone());
    let new = MasterKey::generate();
    e.rotate_key(&op(), new.clone()).unwrap();
    assert!(e.query(&ctx("door-access"), Query::verify(&v, &subject("ida"))).unwrap().decision.is_match());
    drop(e);
    assert!(matches!(open(d.path(), &old, clock()), Err(Error::Key(_))));
    let e = open(d.path(), &new, clock()).unwrap();
    assert!(e.query(&ctx("door-access"), Query::verify(&v, &subject("ida"))).unwrap().decision.is_match());
    let report =
        facematch::audit::AuditLog::verify(&d.path().join("audit"), &facematch::audit::AuditKey::from_bytes(new.audit_key_bytes()))
            .unwrap();
    assert!(report.ok(), "{report:?}");
}

/// A crash during key rotation: before the commit point the old key still opens everything (the
/// staging is shredded), after it the new key does (the next open finishes moving the files, even
/// when some had moved already). Either way the audit log verifies and records the recovery.
#[test]
fn encryption_key_rotation_interrupted_by_a_crash_completes_or_rolls_back() {
    use facematch::audit::{AuditEvent, AuditKey, AuditLog};
    #[derive(Clone, Copy, Debug)]
    enum RotationStep {
        Staged,
        Committed,
    }
    for (stop, partial_move) in [(RotationStep::Staged, false), (RotationStep::Committed, false), (RotationStep::Committed, true)] {
        let d = tempfile::tempdir().unwrap();
        let old = MasterKey::generate();
        let e = create(d.path(), &old, clock());
        let v = vector(21);
        enrol(&e, "kim", &["door-access"], v.clone());
        enrol(&e, "lee", &["door-access"], vector(22));
        e.withdraw(&op(), &subject("lee")).unwrap();
        let new = MasterKey::generate();
        facematch::failpoints::enable(match stop {
            RotationStep::Staged => "rotate-key/staged",
            RotationStep::Committed => "rotate-key/committed",
        });
        e.rotate_key(&op(), new.clone()).unwrap();
        facematch::failpoints::disable_all();
        drop(e); // the crash
        let staging = d.path().join("rotate.new");
        assert!(staging.exists());
        if partial_move {
            // The crash came after the template log had been moved into place.
            std::fs::rename(staging.join("templates.log"), d.path().join("templates.log")).unwrap();
        }
        let (good, bad, finished) = match stop {
            RotationStep::Staged => (&old, &new, false),
            RotationStep::Committed => (&new, &old, true),
        };
        let before = all_bytes(d.path());
        assert!(matches!(open(d.path(), bad, clock()), Err(Error::Key(_))), "{stop:?}: the other key must be refused");
        assert_eq!(before, all_bytes(d.path()), "{stop:?}: a refused key changed the store");
        let e = facematch::engine::EngineBuilder::new(d.path()).key(good.clone()).clock(clock()).open().unwrap();
        assert_eq!(e.open_report().key_rotation_recovered, Some(finished), "{stop:?}");
        assert!(!staging.exists(), "{stop:?}: staging left behind");
        assert!(e.query(&ctx("door-access"), Query::verify(&v, &subject("kim"))).unwrap().decision.is_match(), "{stop:?}");
        assert!(
            e.query(&ctx("door-access"), Query::verify(&vector(22), &subject("lee"))).is_err(),
            "{stop:?}: withdrawn consent came back"
        );
        e.close().unwrap();
        let adir = d.path().join("audit");
        let report = AuditLog::verify(&adir, &AuditKey::from_bytes(good.audit_key_bytes())).unwrap();
        assert!(report.ok(), "{stop:?}: {report:?}");
        let recs = AuditLog::read(&adir, &Default::default()).unwrap();
        assert!(
            recs.iter().any(|r| matches!(&r.event, AuditEvent::Admin { action, .. } if action == "key-rotation-recovery")),
            "{stop:?}: the recovery is not in the audit log"
        );
        // And the gallery keeps working under that key.
        let e = open(d.path(), good, clock()).unwrap();
        assert!(e.query(&ctx("door-access"), Query::identify(&v, 1)).unwrap().decision.is_match());
    }
}

#[test]
fn erasure_leftovers_of_an_interrupted_compaction_are_shredded_on_open() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create(d.path(), &key, clock());
    enrol(&e, "max", &["door-access"], vector(31));
    e.close().unwrap();
    // What a crash leaves: a copy of the store's own files under the temporary names.
    for (from, name) in [("templates.log", "templates.log.new"), ("index.snap", "index.snap.tmp")] {
        std::fs::copy(d.path().join(from), d.path().join(name)).unwrap();
    }
    let e = open(d.path(), &key, clock()).unwrap();
    for name in ["templates.log.new", "index.snap.tmp"] {
        assert!(!d.path().join(name).exists(), "{name} survived the open");
    }
    assert!(e.open_report().left_alone.is_empty());
    assert!(e.query(&ctx("door-access"), Query::verify(&vector(31), &subject("max"))).unwrap().decision.is_match());
}

#[test]
fn human_review_assist_only_purpose_never_returns_a_plain_match() {
    let d = tempfile::tempdir().unwrap();
    let e = create(d.path(), &MasterKey::generate(), clock());
    let v = vector(12);
    enrol(&e, "jon", &["social-assistance"], v.clone());
    let r = e.query(&ctx("social-assistance"), Query::identify(&v, 1)).unwrap();
    assert!(matches!(r.decision, Decision::NeedsHumanReview { .. }), "{:?}", r.decision);
    let r = e.query(&ctx("social-assistance"), Query::verify(&v, &subject("jon"))).unwrap();
    assert!(matches!(r.decision, Decision::NeedsHumanReview { .. }));
}

#[test]
fn filing_notice_raised_once_when_people_reach_the_threshold() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let mut cfg = config();
    cfg.filing_threshold = 25; // an operator may ask to be warned earlier than the law's 100,000
    let e = facematch::engine::EngineBuilder::new(d.path()).key(key.clone()).clock(clock()).create(cfg).unwrap();
    for i in 0..24u64 {
        enrol(&e, &format!("f{i}"), &["door-access"], vector(i));
    }
    assert!(e.notices().is_empty());
    // A second template of an enrolled person does not count twice.
    let cid = "consent-f0".to_string();
    e.enrol(&op(), Enrolment::new(subject("f0"), cid, vec![purpose("door-access")], near(&vector(0), 999, 0.05))).unwrap();
    assert!(e.notices().is_empty());
    enrol(&e, "f24", &["door-access"], vector(24));
    let n = e.notices();
    assert_eq!(n.len(), 1, "{n:?}");
    assert!(matches!(n[0], facematch::engine::Notice::FilingRequired { people: 25, threshold: 25, .. }));
    enrol(&e, "f25", &["door-access"], vector(25));
    assert_eq!(e.notices().len(), 1, "raised once");
    let s = e.stats();
    assert_eq!((s.people, s.filing_threshold), (26, 25));
    assert!(s.filing_notice_ms.is_some());
    // It is in the audit trail.
    drop(e);
    let recs = facematch::audit::AuditLog::read(&d.path().join("audit"), &Default::default()).unwrap();
    assert_eq!(recs.iter().filter(|r| matches!(r.event, facematch::audit::AuditEvent::FilingNotice { .. })).count(), 1);
}

#[test]
fn filing_threshold_cannot_exceed_the_law() {
    let mut cfg = config();
    cfg.filing_threshold = 100_001;
    assert!(cfg.validate().is_err());
    assert_eq!(facematch::compliance::FILING_THRESHOLD, 100_000);
}

#[test]
fn thresholds_changes_are_versioned_and_audited() {
    let d = tempfile::tempdir().unwrap();
    let e = create(d.path(), &MasterKey::generate(), clock());
    let t = e.set_threshold(&op(), &purpose("payment"), Mode::Identify, 0.55).unwrap();
    assert_eq!(t.version(), 2);
    assert!(e.set_threshold(&op(), &purpose("payment"), Mode::Identify, 1.5).is_err());
    drop(e);
    let recs = facematch::audit::AuditLog::read(&d.path().join("audit"), &Default::default()).unwrap();
    assert!(recs
        .iter()
        .any(|r| matches!(&r.event, facematch::audit::AuditEvent::ThresholdChange { new, version: 2, .. } if (*new - 0.55).abs() < 1e-6)));
}

#[test]
fn records_of_processing_every_query_has_an_audit_record_without_biometrics() {
    let d = tempfile::tempdir().unwrap();
    let e = create(d.path(), &MasterKey::generate(), clock());
    let v = vector(13);
    enrol(&e, "kim", &["door-access"], v.clone());
    let a = e.query(&ctx("door-access"), Query::verify(&v, &subject("kim"))).unwrap();
    let b = e.query(&ctx("door-access"), Query::identify(&vector(14), 3)).unwrap();
    assert!(b.audit_seq > a.audit_seq);
    drop(e);
    let recs = facematch::audit::AuditLog::read(&d.path().join("audit"), &Default::default()).unwrap();
    let queries: Vec<_> = recs.iter().filter(|r| matches!(r.event, facematch::audit::AuditEvent::Query(_))).collect();
    assert_eq!(queries.len(), 2);
    let text =
        std::fs::read_dir(d.path().join("audit")).unwrap().map(|f| std::fs::read(f.unwrap().path()).unwrap()).collect::<Vec<_>>().concat();
    let n = facematch::engine::normalise(DIM, &v).unwrap();
    assert!(!contains(&text, &f32_bytes(&n)[..12]));
    // No JSON array of many numbers (an embedding or score vector) in any record.
    let s = String::from_utf8_lossy(&text);
    for arr in s.split('[').skip(1) {
        let inner = arr.split(']').next().unwrap_or("");
        let nums = inner.split(',').filter(|x| x.trim().parse::<f64>().is_ok()).count();
        assert!(nums < 16, "audit record holds a numeric array: [{inner}]");
    }
}

#[test]
fn no_network_the_engine_opens_no_socket() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create(d.path(), &key, clock());
    enrol(&e, "lee", &["door-access"], vector(15));
    e.query(&ctx("door-access"), Query::identify(&vector(15), 1)).unwrap();
    e.export(&op(), None, &d.path().join("export")).unwrap();
    e.compact(&op()).unwrap();
    drop(e);
    let _e = open(d.path(), &key, clock()).unwrap();
    // fstat every descriptor (not /proc/self/fd: the engine makes the process non-dumpable,
    // which hides /proc/self/fd from a non-root user).
    let sockets: Vec<i32> = (0..4096)
        .filter(|&fd| {
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat on any integer is safe; EBADF for closed descriptors.
            unsafe { libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK }
        })
        .collect();
    assert!(sockets.is_empty(), "engine holds sockets: fds {sockets:?}");
}

#[test]
fn privacy_an_open_engine_keeps_templates_out_of_core_dumps() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create(d.path(), &key, clock());
    enrol(&e, "ned", &["door-access"], vector(16));
    // Tests share one process: other tests' engines also made it non-dumpable, which is the point.
    assert_eq!(facematch::engine::core_dumps_allowed(), Some(false));
}

#[test]
fn no_network_export_is_explicit_and_audited() {
    let d = tempfile::tempdir().unwrap();
    let e = create(d.path(), &MasterKey::generate(), clock());
    enrol(&e, "mo", &["door-access"], vector(16));
    enrol(&e, "ned", &["payment"], vector(17));
    let n = e.export(&op(), Some(&purpose("payment")), &d.path().join("out")).unwrap();
    assert_eq!(n, 1);
    drop(e);
    let recs = facematch::audit::AuditLog::read(&d.path().join("audit"), &Default::default()).unwrap();
    assert!(recs.iter().any(|r| matches!(&r.event, facematch::audit::AuditEvent::Export { templates: 1, .. })));
}

#[test]
fn unrelated_faces_that_match_nobody_are_counted_discarded_and_never_logged() {
    let d = tempfile::tempdir().unwrap();
    let e = create(d.path(), &MasterKey::generate(), clock());
    let v = vector(21);
    enrol(&e, "uma", &["door-access"], v.clone());
    let bystander = vector(22);
    let r = e
        .identify_faces_deferred(&ctx("door-access"), &[near(&v, 1, 0.05), bystander.clone()], Identify::top(3))
        .and_then(Pending::wait)
        .unwrap();
    assert!(r[0].decision.is_match());
    assert!(!r[1].decision.is_match());
    drop(e);
    let recs = facematch::audit::AuditLog::read(&d.path().join("audit"), &Default::default()).unwrap();
    let q: Vec<_> = recs
        .iter()
        .filter_map(|r| match &r.event {
            facematch::audit::AuditEvent::Query(q) => Some(q.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(q.len(), 2);
    assert!(q.iter().all(|q| q.faces_found == 2 && q.faces_discarded == 1));
    let raw = all_bytes(d.path());
    assert!(!contains(&raw, &f32_bytes(&bystander)[..12]));
}

/// A template log cut short after a checkpoint (truncation, not a crash: a crash only tears an
/// unacknowledged last frame) is refused, not replayed: replaying it would bring a withdrawn
/// subject back. Found by tests/fuzz.rs.
#[test]
fn consent_withdrawal_survives_no_truncated_log_replay() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let e = create(d.path(), &key, clock());
    for i in 0..12u64 {
        enrol(&e, &format!("t{i}"), &["door-access"], vector(40 + i));
    }
    e.withdraw(&op(), &subject("t3")).unwrap();
    e.close().unwrap();
    let logp = d.path().join("templates.log");
    let len = std::fs::metadata(&logp).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&logp).unwrap().set_len(len / 3).unwrap();
    match open(d.path(), &key, clock()) {
        // The manifest (format 2) or the snapshot proves the frames that were written.
        Err(Error::DataCorruption { reason, .. }) => {
            assert!(reason.contains("the manifest proves") || reason.contains("acknowledged writes were lost"), "{reason}")
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(e) => panic!(
            "opened a truncated log; t3 withdrawn: {:?}",
            e.query(&ctx("door-access"), Query::verify(&vector(43), &subject("t3"))).is_err()
        ),
    }
}
