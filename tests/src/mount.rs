//! A small tmpfs mounted for one test, so a test can fill the disk under a
//! real process. Tests run as root; a refused mount is an error that names
//! the kernel's answer (never a silent skip).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// A mounted tmpfs; lazily unmounted on drop (the processes using it may
/// still hold files open).
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `24m`) at `path`, creating the directory.
    pub fn mount(path: &Path, size: &str) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(path).with_context(|| format!("mkdir {}", path.display()))?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .context("running mount(8)")?;
        if !out.status.success() {
            bail!(
                "MOUNT REFUSED: cannot mount a {size} tmpfs at {} for the disk-full test (tests must run as root with CAP_SYS_ADMIN): {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    /// Writes `name` in 64 KiB steps until the file system is full; returns
    /// its path and size.
    pub fn fill(&self, name: &str) -> anyhow::Result<(PathBuf, u64)> {
        let path = self.path.join(name);
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0xA5u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => return Err(e).context("filling the tmpfs"),
            }
        }
        // Partial last pages: fill byte by byte.
        while let Ok(1) = f.write(&chunk[..1]) {
            written += 1;
        }
        Ok((path, written))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
