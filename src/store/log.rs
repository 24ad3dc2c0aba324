//! The template log: an append-only file of encrypted, checksummed frames.
//!
//! ```text
//! header (32 B): b"FMTLOG\0\0" | u32 version | u32 reserved | 16-byte file id
//! frame:         u32 body_len | u32 crc32(body) | body = nonce(24) | ciphertext | tag(16)
//! ```
//! Each frame is sealed with AAD = file id || frame index, so frames cannot be
//! moved between files or reordered. An acknowledged append has been
//! `fdatasync`ed. On open, an incomplete or checksum-failing *last* frame is a
//! torn write from a crash: it is cut off and reported. Damage anywhere else,
//! or a frame that fails authentication, is corruption and the open fails.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;

use rand::RngCore;
use rayon::prelude::*;
use zeroize::Zeroizing;

use super::crypto::{Cipher, NONCE_LEN, TAG_LEN};
use crate::fs::Dir;
use crate::{Error, Result};

pub(crate) const MAGIC: &[u8; 8] = b"FMTLOG\0\0";
/// On-disk version of the template log.
pub(crate) const LOG_VERSION: u32 = 1;
pub(crate) const HEADER_LEN: usize = 32;
const FRAME_HEAD: usize = 8;
/// Frames larger than this are refused (a corrupted length must not allocate gigabytes).
const MAX_FRAME: usize = 64 << 20;

fn aad(file_id: &[u8; 16], index: u64) -> [u8; 24] {
    let mut a = [0u8; 24];
    a[..16].copy_from_slice(file_id);
    a[16..].copy_from_slice(&index.to_le_bytes());
    a
}

/// What replay found at the end of the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TornTail {
    /// Bytes at the end that are not part of the log (cut by the next append).
    pub bytes_dropped: u64,
    /// Byte offset where they start.
    pub at: u64,
}

/// Why the bytes after the last good frame are not a torn append, if they
/// are not: a torn append is a strict prefix of the frames it was writing,
/// so no whole frame can be found in it. `largest` is the largest frame
/// seen (frames of one gallery are of similar size), bounding the search.
fn tail_holds_a_frame(tail: &[u8], cipher: &Cipher, file_id: &[u8; 16], index: u64, largest: usize) -> Option<String> {
    let min = NONCE_LEN + TAG_LEN;
    if tail.len() >= FRAME_HEAD + min {
        let stored_crc = u32::from_le_bytes(tail[4..8].try_into().unwrap_or_default());
        let body = &tail[FRAME_HEAD..];
        if crc32fast::hash(body) == stored_crc || cipher.open(&aad(file_id, index), body).is_some() {
            return Some("the bytes after its length field are one whole frame (its length field is damaged)".into());
        }
    }
    // A later frame intact: its length and checksum agree.
    let cap = if largest == 0 { 1 << 16 } else { largest.saturating_mul(4).min(MAX_FRAME) };
    let mut q = 1;
    while q + FRAME_HEAD + min <= tail.len() {
        let l = u32::from_le_bytes(tail[q..q + 4].try_into().unwrap_or_default()) as usize;
        if (min..=cap).contains(&l) && q + FRAME_HEAD + l <= tail.len() {
            let crc = u32::from_le_bytes(tail[q + 4..q + 8].try_into().unwrap_or_default());
            if crc32fast::hash(&tail[q + FRAME_HEAD..q + FRAME_HEAD + l]) == crc {
                return Some(format!("an intact frame follows at {q} bytes past it"));
            }
        }
        q += 1;
    }
    None
}

/// Release the mapped pages of `from..to` (rounded to whole pages): they
/// were read and are not needed again, and a mapping's resident pages count
/// against the process. The file is only read, so a later access simply
/// faults the page in again from the page cache.
const RELEASE_EVERY: usize = 64 << 20;
fn release_pages(map: &memmap2::Mmap, from: usize, to: usize) {
    const PAGE: usize = 4096;
    let (start, end) = (from / PAGE * PAGE, (to / PAGE * PAGE).min(map.len()));
    if end > start {
        // SAFETY: the range lies inside the mapping and is page-aligned; the
        // mapping is read-only, so MADV_DONTNEED only drops resident pages.
        unsafe {
            libc::madvise(map.as_ptr().add(start) as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
}

/// The longest prefix of a log that is whole and authentic, for an explicit
/// repair: `(bytes, frames, file length, file id)`. Reads only.
pub(crate) fn good_prefix(dir: &Dir, name: &str, cipher: &Cipher) -> Result<(u64, u64, u64, [u8; 16])> {
    let path = dir.join(name);
    let f = dir.open_read(name)?.ok_or_else(|| Error::io(&path, std::io::ErrorKind::NotFound.into()))?;
    let len = f.metadata().map_err(|e| Error::io(&path, e))?.len();
    if len < HEADER_LEN as u64 {
        return Err(Error::DataCorruption { path, reason: format!("file is {len} bytes, shorter than its header") });
    }
    // SAFETY: the caller holds the gallery lock; the mapping is only read.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
    let data: &[u8] = &map;
    if &data[..8] != MAGIC {
        return Err(Error::IncompatibleStore { path, reason: "not a facematch template log (bad magic)".into() });
    }
    let mut file_id = [0u8; 16];
    file_id.copy_from_slice(&data[16..32]);
    let (mut pos, mut frames) = (HEADER_LEN, 0u64);
    while pos + FRAME_HEAD <= data.len() {
        let blen = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap_or_default());
        if !(NONCE_LEN + TAG_LEN..=MAX_FRAME).contains(&blen) || pos + FRAME_HEAD + blen > data.len() {
            break;
        }
        let body = &data[pos + FRAME_HEAD..pos + FRAME_HEAD + blen];
        if crc32fast::hash(body) != crc || cipher.open(&aad(&file_id, frames), body).is_none() {
            break;
        }
        pos += FRAME_HEAD + blen;
        frames += 1;
    }
    Ok((pos as u64, frames, len, file_id))
}

/// A log's file id and length, from its header, without reading further
/// (`None` when there is no log or its header is not one: opening reports that).
pub(crate) fn peek(dir: &Dir, name: &str) -> Result<Option<([u8; 16], u64)>> {
    use std::io::Read;
    let Some(mut f) = dir.open_read(name)? else { return Ok(None) };
    let len = f.metadata().map_err(|e| Error::io(dir.join(name), e))?.len();
    let mut h = [0u8; HEADER_LEN];
    if f.read_exact(&mut h).is_err() || &h[..8] != MAGIC {
        return Ok(None);
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&h[16..32]);
    Ok(Some((id, len)))
}

/// An open log, positioned at its end, ready to append.
pub(crate) struct LogWriter {
    file: File,
    path: PathBuf,
    file_id: [u8; 16],
    frames: u64,
    len: u64,
    /// A torn tail was found on open and is still on disk past `len`.
    cut_pending: bool,
    cipher: Cipher,
}

impl LogWriter {
    /// Create a new empty log `name` in `dir` (fails if anything has the name).
    pub(crate) fn create(dir: &Dir, name: &str, cipher: Cipher) -> Result<Self> {
        let path = dir.join(name);
        let mut file_id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut file_id);
        let mut file = dir.create_new(name)?;
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&LOG_VERSION.to_le_bytes());
        h[16..32].copy_from_slice(&file_id);
        file.write_all(&h).map_err(|e| Error::io(&path, e))?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        Ok(LogWriter { file, path, file_id, frames: 0, len: HEADER_LEN as u64, cut_pending: false, cipher })
    }

    /// Open the log `name` in `dir`, replay every frame through `apply` (in
    /// order, decrypted in parallel chunks) and return the writer.
    ///
    /// Opening never changes the file. A torn tail (the remains of an append
    /// a crash cut short) is reported and ignored; it is cut only by the next
    /// append. Bytes at the end count as a torn tail only when every frame
    /// before them authenticates and they cannot hold a whole frame (no
    /// checksum-valid frame starts anywhere in them, and they do not
    /// authenticate as the next frame with a damaged length); anything else
    /// is [`Error::DataCorruption`] with the byte offset, and the file is left
    /// exactly as it was (see `facematch repair`).
    #[cfg(any(test, feature = "failpoints"))]
    pub(crate) fn open(
        dir: &Dir,
        name: &str,
        cipher: Cipher,
        mut apply: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<(Self, Option<TornTail>)> {
        Self::open_decoded(dir, name, cipher, |_, p| Ok(p), |i, p: Zeroizing<Vec<u8>>| apply(i, &p))
    }

    /// [`LogWriter::open`] with a decoding step that runs in parallel
    /// (`decode`, per frame, on the decrypting threads) before the in-order
    /// `apply`. The mapped file's pages are released as replay moves on, so
    /// opening a large log does not hold it all in memory.
    pub(crate) fn open_decoded<T: Send>(
        dir: &Dir,
        name: &str,
        cipher: Cipher,
        decode: impl Fn(u64, Zeroizing<Vec<u8>>) -> Result<T> + Sync,
        mut apply: impl FnMut(u64, T) -> Result<()>,
    ) -> Result<(Self, Option<TornTail>)> {
        let path = &dir.join(name);
        let file = dir.open_write(name)?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_len < HEADER_LEN as u64 {
            return Err(Error::DataCorruption { path: path.into(), reason: format!("file is {file_len} bytes, shorter than its header") });
        }
        // SAFETY: the store holds an exclusive lock on the directory, so no
        // other facematch process modifies the file while it is mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let data: &[u8] = &map;
        if &data[..8] != MAGIC {
            return Err(Error::IncompatibleStore { path: path.into(), reason: "not a facematch template log (bad magic)".into() });
        }
        let version = u32::from_le_bytes(data[8..12].try_into().unwrap_or_default());
        if version > LOG_VERSION {
            return Err(Error::IncompatibleStore {
                path: path.into(),
                reason: format!("template log version {version} is newer than this facematch ({LOG_VERSION})"),
            });
        }
        let mut file_id = [0u8; 16];
        file_id.copy_from_slice(&data[16..32]);

        // Pass 1: frame boundaries and checksums.
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let mut pos = HEADER_LEN;
        let mut torn = false;
        let mut largest = 0usize;
        let mut released = 0usize;
        while pos < data.len() {
            let rest = data.len() - pos;
            if rest < FRAME_HEAD {
                torn = true;
                break;
            }
            let blen = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap_or_default()) as usize;
            let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap_or_default());
            let plausible = (NONCE_LEN + TAG_LEN..=MAX_FRAME).contains(&blen);
            if !plausible || rest < FRAME_HEAD + blen {
                // Either the start of an append a crash cut short, or a damaged length.
                torn = true;
                break;
            }
            let body = &data[pos + FRAME_HEAD..pos + FRAME_HEAD + blen];
            if crc32fast::hash(body) != crc {
                if pos + FRAME_HEAD + blen == data.len() {
                    torn = true;
                    break;
                }
                return Err(Error::DataCorruption {
                    path: path.into(),
                    reason: format!("frame {} at byte {pos} fails its checksum (the file was not changed)", spans.len()),
                });
            }
            largest = largest.max(blen);
            spans.push((pos + FRAME_HEAD, blen));
            pos += FRAME_HEAD + blen;
            if pos - released > RELEASE_EVERY {
                release_pages(&map, released, pos);
                released = pos;
            }
        }
        if torn {
            if let Some(reason) = tail_holds_a_frame(&data[pos..], &cipher, &file_id, spans.len() as u64, largest) {
                return Err(Error::DataCorruption {
                    path: path.into(),
                    reason: format!(
                        "frame {} at byte {pos} is damaged, not torn: {reason}; the file was not changed (`facematch repair` can cut it, keeping a copy)",
                        spans.len()
                    ),
                });
            }
        }

        // Pass 2: authenticate + decrypt in parallel chunks (bounded in
        // frames and in bytes, so memory stays small) on a thread of their
        // own, one chunk ahead of this thread, which applies them in order.
        const CHUNK: usize = 16_384;
        const CHUNK_BYTES: usize = 16 << 20;
        let mut chunks: Vec<(usize, usize)> = Vec::new();
        let mut next = 0usize;
        while next < spans.len() {
            let mut end = next;
            let mut bytes = 0usize;
            while end < spans.len() && end - next < CHUNK && (bytes < CHUNK_BYTES || end == next) {
                bytes += spans[end].1;
                end += 1;
            }
            chunks.push((next, end));
            next = end;
        }
        let (spans_ref, map_ref, cipher_ref, decode_ref) = (&spans, &map, &cipher, &decode);
        std::thread::scope(|s| -> Result<()> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<Result<T>>)>(1);
            let producer = s.spawn(move || {
                for &(a, b) in &chunks {
                    let chunk = &spans_ref[a..b];
                    let decoded: Vec<Result<T>> = chunk
                        .par_iter()
                        .enumerate()
                        .map(|(i, &(off, len))| {
                            let idx = (a + i) as u64;
                            match cipher_ref.open(&aad(&file_id, idx), &map_ref[off..off + len]) {
                                Some(p) => decode_ref(idx, p),
                                None => Err(Error::DataCorruption {
                                    path: path.into(),
                                    reason: format!("frame {idx} fails authentication (tampered, or written with another key)"),
                                }),
                            }
                        })
                        .collect();
                    if let (Some(first), Some(last)) = (chunk.first(), chunk.last()) {
                        release_pages(map_ref, first.0, last.0 + last.1);
                    }
                    if tx.send((a as u64, decoded)).is_err() {
                        return; // the applying side stopped (an error)
                    }
                }
            });
            let mut result = Ok(());
            'chunks: while let Ok((base, decoded)) = rx.recv() {
                for (i, d) in decoded.into_iter().enumerate() {
                    if let Err(e) = d.and_then(|d| apply(base + i as u64, d)) {
                        result = Err(e);
                        break 'chunks;
                    }
                }
            }
            drop(rx);
            if producer.join().is_err() && result.is_ok() {
                result = Err(Error::DataCorruption { path: path.into(), reason: "the decrypting thread failed".into() });
            }
            result
        })?;
        let frames = spans.len() as u64;
        let good_len = pos as u64;
        drop(map);
        let torn = torn.then(|| {
            let bytes = file_len - good_len;
            tracing::warn!(path = %path.display(), bytes, at = good_len, "a torn write at the end of the template log is ignored (cut at the next append)");
            TornTail { bytes_dropped: bytes, at: good_len }
        });
        let w = LogWriter { file, path: path.to_path_buf(), file_id, frames, len: good_len, cut_pending: torn.is_some(), cipher };
        Ok((w, torn))
    }

    /// Append frames and make them durable (one `fdatasync` for the batch).
    pub(crate) fn append_durable(&mut self, plaintexts: &[Vec<u8>]) -> Result<()> {
        if plaintexts.is_empty() {
            return Ok(());
        }
        if crate::failpoints::hit("log/enospc") {
            return Err(Error::io(&self.path, std::io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        let first = self.frames;
        let sealed: Vec<Vec<u8>> =
            plaintexts.par_iter().enumerate().map(|(i, p)| self.cipher.seal(&aad(&self.file_id, first + i as u64), p)).collect();
        let mut buf = Vec::with_capacity(sealed.iter().map(|s| s.len() + FRAME_HEAD).sum());
        let mut ends = Vec::with_capacity(sealed.len());
        for s in &sealed {
            buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(s).to_le_bytes());
            buf.extend_from_slice(s);
            ends.push(buf.len());
        }
        if self.cut_pending {
            // The torn tail found on open goes now, before anything is written after it.
            self.file.set_len(self.len).and_then(|_| self.file.sync_all()).map_err(|e| Error::io(&self.path, e))?;
            self.cut_pending = false;
        }
        self.file.seek(SeekFrom::Start(self.len)).map_err(|e| Error::io(&self.path, e))?;
        if ends.len() > 1 && crate::failpoints::hit("log/crash-mid-append") {
            // A crash with the first frame on disk and the second half written.
            let cut = ends[0] + (ends[1] - ends[0]) / 2;
            let _ = self.file.write_all(&buf[..cut]).and_then(|_| self.file.sync_data());
            return Err(Error::Cancelled);
        }
        let res = self.file.write_all(&buf).and_then(|_| self.file.sync_data());
        if let Err(e) = res {
            // Roll the file back to the last good frame so a failed append leaves nothing half-written.
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(Error::io(&self.path, e));
        }
        self.frames += plaintexts.len() as u64;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Number of frames in the log.
    pub(crate) fn frames(&self) -> u64 {
        self.frames
    }
    /// The file was renamed (same inode): report the new path from now on.
    pub(crate) fn renamed(&mut self, path: PathBuf) {
        self.path = path;
    }
    /// The log's random file id (binds snapshots to it).
    pub(crate) fn file_id(&self) -> [u8; 16] {
        self.file_id
    }
    /// Bytes on disk.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }
    /// Overwrite the whole file with zeros and sync (before it is unlinked),
    /// so erased templates' ciphertext does not linger in freed blocks.
    pub(crate) fn shred(mut self) -> Result<()> {
        crate::fs::shred_open(&mut self.file, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MasterKey;
    use std::fs::OpenOptions;

    fn three_frames(k: &MasterKey) -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open(t.path()).unwrap();
        let mut w = LogWriter::create(&d, "t.log", k.store_cipher()).unwrap();
        w.append_durable(&[b"one".to_vec(), b"two".to_vec()]).unwrap();
        w.append_durable(&[b"three".to_vec()]).unwrap();
        (t, d)
    }

    #[test]
    fn append_replay_and_torn_tail() {
        let k = MasterKey::generate();
        let (t, d) = three_frames(&k);
        let p = t.path().join("t.log");
        let good = std::fs::read(&p).unwrap();
        // torn: append half a frame
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let mut seen = vec![];
        let (mut w, torn) = LogWriter::open(&d, "t.log", k.store_cipher(), |i, b| {
            seen.push((i, b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(torn, Some(TornTail { bytes_dropped: 6, at: good.len() as u64 }));
        assert_eq!(w.frames(), 3);
        assert_eq!(seen[2].1, b"three");
        // Opening changed nothing; the next append cuts the tail first.
        assert_eq!(std::fs::read(&p).unwrap().len(), good.len() + 6);
        w.append_durable(&[b"four".to_vec()]).unwrap();
        drop(w);
        let mut n = 0;
        let (_, torn) = LogWriter::open(&d, "t.log", k.store_cipher(), |_, _| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((n, torn), (4, None));
        // wrong key: authentication fails
        assert!(LogWriter::open(&d, "t.log", MasterKey::generate().store_cipher(), |_, _| Ok(())).is_err());
        // flip a byte in the middle frame: corruption, not a torn tail
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[HEADER_LEN + 12] ^= 0xff;
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(LogWriter::open(&d, "t.log", k.store_cipher(), |_, _| Ok(())), Err(Error::DataCorruption { .. })));
    }

    #[test]
    fn a_damaged_length_is_corruption_and_the_file_is_left_alone() {
        let k = MasterKey::generate();
        let (t, d) = three_frames(&k);
        let p = t.path().join("t.log");
        let good = std::fs::read(&p).unwrap();
        let frame1 = HEADER_LEN + FRAME_HEAD + u32::from_le_bytes(good[HEADER_LEN..HEADER_LEN + 4].try_into().unwrap()) as usize;
        let frame2 = frame1 + FRAME_HEAD + u32::from_le_bytes(good[frame1..frame1 + 4].try_into().unwrap()) as usize;
        for (at, flip) in [(HEADER_LEN + 2, 0x01), (HEADER_LEN, 0x80), (frame1 + 3, 0x40), (frame2, 0x10), (frame2 + 2, 0xff)] {
            let mut bad = good.clone();
            bad[at] ^= flip;
            std::fs::write(&p, &bad).unwrap();
            let r = LogWriter::open(&d, "t.log", k.store_cipher(), |_, _| Ok(()));
            assert!(matches!(r, Err(Error::DataCorruption { .. })), "flip at {at}: {:?}", r.map(|x| x.1));
            assert_eq!(std::fs::read(&p).unwrap(), bad, "flip at {at} changed the file");
        }
    }
}
