//! Gallery, compliance and audit subcommands of the `facematch` binary.
//! Thin clients of the library's public API; `anyhow` lives only here.

mod args;
pub mod batch;

pub use self::args::*;

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use facematch::audit::{AuditFilter, AuditLog};
use facematch::compliance::*;
use facematch::config::GalleryConfig;
use facematch::engine::{Engine, EngineBuilder, Enrolment};
use facematch::pipeline::{FacePipeline, PipelineConfig};
use facematch::store::MasterKey;

fn print_notices(e: &Engine) {
    for n in e.notices() {
        match n {
            facematch::engine::Notice::FilingRequired { people, threshold, at_ms } => eprintln!(
                "NOTICE: {people} people stored (threshold {threshold}, reached at unix ms {at_ms}): file with the provincial cyberspace office within 30 working days"
            ),
        }
    }
}

fn json_line(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    out.write_all(b"\n")?;
    Ok(())
}

fn parse_basis(s: &str) -> anyhow::Result<ConsentBasis> {
    Ok(match s {
        "separate" => ConsentBasis::SeparateConsent,
        "written" => ConsentBasis::WrittenConsent,
        _ => match s.strip_prefix("legal:") {
            Some(b) if !b.trim().is_empty() => ConsentBasis::LegalBasis(b.to_string()),
            _ => bail!("--basis must be separate, written or legal:<named basis>"),
        },
    })
}

fn parse_age(s: &str) -> anyhow::Result<AgeBracket> {
    Ok(match s {
        "adult" => AgeBracket::Adult,
        "14-17" => AgeBracket::Minor14To17,
        "under-14" | "under14" => AgeBracket::Under14,
        _ => bail!("--age must be adult, 14-17 or under-14"),
    })
}

fn purposes(v: &[String]) -> anyhow::Result<Vec<Purpose>> {
    v.iter().map(|p| Ok(Purpose::new(p.as_str())?)).collect()
}

fn pipeline(cfg: &PipelineConfig) -> anyhow::Result<FacePipeline> {
    FacePipeline::new(cfg.clone()).context("loading the face pipeline")
}

/// Largest list file (manifests, labels) read: 1 GiB of ids.
const MAX_LIST_BYTES: u64 = 1 << 30;
/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Read a UTF-8 text file the user named: regular files only, at most `max` bytes.
pub(crate) fn read_text(p: &Path, max: u64) -> anyhow::Result<String> {
    let bytes = facematch::fs::read_bounded(p, max)?;
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", p.display()))
}

/// Run a gallery command; `Ok(false)` means some inputs failed.
fn parse_mode(m: &str) -> anyhow::Result<Mode> {
    match m {
        "verify" => Ok(Mode::Verify),
        "identify" => Ok(Mode::Identify),
        m => bail!("--mode must be verify or identify, got {m}"),
    }
}

pub fn run(cmd: &GalleryCommand, pcfg: &PipelineConfig) -> anyhow::Result<bool> {
    match cmd {
        GalleryCommand::Keygen { out } => {
            use std::os::unix::fs::OpenOptionsExt;
            let k = MasterKey::generate();
            let mut f = std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(out)
                .with_context(|| format!("creating {}", out.display()))?;
            writeln!(f, "{}", k.to_hex())?;
            eprintln!("wrote key {} (fingerprint {}); keep it outside the gallery", out.display(), k.fingerprint());
            Ok(true)
        }
        GalleryCommand::Init(a) => {
            let mut cfg: GalleryConfig = match &a.config {
                Some(p) => serde_json::from_str(&read_text(p, MAX_CONFIG_BYTES)?).with_context(|| format!("parsing {}", p.display()))?,
                None => GalleryConfig { dim: a.dim, model_id: a.model_id.clone(), ..Default::default() },
            };
            for spec in &a.purposes {
                let parts: Vec<&str> = spec.split(':').collect();
                let (name, days, assist) = match parts.as_slice() {
                    [n, d] => (*n, *d, false),
                    [n, d, "assist"] => (*n, *d, true),
                    _ => bail!("--purpose must be NAME:RETENTION_DAYS[:assist], got {spec}"),
                };
                let mut p = PurposePolicy::new(Purpose::new(name)?, days.parse().with_context(|| format!("retention days in {spec}"))?);
                p.assist_only = assist;
                cfg.purposes.push(p);
            }
            cfg.audit.site = a.site.clone();
            cfg.audit.device = a.device.clone();
            let e = EngineBuilder::new(&a.g.gallery).key(a.g.key()?).create(cfg)?;
            e.record_admin(&a.g.operator()?, "init", &format!("gallery {}", a.g.gallery.display()))?;
            json_line(&e.stats())?;
            e.close()?;
            Ok(true)
        }
        GalleryCommand::Consent(a) if a.from_csv.is_some() => batch::run_consent_csv(a),
        GalleryCommand::Consent(a) => {
            let e = a.g.open()?;
            let op = a.g.operator()?;
            let mut c = ConsentRecord::new(
                a.consent_id.clone(),
                &a.subject,
                parse_basis(&a.basis)?,
                purposes(&a.purposes)?,
                a.collected_by.clone().unwrap_or_else(|| op.as_str().to_string()),
                parse_age(&a.age)?,
            );
            c.guardian = a.guardian.clone().map(|g| GuardianConsent { guardian: g, relationship: a.relationship.clone() });
            e.record_consent(&op, c)?;
            json_line(&serde_json::json!({"consent": a.consent_id, "subject": a.subject, "recorded": true}))?;
            Ok(true)
        }
        GalleryCommand::Enrol(a) => batch::run_enrol(a, pcfg),
        GalleryCommand::Import(a) => run_import(a),
        GalleryCommand::Search(a) => batch::run_search(a),
        GalleryCommand::Verify(a) => batch::run_verify(a, pcfg),
        GalleryCommand::Identify(a) => batch::run_identify(a, pcfg),
        GalleryCommand::Delete(a) => {
            let e = a.g.open()?;
            let op = a.g.operator()?;
            let r = e.delete(&op, &a.templates, &a.reason)?;
            finish_erasure(e, &op, r, a.compact)
        }
        GalleryCommand::Withdraw(a) => {
            let e = a.g.open()?;
            let op = a.g.operator()?;
            let subject = SubjectId::new(a.subject.as_str())?;
            let r = match e.withdraw(&op, &subject) {
                // Withdrawn already (e.g. a rerun after a crash): say so and finish the compaction asked for.
                Err(facematch::Error::UnknownSubject(_)) if !e.consents_of(&subject).is_empty() => {
                    eprintln!("{subject} has withdrawn already: nothing left to erase");
                    facematch::engine::ErasureReport { subjects: vec![subject.to_string()], ..Default::default() }
                }
                r => r?,
            };
            finish_erasure(e, &op, r, a.compact)
        }
        GalleryCommand::Purge(a) => {
            let e = a.g.open()?;
            let r = e.purge_expired(&a.g.operator()?)?;
            json_line(&serde_json::json!({"purged_on_open": e.open_report().purged_on_open, "purged_now": r}))?;
            e.close()?;
            Ok(true)
        }
        GalleryCommand::BuildGraph(a) => {
            let e = a.g.open()?;
            let t = std::time::Instant::now();
            let n = e.build_graph()?;
            json_line(&serde_json::json!({"added_to_graph": n, "seconds": t.elapsed().as_secs_f64()}))?;
            e.close()?;
            Ok(true)
        }
        GalleryCommand::Compact(a) => {
            let e = a.g.open()?;
            let r = e.compact(&a.g.operator()?)?;
            json_line(&r)?;
            e.close()?;
            Ok(true)
        }
        GalleryCommand::Repair(a) => {
            let op = a.g.operator()?;
            let r = EngineBuilder::new(&a.g.gallery).key(a.g.key()?).repair(&op, a.yes)?;
            json_line(&r)?;
            if !a.yes && !r.plan.is_empty() {
                eprintln!("nothing was changed: run again with --yes to carry this out (everything removed is kept in the gallery's repair-<time>/ directory)");
                return Ok(false);
            }
            Ok(true)
        }
        GalleryCommand::Stats(a) => {
            let e = a.g.open()?;
            json_line(&e.stats())?;
            e.close()?;
            Ok(true)
        }
        GalleryCommand::Export(a) => {
            let e = a.g.open()?;
            let p = a.purpose.as_deref().map(Purpose::new).transpose()?;
            let n = e.export(&a.g.operator()?, p.as_ref(), &a.out)?;
            json_line(&serde_json::json!({"exported": n, "to": a.out}))?;
            Ok(true)
        }
        GalleryCommand::Calibrate(a) => {
            let e = a.g.open()?;
            let mode = parse_mode(&a.mode)?;
            let purpose = Purpose::new(a.purpose.as_str())?;
            let q = facematch::npy::read_f32_matrix(&a.embeddings)?;
            let labels: Vec<Option<SubjectId>> = read_text(&a.labels, MAX_LIST_BYTES)?
                .lines()
                .map(|l| match l.trim() {
                    "" => Ok(None),
                    s => SubjectId::new(s).map(Some),
                })
                .collect::<facematch::Result<_>>()?;
            if labels.len() != q.rows {
                bail!("{} has {} labels, {} has {} rows", a.labels.display(), labels.len(), a.embeddings.display(), q.rows);
            }
            let op = a.g.operator()?;
            let c = e.calibrate_threshold(&op, &purpose, mode, &q.data, &labels, a.target)?;
            let applied = if a.apply { Some(e.set_threshold(&op, &purpose, mode, c.threshold)?.version()) } else { None };
            json_line(&serde_json::json!({"purpose": a.purpose, "calibration": c, "applied_version": applied}))?;
            Ok(true)
        }
        GalleryCommand::Threshold(a) => {
            let e = a.g.open()?;
            let mode = parse_mode(&a.mode)?;
            let t = e.set_threshold(&a.g.operator()?, &Purpose::new(a.purpose.as_str())?, mode, a.value)?;
            json_line(&serde_json::json!({"purpose": a.purpose, "mode": a.mode, "threshold": t.value(), "version": t.version()}))?;
            Ok(true)
        }
        GalleryCommand::RotateKey(a) => {
            let e = a.g.open()?;
            let new = MasterKey::from_file(&a.new_key_file)?;
            let fp = new.fingerprint();
            e.rotate_key(&a.g.operator()?, new)?;
            json_line(&serde_json::json!({"rotated": true, "new_key_fingerprint": fp}))?;
            Ok(true)
        }
        GalleryCommand::Audit(c) => run_audit(c),
    }
}

/// Compact now if asked (and not already done), report, close.
/// Report an erasure that is committed, then what became of the compaction
/// and the close: the exit code is non-zero only with a report that says
/// exactly what is done (the erasure holds either way).
fn finish_erasure(e: Engine, op: &Operator, mut r: facematch::engine::ErasureReport, compact: bool) -> anyhow::Result<bool> {
    let mut failed = None;
    if compact && !r.bytes_removed {
        match e.compact(op) {
            Ok(_) => r.bytes_removed = true,
            Err(err) => failed = Some(format!("compaction failed (the erasure is committed; run `compact` again): {err}")),
        }
    }
    if let Err(err) = e.close() {
        failed.get_or_insert(format!("closing failed after the erasure was committed: {err}"));
    }
    let mut v = serde_json::to_value(&r)?;
    if let Some(f) = &failed {
        v["error"] = serde_json::Value::String(f.clone());
        eprintln!("facematch: {f}");
    }
    json_line(&v)?;
    Ok(failed.is_none())
}

fn run_import(a: &ImportArgs) -> anyhow::Result<bool> {
    // Everything is checked before anything is written: a bad row names its line.
    // The .npy is read a batch of rows at a time (twice: checked, then imported).
    let mut m = facematch::npy::F32Rows::open(&a.embeddings)?;
    let (rows, cols) = (m.rows(), m.cols());
    if cols == 0 && rows > 0 {
        bail!("{}: rows of dimension 0", a.embeddings.display());
    }
    let batch = a.batch.max(1);
    let text = read_text(&a.manifest, MAX_LIST_BYTES)?;
    let mut subjects: Vec<SubjectId> = Vec::with_capacity(rows);
    for (i, raw) in text.lines().enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() {
            continue;
        }
        if line.trim() != line {
            bail!(
                "{} line {}: subject id {line:?} has leading or trailing whitespace (ids are taken exactly as written)",
                a.manifest.display(),
                i + 1
            );
        }
        let s = SubjectId::new(line).with_context(|| format!("{} line {}", a.manifest.display(), i + 1))?;
        subjects.push(s);
    }
    if subjects.len() != rows {
        bail!("manifest has {} subject ids, the .npy has {rows} rows", subjects.len());
    }
    for start in (0..rows).step_by(batch) {
        let block = m.next_block(batch)?;
        for (j, row) in block.chunks_exact(cols.max(1)).enumerate() {
            facematch::engine::normalise(cols, row).with_context(|| format!("{} row {}", a.embeddings.display(), start + j))?;
        }
    }
    m.rewind()?;
    let ps = purposes(&a.purposes)?;
    let basis = parse_basis(&a.basis)?;
    let e = a.g.open()?;
    let op = a.g.operator()?;
    let bar = indicatif::ProgressBar::new(rows as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("import");
    let mut seen = std::collections::HashSet::new();
    let (mut imported, mut skipped) = (0u64, 0u64);
    for start in (0..rows).step_by(batch) {
        let end = (start + batch).min(rows);
        let block = match m.next_block(batch) {
            Ok(b) => b,
            Err(err) => {
                bar.finish_and_clear();
                return Err(anyhow::Error::from(err)
                    .context(format!("import stopped at row {start}: rows 0..{start} are imported (a rerun skips them)")));
            }
        };
        let mut reqs = Vec::with_capacity(end - start);
        let mut consents = Vec::new();
        for (subject, row) in subjects[start..end].iter().zip(block.chunks_exact(cols.max(1))) {
            // Rows an earlier, interrupted run stored already are recognised and skipped.
            if e.enrolled_copy(subject, row)?.is_some() {
                skipped += 1;
                continue;
            }
            let cid = import_consent_id(subject);
            if seen.insert(subject.clone()) && !e.has_consent(&cid) {
                consents.push(ConsentRecord::new(cid.clone(), subject.as_str(), basis.clone(), ps.clone(), op.as_str(), AgeBracket::Adult));
            }
            reqs.push(Enrolment::new(subject.clone(), cid, ps.clone(), row.to_vec()));
        }
        // Consents and templates commit together: a failed batch leaves neither.
        let done = e.import_with_consents(&op, consents, reqs).map(|ids| ids.len() as u64).map_err(anyhow::Error::from);
        match done {
            Ok(n) => imported += n,
            Err(err) => {
                bar.finish_and_clear();
                // Say exactly what is in: rows before this batch are committed, and a rerun skips them.
                json_line(
                    &serde_json::json!({"imported": imported, "skipped_already_imported": skipped, "failed_at_row": start, "error": format!("{err:#}")}),
                )?;
                return Err(err.context(format!("import stopped at row {start}: rows 0..{start} are imported (a rerun skips them)")));
            }
        }
        bar.set_position(end as u64);
    }
    bar.finish_and_clear();
    if a.build_graph {
        e.build_graph()?;
    } else {
        e.checkpoint()?;
    }
    let stats = e.stats();
    if stats.graph_pending >= 10_000 {
        eprintln!(
            "import: {} templates are not in the search graph yet (searches scan them exactly); `facematch build-graph` builds it (minutes per million)",
            stats.graph_pending
        );
    }
    json_line(&serde_json::json!({"imported": imported, "skipped_already_imported": skipped, "stats": stats}))?;
    print_notices(&e);
    e.close()?;
    Ok(true)
}

/// The consent id of an imported subject: readable when it fits, hashed when the id is long.
fn import_consent_id(subject: &SubjectId) -> String {
    let id = format!("import-{subject}");
    if id.len() <= 128 {
        return id;
    }
    use sha2::Digest;
    format!("import-h{}", hex::encode(&sha2::Sha256::digest(subject.as_str().as_bytes())[..16]))
}

fn run_audit(c: &AuditCommand) -> anyhow::Result<bool> {
    match c {
        AuditCommand::Verify(a) => {
            let key = a.g.key()?;
            let anchor = a.g.read_anchor(&key)?;
            let r = facematch::engine::verify_audit(&a.g.gallery, &key, anchor.as_ref())?;
            json_line(&r)?;
            for p in &r.problems {
                eprintln!("audit: {p}");
            }
            Ok(r.ok())
        }
        AuditCommand::Anchor(a) => {
            let e = a.g.open()?;
            let anchor = e.anchor(&a.g.operator()?)?;
            e.close()?;
            match &a.out {
                Some(p) => {
                    let mut f = facematch::fs::create_output(p)?;
                    writeln!(f, "{}", anchor.to_json())?;
                    f.sync_all()?;
                    eprintln!("wrote the anchor to {}: keep it off this machine; check with --anchor", p.display());
                }
                None => println!("{}", anchor.to_json()),
            }
            Ok(true)
        }
        AuditCommand::Show(q) | AuditCommand::Export(q) => {
            let f = AuditFilter {
                from_ms: q.from_ms,
                until_ms: q.until_ms,
                operator: q.by.clone(),
                purpose: q.purpose.clone(),
                subject: q.subject.clone(),
                ..Default::default()
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            AuditLog::export_jsonl(&q.g.gallery.join("audit"), &f, &mut out)?;
            out.flush()?;
            Ok(true)
        }
    }
}
