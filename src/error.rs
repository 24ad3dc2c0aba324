//! The one error type of facematch.
//!
//! Every fallible public function returns [`Result<T>`]. Variants carry the
//! context a caller needs to act (which file, which id, what was expected).
//! "No match" is never an error: it is a [`crate::compliance::Decision`].

use std::path::PathBuf;

/// `Result` with facematch's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in facematch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- configuration -------------------------------------------------------
    /// A configuration value is invalid.
    #[error("invalid configuration: {field}: {reason}")]
    InvalidConfig {
        /// Which field.
        field: String,
        /// Why it is invalid.
        reason: String,
    },

    // --- I/O -----------------------------------------------------------------
    /// An I/O error on a named path.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    // --- images & models -----------------------------------------------------
    /// The input image could not be decoded or is not acceptable.
    #[error("bad image{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    BadImage {
        /// Source path when known.
        path: Option<PathBuf>,
        /// Why it was refused.
        reason: String,
    },
    /// The image is larger than the configured limits (refused before allocating).
    #[error("image too large: {width}x{height} exceeds the limit of {max_pixels} pixels")]
    ImageTooLarge {
        /// Width claimed by the header.
        width: u32,
        /// Height claimed by the header.
        height: u32,
        /// Configured limit.
        max_pixels: u64,
    },
    /// ONNX Runtime could not be loaded or a model failed.
    #[error("model error ({model}): {reason}")]
    Model {
        /// Model file or id.
        model: String,
        /// What went wrong.
        reason: String,
    },

    // --- embeddings & index --------------------------------------------------
    /// An embedding has the wrong dimension.
    #[error("wrong embedding dimension: expected {expected}, got {got}")]
    WrongDimension {
        /// The gallery's dimension.
        expected: usize,
        /// The dimension received.
        got: usize,
    },
    /// An embedding contains NaN/inf or has zero norm.
    #[error("invalid embedding: {reason}")]
    InvalidEmbedding {
        /// What is wrong with it.
        reason: String,
    },

    // --- gallery -------------------------------------------------------------
    /// No such subject in the gallery.
    #[error("unknown subject {0:?}")]
    UnknownSubject(String),
    /// No such template in the gallery.
    #[error("unknown template {0}")]
    UnknownTemplate(u64),
    /// A template id is already in use.
    #[error("duplicate template id {0}")]
    DuplicateTemplate(u64),
    /// A store file is damaged (not a torn tail, which is repaired).
    #[error("data corruption in {path}: {reason}")]
    DataCorruption {
        /// The damaged file.
        path: PathBuf,
        /// What was found.
        reason: String,
    },
    /// A file is not a facematch file, or was written by an incompatible version.
    #[error("incompatible store {path}: {reason}")]
    IncompatibleStore {
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        reason: String,
    },
    /// The key is missing or does not open this store.
    #[error("key error: {0}")]
    Key(String),
    /// The gallery is locked by another process.
    #[error("store {0} is in use by another process")]
    Locked(PathBuf),
    /// A path inside a gallery (or a file the user named) is not what
    /// facematch may touch: a symbolic link, a hard-linked file, a FIFO, a
    /// device, a directory where a file belongs, or a leftover that
    /// facematch cannot prove its own. Nothing was read or written through it.
    #[error("refusing {path}: {reason}")]
    UnsafePath {
        /// The entry.
        path: PathBuf,
        /// What it is and why it is refused.
        reason: String,
    },
    /// An input file (embeddings `.npy`, a list, a CSV) is not of the kind or
    /// shape expected (e.g. float64 where float32 is needed).
    #[error("bad input file {path}: {reason}")]
    BadInputFile {
        /// The file.
        path: PathBuf,
        /// What is wrong and, where possible, how to fix it.
        reason: String,
    },
    /// An input file is larger than the limit for its kind (read no further).
    #[error("{path} is larger than the {limit}-byte limit for this kind of file")]
    InputTooLarge {
        /// The file.
        path: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },

    // --- compliance ----------------------------------------------------------
    /// A rule of the regulation forbids the operation.
    #[error("refused by policy ({rule}): {reason}")]
    PolicyViolation {
        /// The obligation that applies (e.g. "guardian-consent").
        rule: &'static str,
        /// Details.
        reason: String,
    },

    // --- audit ---------------------------------------------------------------
    /// The audit log failed verification.
    #[error("audit log tampered or damaged at record {seq}: {reason}")]
    AuditTampered {
        /// The first bad record's sequence number.
        seq: u64,
        /// What failed.
        reason: String,
    },
    /// An audit record could not be made durable (the query is not answered).
    #[error("audit write failed: {0}")]
    Audit(String),

    // --- misc ----------------------------------------------------------------
    /// The operation was cancelled through its cancel flag.
    #[error("cancelled")]
    Cancelled,
}

impl Error {
    /// Wrap an `io::Error` with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// Shorthand for [`Error::InvalidConfig`].
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig { field: field.into(), reason: reason.into() }
    }
}
