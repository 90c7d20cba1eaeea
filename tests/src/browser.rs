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

/// Headless Chromium driven over WebDriver (chromedriver from Debian's
/// `chromium-driver`), for tests that measure what a reader sees: element
/// boxes, the rendered text, screenshots and printing. Scripts are injected
/// through the driver, so pages keep their no-inline-script CSP.
pub struct Browser {
    pub client: fantoccini::Client,
    _driver: crate::procs::Proc,
    profile: std::path::PathBuf,
}

impl Drop for Browser {
    /// Killing chromedriver leaves its Chromium running (a test that
    /// fails or returns early never closes the session): end every
    /// Chromium process of this profile too.
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .arg("-KILL")
            .arg("-f")
            .arg(format!("user-data-dir={}( |$)", self.profile.display()))
            .status();
    }
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium
    /// `width` px wide with its profile in `profile`.
    pub async fn start(profile: &Path, width: u32) -> anyhow::Result<Browser> {
        Browser::start_with(profile, width, serde_json::json!({})).await
    }

    /// A phone's screen `width` px wide (Chromium's mobile emulation: a
    /// desktop window is never narrower than 500 px).
    pub async fn phone(profile: &Path, width: u32) -> anyhow::Result<Browser> {
        let metrics = serde_json::json!({ "width": width, "height": 800, "pixelRatio": 1.0 });
        let emulation = serde_json::json!({ "mobileEmulation": { "deviceMetrics": metrics } });
        Browser::start_with(profile, 600, emulation).await
    }

    /// `start`, with `extra` merged into `goog:chromeOptions`.
    async fn start_with(
        profile: &Path,
        width: u32,
        extra: serde_json::Value,
    ) -> anyhow::Result<Browser> {
        let exe = ["chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no chromedriver found: install it (Debian/Ubuntu: `sudo apt-get install chromium-driver`); ./test.sh does this"
                )
            })?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        std::fs::create_dir_all(profile)?;
        let driver = crate::procs::Proc::spawn(
            "chromedriver",
            Command::new(exe).arg(format!("--port={port}")),
            &profile.with_extension("chromedriver.log"),
        )?;
        let mut options = serde_json::json!({
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--hide-scrollbars", "--force-device-scale-factor=1",
                format!("--window-size={width},1000"),
                format!("--user-data-dir={}", profile.display()),
            ]
        });
        if let (Some(o), serde_json::Value::Object(extra)) = (options.as_object_mut(), extra) {
            o.extend(extra);
        }
        let caps: serde_json::Map<String, serde_json::Value> =
            serde_json::from_value(serde_json::json!({ "goog:chromeOptions": options }))?;
        let url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let client = loop {
            match fantoccini::ClientBuilder::new(
                hyper_util::client::legacy::connect::HttpConnector::new(),
            )
            .capabilities(caps.clone())
            .connect(&url)
            .await
            {
                Ok(c) => break c,
                Err(e) if std::time::Instant::now() > deadline => {
                    anyhow::bail!("chromedriver on {url} did not start a session: {e}")
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        };
        Ok(Browser {
            client,
            _driver: driver,
            profile: profile.to_path_buf(),
        })
    }

    /// Opens `url` and resizes the window to the page's full height, so
    /// that a screenshot shows all of it.
    pub async fn open(&self, url: &str) -> anyhow::Result<()> {
        self.client.goto(url).await?;
        let h = self
            .eval("return document.documentElement.scrollHeight")
            .await?
            .as_u64()
            .unwrap_or(1000);
        let (w, _) = self.client.get_window_size().await?;
        self.client
            .set_window_size(w as u32, (h as u32).clamp(600, 16_000))
            .await?;
        Ok(())
    }

    /// Runs `script` (a function body; `arguments` empty) in the page.
    pub async fn eval(&self, script: &str) -> anyhow::Result<serde_json::Value> {
        Ok(self.client.execute(script, Vec::new()).await?)
    }

    /// A PNG of the window, written to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.client.screenshot().await?)?;
        Ok(())
    }
}
