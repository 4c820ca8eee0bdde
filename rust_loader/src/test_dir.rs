//! A scratch directory for the unit tests, removed with everything in it when dropped, so
//! `cargo test` leaves nothing behind in the system's temp directory.

use std::ops::Deref;
use std::path::{Path, PathBuf};

pub(crate) struct TestDir(PathBuf);

impl TestDir {
    /// `<temp>/bulba-<tag>-<pid>`: unique per test (tag) and per test process (pid).
    pub(crate) fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("bulba-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TestDir(d)
    }
}

impl Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
