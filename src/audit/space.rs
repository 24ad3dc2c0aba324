//! Zero-filled free space ahead of the writer in the open segment.
//!
//! An fsync after an append must also make the file's new size durable (on
//! ext4 a journal commit; on the README machine, whose ext4 runs without a
//! journal, a synchronous write of the inode block); an fsync after overwriting blocks that already
//! hold durable zeros flushes only the data. Measured on the 2-core VM of
//! the README (ext4 on virtio): fdatasync of a 1 KiB append 143-182 us
//! (59-70 us CPU), of a 1 KiB overwrite of zeroed space 85-95 us (33-37 us
//! CPU). So a companion thread keeps up to [`AuditConfig::preallocate_bytes`] of
//! durable zeros ahead of the writer, and a commit's fsync is the cheap kind.
//!
//! The zeros are free space, not data: every reader takes a segment to end
//! at its last non-zero byte ([`super::format::data_len`]), a NUL inside
//! the data ends the records (the remains of an unfinished commit: a torn
//! tail), closing a segment or the log trims the slack, and `open` appends
//! at the end of the data. If the filler falls behind, the writer simply
//! appends past it; if it fails, appending goes on without it.
//!
//! [`AuditConfig::preallocate_bytes`]: super::AuditConfig::preallocate_bytes

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::direct::{self, AlignedBuf};
use crate::{Error, Result};

/// Zeros written per `write` call.
const ZERO_PIECE: usize = 64 * 1024;
/// First zero-fill of a segment; later ones double up to the configured size.
const FIRST_CHUNK: u64 = 64 * 1024;

struct State {
    /// The open segment: index and path. `None` stops filling.
    seg: Option<(u32, PathBuf)>,
    /// End of the writer's data, including a write about to start.
    written: u64,
    /// Durable zeros reach this offset (from `written` on).
    zeroed: u64,
    /// The filler is writing zeros to this segment from this offset on.
    busy: Option<(u32, u64)>,
    /// The writer has written since the segment was handed over (a log
    /// opened for a couple of records never gets zeros it would not use).
    active: bool,
    /// Bytes the next fill appends; a refill starts when fewer than half
    /// of them are left ahead of the writer.
    chunk: u64,
    /// The writer writes whole blocks with `O_DIRECT`: so does the filler.
    direct: bool,
    closing: bool,
}

/// Keeps zero-filled, fsynced space ahead of the writer (see the module docs).
pub(crate) struct Space {
    state: Arc<(Mutex<State>, Condvar)>,
    ahead: u64,
    handle: Option<JoinHandle<()>>,
}

impl Space {
    /// Start filling segment `seg` at `path`, whose data ends at `written`.
    /// `ahead == 0` gives a `Space` that does nothing. With `direct` the
    /// writer writes whole blocks with `O_DIRECT` (see [`super::direct`]):
    /// the zeros are written the same way, from block boundaries on.
    pub(crate) fn start(ahead: u64, seg: u32, path: PathBuf, written: u64, direct: bool) -> Result<Space> {
        let state = Arc::new((
            Mutex::new(State {
                seg: Some((seg, path)),
                written,
                zeroed: written,
                busy: None,
                active: false,
                chunk: FIRST_CHUNK.min(ahead),
                direct,
                closing: false,
            }),
            Condvar::new(),
        ));
        if ahead == 0 {
            return Ok(Space { state, ahead, handle: None });
        }
        let st = Arc::clone(&state);
        let handle = std::thread::Builder::new()
            .name("facematch-audit-space".into())
            .spawn(move || fill(&st, ahead))
            .map_err(|e| Error::Audit(format!("starting the audit space thread: {e}")))?;
        Ok(Space { state, ahead, handle: Some(handle) })
    }

    /// The writer is about to write up to `end` in segment `seg`: wait if
    /// the filler is zeroing that range, then let it know.
    pub(crate) fn reserve(&self, seg: u32, end: u64) {
        if self.handle.is_none() {
            return;
        }
        let (m, cv) = &*self.state;
        let mut g = m.lock();
        while g.busy.is_some_and(|(s, from)| s == seg && from < end) {
            cv.wait(&mut g);
        }
        g.written = end;
        let wake = g.busy.is_none() && (!g.active || g.zeroed < end + g.chunk / 2);
        g.active = true;
        drop(g);
        if wake {
            cv.notify_all();
        }
    }

    /// Stop filling the current segment (waiting out a fill in progress), so
    /// the writer may trim it; then fill `next` (index, path, data end).
    pub(crate) fn switch(&self, next: Option<(u32, PathBuf, u64)>) {
        let (m, cv) = &*self.state;
        let mut g = m.lock();
        while g.busy.is_some() {
            cv.wait(&mut g);
        }
        match next {
            Some((seg, path, written)) => {
                g.seg = Some((seg, path));
                g.written = written;
                g.zeroed = written;
                g.active = false;
                g.chunk = FIRST_CHUNK.min(self.ahead);
            }
            None => g.seg = None,
        }
        drop(g);
        cv.notify_all();
    }

    /// The writer fell back to buffered writes: zero-fill through the page
    /// cache too from the next fill on (the writer would otherwise read each
    /// fresh page back from disk before writing into it).
    pub(crate) fn buffered(&self) {
        self.state.0.lock().direct = false;
    }

    /// Stop the filler thread (after a fill in progress).
    pub(crate) fn stop(&mut self) {
        {
            let (m, cv) = &*self.state;
            m.lock().closing = true;
            cv.notify_all();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Space {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The filler thread: whenever fewer than half a chunk of zeroed bytes is
/// left ahead of the writer, append a chunk more and fsync it. Chunks start
/// at [`FIRST_CHUNK`] in each segment and double up to `ahead`, so a log
/// that writes little costs little. Stops at the first failure.
fn fill(state: &(Mutex<State>, Condvar), ahead: u64) {
    let (m, cv) = state;
    let zeros = AlignedBuf::zeroed(ZERO_PIECE);
    let zeros = &zeros.as_slice()[..ZERO_PIECE];
    // The file open for the segment, and whether it was opened for direct writes.
    let mut open: Option<(u32, bool, File)> = None;
    let mut g = m.lock();
    loop {
        if g.closing {
            return;
        }
        let Some((seg, path)) = g.seg.clone() else {
            open = None;
            cv.wait(&mut g);
            continue;
        };
        if !g.active || g.zeroed >= g.written + g.chunk / 2 {
            cv.wait(&mut g);
            continue;
        }
        let direct = g.direct;
        let from = g.zeroed.max(g.written);
        // Direct writes cover the writer's last block: start after it.
        let from = if direct { direct::align_up(from) } else { from };
        let to = from + g.chunk;
        g.chunk = (g.chunk * 2).min(ahead);
        g.busy = Some((seg, from));
        drop(g);
        let r = (|| -> std::io::Result<()> {
            if open.as_ref().is_none_or(|(s, d, _)| (*s, *d) != (seg, direct)) {
                let f = if direct {
                    direct::open_write(&path).ok_or_else(|| std::io::Error::other("O_DIRECT refused"))?
                } else {
                    crate::fs::open_write_nofollow(&path)?
                };
                open = Some((seg, direct, f));
            }
            let Some((_, _, f)) = open.as_ref() else {
                return Ok(());
            };
            let mut at = from;
            while at < to {
                let n = (to - at).min(ZERO_PIECE as u64) as usize;
                f.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            f.sync_data()
        })();
        g = m.lock();
        g.busy = None;
        cv.notify_all();
        if let Err(e) = r {
            // Appending goes on without zeroed space (slower fsyncs).
            tracing::warn!(path = %path.display(), error = %e, "audit log: zero-filling free space failed; continuing without it");
            return;
        }
        if g.seg.as_ref().is_some_and(|(s, _)| *s == seg) {
            g.zeroed = to;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zeros are filled ahead of the writer in direct mode and, after the
    /// writer falls back to buffered writes, through the page cache.
    #[test]
    fn fills_ahead_direct_and_after_falling_back_to_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        std::fs::write(&path, b"header\n").unwrap();
        let wait_for = |len: u64| {
            for _ in 0..2000 {
                if std::fs::metadata(&path).unwrap().len() >= len {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            panic!("no zeros up to {len}");
        };
        // Where the test filesystem refuses O_DIRECT, both halves run buffered.
        let direct = direct::open_write(&path).is_some();
        let mut s = Space::start(1 << 20, 0, path.clone(), 7, direct).unwrap();
        s.reserve(0, direct::BLOCK);
        // The first chunk (64 KiB) starts at the block after the writer's.
        wait_for(direct::BLOCK + FIRST_CHUNK);
        s.buffered();
        // Run the writer up to the zeroed end: the next fill is buffered.
        s.reserve(0, direct::BLOCK + FIRST_CHUNK);
        wait_for(direct::BLOCK + 2 * FIRST_CHUNK);
        s.stop();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..7], b"header\n");
        assert!(bytes[7..].iter().all(|&b| b == 0));
    }
}
