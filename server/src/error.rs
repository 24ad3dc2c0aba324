//! The server's errors: [`ServerError`] for starting and stopping, [`ApiError`]
//! for one request (an HTTP status, a stable kind and a message that names no
//! file and holds nothing the caller sent).

use facematch::Error;
use serde::Serialize;

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A setting is out of range.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address asked for.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The engine failed (opening, closing).
    #[error(transparent)]
    Engine(#[from] Error),
    /// A socket, runtime or thread operation failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// One request's failure, as the client sees it: `{"error": kind, "message": ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ApiError {
    /// HTTP status.
    #[serde(skip)]
    pub status: u16,
    /// Stable machine-readable kind (`bad_request`, `policy_violation`, ...).
    pub error: &'static str,
    /// For people.
    pub message: String,
}

impl ApiError {
    /// An error with `status`, `kind` and `message`.
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, error: kind, message: message.into() }
    }
    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "bad_request", message)
    }
    /// 401: no or unknown credentials.
    pub fn unauthorized() -> Self {
        ApiError::new(401, "unauthorized", "a valid `Authorization: Bearer TOKEN` is required")
    }
    /// 404: no such route.
    pub fn not_found(path: &str) -> Self {
        ApiError::new(404, "not_found", format!("no route {path}"))
    }
    /// 413: the body is larger than the server accepts.
    pub fn too_large(limit: u64) -> Self {
        ApiError::new(413, "payload_too_large", format!("request body larger than {limit} bytes"))
    }
    /// The JSON body of this error.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| br#"{"error":"internal"}"#.to_vec())
    }
}

impl From<Error> for ApiError {
    /// Map an engine error to a status. Errors about the server's own files
    /// (I/O, corruption, keys) become a 500 without the details, which go to
    /// the server's log instead: they name paths and say nothing the caller
    /// can act on.
    fn from(e: Error) -> Self {
        let (status, kind) = match &e {
            Error::InvalidConfig { .. } => (400, "invalid_argument"),
            Error::BadImage { .. } => (422, "bad_image"),
            Error::ImageTooLarge { .. } => (413, "image_too_large"),
            Error::WrongDimension { .. } => (422, "wrong_dimension"),
            Error::InvalidEmbedding { .. } => (422, "invalid_embedding"),
            Error::UnknownSubject(_) => (404, "unknown_subject"),
            Error::UnknownTemplate(_) => (404, "unknown_template"),
            Error::DuplicateTemplate(_) => (409, "duplicate_template"),
            Error::PolicyViolation { .. } => (403, "policy_violation"),
            Error::Audit(_) => (503, "audit_unavailable"),
            Error::Locked(_) => (503, "unavailable"),
            Error::Cancelled => (503, "cancelled"),
            _ => (500, "internal"),
        };
        if status >= 500 {
            tracing::error!(error = %e, "request failed");
            let message = match kind {
                "audit_unavailable" => "the audit record could not be made durable: not answered",
                _ => "internal error (see the server log)",
            };
            return ApiError::new(status, kind, message);
        }
        ApiError::new(status, kind, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_statuses_and_hide_paths() {
        let e: ApiError = Error::UnknownSubject("bob".into()).into();
        assert_eq!((e.status, e.error), (404, "unknown_subject"));
        let e: ApiError = Error::io("/secret/gallery/templates.log", std::io::Error::other("disk")).into();
        assert_eq!((e.status, e.error), (500, "internal"));
        assert!(!e.message.contains("secret"), "{}", e.message);
        let e: ApiError = Error::Audit("fsync failed".into()).into();
        assert_eq!(e.status, 503);
        let e: ApiError = Error::PolicyViolation { rule: "purpose", reason: "undeclared".into() }.into();
        assert_eq!((e.status, e.error), (403, "policy_violation"));
        let body: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(body["error"], "policy_violation");
    }
}
