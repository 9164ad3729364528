//! Test-side helpers shared by the multi-process tests of `hypervisor/tests/process_cells.rs`
//! and the root package's `tests/process_cells.rs` (included there with `#[path]`): a
//! temporary directory and the lines of a child's output, waited for with a timeout.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

/// How long a test waits for a line before it fails with what it saw.
const LINE_GUARD: Duration = Duration::from_secs(10);

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("process-cells-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Lines of a child's stdout, read by a thread, received with a timeout.
pub struct Lines {
    /// Lines as they arrive.
    pub rx: Receiver<String>,
    pub seen: Vec<String>,
}

impl Lines {
    pub fn new(stdout: impl std::io::Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// The next line containing `needle` (other lines are kept in `seen`).
    pub fn expect(&mut self, needle: &str) -> String {
        loop {
            match self.rx.recv_timeout(LINE_GUARD) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    // The libtest harness of a re-executed cell may print before a reply on
                    // the same line: the reply starts at the needle.
                    if let Some(at) = line.find(needle) {
                        return line[at..].to_string();
                    }
                }
                Err(e) => panic!("waiting for `{needle}`: {e}; seen so far: {:#?}", self.seen),
            }
        }
    }
}
