//! Versioned binary format of a [`VectorIndex`].
//!
//! Little-endian: magic `FMVINDEX`, format version (u32), dim (u32), config
//! (u32 length + JSON), slots (u64), entry (u32, `u32::MAX` = none),
//! (version 2:) slots in the graph (u64), the calibration in force (u32 ef,
//! 0 = scan, `u32::MAX` = none; f32 agreement; u64 live), tombstone bitset (u64 words), levels (1 byte per slot), vectors (slots x
//! dim f32, normalised), level-0 lists (count + ids per slot), upper lists
//! (per slot with level >= 1, per level: count + ids), then a CRC-32 of all
//! the bytes before it. Int8 codes are derived from the vectors on load.
//!
//! Version 3 is version 2 without the vectors section: the structure of an
//! index whose vectors are kept elsewhere (a gallery's template log holds
//! them already; its snapshot need not hold them twice). It is read with
//! [`VectorIndex::read_structure_from`] and completed with the vectors.
//!
//! Reading never trusts a size before the bytes are there: sections are read
//! in bounded chunks, so a lying header ends in an error at end of input,
//! not in a huge allocation.

use std::io::{Read, Write};

use super::{IndexConfig, Parts, VectorIndex, MAX_LEVEL};
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"FMVINDEX";
/// Current format version. 2: the graph may cover a prefix of the slots (a
/// deferred build) and the calibration is saved, so opening does not
/// measure it again. Version 1 is still read.
pub const FORMAT_VERSION: u32 = 2;
/// The format of [`VectorIndex::write_structure_to`]: version 2 without the vectors.
pub const STRUCTURE_VERSION: u32 = 3;
const MAX_CONFIG_BYTES: usize = 64 * 1024;
const CHUNK: usize = 1 << 16;
const RESERVE_BYTES: usize = 2 << 30;

fn path() -> std::path::PathBuf {
    "<index>".into()
}
fn corrupt(reason: impl Into<String>) -> Error {
    Error::DataCorruption { path: path(), reason: reason.into() }
}

struct CrcWriter<'a> {
    w: &'a mut dyn Write,
    h: crc32fast::Hasher,
    buf: Vec<u8>,
}

impl CrcWriter<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        self.h.update(&self.buf);
        self.w.write_all(&self.buf).map_err(|e| Error::io(path(), e))?;
        self.buf.clear();
        Ok(())
    }
    fn u32(&mut self, x: u32) -> Result<()> {
        self.put(&x.to_le_bytes())
    }
}

struct CrcReader<'a> {
    r: &'a mut dyn Read,
    h: crc32fast::Hasher,
}

impl CrcReader<'_> {
    fn fill(&mut self, b: &mut [u8]) -> Result<()> {
        self.r.read_exact(b).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                corrupt("truncated index data")
            } else {
                Error::io(path(), e)
            }
        })?;
        self.h.update(b);
        Ok(())
    }
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// `n` items of `size` bytes, read chunk by chunk and decoded by `f`.
    fn chunked<T>(&mut self, n: usize, size: usize, mut f: impl FnMut(&[u8]) -> T) -> Result<Vec<T>> {
        // Reserving is not touching: up to RESERVE_BYTES of address space is
        // reserved at once (no copies as the section grows); a lying count
        // above that still ends at the end of the input, not in an allocation.
        let mut out = Vec::with_capacity(if n.saturating_mul(size) <= RESERVE_BYTES { n } else { n.min(CHUNK) });
        let mut buf = vec![0u8; CHUNK.min(n.max(1)) * size];
        let mut left = n;
        while left > 0 {
            let c = left.min(CHUNK);
            self.fill(&mut buf[..c * size])?;
            out.extend(buf[..c * size].chunks_exact(size).map(&mut f));
            left -= c;
        }
        Ok(out)
    }
}

impl VectorIndex {
    /// Write the index in the versioned binary format (see the module docs).
    pub fn write_to(&self, w: &mut dyn Write) -> Result<()> {
        self.write_impl(w, true)
    }

    /// Write the index without its vectors (format version 3): for a caller
    /// that keeps the vectors elsewhere and hands them back to
    /// [`IndexStructure::into_index`].
    pub fn write_structure_to(&self, w: &mut dyn Write) -> Result<()> {
        self.write_impl(w, false)
    }

    fn write_impl(&self, w: &mut dyn Write, with_vectors: bool) -> Result<()> {
        let mut cw = CrcWriter { w, h: crc32fast::Hasher::new(), buf: Vec::with_capacity(1 << 20) };
        cw.put(MAGIC)?;
        cw.u32(if with_vectors { FORMAT_VERSION } else { STRUCTURE_VERSION })?;
        cw.u32(self.dim as u32)?;
        let cfg = serde_json::to_vec(&self.cfg).map_err(|e| corrupt(format!("config: {e}")))?;
        cw.u32(cfg.len() as u32)?;
        cw.put(&cfg)?;
        cw.put(&(self.slots as u64).to_le_bytes())?;
        cw.u32(self.entry.unwrap_or(u32::MAX))?;
        cw.put(&(self.graph_len as u64).to_le_bytes())?;
        let c = self.calibration_in_force();
        cw.u32(match c {
            None => u32::MAX,
            Some(c) => c.ef.map_or(0, |e| e.min(u32::MAX as usize - 1) as u32),
        })?;
        cw.put(&c.map_or(0.0, |c| c.agreement).to_le_bytes())?;
        cw.put(&(c.map_or(0, |c| c.live) as u64).to_le_bytes())?;
        for w in &self.deleted {
            cw.put(&w.to_le_bytes())?;
        }
        cw.put(&self.levels)?;
        for s in (0..self.slots as u32).filter(|_| with_vectors) {
            for x in &self.exact_vec(s)[..self.dim] {
                cw.put(&x.to_le_bytes())?;
            }
        }
        for s in 0..self.slots as u32 {
            let l = self.links0(s);
            cw.u32(l.len() as u32)?;
            for &x in l {
                cw.u32(x)?;
            }
        }
        for s in 0..self.slots as u32 {
            for l in 1..=self.levels[s as usize] as usize {
                let list = self.links(s, l);
                cw.u32(list.len() as u32)?;
                for &x in list {
                    cw.u32(x)?;
                }
            }
        }
        cw.flush()?;
        let crc = cw.h.clone().finalize();
        cw.w.write_all(&crc.to_le_bytes()).map_err(|e| Error::io(path(), e))?;
        Ok(())
    }

    /// Read an index written by [`VectorIndex::write_to`]. Foreign or newer
    /// input gives [`Error::IncompatibleStore`], damaged or truncated input
    /// [`Error::DataCorruption`].
    pub fn read_from(r: &mut dyn Read) -> Result<Self> {
        let s = Self::read_structure_from(r)?;
        if !s.has_vectors {
            return Err(Error::IncompatibleStore {
                path: path(),
                reason: "an index structure without its vectors (format 3): read it with read_structure_from".into(),
            });
        }
        s.into_index(None)
    }

    /// Read an index written by [`VectorIndex::write_to`] (versions 1, 2) or
    /// [`VectorIndex::write_structure_to`] (version 3, no vectors). Errors as
    /// [`VectorIndex::read_from`].
    pub fn read_structure_from(r: &mut dyn Read) -> Result<IndexStructure> {
        let mut cr = CrcReader { r, h: crc32fast::Hasher::new() };
        let mut magic = [0u8; 8];
        cr.fill(&mut magic).map_err(|_| Error::IncompatibleStore { path: path(), reason: "not a facematch index (too short)".into() })?;
        if &magic != MAGIC {
            return Err(Error::IncompatibleStore { path: path(), reason: "not a facematch index (bad magic)".into() });
        }
        let version = cr.u32()?;
        if !(1..=STRUCTURE_VERSION).contains(&version) {
            return Err(Error::IncompatibleStore {
                path: path(),
                reason: format!("index format version {version}, this build reads 1 to {STRUCTURE_VERSION}"),
            });
        }
        let dim = cr.u32()? as usize;
        if dim == 0 || dim > 65_536 {
            return Err(corrupt(format!("dimension {dim} out of range")));
        }
        let cfg_len = cr.u32()? as usize;
        if cfg_len > MAX_CONFIG_BYTES {
            return Err(corrupt("config section too large"));
        }
        let mut cfg_bytes = vec![0u8; cfg_len];
        cr.fill(&mut cfg_bytes)?;
        let cfg: IndexConfig = serde_json::from_slice(&cfg_bytes).map_err(|e| corrupt(format!("config: {e}")))?;
        cfg.validate().map_err(|e| corrupt(format!("config: {e}")))?;
        let slots = cr.u64()?;
        if slots >= u32::MAX as u64 {
            return Err(corrupt("slot count out of range"));
        }
        let n = slots as usize;
        let entry = match cr.u32()? {
            u32::MAX => None,
            e => Some(e),
        };
        let (graph_len, calibration) = if version >= 2 {
            let graph_len = cr.u64()?;
            if graph_len > slots {
                return Err(corrupt("graph covers more slots than there are"));
            }
            let ef = cr.u32()?;
            let agreement = f32::from_bits(cr.u32()?);
            let live = cr.u64()? as usize;
            let c = (ef != u32::MAX).then_some(super::Calibration { ef: (ef != 0).then_some(ef as usize), agreement, live });
            (graph_len as usize, c)
        } else {
            // Version 1 built the graph over every slot as it was added.
            (if cfg.graph && entry.is_some() { n } else { 0 }, None)
        };
        let deleted = cr.chunked(n.div_ceil(64), 8, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))?;
        let levels = cr.chunked(n, 1, |b| b[0])?;
        if levels.iter().any(|&l| l as usize > MAX_LEVEL) {
            return Err(corrupt("node level out of range"));
        }
        let has_vectors = version < STRUCTURE_VERSION;
        let vectors = if has_vectors {
            cr.chunked(n.checked_mul(dim).ok_or_else(|| corrupt("size overflow"))?, 4, |b| {
                f32::from_le_bytes(b.try_into().unwrap_or([0; 4]))
            })?
        } else {
            Vec::new()
        };
        let m = cfg.m;
        let mut l0 = Vec::with_capacity(n.min(CHUNK));
        for s in 0..n {
            let c = cr.u32()? as usize;
            if c > 2 * m {
                return Err(corrupt(format!("level-0 list of slot {s} too long")));
            }
            l0.push(cr.chunked(c, 4, |b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))?);
        }
        let mut upper: Vec<Box<[u32]>> = Vec::with_capacity(n.min(CHUNK));
        for (s, &lv) in levels.iter().enumerate() {
            let mut u = vec![0u32; lv as usize * (1 + m)];
            for l in 0..lv as usize {
                let c = cr.u32()? as usize;
                if c > m {
                    return Err(corrupt(format!("upper list of slot {s} too long")));
                }
                u[l * (1 + m)] = c as u32;
                for i in 0..c {
                    u[l * (1 + m) + 1 + i] = cr.u32()?;
                }
            }
            upper.push(u.into_boxed_slice());
        }
        let want = cr.h.clone().finalize();
        let mut crc = [0u8; 4];
        cr.r.read_exact(&mut crc).map_err(|_| corrupt("truncated index data (checksum)"))?;
        if u32::from_le_bytes(crc) != want {
            return Err(corrupt("checksum mismatch"));
        }
        Ok(IndexStructure {
            dim,
            cfg,
            parts: Parts { vectors, deleted, levels, l0, upper, entry, graph_len, finite: false },
            calibration,
            has_vectors,
        })
    }
}

/// An index as read by [`VectorIndex::read_structure_from`]: checked against
/// its checksum, not yet against the invariants [`IndexStructure::into_index`] checks.
pub struct IndexStructure {
    dim: usize,
    cfg: IndexConfig,
    parts: Parts,
    calibration: Option<super::Calibration>,
    has_vectors: bool,
}

impl IndexStructure {
    /// Dimension of the vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Slots (live and tombstoned).
    pub fn slots(&self) -> usize {
        self.parts.levels.len()
    }

    /// Whether the vectors were in the input (format 1 or 2).
    pub fn has_vectors(&self) -> bool {
        self.has_vectors
    }

    /// The index, with `vectors` (`slots * dim` vectors in slot order, as
    /// they were given to [`VectorIndex::add`]) when the input had none; `vectors` is ignored when it had them.
    /// Inconsistent input is [`Error::DataCorruption`].
    pub fn into_index(self, vectors: Option<Vec<f32>>) -> Result<VectorIndex> {
        let mut parts = self.parts;
        if !self.has_vectors {
            let v = vectors.ok_or_else(|| corrupt("index structure without its vectors"))?;
            if v.len() != parts.levels.len() * self.dim {
                return Err(corrupt(format!("{} vector values given for {} slots of dimension {}", v.len(), parts.levels.len(), self.dim)));
            }
            parts.vectors = v;
            // As `add` stores them: each divided by its norm (the same arithmetic, so
            // an index assembled this way equals one built by adding the vectors).
            use rayon::prelude::*;
            let dim = self.dim;
            parts.vectors.par_chunks_mut(dim).try_for_each(|v| {
                let norm = super::check_vector(v, dim).map_err(|e| corrupt(format!("vector: {e}")))?;
                v.iter_mut().for_each(|x| *x /= norm);
                Ok::<(), Error>(())
            })?;
            parts.finite = true;
        }
        let mut ix = VectorIndex::from_parts(self.dim, self.cfg, parts)?;
        ix.calibration = self.calibration;
        Ok(ix)
    }
}
