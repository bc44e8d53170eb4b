//! The agent's copy of the last configuration it applied: the signed envelope as received,
//! written atomically (a temporary file, fsync, rename, fsync of the directory), so a crash
//! leaves the old copy or the new one, never half of one. On start it goes through the same
//! signature, pool and generation checks as a configuration from the wire.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::envelope::Envelope;

/// The cache file's name in `--cache-dir`.
pub const FILE: &str = "config.envelope.json";

/// The cache in a directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// Creates the directory (owner-only on Unix) when it does not exist.
    pub fn open(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("--cache-dir {}: cannot create it: {e}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The cached envelope; `Ok(None)` when there is none yet. A file that is not an envelope
    /// at all is an error (it is reported and not used).
    pub fn read(&self) -> Result<Option<Envelope>, String> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{} is not a configuration envelope: {e}", path.display()))
    }

    /// Replaces the cached envelope atomically.
    pub fn write(&self, envelope: &Envelope) -> Result<(), String> {
        let path = self.path();
        let tmp = self.dir.join(format!(".{FILE}.tmp"));
        let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
        let bytes = serde_json::to_vec(envelope).expect("an envelope serialises");
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(&bytes).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(fail)?;
        // The rename itself survives a crash only once the directory is on disk.
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_envelope_reads_back_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("c")).unwrap();
        assert_eq!(cache.read().unwrap(), None);
        let env = Envelope {
            payload: "cA==".into(),
            signature: "cw==".into(),
            key_id: "k".into(),
        };
        cache.write(&env).unwrap();
        cache.write(&env).unwrap();
        assert_eq!(cache.read().unwrap(), Some(env));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("c"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [FILE]);
        std::fs::write(cache.path(), b"{not json").unwrap();
        assert!(cache
            .read()
            .unwrap_err()
            .contains("not a configuration envelope"));
    }
}
