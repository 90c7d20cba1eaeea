//! A Siemens S7 PLC for the tests and `bench-s7`: python-snap7's server (a
//! third-party S7comm implementation) running `tests/peers/s7_server.py`.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::mqtt::peers_python;

/// The S7 server on `port`, ready; killed when dropped.
pub struct Plc {
    child: Child,
    /// Kept open: a server writing to a closed pipe would die.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Plc {
    /// The test PLC (the script's data blocks), logging into `dir`.
    pub fn start(port: u16, dir: &Path) -> anyhow::Result<Plc> {
        Plc::start_with(port, &[], dir)
    }

    /// With the script's extra arguments (`BLOCKS SIZE` for the bench).
    pub fn start_with(port: u16, extra: &[String], dir: &Path) -> anyhow::Result<Plc> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/s7_server.py");
        let log = std::fs::File::create(dir.join(format!("s7-{port}.log")))?;
        let mut child = Command::new(peers_python()?)
            .arg(script)
            .arg(port.to_string())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut out = std::io::BufReader::new(out);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line)?;
        anyhow::ensure!(
            line.trim() == "ready",
            "the S7 server did not start: {line:?}"
        );
        Ok(Plc {
            child,
            _stdout: out,
        })
    }
}

impl Drop for Plc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
