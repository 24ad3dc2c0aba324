//! What open finds of writes a crash cut short, and what it may do about it.
//!
//! Owns the store's temporary names: the compaction's [`LOG_NEW`], the
//! snapshot's [`SNAPSHOT_TMP`] and the key rotation's staging directory
//! [`ROTATION_DIR`]. A leftover at one of them is removed (its template
//! ciphertext shredded first) only if it is provably one of ours: a regular
//! file with a single link that starts with the header of the file it
//! stands for. Anything else there (a link, a hard-linked file, a FIFO, a
//! foreign file) is left exactly as it is and reported; a write that needs
//! the name then refuses with [`Error::UnsafePath`] naming it.

use super::{log, snapshot, AUDIT_DIR, LOG, LOG_NEW, MANIFEST, SNAPSHOT, SNAPSHOT_TMP};
use crate::fs::{Dir, Kind};
use crate::store::Manifest;
use crate::{Error, Result};

/// Staging directory of a key rotation: the whole store re-encrypted (and the
/// audit log re-signed) under the new key is built here, then [`ROTATION_COMMIT`]
/// is made durable and the files are moved into place. A crash before the
/// commit leaves the old store untouched (the staging is discarded on open);
/// after it, open finishes the moves. See `Engine::rotate_key`.
pub(crate) const ROTATION_DIR: &str = "rotate.new";
const ROTATION_COMMIT: &str = "COMMIT";
const COMMIT_TEXT: &[u8] = b"facematch key rotation committed\n";

/// What the recovery of an interrupted key rotation found on open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationRecovery {
    /// The rotation had committed: its moves were finished (the new key opens the gallery).
    Finished,
    /// It had not: the staging was shredded and removed (the old key still opens the gallery).
    RolledBack,
}

/// The magic a file at `name` must start with to be one of ours.
pub(crate) fn magic_of(name: &str) -> Option<&'static [u8]> {
    match name {
        LOG | LOG_NEW => Some(log::MAGIC),
        SNAPSHOT | SNAPSHOT_TMP => Some(snapshot::MAGIC),
        _ => None,
    }
}

/// Why the entry `name` in `dir` is not provably ours (`None`: it is ours, or missing).
pub(crate) fn not_ours(dir: &Dir, name: &str, magic: Option<&[u8]>) -> Result<Option<String>> {
    let Some(e) = dir.stat(name)? else { return Ok(None) };
    if e.kind != Kind::File {
        return Ok(Some(format!("is {}", e.kind.describe())));
    }
    if e.nlink > 1 {
        return Ok(Some(format!("has {} hard links", e.nlink)));
    }
    if let Some(magic) = magic {
        let mut head = vec![0u8; magic.len()];
        let f = dir.open_read(name)?;
        let n = match f {
            Some(f) => {
                use std::io::Read;
                f.take(magic.len() as u64).read(&mut head).map_err(|err| Error::io(dir.join(name), err))?
            }
            None => return Ok(None),
        };
        // A header cut short by a crash is a prefix of ours.
        if n > 0 && head[..n] != magic[..n] {
            return Ok(Some("does not start with a facematch header".into()));
        }
    }
    Ok(None)
}

/// Shred and remove the leftover `name` if it is provably ours; refuse
/// (leaving it alone) otherwise. For writers about to reuse the name.
pub(crate) fn clear_leftover(dir: &Dir, name: &str) -> Result<()> {
    if let Some(why) = not_ours(dir, name, magic_of(name))? {
        return Err(Error::UnsafePath {
            path: dir.join(name),
            reason: format!("{why}: not a leftover of this gallery, so it was left alone; move it away (or `facematch repair --yes`)"),
        });
    }
    if dir.exists(name)? {
        dir.shred_remove(name)?;
    }
    Ok(())
}

/// Shred and remove leftovers of cut-short compactions and snapshots that are
/// provably ours. Returns what was found at those names but left alone.
pub(crate) fn clear_leftovers(dir: &Dir) -> Result<Vec<String>> {
    let mut left = Vec::new();
    for name in [LOG_NEW, SNAPSHOT_TMP] {
        match clear_leftover(dir, name) {
            Ok(()) => {}
            Err(Error::UnsafePath { path, reason }) => {
                tracing::warn!(path = %path.display(), %reason, "left alone");
                left.push(format!("{}: {reason}", path.display()));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(left)
}

/// The staging directory, if there is a real one; a link or file in its
/// place is reported in `left` and otherwise ignored.
fn staging(dir: &Dir, left: &mut Vec<String>) -> Result<Option<Dir>> {
    match dir.subdir(ROTATION_DIR) {
        Ok(d) => Ok(d),
        Err(Error::UnsafePath { path, reason }) => {
            tracing::warn!(path = %path.display(), %reason, "not a rotation staging directory; left alone");
            left.push(format!("{}: {reason}; left alone", path.display()));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Whether the staged rotation in `st` has its durable commit marker.
pub(crate) fn committed(st: &Dir) -> Result<bool> {
    Ok(st.read_bounded(ROTATION_COMMIT, 1024)?.is_some_and(|b| b == COMMIT_TEXT))
}

/// Start a rotation: a fresh, empty staging directory (a stale one of ours is discarded).
pub(crate) fn begin_rotation(dir: &Dir) -> Result<Dir> {
    let mut left = Vec::new();
    discard_rotation(dir, &mut left)?;
    if let Some(l) = left.into_iter().next() {
        return Err(Error::UnsafePath { path: dir.join(ROTATION_DIR), reason: l });
    }
    let st = dir.create_subdir(ROTATION_DIR)?;
    st.create_subdir(AUDIT_DIR)?;
    Ok(st)
}

/// Shred the staged template files and remove the staging directory. Entries
/// that are not ours are left (and the directory with them) and reported.
pub(crate) fn discard_rotation(dir: &Dir, left: &mut Vec<String>) -> Result<()> {
    let Some(st) = staging(dir, left)? else { return Ok(()) };
    let before = left.len();
    if let Some(audit) = st.subdir(AUDIT_DIR).or_else(|e| match e {
        Error::UnsafePath { path, reason } => {
            left.push(format!("{}: {reason}", path.display()));
            Ok(None)
        }
        e => Err(e),
    })? {
        // Re-signed audit segments: plaintext records, no templates; unlinking never follows.
        for name in audit.list()? {
            audit.remove_file(&name)?;
        }
        st.remove_dir(AUDIT_DIR)?;
    }
    for name in st.list()? {
        let magic = magic_of(&name);
        match not_ours(&st, &name, magic)? {
            Some(why) => left.push(format!("{}: {why}; left alone", st.join(&name).display())),
            None if magic.is_some() => st.shred_remove(&name)?,
            None => st.remove_file(&name)?,
        }
    }
    if left.len() == before {
        dir.remove_dir(ROTATION_DIR)?;
    }
    dir.sync()
}

/// The commit point: from here on the rotation completes, even after a crash.
pub(crate) fn commit_rotation(dir: &Dir, st: &Dir) -> Result<()> {
    if let Some(a) = st.subdir(AUDIT_DIR)? {
        a.sync()?;
    }
    st.sync()?;
    st.write_atomic(ROTATION_COMMIT, COMMIT_TEXT, true)?;
    dir.sync()
}

/// Move the staged files into place (idempotent: a crash part-way is
/// finished by the next call). The replaced template log and snapshot are
/// shredded first.
pub(crate) fn finish_rotation(dir: &Dir, st: &Dir) -> Result<()> {
    for name in [LOG, SNAPSHOT] {
        if st.exists(name)? {
            if let Some(why) = not_ours(st, name, magic_of(name))? {
                return Err(Error::UnsafePath { path: st.join(name), reason: format!("{why}; the rotation cannot finish") });
            }
            if dir.exists(name)? {
                let mut f = dir.open_write(name)?;
                crate::fs::shred_open(&mut f, &dir.join(name))?;
            }
            st.rename_to(name, dir, name)?;
        }
    }
    if let Some(staged_audit) = st.subdir(AUDIT_DIR)? {
        let audit = dir.create_subdir(AUDIT_DIR)?;
        for name in staged_audit.list()? {
            staged_audit.rename_to(&name, &audit, &name)?;
        }
        audit.sync()?;
        st.remove_dir(AUDIT_DIR)?;
    }
    // The manifest (the new key check) last: until it moves, the old key is
    // still checked, and open keeps finishing the rotation before checking.
    if st.exists(MANIFEST)? {
        st.rename_to(MANIFEST, dir, MANIFEST)?;
    }
    dir.sync()?;
    st.remove_file(ROTATION_COMMIT)?;
    for name in st.list()? {
        st.remove_file(&name)?;
    }
    dir.remove_dir(ROTATION_DIR)?;
    dir.sync()
}

/// The manifest that will be in force once an interrupted rotation is
/// recovered: the staged one after the commit, else the one in place. The
/// key is checked against it before [`recover_rotation`] touches anything.
pub(crate) fn effective_manifest(dir: &Dir) -> Result<Manifest> {
    let mut ignored = Vec::new();
    if let Some(st) = staging(dir, &mut ignored)? {
        if committed(&st)? && st.exists(MANIFEST)? {
            return super::read_manifest_in(&st);
        }
    }
    super::read_manifest_in(dir)
}

/// Finish (after the commit) or roll back (before it) a rotation a crash
/// interrupted. Call with the directory locked, before reading anything
/// else. What was found at the staging name but not touched goes to `left`.
pub(crate) fn recover_rotation(dir: &Dir, left: &mut Vec<String>) -> Result<Option<RotationRecovery>> {
    let Some(st) = staging(dir, left)? else { return Ok(None) };
    if committed(&st)? {
        finish_rotation(dir, &st)?;
        Ok(Some(RotationRecovery::Finished))
    } else {
        drop(st);
        discard_rotation(dir, left)?;
        Ok(Some(RotationRecovery::RolledBack))
    }
}
