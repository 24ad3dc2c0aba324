//! NumPy `.npy` files: the interchange format for embeddings and labels.
//!
//! Benchmarks and tools exchange galleries with Python peers (hnswlib, faiss,
//! numpy scripts) through `.npy` files. This module reads and writes the
//! subset facematch needs: 1-D or 2-D, C-order, little-endian arrays of
//! `<f4` ([`f32`], embeddings), `<u4` ([`u32`], identity labels) and `<i8`
//! ([`i64`], labels with -1 for "none", neighbour ids), with format version
//! 1.0, 2.0 or 3.0 headers. Large embedding files can be read a block of rows
//! at a time ([`F32Rows`]) or memory-mapped ([`MmapMatrix`]).
//!
//! Reading validates everything before trusting it (magic, version, header
//! syntax, dtype, `fortran_order`, shape against the file length) and fails
//! with a typed error naming the file, never a panic:
//! [`Error::BadInputFile`] for a file that is not an `.npy` file or holds
//! another dtype/layout, [`Error::DataCorruption`] for a damaged or truncated
//! one. Writing is atomic (temporary file, then rename).
//!
//! What the `ndarray-npy` crate does and what is written here: ndarray-npy
//! parses the header's dictionary (`Header::from_reader`, a Python-literal
//! parser), reads a whole array's elements ([`read_array`]: descriptor, count
//! and trailing bytes checked) and writes arrays (header and data,
//! [`write_array`]). Written here, and why: the header's fixed prefix
//! (magic, version, length) is checked before ndarray-npy sees it, because it
//! allocates whatever header length a file claims (up to 4 GiB), and the shape
//! is checked against the file's length before a whole array is allocated
//! (a bounded read); the checks that map a file to [`Error::BadInputFile`] or
//! [`Error::DataCorruption`] with its path; Python 2's `2L` dimensions (which
//! ndarray-npy's parser refuses), filtered as numpy's own reader does;
//! [`F32Rows`], because ndarray-npy reads whole arrays only (an import of
//! 1M x 128 must not hold the file); [`MmapMatrix`], which keeps the map and
//! the validated data offset together (ndarray-npy's `view_npy` gives a view
//! borrowed from the map and would parse the header again for each one).
//! Files are opened through [`crate::fs::open_input`] (regular files only).
//!
//! ```
//! use facematch::npy;
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("emb.npy");
//! npy::write_f32_matrix(&path, &[1.0, 0.0, 0.0, 1.0, 0.6, 0.8], 3, 2).unwrap();
//! let m = npy::read_f32_matrix(&path).unwrap();
//! assert_eq!((m.rows, m.cols), (3, 2));
//! assert_eq!(m.row(2), &[0.6, 0.8]);
//! ```

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ndarray::{ArrayViewD, IxDyn};
use ndarray_npy::npy::header::{Header, ParseHeaderError, ReadHeaderError};
use ndarray_npy::{ReadDataError, ReadableElement, WritableElement, WriteNpyError, WriteNpyExt};

use crate::{Error, Result};

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Headers longer than this are refused (numpy itself caps them at 10 KiB by default).
const MAX_HEADER_LEN: usize = 1 << 20;
/// numpy (and ndarray-npy) align the start of the data to this many bytes.
#[cfg(test)]
const ALIGN: usize = 64;

/// Element types facematch reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyDtype {
    /// `<f4`: little-endian f32.
    F32,
    /// `<u4`: little-endian u32.
    U32,
    /// `<i8`: little-endian i64.
    I64,
}

impl NpyDtype {
    /// The numpy `descr` string.
    pub fn descr(self) -> &'static str {
        match self {
            NpyDtype::F32 => "<f4",
            NpyDtype::U32 => "<u4",
            NpyDtype::I64 => "<i8",
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            NpyDtype::F32 | NpyDtype::U32 => 4,
            NpyDtype::I64 => 8,
        }
    }
    fn from_descr(d: &str) -> Option<NpyDtype> {
        match d {
            "<f4" => Some(NpyDtype::F32),
            "<u4" => Some(NpyDtype::U32),
            "<i8" => Some(NpyDtype::I64),
            _ => None,
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u32 {}
    impl Sealed for i64 {}
}

/// A Rust type stored in `.npy` files ([`f32`], [`u32`], [`i64`]).
pub trait NpyElement: Copy + Default + sealed::Sealed + ReadableElement + WritableElement {
    /// Its numpy dtype.
    const DTYPE: NpyDtype;
}

impl NpyElement for f32 {
    const DTYPE: NpyDtype = NpyDtype::F32;
}
impl NpyElement for u32 {
    const DTYPE: NpyDtype = NpyDtype::U32;
}
impl NpyElement for i64 {
    const DTYPE: NpyDtype = NpyDtype::I64;
}

/// A parsed and validated `.npy` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    /// Format version (major, minor).
    pub version: (u8, u8),
    /// Element type.
    pub dtype: NpyDtype,
    /// Array shape (1 or 2 dimensions).
    pub shape: Vec<usize>,
    /// Byte offset of the first element.
    pub data_offset: usize,
}

impl NpyHeader {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True when the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::DataCorruption { path: path.to_path_buf(), reason: reason.into() }
}
fn incompatible(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadInputFile { path: path.to_path_buf(), reason: reason.into() }
}

/// The fixed prefix of a header (magic, version, header length), checked
/// before anything is allocated for it: the version and where the header
/// ends, for a file of `file_len` bytes. `bytes` may hold just the prefix.
fn header_extent(bytes: &[u8], file_len: u64, path: &Path) -> Result<((u8, u8), usize)> {
    let prefix = bytes.len().min(MAGIC.len());
    if bytes[..prefix] != MAGIC[..prefix] {
        return Err(incompatible(path, "not a .npy file (bad magic)"));
    }
    if bytes.len() < 10 {
        return Err(corrupt(path, "truncated .npy header"));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(corrupt(path, "truncated .npy header"));
            }
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12usize)
        }
        _ => return Err(incompatible(path, format!("unsupported .npy format version {major}.{minor}"))),
    };
    if header_len > MAX_HEADER_LEN {
        return Err(corrupt(path, format!("header length {header_len} is implausible")));
    }
    let end = start + header_len;
    if (file_len as u128) < end as u128 {
        return Err(corrupt(path, "truncated .npy header"));
    }
    Ok(((major, minor), end))
}

/// Parse the header at the start of `bytes` (at least the whole header) for a file of
/// `file_len` bytes, checking the shape against the file length.
pub fn parse_header(bytes: &[u8], file_len: u64, path: &Path) -> Result<NpyHeader> {
    Ok(checked_header(bytes, file_len, path)?.0)
}

/// [`parse_header`], also returning ndarray-npy's parse (its type
/// descriptor reads the data).
fn checked_header(bytes: &[u8], file_len: u64, path: &Path) -> Result<(NpyHeader, Header)> {
    let (version, end) = header_extent(bytes, file_len, path)?;
    if bytes.len() < end {
        return Err(corrupt(path, "truncated .npy header"));
    }
    let header = parse_dict(&bytes[..end], path)?;
    let descr = header
        .type_descriptor
        .as_string()
        .ok_or_else(|| incompatible(path, format!("unsupported dtype {} (facematch reads '<f4', '<u4', '<i8')", header.type_descriptor)))?;
    let dtype = NpyDtype::from_descr(descr).ok_or_else(|| {
        incompatible(
            path,
            format!("unsupported dtype {descr:?} (facematch reads '<f4', '<u4', '<i8'; numpy: a.astype('float32') for embeddings)"),
        )
    })?;
    if header.layout.is_fortran() {
        return Err(incompatible(path, "Fortran-order arrays are not supported (save with C order)"));
    }
    let shape = header.shape.clone();
    if shape.is_empty() || shape.len() > 2 {
        return Err(incompatible(path, format!("expected a 1-D or 2-D array, got shape {shape:?}")));
    }
    let n_bytes = shape
        .iter()
        .try_fold(dtype.size() as u128, |acc, &d| acc.checked_mul(d as u128))
        .ok_or_else(|| corrupt(path, format!("shape {shape:?} overflows")))?;
    let data_len = file_len as u128 - end as u128;
    if data_len < n_bytes {
        return Err(corrupt(path, format!("truncated: shape {shape:?} needs {n_bytes} data bytes, file has {data_len}")));
    }
    if data_len > n_bytes {
        return Err(corrupt(path, format!("{} trailing bytes after the data of shape {shape:?}", data_len - n_bytes)));
    }
    if n_bytes > usize::MAX as u128 / 2 {
        return Err(corrupt(path, format!("shape {shape:?} too large for this platform")));
    }
    Ok((NpyHeader { version, dtype, shape, data_offset: end }, header))
}

/// The header's dictionary (descr, fortran_order, shape), parsed by
/// ndarray-npy from the whole header (`header`: magic to newline, its
/// prefix already checked by [`header_extent`]).
fn parse_dict(header: &[u8], path: &Path) -> Result<Header> {
    let err = match Header::from_reader(&mut &header[..]) {
        Ok(h) => return Ok(h),
        Err(e) => e,
    };
    if let Some(filtered) = without_long_suffix(header) {
        if let Ok(h) = Header::from_reader(&mut &filtered[..]) {
            return Ok(h);
        }
    }
    let start = if header.get(6) == Some(&1) { 10 } else { 12 };
    let text = String::from_utf8_lossy(header.get(start..).unwrap_or_default());
    Err(match err {
        ReadHeaderError::Parse(ParseHeaderError::MagicString) => incompatible(path, "not a .npy file (bad magic)"),
        ReadHeaderError::Parse(ParseHeaderError::Version { major, minor }) => {
            incompatible(path, format!("unsupported .npy format version {major}.{minor}"))
        }
        ReadHeaderError::Parse(e) => corrupt(path, format!("malformed header {text:?}: {e}")),
        ReadHeaderError::Io(_) => corrupt(path, "truncated .npy header"),
    })
}

/// Python 2's numpy wrote dimensions as longs (`(2L,)`), which
/// ndarray-npy's parser refuses; numpy's reader drops the suffix
/// (`np.lib.format._filter_header`), and so does this: the header with
/// every `L` right after a digit (and before `,`, `)` or a space) removed,
/// its length field updated; `None` if there is none.
fn without_long_suffix(header: &[u8]) -> Option<Vec<u8>> {
    let start = if header.get(6) == Some(&1) { 10 } else { 12 };
    let text = header.get(start..)?;
    let mut out = Vec::with_capacity(text.len());
    for (i, &c) in text.iter().enumerate() {
        let after_digit = i > 0 && text[i - 1].is_ascii_digit();
        let before_end = matches!(text.get(i + 1), Some(b',' | b')' | b' '));
        if !(c == b'L' && after_digit && before_end) {
            out.push(c);
        }
    }
    if out.len() == text.len() {
        return None;
    }
    let mut h = header.get(..start)?.to_vec();
    if start == 10 {
        h[8..10].copy_from_slice(&u16::try_from(out.len()).ok()?.to_le_bytes());
    } else {
        h[8..12].copy_from_slice(&u32::try_from(out.len()).ok()?.to_le_bytes());
    }
    h.extend_from_slice(&out);
    Some(h)
}

/// Read and validate the header of the file at `path`.
pub fn read_header(path: impl AsRef<Path>) -> Result<NpyHeader> {
    let path = path.as_ref();
    let mut f = crate::fs::open_input(path)?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    Ok(read_header_from(&mut f, file_len, path)?.0)
}

fn read_header_from(f: &mut File, file_len: u64, path: &Path) -> Result<(NpyHeader, Header)> {
    let mut head = vec![0u8; 12.min(file_len as usize)];
    f.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
    // The fixed part tells how long the header is (bounded before it is read).
    let (_, end) = header_extent(&head, file_len, path)?;
    let mut full = head;
    if end > full.len() {
        let have = full.len();
        full.resize(end, 0);
        f.read_exact(&mut full[have..]).map_err(|e| Error::io(path, e))?;
    }
    checked_header(&full[..end], file_len, path)
}

/// Read a whole 1-D or 2-D array of `T`; returns its shape and elements.
pub fn read_array<T: NpyElement>(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<T>)> {
    let path = path.as_ref();
    let mut f = crate::fs::open_input(path)?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let (h, header) = read_header_from(&mut f, file_len, path)?;
    if h.dtype != T::DTYPE {
        return Err(incompatible(
            path,
            format!("dtype is {:?}, expected {:?}", h.dtype.descr(), T::DTYPE.descr())
                + if T::DTYPE == NpyDtype::F32 { " (numpy: a.astype('float32'))" } else { "" },
        ));
    }
    // The shape was checked against the file's length: ndarray-npy
    // allocates no more than the file holds.
    f.seek(SeekFrom::Start(h.data_offset as u64)).map_err(|e| Error::io(path, e))?;
    let data = T::read_to_end_exact_vec(&mut f, &header.type_descriptor, h.len()).map_err(|e| match e {
        ReadDataError::Io(e) => Error::io(path, e),
        ReadDataError::MissingData => corrupt(path, "file shrank while being read"),
        other => corrupt(path, format!("file changed while being read: {other}")),
    })?;
    Ok((h.shape, data))
}

/// A row-major matrix of f32 read into memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns (the embedding dimension).
    pub cols: usize,
    /// `rows * cols` values, row-major.
    pub data: Vec<f32>,
}

impl Matrix {
    /// Row `i` (panics if `i >= rows`, like slice indexing).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// Read a 2-D `<f4` array (e.g. a gallery of embeddings).
pub fn read_f32_matrix(path: impl AsRef<Path>) -> Result<Matrix> {
    let path = path.as_ref();
    let (shape, data) = read_array::<f32>(path)?;
    match shape[..] {
        [rows, cols] => Ok(Matrix { rows, cols, data }),
        _ => Err(incompatible(path, format!("expected a 2-D array, got shape {shape:?}"))),
    }
}

fn read_vec<T: NpyElement>(path: &Path) -> Result<Vec<T>> {
    let (shape, data) = read_array::<T>(path)?;
    if shape.len() != 1 {
        return Err(incompatible(path, format!("expected a 1-D array, got shape {shape:?}")));
    }
    Ok(data)
}

/// Read a 1-D `<u4` array (e.g. identity labels).
pub fn read_u32_vec(path: impl AsRef<Path>) -> Result<Vec<u32>> {
    read_vec(path.as_ref())
}

/// Read a 1-D `<i8` array (e.g. labels with -1 for "not enrolled").
pub fn read_i64_vec(path: impl AsRef<Path>) -> Result<Vec<i64>> {
    read_vec(path.as_ref())
}

/// Write a 1-D or 2-D array of `T` with the given shape, atomically
/// (header and data by ndarray-npy into a temporary file, synced, renamed).
pub fn write_array<T: NpyElement>(path: impl AsRef<Path>, shape: &[usize], data: &[T]) -> Result<()> {
    let path = path.as_ref();
    if shape.is_empty() || shape.len() > 2 {
        return Err(Error::config("npy.shape", format!("must have 1 or 2 dimensions, got {shape:?}")));
    }
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n != Some(data.len()) {
        return Err(Error::config("npy.shape", format!("shape {shape:?} does not match {} elements ({})", data.len(), path.display())));
    }
    let view = ArrayViewD::from_shape(IxDyn(shape), data).map_err(|e| Error::config("npy.shape", format!("{shape:?}: {e}")))?;
    let tmp = tmp_path(path);
    let result = (|| {
        let f = crate::fs::create_output(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        view.write_npy(&mut w).map_err(|e| match e {
            WriteNpyError::Io(e) => Error::io(&tmp, e),
            other => Error::io(&tmp, std::io::Error::other(other)),
        })?;
        let f = w.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Write `rows x cols` f32 values (row-major) as a 2-D `<f4` array.
pub fn write_f32_matrix(path: impl AsRef<Path>, data: &[f32], rows: usize, cols: usize) -> Result<()> {
    write_array(path, &[rows, cols], data)
}

/// Write a 1-D `<u4` array.
pub fn write_u32_vec(path: impl AsRef<Path>, data: &[u32]) -> Result<()> {
    write_array(path, &[data.len()], data)
}

/// Write a 1-D `<i8` array.
pub fn write_i64_vec(path: impl AsRef<Path>, data: &[i64]) -> Result<()> {
    write_array(path, &[data.len()], data)
}

/// The header of an open `.npy` that must hold a 2-D `<f4` array, and the file's length.
fn f32_matrix_header(f: &mut File, path: &Path) -> Result<(NpyHeader, u64)> {
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let (h, _) = read_header_from(f, file_len, path)?;
    if h.dtype != NpyDtype::F32 || h.shape.len() != 2 {
        return Err(incompatible(path, format!("expected a 2-D '<f4' array, got {:?} with shape {:?}", h.dtype.descr(), h.shape)));
    }
    Ok((h, file_len))
}

/// A 2-D `<f4` file read a block of rows at a time: a bulk import of
/// millions of rows holds one block, not the file (`facematch import`).
#[derive(Debug)]
pub struct F32Rows {
    file: File,
    path: PathBuf,
    data_offset: u64,
    rows: usize,
    cols: usize,
    next: usize,
    buf: Vec<u8>,
}

impl F32Rows {
    /// Open `path` and validate its header (a regular file, `<f4`, 2-D, C order, long enough).
    pub fn open(path: impl AsRef<Path>) -> Result<F32Rows> {
        let path = path.as_ref();
        let mut file = crate::fs::open_input(path)?;
        let (h, _) = f32_matrix_header(&mut file, path)?;
        let mut r = F32Rows {
            file,
            path: path.to_path_buf(),
            data_offset: h.data_offset as u64,
            rows: h.shape[0],
            cols: h.shape[1],
            next: 0,
            buf: Vec::new(),
        };
        r.rewind()?;
        Ok(r)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Back to the first row.
    pub fn rewind(&mut self) -> Result<()> {
        self.file.seek(SeekFrom::Start(self.data_offset)).map_err(|e| Error::io(&self.path, e))?;
        self.next = 0;
        Ok(())
    }

    /// The next up to `n` rows, row-major (empty at the end). A file cut
    /// short since it was opened is [`Error::DataCorruption`].
    pub fn next_block(&mut self, n: usize) -> Result<Vec<f32>> {
        let take = n.min(self.rows - self.next);
        let bytes = take * self.cols * 4;
        self.buf.resize(bytes, 0);
        self.file.read_exact(&mut self.buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                corrupt(&self.path, format!("the file ends before row {} (it changed while being read)", self.next + take))
            } else {
                Error::io(&self.path, e)
            }
        })?;
        self.next += take;
        Ok(self.buf.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// A 2-D `<f4` file mapped into memory: gigabyte galleries without a copy.
///
/// The mapping assumes nobody truncates or rewrites the file while it is
/// mapped (facematch only maps files it wrote itself or benchmark data);
/// [`write_array`] replaces files by rename, which leaves a live mapping valid.
#[derive(Debug)]
pub struct MmapMatrix {
    map: memmap2::Mmap,
    offset: usize,
    rows: usize,
    cols: usize,
}

impl MmapMatrix {
    /// Map `path` after validating its header; refuses files whose data is not 4-byte aligned.
    pub fn open(path: impl AsRef<Path>) -> Result<MmapMatrix> {
        let path = path.as_ref();
        if cfg!(target_endian = "big") {
            return Err(incompatible(path, "memory-mapping little-endian .npy needs a little-endian CPU"));
        }
        let mut f = crate::fs::open_input(path)?;
        let (h, file_len) = f32_matrix_header(&mut f, path)?;
        // SAFETY: the file is opened read-only; see the type-level note on concurrent modification.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        if map.len() as u64 != file_len {
            return Err(corrupt(path, "file changed size while being opened"));
        }
        let m = MmapMatrix { map, offset: h.data_offset, rows: h.shape[0], cols: h.shape[1] };
        if m.try_slice().is_none() {
            return Err(incompatible(path, "data offset is not 4-byte aligned; use read_f32_matrix"));
        }
        Ok(m)
    }

    fn try_slice(&self) -> Option<&[f32]> {
        let bytes = &self.map[self.offset..self.offset + self.rows * self.cols * 4];
        // SAFETY: every bit pattern is a valid f32; align_to only yields aligned elements.
        let (pre, mid, post) = unsafe { bytes.align_to::<f32>() };
        (pre.is_empty() && post.is_empty()).then_some(mid)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// All values, row-major.
    pub fn as_slice(&self) -> &[f32] {
        self.try_slice().unwrap_or(&[])
    }
    /// Row `i`, or `None` past the end.
    pub fn row(&self, i: usize) -> Option<&[f32]> {
        (i < self.rows).then(|| &self.as_slice()[i * self.cols..(i + 1) * self.cols])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn v1(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut h = dict.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn round_trip_all_types() {
        let dir = tempfile::tempdir().unwrap();
        let m: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        write_f32_matrix(dir.path().join("m.npy"), &m, 4, 3).unwrap();
        let back = read_f32_matrix(dir.path().join("m.npy")).unwrap();
        assert_eq!((back.rows, back.cols, &back.data), (4, 3, &m));
        let u = vec![0u32, 7, u32::MAX];
        write_u32_vec(dir.path().join("u.npy"), &u).unwrap();
        assert_eq!(read_u32_vec(dir.path().join("u.npy")).unwrap(), u);
        let i = vec![-1i64, 0, i64::MAX];
        write_i64_vec(dir.path().join("i.npy"), &i).unwrap();
        assert_eq!(read_i64_vec(dir.path().join("i.npy")).unwrap(), i);
        let h = read_header(dir.path().join("m.npy")).unwrap();
        assert_eq!(h.data_offset % ALIGN, 0);
        assert_eq!(h.version, (1, 0));
        let mm = MmapMatrix::open(dir.path().join("m.npy")).unwrap();
        assert_eq!(mm.as_slice(), &m[..]);
        assert_eq!(mm.row(3), Some(&m[9..12]));
        assert_eq!(mm.row(4), None);
    }

    #[test]
    fn empty_arrays() {
        let dir = tempfile::tempdir().unwrap();
        write_f32_matrix(dir.path().join("e.npy"), &[], 0, 128).unwrap();
        let m = read_f32_matrix(dir.path().join("e.npy")).unwrap();
        assert_eq!((m.rows, m.cols, m.data.len()), (0, 128, 0));
        write_u32_vec(dir.path().join("e1.npy"), &[]).unwrap();
        assert!(read_u32_vec(dir.path().join("e1.npy")).unwrap().is_empty());
    }

    #[test]
    fn version_2_header_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }";
        let mut h = dict.to_string();
        while !(12 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[2, 0]);
        b.extend_from_slice(&(h.len() as u32).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(&1.5f32.to_le_bytes());
        b.extend_from_slice(&(-2.0f32).to_le_bytes());
        let p = raw(dir.path(), "v2.npy", &b);
        let m = read_f32_matrix(&p).unwrap();
        assert_eq!(m.data, vec![1.5, -2.0]);
        assert_eq!(read_header(&p).unwrap().version, (2, 0));
    }

    #[test]
    fn writer_refuses_wrong_shape() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        assert!(matches!(write_f32_matrix(&p, &[1.0; 5], 2, 3), Err(Error::InvalidConfig { .. })));
        assert!(matches!(write_array::<f32>(&p, &[], &[]), Err(Error::InvalidConfig { .. })));
        assert!(!p.exists());
    }

    #[test]
    fn malformed_files_give_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let data8 = [0u8; 8];
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "corrupt"),
            ("not_npy", b"hello world, not numpy".to_vec(), "incompatible"),
            ("short_magic", MAGIC[..4].to_vec(), "corrupt"),
            (
                "bad_version",
                {
                    let mut b = v1("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", &data8);
                    b[6] = 9;
                    b
                },
                "incompatible",
            ),
            (
                "huge_header_len",
                {
                    let mut b = v1("{}", &[]);
                    b[8] = 0xff;
                    b[9] = 0xff;
                    b
                },
                "corrupt",
            ),
            ("f8", v1("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", &data8), "incompatible"),
            ("big_endian", v1("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", &data8), "incompatible"),
            ("fortran", v1("{'descr': '<f4', 'fortran_order': True, 'shape': (1, 2), }", &data8), "incompatible"),
            ("3d", v1("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2), }", &data8), "incompatible"),
            ("scalar", v1("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", &data8[..4]), "incompatible"),
            ("truncated_data", v1("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", &data8), "corrupt"),
            ("trailing_data", v1("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", &data8), "corrupt"),
            ("overflow", v1("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999, 99999999999), }", &data8), "corrupt"),
            ("huge_dim", v1("{'descr': '<f4', 'fortran_order': False, 'shape': (999999999999999999999999,), }", &data8), "corrupt"),
            ("no_shape", v1("{'descr': '<f4', 'fortran_order': False, }", &data8), "corrupt"),
            ("garbage_dict", v1("{'descr': <f4, 'fortran_order': False, 'shape': (2,), }", &data8), "corrupt"),
            ("unterminated", v1("{'descr': '<f4", &data8), "corrupt"),
            ("extra_key", v1("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", &data8), "corrupt"),
            ("truncated_header", v1("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", &[])[..30].to_vec(), "corrupt"),
        ];
        for (name, bytes, want) in cases {
            let p = raw(d, &format!("{name}.npy"), &bytes);
            let err = read_array::<f32>(&p).expect_err(name);
            let ok = match want {
                "corrupt" => matches!(&err, Error::DataCorruption { path, .. } if path == &p),
                _ => matches!(&err, Error::BadInputFile { path, .. } if path == &p),
            };
            assert!(ok, "{name}: {err}");
            assert!(MmapMatrix::open(&p).is_err(), "{name}");
            assert!(read_header(&p).is_err(), "{name}");
        }
        // wrong dtype for the reader
        let p = d.join("u.npy");
        write_u32_vec(&p, &[1, 2]).unwrap();
        assert!(matches!(read_f32_matrix(&p), Err(Error::BadInputFile { .. })));
        assert!(matches!(MmapMatrix::open(&p), Err(Error::BadInputFile { .. })));
        // 1-D where 2-D is expected and vice versa
        let p = d.join("f1.npy");
        write_array::<f32>(&p, &[2], &[1.0, 2.0]).unwrap();
        assert!(matches!(read_f32_matrix(&p), Err(Error::BadInputFile { .. })));
        let p = d.join("u2.npy");
        write_array::<u32>(&p, &[1, 2], &[1, 2]).unwrap();
        assert!(matches!(read_u32_vec(&p), Err(Error::BadInputFile { .. })));
        // missing file is an I/O error with the path
        assert!(matches!(read_f32_matrix(d.join("missing.npy")), Err(Error::Io { .. })));
    }

    #[test]
    fn float64_is_refused_with_the_numpy_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = raw(dir.path(), "f8.npy", &v1("{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1), }", &[0u8; 8]));
        for err in [read_f32_matrix(&p).unwrap_err(), F32Rows::open(&p).unwrap_err(), MmapMatrix::open(&p).unwrap_err()] {
            assert!(matches!(&err, Error::BadInputFile { path, reason } if path == &p && reason.contains("astype('float32')")), "{err}");
        }
    }

    #[test]
    fn invalid_utf8_header() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = v1("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", &[0u8; 8]);
        b[12] = 0xff;
        let p = raw(dir.path(), "x.npy", &b);
        assert!(matches!(read_array::<f32>(&p), Err(Error::DataCorruption { .. })));
    }

    #[test]
    fn python_style_headers() {
        // double quotes, Python-2 long suffix, no trailing comma, extra spaces
        let dir = tempfile::tempdir().unwrap();
        let b = v1("{ \"descr\" : \"<u4\", \"shape\" : (2L,) , \"fortran_order\" : False }", &[1, 0, 0, 0, 2, 0, 0, 0]);
        let p = raw(dir.path(), "py.npy", &b);
        assert_eq!(read_u32_vec(&p).unwrap(), vec![1, 2]);
    }

    /// Round trip with real numpy when the project venv has it (skipped otherwise).
    #[test]
    fn numpy_interop() {
        let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
        let has_numpy = std::process::Command::new(&py).args(["-c", "import numpy"]).output().map(|o| o.status.success()).unwrap_or(false);
        if !has_numpy {
            eprintln!("skipping numpy_interop: no numpy in {}", py.display());
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mine: Vec<f32> = (0..15).map(|i| (i as f32).sin()).collect();
        write_f32_matrix(d.join("rust_f.npy"), &mine, 5, 3).unwrap();
        write_i64_vec(d.join("rust_i.npy"), &[-1, 5, 1 << 40]).unwrap();
        let script = r#"
import sys, numpy as np
d = sys.argv[1]
f = np.load(d + "/rust_f.npy")
assert f.dtype == np.float32 and f.shape == (5, 3), (f.dtype, f.shape)
assert np.allclose(f.ravel(), np.sin(np.arange(15)), atol=1e-6)
i = np.load(d + "/rust_i.npy")
assert i.dtype == np.int64 and list(i) == [-1, 5, 1 << 40]
np.save(d + "/np_f.npy", (np.arange(24, dtype=np.float32) / 7).reshape(6, 4))
np.save(d + "/np_u.npy", np.array([3, 1, 4, 1, 5], dtype=np.uint32))
np.save(d + "/np_i.npy", np.array([-1, 2], dtype=np.int64))
np.save(d + "/np_fortran.npy", np.asfortranarray(np.ones((3, 2), dtype=np.float32)))
np.save(d + "/np_f8.npy", np.ones((2, 2)))
with open(d + "/np_v2.npy", "wb") as fh:
    np.lib.format.write_array(fh, np.ones((2, 3), dtype=np.float32), version=(2, 0))
"#;
        let out = std::process::Command::new(&py).args(["-c", script, d.to_str().unwrap()]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let m = read_f32_matrix(d.join("np_f.npy")).unwrap();
        assert_eq!((m.rows, m.cols), (6, 4));
        assert_eq!(m.data, (0..24).map(|i| i as f32 / 7.0).collect::<Vec<_>>());
        assert_eq!(MmapMatrix::open(d.join("np_f.npy")).unwrap().as_slice(), &m.data[..]);
        assert_eq!(read_u32_vec(d.join("np_u.npy")).unwrap(), vec![3, 1, 4, 1, 5]);
        assert_eq!(read_i64_vec(d.join("np_i.npy")).unwrap(), vec![-1, 2]);
        assert!(matches!(read_f32_matrix(d.join("np_fortran.npy")), Err(Error::BadInputFile { .. })));
        assert!(matches!(read_f32_matrix(d.join("np_f8.npy")), Err(Error::BadInputFile { .. })));
        let v2 = read_f32_matrix(d.join("np_v2.npy")).unwrap();
        assert_eq!((v2.rows, v2.cols, v2.data), (2, 3, vec![1.0; 6]));
        assert_eq!(read_header(d.join("np_v2.npy")).unwrap().version, (2, 0));
    }
}
