//! The service's error, named by meaning; `http::error` maps it to a status.
//!
//! Client errors carry the sentence the client sees (what is wrong and what to do);
//! `Internal` carries the cause for the log only: the client gets a fixed message
//! naming the request id.

/// A failed operation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed or asks for something unsupported (400).
    BadRequest(String),
    /// No valid token (401).
    Unauthorized,
    /// The caller may not do this (403).
    Forbidden(String),
    /// No such resource visible to the caller (404).
    NotFound(String),
    /// The resource is in a state that does not allow this now (409).
    Conflict(String),
    /// The body is larger than allowed or than the space left (413).
    TooLarge(String),
    /// The request body's type is not the one the endpoint takes (415).
    UnsupportedMediaType(String),
    /// A `Range` outside the image of `size` bytes (416).
    RangeNotSatisfiable {
        /// The image's size.
        size: u64,
    },
    /// The service is shutting down (503).
    Unavailable(String),
    /// Our fault: the cause is logged, never sent (500).
    Internal(String),
}

impl Error {
    /// An internal error from any displayable cause.
    pub fn internal(e: impl std::fmt::Display) -> Error {
        Error::Internal(e.to_string())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::BadRequest(m)
            | Error::Forbidden(m)
            | Error::NotFound(m)
            | Error::Conflict(m)
            | Error::TooLarge(m)
            | Error::UnsupportedMediaType(m)
            | Error::Unavailable(m)
            | Error::Internal(m) => f.write_str(m),
            Error::Unauthorized => {
                f.write_str("The request you have made requires authentication.")
            }
            Error::RangeNotSatisfiable { size } => {
                write!(
                    f,
                    "requested range not satisfiable: the image has {size} bytes"
                )
            }
        }
    }
}

impl std::error::Error for Error {}

/// A result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
