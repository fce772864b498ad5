//! The one error type of vconvert. Every variant that comes from an image names the
//! file; errors about on-disk structures also name the structure and its byte offset.

use std::io;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of every vconvert crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call on a file failed.
    #[error("{file}: {action}: {source}")]
    Io {
        /// The file, as the user named it.
        file: String,
        /// What was being done, e.g. "read 4096 bytes at offset 0x1000".
        action: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// An on-disk structure is invalid.
    #[error("{file}: invalid {structure} at offset {offset:#x}: {reason}")]
    Corrupt {
        /// The file, as the user named it.
        file: String,
        /// The structure, e.g. "L2 table" or "grain directory".
        structure: &'static str,
        /// Byte offset of the structure (or the offending field) in the file.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The image uses a feature vconvert does not implement.
    #[error("{file}: {what} is not supported")]
    Unsupported {
        /// The file, as the user named it.
        file: String,
        /// The feature, e.g. "qcow2 incompatible feature 'extended L2'".
        what: String,
    },
    /// The image is refused by the caller's policy (e.g. untrusted input with a backing file).
    #[error("{file}: refused: {reason}")]
    Refused {
        /// The file, as the user named it.
        file: String,
        /// Why it was refused.
        reason: String,
    },
    /// A command-line or library argument is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The operation was cancelled through its cancellation token.
    #[error("operation cancelled")]
    Cancelled,
}

impl Error {
    /// An I/O error on `file` while doing `action`.
    pub fn io(file: impl Into<String>, action: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            file: file.into(),
            action: action.into(),
            source,
        }
    }

    /// An invalid `structure` at `offset` of `file`.
    pub fn corrupt(
        file: impl Into<String>,
        structure: &'static str,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            file: file.into(),
            structure,
            offset,
            reason: reason.into(),
        }
    }

    /// An unsupported feature of `file`.
    pub fn unsupported(file: impl Into<String>, what: impl Into<String>) -> Self {
        Error::Unsupported {
            file: file.into(),
            what: what.into(),
        }
    }

    /// A bad argument.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}
