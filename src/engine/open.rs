//! Creating, opening and repairing a gallery: [`EngineBuilder`].

use super::*;

/// Builds an [`Engine`]: create a new gallery or open an existing one.
#[derive(Debug)]
pub struct EngineBuilder {
    dir: PathBuf,
    key: Option<MasterKey>,
    clock: Arc<dyn Clock>,
    allow_core_dumps: bool,
    /// Repair: accept a template log or audit log older than the manifest
    /// proves, then bind the manifest to what is there.
    rebind: bool,
    /// Refuse a gallery older than this anchor.
    anchor: Option<crate::engine::Anchor>,
}

impl EngineBuilder {
    /// A builder for the gallery at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        EngineBuilder { dir: dir.into(), key: None, clock: Arc::new(SystemClock), allow_core_dumps: false, rebind: false, anchor: None }
    }
    /// Let this process write core dumps. By default opening or creating an
    /// engine makes the process non-dumpable (Linux `PR_SET_DUMPABLE` 0;
    /// elsewhere on Unix a core size limit of 0), because a dump would hold
    /// the decrypted templates and any probe in flight. Non-dumpable also
    /// stops debuggers of the same user from attaching.
    pub fn allow_core_dumps(mut self, allow: bool) -> Self {
        self.allow_core_dumps = allow;
        self
    }
    /// Check the gallery against an anchor kept off the machine
    /// ([`Engine::anchor`]): open refuses a gallery older than it (a
    /// whole-directory rollback), another gallery, or a rewritten audit chain.
    pub fn anchor(mut self, anchor: crate::engine::Anchor) -> Self {
        self.anchor = Some(anchor);
        self
    }
    /// The master key (required).
    pub fn key(mut self, key: MasterKey) -> Self {
        self.key = Some(key);
        self
    }
    /// An injectable clock (tests); the system clock by default.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Create a new gallery (the directory must not hold one).
    pub fn create(self, config: GalleryConfig) -> Result<Engine> {
        config.validate()?;
        let key = self.key.ok_or_else(|| Error::Key("no key given".into()))?;
        if !self.allow_core_dumps {
            forbid_core_dumps()?;
        }
        let dir = self.dir;
        let gdir = Dir::create_or_open(&dir)?;
        let lock = store::DirLock::acquire(&gdir)?;
        if gdir.exists(store::MANIFEST)? || gdir.exists(store::LOG)? {
            return Err(Error::config("gallery", format!("{} already holds a gallery", dir.display())));
        }
        let report = OpenReport { modes_tightened: gdir.tighten(&[store::AUDIT_DIR])?, ..Default::default() };
        let mut manifest = store::new_manifest(config, &key, self.clock.now_unix_ms());
        let log = LogWriter::create(&gdir, store::LOG, key.store_cipher())?;
        gdir.sync()?;
        manifest.bound = Some(store::Bound {
            log_id: hex::encode(log.file_id()),
            log_frames: 0,
            pending_log: None,
            audit_records: 0,
            audit_hash: String::new(),
        });
        store::write_manifest(&gdir, &mut manifest, &key)?;
        let id = manifest.gallery_id.clone().unwrap_or_default();
        let engine = Engine::assemble(dir, gdir, lock, key, self.clock, manifest, log, report, None)?;
        // The chain starts with this gallery's id: another gallery's audit log never matches it.
        engine.record_admin(&Operator::system(), "gallery-created", &format!("gallery {id}"))?;
        Ok(engine)
    }

    /// Repair a gallery that open refuses (`facematch repair`), or with
    /// `apply: false` only say what would be done.
    ///
    /// The plan: cut the template log after its last whole, authentic frame;
    /// set aside a snapshot that covers frames the log no longer has, and
    /// entries at the store's temporary names that are not provably ours.
    /// Applying writes an audit record of the plan first (durable before
    /// anything changes), keeps every removed byte in `repair-<unix ms>/`
    /// inside the gallery, then opens the gallery and re-applies every
    /// erasure the audit log records that the store lacks (a template is
    /// erased again only if it belongs to the recorded subject and was
    /// enrolled before the erasure), so frames lost with the cut do not
    /// bring erased people back. Enrolments after the cut are lost: their
    /// records stay in the audit log.
    pub fn repair(self, operator: &Operator, apply: bool) -> Result<RepairReport> {
        let key = self.key.clone().ok_or_else(|| Error::Key("no key given".into()))?;
        if !self.allow_core_dumps {
            forbid_core_dumps()?;
        }
        let gdir = Dir::open(&self.dir)?;
        store::read_manifest_in(&gdir)?;
        let mut report = RepairReport::default();
        {
            let _lock = store::DirLock::acquire(&gdir)?;
            let manifest = store::recover::effective_manifest(&gdir)?;
            store::check_key(&gdir, &manifest, &key)?;
            report.plan = store::repair::plan(&gdir, &key.store_cipher())?;
            if apply && !report.plan.is_empty() {
                let detail = serde_json::to_string(&report.plan).map_err(|e| Error::Audit(e.to_string()))?;
                let (audit, _) = AuditLog::open(
                    &self.dir.join(store::AUDIT_DIR),
                    AuditKey::from_bytes(key.audit_key_bytes()),
                    manifest.config.audit.clone(),
                    self.clock.clone(),
                )?;
                audit.submit(AuditEvent::Admin { operator: operator.as_str().into(), action: "repair".into(), detail })?.wait()?;
                audit.close()?;
                report.repair_dir = Some(store::repair::apply(&gdir, &report.plan, self.clock.now_unix_ms())?);
            }
        }
        if apply {
            report.applied = true;
            let engine = EngineBuilder { rebind: true, ..self }.open()?;
            report.erasures_reapplied = engine.reapply_recorded_erasures(operator)?;
            engine.close()?;
        }
        Ok(report)
    }

    /// Open an existing gallery: check the key, replay the log, load or rebuild the index, purge expired templates.
    pub fn open(self) -> Result<Engine> {
        let key = self.key.ok_or_else(|| Error::Key("no key given".into()))?;
        if !self.allow_core_dumps {
            forbid_core_dumps()?;
        }
        let dir = self.dir;
        let gdir = Dir::open(&dir)?;
        store::read_manifest_in(&gdir)?; // a gallery is here (before creating LOCK)
        let lock = store::DirLock::acquire(&gdir)?;
        // The key must open the gallery as it will be once a key rotation a
        // crash interrupted is finished or undone; then that is done, first.
        // Recovery leaves exactly this manifest in place (moves the staged one, or keeps the old).
        let manifest = store::recover::effective_manifest(&gdir)?;
        manifest.config.validate()?;
        store::check_key(&gdir, &manifest, &key)?;
        let authenticated = store::verify_manifest(&gdir, &manifest, &key)?;
        if let (Some(b), false) = (&manifest.bound, self.rebind) {
            // A deleted audit directory is refused before anything would recreate it.
            let segments = match gdir.subdir(store::AUDIT_DIR)? {
                Some(a) => a.list()?.iter().filter(|n| n.starts_with("seg-")).count(),
                None => 0,
            };
            if b.audit_records > 0 && segments == 0 {
                return Err(Error::AuditTampered {
                    seq: 0,
                    reason: format!(
                        "the audit log is gone but the manifest proves {} records were written: the audit directory was deleted or replaced; restore it from a backup",
                        b.audit_records
                    ),
                });
            }
        }
        let mut left_alone = Vec::new();
        let rotation = store::recover::recover_rotation(&gdir, &mut left_alone)?;
        if let Some(r) = rotation {
            match r {
                store::RotationRecovery::Finished => tracing::warn!("a key rotation a crash interrupted after its commit was finished on open: the gallery is under the new key"),
                store::RotationRecovery::RolledBack => tracing::warn!("a key rotation a crash interrupted before its commit was rolled back on open: the gallery stays under the previous key"),
            }
        }
        // Leftovers of a compaction or snapshot a crash cut short hold template ciphertext.
        left_alone.extend(store::recover::clear_leftovers(&gdir)?);
        let modes_tightened = gdir.tighten(&[store::AUDIT_DIR])?;
        let cfg = &manifest.config;
        let cipher = key.store_cipher();

        // The snapshot (when it belongs to this log) loads on one thread while
        // the log replays into the state on this one. A version-3 snapshot
        // holds the graph, not the vectors: the replay keeps every vector and
        // the first `slots` of them complete the snapshot's index. An older
        // snapshot holds its vectors: the replay converts only the later ones.
        let logp = dir.join(store::LOG);
        let snapp = dir.join(store::SNAPSHOT);
        let t0 = Instant::now();
        let peeked = store::peek(&gdir, store::LOG)?;
        let (file_id, log_bytes) = (peeked.map(|p| p.0), peeked.map_or(0, |p| p.1) as usize);
        let candidate = snapshot::read_header(&gdir, store::SNAPSHOT)?.filter(|h| Some(h.log_id) == file_id);
        let expect = candidate.map_or(0, |h| h.slots as usize);
        let have = candidate.map_or(0, |h| if h.vectors_in_log { 0 } else { expect });
        let (loaded, replayed) = std::thread::scope(|s| {
            let job = candidate.map(|h| {
                let (gdir, cipher) = (&gdir, &cipher);
                s.spawn(move || {
                    let t = Instant::now();
                    let r = snapshot::read(gdir, store::SNAPSHOT, cipher, &h, |r| VectorIndex::read_structure_from(r));
                    tracing::debug!(ms = t.elapsed().as_millis() as u64, "index snapshot read");
                    (r, h)
                })
            });
            let t = Instant::now();
            let replayed = replay(&gdir, &cipher, cfg, &logp, have, expect, log_bytes);
            tracing::debug!(ms = t.elapsed().as_millis() as u64, "template log replayed");
            (job.map(|j| j.join()), replayed)
        });
        let mut structure = None;
        match loaded {
            Some(Ok((Ok(s), h))) if s.dim() == cfg.dim && s.slots() as u64 == h.slots => structure = Some((s, h.frames)),
            Some(Ok((Ok(_), _))) => tracing::warn!("index snapshot does not match the gallery; rebuilding"),
            Some(Ok((Err(e), _))) => tracing::warn!(error = %e, "index snapshot unreadable; rebuilding"),
            Some(Err(_)) => tracing::warn!("reading the index snapshot failed; rebuilding"),
            None => {}
        }
        let mut r = replayed?;
        if let Some(f) = structure.as_ref().map(|(_, f)| *f).filter(|&f| f > r.log.frames()) {
            // An authentic snapshot of this very log covers frames the log no longer has:
            // acknowledged writes (a deletion, a withdrawal) were lost. A crash only ever
            // tears an unacknowledged last frame, so this is truncation or damage: serving
            // the shorter log would bring erased templates back.
            return Err(Error::DataCorruption {
                path: logp.clone(),
                reason: format!(
                    "the template log ends at frame {} but the index snapshot proves {f} frames were written: acknowledged writes were lost (truncation or damage); restore the gallery from a backup",
                    r.log.frames()
                ),
            });
        }
        let mut index = None;
        if let Some((s, frames)) = structure {
            let slots = s.slots();
            if slots > r.enrolments {
                return Err(Error::DataCorruption { path: snapp, reason: "snapshot holds more templates than the log".into() });
            }
            let want = slots * cfg.dim;
            let assembled = if s.has_vectors() {
                if have == 0 {
                    // The replay kept them too (the header said otherwise): drop its copy.
                    r.pending.drain(..want);
                }
                s.into_index(None)
            } else if have == 0 {
                let rest = r.pending.split_off(want);
                s.into_index(Some(std::mem::replace(&mut r.pending, rest)))
            } else {
                s.into_index(None) // a header that said "vectors inside" for a body without them: refused
            };
            match assembled {
                Ok(ix) => index = Some((ix, frames)),
                Err(e) => tracing::warn!(error = %e, "index snapshot unusable; rebuilding"),
            }
        }
        if index.is_none() && have > 0 {
            // The replay left the snapshot's vectors out: replay again, keeping them all.
            r = replay(&gdir, &cipher, cfg, &logp, 0, expect, log_bytes)?;
        }
        let t_load = t0.elapsed();
        let snapshot_frames = index.as_ref().map(|(_, f)| *f);
        let Replay { log, torn, mut st, pending, deletes, enrolments: _ } = r;
        if let Some((ix, _)) = index {
            st.index = ix;
        }
        if let (Some(b), false) = (&manifest.bound, self.rebind) {
            check_log_binding(&logp, b, &log)?;
        }
        let mut report = OpenReport {
            upgraded_from: (!authenticated).then_some(manifest.version),
            torn_log_tail: torn,
            key_rotation_recovered: rotation.map(|r| r == store::RotationRecovery::Finished),
            left_alone,
            modes_tightened,
            ..Default::default()
        };
        report.snapshot_used = snapshot_frames.is_some();
        if !pending.is_empty() {
            st.index.add_batch(&pending)?;
        }
        for slot in deletes {
            st.index.remove(slot as u32)?;
        }
        let calibrated = calibrate_index(&mut st.index);
        let t_index = t0.elapsed() - t_load;
        let stale = log.frames().saturating_sub(snapshot_frames.unwrap_or(0));
        let bound = if self.rebind { None } else { manifest.bound.clone() };
        let engine = Engine::assemble(dir, gdir, lock, key, self.clock, manifest, log, report, Some(st))?;
        let mut engine = engine;
        if let Some(b) = &bound {
            engine.check_audit_binding(b)?;
            if let Some(a) = &self.anchor {
                engine.check_anchor(a)?;
            }
            let done = engine.reconcile(b)?;
            for d in &done {
                tracing::warn!(what = %d, "reconciled on open");
            }
            engine.open_report.reconciled = done;
        }
        if !authenticated {
            // Format 1: authenticate the manifest and bind it to what is here now.
            engine.manifest.write().gallery_id = Some(store::new_gallery_id());
            engine.record_admin(
                &Operator::system(),
                "format-upgrade",
                &format!(
                    "gallery format 1 -> 2 on open: the manifest is now authenticated and bound to the template log and the audit log; gallery {}",
                    engine.manifest.read().gallery_id.clone().unwrap_or_default()
                ),
            )?;
        } else if self.rebind {
            engine.rebind()?;
        }
        if !engine.open_report.snapshot_used || stale > 10_000 {
            engine.checkpoint()?;
        } else if let (0, false, Some(f)) = (stale, calibrated, snapshot_frames) {
            // The snapshot is the state as opened: closing need not rewrite it.
            engine.snapshot_is_current(f);
        }
        if let Some(r) = rotation {
            let detail = match r {
                store::RotationRecovery::Finished => {
                    "finished on open: the rotation had committed before the crash; the gallery is under the new key"
                }
                store::RotationRecovery::RolledBack => {
                    "rolled back on open: the crash came before the commit; the gallery stays under the previous key"
                }
            };
            engine.record_admin(&Operator::system(), "key-rotation-recovery", detail)?;
        }
        let purged = engine.purge_expired(&Operator::system())?;
        tracing::debug!(
            load_ms = t_load.as_millis() as u64,
            index_ms = t_index.as_millis() as u64,
            total_ms = t0.elapsed().as_millis() as u64,
            "gallery opened"
        );
        let mut engine = engine;
        engine.open_report.purged_on_open = purged.templates.len();
        Ok(engine)
    }
}

/// What replaying the template log gave.
struct Replay {
    log: LogWriter,
    torn: Option<TornTail>,
    /// Metadata, subjects and consents (its index is empty: the caller sets it).
    st: State,
    /// Vectors of the enrolments from the `have`-th on, in order.
    pending: Vec<f32>,
    /// Slots erased by the log.
    deletes: Vec<u64>,
    /// Enrolments in the log.
    enrolments: usize,
}

/// Replay every frame of the template log in order, straight into a new
/// state; vectors of the first `have` enrolments (a snapshot holds them)
/// are not converted. `log_bytes` (the file's length) sizes the state.
/// `expect` (the snapshot's slots) sizes the state and the vectors.
fn replay(
    gdir: &Dir,
    cipher: &store::Cipher,
    cfg: &GalleryConfig,
    logp: &Path,
    have: usize,
    expect: usize,
    log_bytes: usize,
) -> Result<Replay> {
    let mut st = State::new(VectorIndex::new(cfg.dim, cfg.index.clone())?);
    // About as many templates as the snapshot's header says, or as the log's
    // size suggests; never more than the log's bytes could hold (the header
    // is not authenticated yet).
    let most = log_bytes / (40 + 4 * cfg.dim);
    let n = expect.max(log_bytes / 1024).min(most);
    st.reserve(n);
    // The vectors to convert: the header's count exactly (a later
    // enrolment or two grows the vector; a million would copy it).
    let mut pending: Vec<f32> = Vec::with_capacity(expect.min(most).saturating_sub(have).max(n.saturating_sub(have) / 64) * cfg.dim);
    let mut enrol_ordinal = 0usize;
    let mut deletes: Vec<u64> = Vec::new();
    let corrupt = |i: u64, e: String| Error::DataCorruption { path: logp.to_path_buf(), reason: format!("frame {i}: {e}") };
    let mut enrol = |st: &mut State, meta: Meta<'_>, vector: &[u8], pending: &mut Vec<f32>| -> std::result::Result<(), String> {
        let template = match &meta {
            Meta::Owned(m) => m.template,
            Meta::Ref(m) => m.template,
        };
        if vector.len() != cfg.dim * 4 {
            return Err(format!("template {template} has dimension {}", vector.len() / 4));
        }
        if enrol_ordinal >= have {
            store::f32s_from_le(vector, pending);
        }
        match meta {
            Meta::Owned(m) => st.note_enrol(cfg, &m, enrol_ordinal as u32),
            Meta::Ref(m) => st.note_enrol_ref(cfg, m, enrol_ordinal as u32)?,
        }
        enrol_ordinal += 1;
        Ok(())
    };
    // Frames other than batched enrolments (consents, deletions) are parsed
    // on the decrypting threads; enrolments are visited in order.
    let decode = |i: u64, b: Zeroizing<Vec<u8>>| -> Result<Frame> {
        if store::enrolments_frame(&b).is_some() {
            return Ok(Frame::Enrolments(b));
        }
        if let Some(parts) = store::import_frame(&b) {
            let consents = parts.and_then(|(c, _)| store::import_consents(c)).map_err(|e| corrupt(i, e))?;
            return Ok(Frame::Import(consents, b));
        }
        Op::decode(&b).map(Frame::Op).map_err(|e| corrupt(i, e))
    };
    // The vectors' pages are faulted in on a thread of their own (the kernel
    // zeroes each one: ~1 s per GB here), not one by one as the replay fills them.
    let prefault = prefault::PrefaultAhead::start(pending.spare_capacity_mut());
    let (log, torn) = LogWriter::open_decoded(gdir, store::LOG, cipher.clone(), decode, |i, f| {
        let op = match f {
            Frame::Enrolments(b) => {
                let rest = store::enrolments_frame(&b).unwrap_or_default();
                return store::visit_enrolments(rest, |meta, v| enrol(&mut st, Meta::Ref(meta), v, &mut pending))
                    .map_err(|e| corrupt(i, e));
            }
            Frame::Import(consents, b) => {
                // The consents first: the enrolments of the frame use them.
                for c in &consents {
                    st.put_consent(c);
                }
                let (_, rest) = store::import_frame(&b).unwrap_or(Ok((&[], &[]))).map_err(|e| corrupt(i, e))?;
                return store::visit_enrolments(rest, |meta, v| enrol(&mut st, Meta::Ref(meta), v, &mut pending))
                    .map_err(|e| corrupt(i, e));
            }
            Frame::Op(op) => op,
        };
        match op {
            Op::Enrol { meta, vector } => {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                enrol(&mut st, Meta::Owned(meta), &bytes, &mut pending).map_err(|e| corrupt(i, e))?;
            }
            // Batched enrolments are visited above; a decoder that disagreed would be a bug, reported as such.
            Op::EnrolMany(_) | Op::Import(..) => return Err(corrupt(i, "batched enrolments decoded out of order".into())),
            Op::Delete { templates } => {
                for t in templates {
                    if let Some(slot) = st.note_delete(t) {
                        deletes.push(slot as u64);
                    }
                }
            }
            Op::Consent(c) => st.put_consent(&c),
            Op::Consents(cs) => {
                for c in &cs {
                    st.put_consent(c);
                }
            }
        }
        Ok(())
    })?;
    drop(prefault);
    Ok(Replay { log, torn, st, pending, deletes, enrolments: enrol_ordinal })
}

/// A decrypted frame, decoded on the decrypting threads.
enum Frame {
    /// Batched enrolments, visited in order from the plaintext.
    Enrolments(Zeroizing<Vec<u8>>),
    /// An import: its consents (decoded) and the plaintext, whose enrolments are visited in order.
    Import(Vec<ConsentRecord>, Zeroizing<Vec<u8>>),
    Op(Op),
}

/// An enrolment's metadata in replay: from an old one-per-frame JSON frame, or borrowed from a batched frame.
enum Meta<'a> {
    Owned(TemplateMeta),
    Ref(&'a store::MetaRef<'a>),
}

/// The template log is the one the manifest names (or a compaction's new
/// log it accepted) and holds at least the frames it proves.
fn check_log_binding(path: &Path, b: &store::Bound, log: &LogWriter) -> Result<()> {
    let id = hex::encode(log.file_id());
    let proven = if id == b.log_id {
        b.log_frames
    } else if let Some((pid, pframes)) = b.pending_log.as_ref().filter(|(pid, _)| *pid == id) {
        let _ = pid;
        *pframes
    } else {
        return Err(Error::DataCorruption {
            path: path.into(),
            reason: "is not the template log this gallery's manifest names (another gallery's, or a copy from another time); `facematch repair --yes` adopts it and erases again everyone the audit log says was erased".into(),
        });
    };
    if log.frames() < proven {
        return Err(Error::DataCorruption {
            path: path.into(),
            reason: format!(
                "holds {} frames, the manifest proves {proven} were written: an older copy (a restored backup) or cut short; erasures may be missing. `facematch repair --yes` erases again everyone the audit log says was erased",
                log.frames()
            ),
        });
    }
    Ok(())
}

/// Keep decrypted templates and probes out of core dumps (see
/// [`EngineBuilder::allow_core_dumps`]). Idempotent.
pub fn forbid_core_dumps() -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with PR_SET_DUMPABLE takes one integer argument.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(Error::Io { path: PathBuf::from("prctl(PR_SET_DUMPABLE)"), source: std::io::Error::last_os_error() });
        }
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    {
        let lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: a valid rlimit for RLIMIT_CORE.
        if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &lim) } != 0 {
            return Err(Error::Io { path: PathBuf::from("setrlimit(RLIMIT_CORE)"), source: std::io::Error::last_os_error() });
        }
    }
    Ok(())
}

/// True when this process may write core dumps (Linux; `None` elsewhere).
pub fn core_dumps_allowed() -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_GET_DUMPABLE takes no argument and returns the flag.
        Some(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } == 1)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Let the index measure how wide a graph search must be to find what the
/// exact scan finds (top-1 on 99% of 200 probes); with no affordable width,
/// `Auto` scans. Skipped where `Auto` scans anyway.
pub(super) fn calibrate_index(index: &mut VectorIndex) -> bool {
    if !index.needs_calibration() {
        return false;
    }
    let c = index.calibrate(CALIBRATION_TARGET, CALIBRATION_PROBES, CALIBRATION_SEED);
    tracing::debug!(ef = ?c.ef, agreement = c.agreement, live = c.live, "index calibrated");
    true
}

pub(super) const CALIBRATION_TARGET: f32 = 0.99;
pub(super) const CALIBRATION_PROBES: usize = 200;
pub(super) const CALIBRATION_SEED: u64 = 0xCA11_B2A7;
