//! A real browser for the tests of pages: headless Chromium, its DOM after
//! load, and what it logged to the console.

use std::path::Path;
use std::process::Command;

/// Opens `url` in headless Chromium; returns the DOM and the console errors.
pub fn chromium_dom(url: &str, profile: &Path) -> anyhow::Result<(String, Vec<String>)> {
    let exe = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no Chromium found: install it (Debian/Ubuntu: `sudo apt-get install chromium`); ./test.sh does this"
            )
        })?;
    let out = Command::new(exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let console: Vec<String> = stderr
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .map(str::to_string)
        .collect();
    if !out.status.success() {
        anyhow::bail!("chromium failed: {stderr}");
    }
    Ok((String::from_utf8(out.stdout)?, console))
}
