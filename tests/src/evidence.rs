//! The evidence tools as an auditor runs them: `verify-chain` on a stopped
//! ingest's data directory, `export-evidence`, and the offline `verify`.

use std::path::Path;
use std::process::Command;

use crate::procs::binary;

/// A tool's exit status and its stdout and stderr together.
pub struct Run {
    pub ok: bool,
    pub text: String,
}

fn run(cmd: &mut Command) -> anyhow::Result<Run> {
    let out = cmd.output()?;
    Ok(Run {
        ok: out.status.success(),
        text: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

pub fn verify_chain(data: &Path) -> anyhow::Result<Run> {
    run(Command::new(binary("guantong-ingest")?)
        .args(["verify-chain", "--data"])
        .arg(data))
}

/// Exports `gateway` over `from_ms..to_ms`; fails when the export does.
pub fn export(
    data: &Path,
    gateway: &str,
    from_ms: i64,
    to_ms: i64,
    out: &Path,
) -> anyhow::Result<()> {
    let r = run(Command::new(binary("guantong-ingest")?)
        .args(["export-evidence", "--data"])
        .arg(data)
        .args(["--gateway", gateway])
        .args(["--from", &from_ms.to_string(), "--to", &to_ms.to_string()])
        .arg("--out")
        .arg(out))?;
    anyhow::ensure!(r.ok, "export-evidence failed:\n{}", r.text);
    Ok(())
}

pub fn verify(bundle: &Path, kept_digests: Option<&Path>) -> anyhow::Result<Run> {
    let mut cmd = Command::new(binary("guantong-ingest")?);
    cmd.arg("verify").arg(bundle);
    if let Some(d) = kept_digests {
        cmd.arg("--digests").arg(d);
    }
    run(&mut cmd)
}
