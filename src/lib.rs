//! # facematch
//!
//! A face-embedding matching engine that a recognition server links in so that
//! the obligations of China's *Measures for the Security Management of Face
//! Recognition Technology Applications* hold by construction.
//!
//! The path of an image: [`image_io`] decodes it (limits, EXIF orientation),
//! [`detect`] finds every face (YuNet via ONNX Runtime), [`align`] warps each
//! face onto the 112x112 template, [`embed`] turns it into an L2-normalised
//! embedding (SFace), [`pipeline`] ties these together. The matching half
//! lives in [`index`] (exact SIMD scan and an HNSW graph), [`store`] (the
//! encrypted, crash-safe gallery files), [`compliance`] (purposes, consent,
//! retention), [`audit`] (hash-chained audit log) and [`engine`] (the
//! `Send + Sync` engine a server holds).
//!
//! See ARCHITECTURE.md for the map.
#![warn(missing_docs)]

pub mod error;
pub use error::{Error, Result};
pub mod failpoints;
pub mod fs;

// --- the vision half: image -> faces -> embeddings (src/vision/) ---
pub mod vision;
// Their historical paths (`facematch::detect`, ...), kept for callers.
pub use vision::{align, anonymise, detect, embed, image_io, letterbox, pipeline, runtime};
// --- image-level queries: vision + engine, the unrelated-faces rule ---
pub mod probe;

// --- matching ---
pub mod index;

pub mod npy;
pub mod synth;

// --- gallery, compliance, audit ---
pub mod audit;
pub mod calibration;
pub mod clock;
pub mod compliance;
pub mod config;
pub mod engine;
pub mod store;

// --- batch jobs over many inputs ---
pub mod batch;
