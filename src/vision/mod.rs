//! The vision half: from image bytes to aligned faces and embeddings.
//!
//! [`image_io`] decodes (limits, EXIF orientation), [`detect`] finds every
//! face (YuNet via ONNX Runtime, its input fitted by [`letterbox`]),
//! [`align`] warps each face onto the 112x112 template, [`embed`] turns it
//! into an L2-normalised embedding (SFace),
//! [`pipeline`] ties these together; [`runtime`] loads ONNX Runtime once per
//! process; [`anonymise`] paints faces over in images that leave the engine.
//! Nothing here knows about galleries, purposes or audit records.

pub mod align;
pub mod anonymise;
pub mod detect;
pub mod embed;
pub mod image_io;
pub mod letterbox;
pub mod pipeline;
pub mod runtime;
