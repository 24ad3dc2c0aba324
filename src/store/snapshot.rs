//! Encrypted snapshots of the in-memory index, so opening a large gallery
//! loads the graph instead of rebuilding it.
//!
//! ```text
//! header (64 B): b"FMSNAP\0\0" | u32 version | u32 reserved | log file id (16) | u64 frames covered | u64 slots | 16 B reserved
//! chunks:        u32 sealed_len | sealed(AAD = "snap" | log id | frames | slots | chunk index | last flag)
//! ```
//! A snapshot names the log (file id) and the number of its frames it
//! reflects; a snapshot that does not match the log, fails authentication or
//! is truncated is ignored (the index is rebuilt from the log), never trusted.

use std::io::{BufReader, BufWriter, Read, Write};

use zeroize::Zeroizing;

use super::crypto::{Cipher, NONCE_LEN, TAG_LEN};
use crate::fs::Dir;
use crate::{Error, Result};

pub(crate) const MAGIC: &[u8; 8] = b"FMSNAP\0\0";
/// 2: the chunks' AAD binds the frame and slot counts too (1 bound the log id
/// only). 3: the same, and the body is the index without its vectors (index
/// format 3): the template log holds them, and open takes them from its replay.
const VERSION: u32 = 3;
const HEADER_LEN: usize = 64;
const CHUNK: usize = 1 << 20;

/// What a snapshot covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotHeader {
    pub log_id: [u8; 16],
    pub frames: u64,
    pub slots: u64,
    /// Version 3: the body leaves the vectors to the log (version 2 holds them).
    pub vectors_in_log: bool,
}

/// Binds every chunk to the whole header (log id, frames, slots), its place
/// and whether it is the last: a header edited to claim other counts fails.
fn chunk_aad(h: &SnapshotHeader, idx: u64, last: bool) -> [u8; 45] {
    let mut a = [0u8; 45];
    a[..4].copy_from_slice(b"snap");
    a[4..20].copy_from_slice(&h.log_id);
    a[20..28].copy_from_slice(&h.frames.to_le_bytes());
    a[28..36].copy_from_slice(&h.slots.to_le_bytes());
    a[36..44].copy_from_slice(&idx.to_le_bytes());
    a[44] = last as u8;
    a
}

struct SealingWriter<'a, W: Write> {
    out: W,
    cipher: &'a Cipher,
    header: SnapshotHeader,
    buf: Zeroizing<Vec<u8>>,
    idx: u64,
}

impl<W: Write> SealingWriter<'_, W> {
    fn emit(&mut self, last: bool) -> std::io::Result<()> {
        let sealed = self.cipher.seal(&chunk_aad(&self.header, self.idx, last), &self.buf);
        self.out.write_all(&(sealed.len() as u32).to_le_bytes())?;
        self.out.write_all(&sealed)?;
        self.idx += 1;
        self.buf.clear();
        Ok(())
    }
}

impl<W: Write> Write for SealingWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            let room = CHUNK - self.buf.len();
            let n = room.min(rest.len());
            self.buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.buf.len() == CHUNK {
                self.emit(false)?;
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Write the snapshot `name` in `dir` atomically (`name.tmp`, fsync, rename, fsync dir).
pub(crate) fn write(
    dir: &Dir,
    name: &str,
    cipher: &Cipher,
    header: SnapshotHeader,
    body: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let tmp_name = format!("{name}.tmp");
    super::recover::clear_leftover(dir, &tmp_name)?;
    let tmp = dir.join(&tmp_name);
    let path = dir.join(name);
    let file = dir.create_new(&tmp_name)?;
    let mut out = BufWriter::with_capacity(CHUNK + 64, file);
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&(if header.vectors_in_log { VERSION } else { 2 }).to_le_bytes());
    h[16..32].copy_from_slice(&header.log_id);
    h[32..40].copy_from_slice(&header.frames.to_le_bytes());
    h[40..48].copy_from_slice(&header.slots.to_le_bytes());
    out.write_all(&h).map_err(|e| Error::io(&tmp, e))?;
    let mut w = SealingWriter { out, cipher, header, buf: Zeroizing::new(Vec::with_capacity(CHUNK)), idx: 0 };
    body(&mut w)?;
    w.emit(true).map_err(|e| Error::io(&tmp, e))?;
    let file = w.out.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    dir.rename(&tmp_name, name).map_err(|e| match e {
        Error::Io { source, .. } => Error::io(&path, source),
        e => e,
    })?;
    dir.sync()
}

struct OpeningReader<'a, R: Read> {
    inp: R,
    cipher: &'a Cipher,
    header: SnapshotHeader,
    buf: Zeroizing<Vec<u8>>,
    /// The sealed chunk being read (ciphertext; reused).
    sealed: Vec<u8>,
    pos: usize,
    idx: u64,
    done: bool,
}

impl<R: Read> Read for OpeningReader<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            let mut l = [0u8; 4];
            self.inp.read_exact(&mut l)?;
            let len = u32::from_le_bytes(l) as usize;
            if !(NONCE_LEN + TAG_LEN..=CHUNK + NONCE_LEN + TAG_LEN).contains(&len) {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "bad snapshot chunk length"));
            }
            let sealed = &mut self.sealed;
            sealed.resize(len, 0);
            self.inp.read_exact(sealed)?;
            // A chunk opens either as a middle chunk or as the last one.
            let (plain, last) = match self.cipher.open(&chunk_aad(&self.header, self.idx, false), sealed) {
                Some(p) => (p, false),
                None => match self.cipher.open(&chunk_aad(&self.header, self.idx, true), sealed) {
                    Some(p) => (p, true),
                    None => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "snapshot chunk fails authentication")),
                },
            };
            self.buf = plain;
            self.pos = 0;
            self.idx += 1;
            self.done = last;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Read a snapshot's header; `Ok(None)` if there is no snapshot file.
pub(crate) fn read_header(dir: &Dir, name: &str) -> Result<Option<SnapshotHeader>> {
    let Some(mut f) = dir.open_read(name)? else { return Ok(None) };
    let mut h = [0u8; HEADER_LEN];
    if f.read_exact(&mut h).is_err() || &h[..8] != MAGIC {
        return Ok(None);
    }
    let version = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
    if !(2..=VERSION).contains(&version) {
        return Ok(None);
    }
    let mut log_id = [0u8; 16];
    log_id.copy_from_slice(&h[16..32]);
    Ok(Some(SnapshotHeader {
        log_id,
        frames: u64::from_le_bytes(h[32..40].try_into().unwrap_or_default()),
        slots: u64::from_le_bytes(h[40..48].try_into().unwrap_or_default()),
        vectors_in_log: version == VERSION,
    }))
}

/// Stream a snapshot's decrypted body into `body`.
pub(crate) fn read<T>(
    dir: &Dir,
    name: &str,
    cipher: &Cipher,
    header: &SnapshotHeader,
    body: impl FnOnce(&mut dyn Read) -> Result<T>,
) -> Result<T> {
    let path = &dir.join(name);
    let f = dir.open_read(name)?.ok_or_else(|| Error::io(path, std::io::ErrorKind::NotFound.into()))?;
    let mut inp = BufReader::with_capacity(CHUNK + 64, f);
    let mut h = [0u8; HEADER_LEN];
    inp.read_exact(&mut h).map_err(|e| Error::io(path, e))?;
    let mut r =
        OpeningReader { inp, cipher, header: *header, buf: Zeroizing::new(Vec::new()), sealed: Vec::new(), pos: 0, idx: 0, done: false };
    let v = body(&mut r)?;
    // The body must have consumed the whole stream up to the last chunk.
    let mut probe = [0u8; 1];
    match r.read(&mut probe) {
        Ok(0) if r.done => Ok(v),
        _ => Err(Error::DataCorruption { path: path.into(), reason: "snapshot has trailing data or no final chunk".into() }),
    }
}
