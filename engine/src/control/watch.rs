//! Noticing that the config file changed: cheaply by its metadata on every poll, exactly by its
//! content hash when the metadata moved.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// Identifies a version of the config file cheaply.
#[derive(PartialEq, Eq, Clone)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    // metadata() follows symlinks, so a Kubernetes ConfigMap's "..data" swap is seen too.
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

/// The config file as last seen.
pub(super) struct ConfigFile {
    path: PathBuf,
    stamp: Option<FileStamp>,
    hash: Option<[u8; 32]>,
}

impl ConfigFile {
    /// Starts watching `path` from its current version (the one loaded at start).
    pub(super) fn new(path: &Path) -> Self {
        ConfigFile {
            path: path.to_owned(),
            stamp: stamp(path),
            hash: Self::hash(path),
        }
    }

    fn hash(path: &Path) -> Option<[u8; 32]> {
        std::fs::read(path).map(|b| Sha256::digest(&b).into()).ok()
    }

    /// Whether the file's content changed since the last call that said so; a file that
    /// cannot be read is logged and counts as unchanged (the previous config stays).
    pub(super) fn changed(&mut self) -> bool {
        let now = stamp(&self.path);
        if now == self.stamp {
            return false;
        }
        self.stamp = now;
        let Ok(bytes) = std::fs::read(&self.path) else {
            tracing::error!(config = %self.path.display(), "config file unreadable; keeping the previous config");
            return false;
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if Some(hash) == self.hash {
            return false;
        }
        self.hash = Some(hash);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_new_content_is_a_change() {
        let dir = std::env::temp_dir().join(format!("ringtun-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("config.yaml");
        std::fs::write(&path, "workloads: []\n").expect("write");
        let mut file = ConfigFile::new(&path);
        assert!(!file.changed(), "nothing happened");
        // Same bytes, new inode and time: the metadata moved, the content did not.
        std::fs::remove_file(&path).expect("remove");
        std::fs::write(&path, "workloads: []\n").expect("rewrite");
        assert!(!file.changed(), "same content");
        std::fs::write(&path, "services: []\n").expect("edit");
        assert!(file.changed(), "new content");
        assert!(!file.changed(), "reported once");
        std::fs::remove_file(&path).expect("remove");
        assert!(!file.changed(), "a missing file keeps the previous config");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
