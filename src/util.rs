//! Small shared helpers: atomic file output and where triaxkv keeps its cache.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// `$TRIAXKV_HOME`, or `~/.cache/triaxkv`.
pub fn triaxkv_home() -> PathBuf {
    if let Some(h) = std::env::var_os("TRIAXKV_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("triaxkv")
}

/// Write `path` atomically: the bytes go to a temporary file in the same folder, which is
/// renamed over `path` only once complete, so a failure never leaves a partial output. The
/// temporary name is unique per call (process id and a counter), so threads writing the same
/// path (kernel caches compiled on several GPUs at once) never share one.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut buf = io::BufWriter::new(file);
        write(&mut buf)?;
        let file = buf.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_nothing_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        let err = write_atomic(&out, |w| {
            w.write_all(b"partial")?;
            Err(io::Error::other("boom"))
        });
        assert!(err.is_err());
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_atomic(&out, |w| w.write_all(b"whole")).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "whole");
    }

    /// Threads writing one path at once each succeed, and the file ends as one of them wrote
    /// it whole (a shared temporary file would let one rename another's half-written bytes).
    #[test]
    fn concurrent_atomic_writes_of_one_path_stay_whole() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cubin");
        let blobs: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 1 << 16]).collect();
        std::thread::scope(|s| {
            for b in &blobs {
                let out = &out;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomic(out, |w| {
                            for c in b.chunks(4096) {
                                w.write_all(c)?;
                            }
                            Ok(())
                        })
                        .unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&out).unwrap();
        assert!(
            blobs.contains(&got),
            "a mixed or partial file of {} bytes",
            got.len()
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
