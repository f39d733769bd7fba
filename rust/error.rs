//! The crate's error type: one enum, OS failures keep their errno.

use std::io;

/// Errors of the ksm core. `From<Error> for PyErr` lives in `py/` and keeps the errno.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed; `op` names it and the address range it was about.
    #[error("{op} at {addr:#x}+{len:#x}: {source}")]
    Os {
        op: &'static str,
        addr: usize,
        len: usize,
        source: io::Error,
    },
    /// A madvise-style error with the kernel's errno and our explanation.
    #[error("{msg}")]
    Errno { errno: i32, msg: String },
    /// A knob was given a value outside its accepted range (nothing changed).
    #[error("{0}")]
    Value(String),
    /// A knob or statistic name that does not exist.
    #[error("{0}")]
    Attribute(String),
    /// A call that this process's state does not allow now (e.g. joining a second
    /// merge domain); nothing changed.
    #[error("{0}")]
    State(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn errno(errno: i32, msg: impl Into<String>) -> Self {
        Error::Errno {
            errno,
            msg: msg.into(),
        }
    }

    pub fn os(op: &'static str, addr: usize, len: usize, source: io::Error) -> Self {
        Error::Os {
            op,
            addr,
            len,
            source,
        }
    }

    /// An OS error of an operation that is about no address range: `op: error`,
    /// with its errno.
    pub fn io(op: &str, e: io::Error) -> Self {
        Error::Errno {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            msg: format!("{op}: {e}"),
        }
    }

    /// The errno this error carries, if it is an OS-level one.
    pub fn raw_errno(&self) -> Option<i32> {
        match self {
            Error::Os { source, .. } => source.raw_os_error(),
            Error::Errno { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}
