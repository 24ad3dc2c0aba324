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
        let mut cw = CrcWriter { w, h: crc32fast::Hasher::new(), buf: Vec::with_capacity(1 << 20) };
        cw.put(MAGIC)?;
        cw.u32(FORMAT_VERSION)?;
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
        for s in 0..self.slots as u32 {
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
        let mut cr = CrcReader { r, h: crc32fast::Hasher::new() };
        let mut magic = [0u8; 8];
        cr.fill(&mut magic).map_err(|_| Error::IncompatibleStore { path: path(), reason: "not a facematch index (too short)".into() })?;
        if &magic != MAGIC {
            return Err(Error::IncompatibleStore { path: path(), reason: "not a facematch index (bad magic)".into() });
        }
        let version = cr.u32()?;
        if version != FORMAT_VERSION && version != 1 {
            return Err(Error::IncompatibleStore {
                path: path(),
                reason: format!("index format version {version}, this build reads {FORMAT_VERSION}"),
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
        let vectors = cr.chunked(n.checked_mul(dim).ok_or_else(|| corrupt("size overflow"))?, 4, |b| {
            f32::from_le_bytes(b.try_into().unwrap_or([0; 4]))
        })?;
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
        let mut ix = VectorIndex::from_parts(dim, cfg, Parts { vectors, deleted, levels, l0, upper, entry, graph_len })?;
        ix.calibration = calibration;
        Ok(ix)
    }
}
