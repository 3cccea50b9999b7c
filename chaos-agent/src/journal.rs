//! The journal: what the agent is about to do and has done to processes and files, written under the state
//! directory (tmpfs) *before* anything is touched, so a restarted agent — or the guardian of a dead one — can undo
//! it. Network faults need no entry of their own: every kernel object of ours is recognisable and removed by the
//! network cleanup, and the rules expire in the kernel.
//!
//! The file is a JSON array rewritten atomically (write to a temporary file, rename) on every change.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use crate::procinfo::ProcInfo;

/// How to undo one fault.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Entry {
    /// Fault id.
    pub(crate) fault: String,
    /// Kind, for messages.
    pub(crate) kind: String,
    /// Wall-clock expiry (unix seconds).
    pub(crate) expires_at: f64,
    /// Stopped processes to SIGCONT.
    #[serde(default)]
    pub(crate) paused: Vec<ProcInfo>,
    /// Worker processes of resource faults to kill.
    #[serde(default)]
    pub(crate) workers: Vec<ProcInfo>,
    /// Files to delete (disk fill).
    #[serde(default)]
    pub(crate) files: Vec<PathBuf>,
    /// Whether the fault has network rules.
    #[serde(default)]
    pub(crate) network: bool,
}

/// The journal file.
pub(crate) struct Journal {
    path: PathBuf,
    entries: Mutex<Vec<Entry>>,
}

impl Journal {
    /// Opens the journal at `path` (an absent file is empty).
    pub(crate) fn open(path: &Path) -> Journal {
        Journal { path: path.to_owned(), entries: Mutex::new(Vec::new()) }
    }

    /// Entries left by an earlier run (read from disk).
    pub(crate) fn leftovers(&self) -> Vec<Entry> {
        read(&self.path)
    }

    /// Adds or replaces the entry of a fault, then writes the file.
    ///
    /// # Errors
    /// When the file cannot be written (the caller must not touch anything then).
    pub(crate) fn put(&self, entry: Entry) -> std::io::Result<()> {
        let mut entries = self.entries.lock().expect("poisoned");
        entries.retain(|e| e.fault != entry.fault);
        entries.push(entry);
        write(&self.path, &entries)
    }

    /// Removes the entry of a fault.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub(crate) fn remove(&self, fault: &str) -> std::io::Result<()> {
        let mut entries = self.entries.lock().expect("poisoned");
        let before = entries.len();
        entries.retain(|e| e.fault != fault);
        if entries.len() == before {
            return Ok(());
        }
        write(&self.path, &entries)
    }

    /// Empties the journal.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub(crate) fn clear(&self) -> std::io::Result<()> {
        let mut entries = self.entries.lock().expect("poisoned");
        entries.clear();
        write(&self.path, &entries)
    }

    /// Current entries.
    pub(crate) fn entries(&self) -> Vec<Entry> {
        self.entries.lock().expect("poisoned").clone()
    }
}

/// Reads a journal file (missing or unreadable = empty).
pub(crate) fn read(path: &Path) -> Vec<Entry> {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn write(path: &Path, entries: &[Entry]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        // Root's eyes only: it names processes and files the agent acts on.
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(entries).expect("plain data"))?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_reopen_and_are_removed_individually() {
        let dir = std::env::temp_dir().join(format!("chaos-journal-{}", std::process::id()));
        let path = dir.join("journal.json");
        let j = Journal::open(&path);
        let entry = |id: &str| Entry {
            fault: id.into(),
            kind: "pause".into(),
            expires_at: 1.0,
            paused: vec![],
            workers: vec![],
            files: vec![],
            network: false,
        };
        j.put(entry("a")).unwrap();
        j.put(entry("b")).unwrap();
        j.remove("a").unwrap();
        let again = Journal::open(&path);
        assert_eq!(again.leftovers(), vec![entry("b")]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
