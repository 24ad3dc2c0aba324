//! The explicit repair of a damaged gallery (`facematch repair`).
//!
//! Opening never destroys anything it has not proven to be an unfinished
//! write of this gallery; what it refuses stays exactly as it was. This
//! module does, on request, what is still wanted: it cuts a template log
//! at its last whole, authentic frame, sets aside an index snapshot that no
//! longer matches, and moves entries that facematch could not prove its own
//! away from the store's temporary names. Everything it removes is kept in
//! a `repair-<unix ms>/` directory of the gallery (0700; template
//! ciphertext stays encrypted), and [`crate::engine::EngineBuilder::repair`]
//! audits it and re-applies erasures the audit log records.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use serde::Serialize;

use super::recover::{magic_of, not_ours, ROTATION_DIR};
use super::{good_prefix, snapshot, Cipher, LOG, LOG_NEW, SNAPSHOT, SNAPSHOT_TMP};
use crate::fs::{Dir, Kind};
use crate::{Error, Result};

/// One change a repair makes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum RepairAction {
    /// Cut the template log after its last whole, authentic frame.
    CutLog {
        /// Byte offset of the cut.
        at: u64,
        /// Bytes removed (kept in the repair directory).
        bytes: u64,
        /// Frames kept.
        frames_kept: u64,
    },
    /// Move an entry of the gallery into the repair directory.
    SetAside {
        /// Its name in the gallery.
        name: String,
        /// Why.
        reason: String,
    },
}

/// What a repair would do (or did).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairPlan {
    /// The changes, in order.
    pub actions: Vec<RepairAction>,
}

impl RepairPlan {
    /// Nothing to repair.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

/// Work out what to repair, reading only. The caller holds the gallery lock
/// and has checked the key.
pub(crate) fn plan(dir: &Dir, cipher: &Cipher) -> Result<RepairPlan> {
    let mut actions = Vec::new();
    for name in [LOG_NEW, SNAPSHOT_TMP] {
        if let Some(why) = not_ours(dir, name, magic_of(name))? {
            actions.push(RepairAction::SetAside { name: name.into(), reason: format!("{why}; not provably a leftover of this gallery") });
        }
    }
    if let Some(e) = dir.stat(ROTATION_DIR)? {
        if e.kind != Kind::Dir {
            actions.push(RepairAction::SetAside { name: ROTATION_DIR.into(), reason: "not a directory".into() });
        }
    }
    let (good, frames, len, log_id) = good_prefix(dir, LOG, cipher)?;
    if good < len {
        actions.push(RepairAction::CutLog { at: good, bytes: len - good, frames_kept: frames });
    }
    // A snapshot of this log covering frames it no longer has cannot be loaded (open refuses it).
    if let Some(h) = snapshot::read_header(dir, SNAPSHOT)? {
        if h.log_id == log_id && h.frames > frames {
            actions.push(RepairAction::SetAside {
                name: SNAPSHOT.into(),
                reason: format!("it covers {} frames, the log keeps {frames}; the index is rebuilt from the log", h.frames),
            });
        }
    }
    Ok(RepairPlan { actions })
}

/// Carry out `plan`; returns the repair directory holding what was removed.
pub(crate) fn apply(dir: &Dir, plan: &RepairPlan, now_ms: i64) -> Result<PathBuf> {
    let qname = format!("repair-{now_ms}");
    let q = dir.create_subdir(&qname)?;
    for a in &plan.actions {
        match a {
            RepairAction::SetAside { name, .. } => dir.rename_to(name, &q, name)?,
            RepairAction::CutLog { at, bytes, .. } => {
                let path = dir.join(LOG);
                let mut f = dir.open_write(LOG)?;
                let keep = format!("{LOG}.from-byte-{at}");
                let mut out = q.create_new(&keep)?;
                f.seek(SeekFrom::Start(*at)).map_err(|e| Error::io(&path, e))?;
                let mut tail = Vec::with_capacity(*bytes as usize);
                Read::by_ref(&mut f).take(*bytes).read_to_end(&mut tail).map_err(|e| Error::io(&path, e))?;
                out.write_all(&tail).and_then(|_| out.sync_all()).map_err(|e| Error::io(q.join(&keep), e))?;
                q.sync()?;
                f.set_len(*at).and_then(|_| f.sync_all()).map_err(|e| Error::io(&path, e))?;
            }
        }
    }
    q.sync()?;
    dir.sync()?;
    Ok(q.path().to_path_buf())
}
