//! One line of progress on stderr: rewritten in place on a terminal, appended otherwise.

use std::io::{IsTerminal, Write as _};
use std::sync::Mutex;
use std::time::Instant;

/// Progress of the run on stderr, with the elapsed time and the stage.
pub struct Progress {
    tty: bool,
    start: Instant,
    label: Mutex<String>,
}

impl Progress {
    /// Starts the clock.
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            label: Mutex::new(String::new()),
        }
    }

    /// Names what the following steps belong to (e.g. "run 1/3").
    pub fn stage(&self, label: String) {
        *self.label.lock().unwrap_or_else(|e| e.into_inner()) = label;
    }

    /// Shows one step.
    pub fn step(&self, what: &str) {
        let label = self.label.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let t = self.start.elapsed().as_secs();
        let line = format!("[{:>2}:{:02}] {label} {what}", t / 60, t % 60);
        if self.tty {
            let mut e = std::io::stderr();
            let _ = write!(e, "\r\x1b[2K{line}");
            let _ = e.flush();
        } else {
            eprintln!("{line}");
        }
    }

    /// Ends the progress line.
    pub fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
