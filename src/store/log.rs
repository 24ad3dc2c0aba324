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

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rand::RngCore;
use rayon::prelude::*;
use zeroize::Zeroizing;

use super::crypto::{Cipher, NONCE_LEN, TAG_LEN};
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"FMTLOG\0\0";
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
    /// Bytes cut off the end.
    pub bytes_dropped: u64,
}

/// An open log, positioned at its end, ready to append.
pub(crate) struct LogWriter {
    file: File,
    path: PathBuf,
    file_id: [u8; 16],
    frames: u64,
    len: u64,
    cipher: Cipher,
}

impl LogWriter {
    /// Create a new empty log at `path` (fails if it exists).
    pub(crate) fn create(path: &Path, cipher: Cipher) -> Result<Self> {
        let mut file_id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut file_id);
        let mut file = OpenOptions::new().create_new(true).write(true).read(true).open(path).map_err(|e| Error::io(path, e))?;
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&LOG_VERSION.to_le_bytes());
        h[16..32].copy_from_slice(&file_id);
        file.write_all(&h).map_err(|e| Error::io(path, e))?;
        file.sync_all().map_err(|e| Error::io(path, e))?;
        Ok(LogWriter { file, path: path.to_path_buf(), file_id, frames: 0, len: HEADER_LEN as u64, cipher })
    }

    /// Open an existing log, replay every frame through `apply` (in order,
    /// decrypted in parallel chunks), cut a torn tail, and return the writer.
    pub(crate) fn open(
        path: &Path,
        cipher: Cipher,
        mut apply: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<(Self, Option<TornTail>)> {
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::io(path, e))?;
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
        let mut torn = None;
        while pos < data.len() {
            let rest = data.len() - pos;
            if rest < FRAME_HEAD {
                torn = Some(rest);
                break;
            }
            let blen = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap_or_default()) as usize;
            let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap_or_default());
            if !(NONCE_LEN + TAG_LEN..=MAX_FRAME).contains(&blen) {
                if pos + FRAME_HEAD + blen.min(MAX_FRAME) >= data.len() || blen == 0 {
                    torn = Some(rest);
                    break;
                }
                return Err(Error::DataCorruption { path: path.into(), reason: format!("frame {} at byte {pos} has impossible length {blen}", spans.len()) });
            }
            if rest < FRAME_HEAD + blen {
                torn = Some(rest);
                break;
            }
            let body = &data[pos + FRAME_HEAD..pos + FRAME_HEAD + blen];
            if crc32fast::hash(body) != crc {
                if pos + FRAME_HEAD + blen == data.len() {
                    torn = Some(rest);
                    break;
                }
                return Err(Error::DataCorruption { path: path.into(), reason: format!("frame {} at byte {pos} fails its checksum", spans.len()) });
            }
            spans.push((pos + FRAME_HEAD, blen));
            pos += FRAME_HEAD + blen;
        }

        // Pass 2: authenticate + decrypt in parallel chunks, apply in order.
        const CHUNK: usize = 16_384;
        for (ci, chunk) in spans.chunks(CHUNK).enumerate() {
            let base = (ci * CHUNK) as u64;
            let plain: Vec<Option<Zeroizing<Vec<u8>>>> = chunk
                .par_iter()
                .enumerate()
                .map(|(i, &(off, len))| cipher.open(&aad(&file_id, base + i as u64), &data[off..off + len]))
                .collect();
            for (i, p) in plain.into_iter().enumerate() {
                let idx = base + i as u64;
                match p {
                    Some(p) => apply(idx, &p)?,
                    None => {
                        return Err(Error::DataCorruption {
                            path: path.into(),
                            reason: format!("frame {idx} fails authentication (tampered, or written with another key)"),
                        })
                    }
                }
            }
        }
        let frames = spans.len() as u64;
        let good_len = pos as u64;
        drop(map);
        let mut w = LogWriter { file, path: path.to_path_buf(), file_id, frames, len: good_len, cipher };
        let torn = match torn {
            Some(bytes) => {
                w.file.set_len(good_len).map_err(|e| Error::io(path, e))?;
                w.file.sync_all().map_err(|e| Error::io(path, e))?;
                tracing::warn!(path = %path.display(), bytes, "cut a torn write off the end of the template log");
                Some(TornTail { bytes_dropped: bytes as u64 })
            }
            None => None,
        };
        w.file.seek(SeekFrom::Start(w.len)).map_err(|e| Error::io(path, e))?;
        Ok((w, torn))
    }

    /// Append frames and make them durable (one `fdatasync` for the batch).
    pub(crate) fn append_durable(&mut self, plaintexts: &[Vec<u8>]) -> Result<()> {
        if plaintexts.is_empty() {
            return Ok(());
        }
        let first = self.frames;
        let sealed: Vec<Vec<u8>> = plaintexts
            .par_iter()
            .enumerate()
            .map(|(i, p)| self.cipher.seal(&aad(&self.file_id, first + i as u64), p))
            .collect();
        let mut buf = Vec::with_capacity(sealed.iter().map(|s| s.len() + FRAME_HEAD).sum());
        for s in &sealed {
            buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(s).to_le_bytes());
            buf.extend_from_slice(s);
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
        super::shred_open(&mut self.file, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MasterKey;

    #[test]
    fn append_replay_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.log");
        let k = MasterKey::generate();
        let mut w = LogWriter::create(&p, k.store_cipher()).unwrap();
        w.append_durable(&[b"one".to_vec(), b"two".to_vec()]).unwrap();
        w.append_durable(&[b"three".to_vec()]).unwrap();
        drop(w);
        // torn: append half a frame
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let mut seen = vec![];
        let (w, torn) = LogWriter::open(&p, k.store_cipher(), |i, b| {
            seen.push((i, b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(torn, Some(TornTail { bytes_dropped: 6 }));
        assert_eq!(w.frames(), 3);
        assert_eq!(seen[2].1, b"three");
        // wrong key: authentication fails
        assert!(LogWriter::open(&p, MasterKey::generate().store_cipher(), |_, _| Ok(())).is_err());
        // flip a byte in the middle frame: corruption, not a torn tail
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[HEADER_LEN + 12] ^= 0xff;
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(LogWriter::open(&p, k.store_cipher(), |_, _| Ok(())), Err(Error::DataCorruption { .. })));
    }
}
