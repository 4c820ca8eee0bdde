//! One error type for everything the engine can reject; Python sees it as `ValueError`.
use std::fmt;
use std::path::Path;

/// A problem with the data or the request, as one line that names the file when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError(pub String);

impl DataError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }

    /// An error about `path`: "<path>: <msg>".
    pub fn at(path: &Path, msg: impl fmt::Display) -> Self {
        Self(format!("{}: {msg}", path.display()))
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}

pub type Result<T> = std::result::Result<T, DataError>;
