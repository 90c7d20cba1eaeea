//! The cross-built gateways for the edge boxes (aarch64, armv7 hard float)
//! run under qemu-user: `check` passes on every shipped example config and
//! template, and values from a simulated Modbus device reach a real ingest on
//! loopback.
//!
//! The binaries: `GUANTONG_GATEWAY_AARCH64` / `GUANTONG_GATEWAY_ARMV7`, else
//! `target/<triple>/debug/guantong-gateway` (test.sh's "cross gateways under
//! qemu" step builds those). Each is checked to be an ELF of its
//! architecture, so a native binary cannot pass by mistake.
//! `GUANTONG_SKIP_CROSS=1` skips them, saying so.
//!
//! The armv7 gateway is the Modbus-only build (`--no-default-features`, the
//! one for the smallest boxes) unless `GUANTONG_CROSS_ARMV7=all`: a second
//! cross build of every protocol would cost CI minutes and test no code the
//! aarch64 one does not. For the Modbus-only build, `check` must refuse the
//! MQTT and OPC UA examples naming the missing feature for every such device
//! (and nothing else), and pass on the rest.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use guantong_e2e::procs::{GatewayProc, IngestProc, gateway_identity_of, gateway_toml, wait_for};
use guantong_e2e::sim::{SimDevice, standard_device_toml, standard_expected};

struct Arch {
    name: &'static str,
    triple: &'static str,
    /// ELF `e_machine`.
    machine: u16,
    qemu: &'static str,
    /// Where Debian's cross libc lives (`-L` for qemu's loader).
    sysroot: &'static str,
    env: &'static str,
}

const ARCHES: [Arch; 2] = [
    Arch {
        name: "aarch64",
        triple: "aarch64-unknown-linux-gnu",
        machine: 183,
        qemu: "qemu-aarch64-static",
        sysroot: "/usr/aarch64-linux-gnu",
        env: "GUANTONG_GATEWAY_AARCH64",
    },
    Arch {
        name: "armv7",
        triple: "armv7-unknown-linux-gnueabihf",
        machine: 40,
        qemu: "qemu-arm-static",
        sysroot: "/usr/arm-linux-gnueabihf",
        env: "GUANTONG_GATEWAY_ARMV7",
    },
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl Arch {
    /// The cross-built gateway, or None when the run skips cross tests.
    fn binary(&self) -> Option<PathBuf> {
        if std::env::var_os("GUANTONG_SKIP_CROSS").is_some_and(|v| v == "1") {
            eprintln!(
                "SKIPPED: {} gateway under qemu (GUANTONG_SKIP_CROSS=1)",
                self.name
            );
            return None;
        }
        let path = std::env::var_os(self.env)
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                workspace().join(format!("target/{}/debug/guantong-gateway", self.triple))
            });
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}: build it with `cargo build -p guantong-gateway --target {}` \
                 (./test.sh does), name it in {}, or set GUANTONG_SKIP_CROSS=1",
                path.display(),
                self.triple,
                self.env
            )
        });
        assert!(
            bytes.starts_with(b"\x7fELF")
                && bytes.len() > 20
                && u16::from_le_bytes([bytes[18], bytes[19]]) == self.machine,
            "{} is not an {} ELF binary",
            path.display(),
            self.name
        );
        Some(path)
    }

    /// Whether this arch's gateway is the Modbus-only build.
    fn modbus_only(&self) -> bool {
        self.name == "armv7" && std::env::var_os("GUANTONG_CROSS_ARMV7").is_none_or(|v| v != "all")
    }

    /// `binary` under qemu-user with Debian's cross libc.
    fn command(&self, binary: &Path) -> Command {
        let mut cmd = Command::new(self.qemu);
        cmd.arg("-L").arg(self.sysroot).arg(binary);
        cmd
    }
}

/// Protocols a Modbus-only build lacks, with the feature `check` names.
const NOT_IN_MODBUS_ONLY: [(&str, &str); 4] = [
    ("\"mqtt\"", "built without MQTT (the `mqtt` cargo feature)"),
    (
        "\"opcua\"",
        "built without OPC UA (the `opcua` cargo feature)",
    ),
    ("\"s7\"", "built without S7 (the `s7` cargo feature)"),
    (
        "\"dlt645\"",
        "built without DL/T 645 (the `dlt645` cargo feature)",
    ),
];

/// `check` on `config`: passes, or for a Modbus-only build refuses exactly
/// the devices of the protocols it lacks, naming the feature.
fn check_passes(arch: &Arch, binary: &Path, config: &Path) {
    let out = arch
        .command(binary)
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (apt-get install qemu-user-static)", arch.qemu));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(config).expect("config");
    let refused: Vec<(usize, &str)> = NOT_IN_MODBUS_ONLY
        .iter()
        .map(|(protocol, why)| {
            let devices = text
                .lines()
                .filter(|l| l.trim_start().starts_with("protocol") && l.contains(protocol))
                .count();
            (devices, *why)
        })
        .filter(|(devices, _)| arch.modbus_only() && *devices > 0)
        .collect();
    if refused.is_empty() {
        assert!(
            out.status.success(),
            "{} check {}: {said}",
            arch.name,
            config.display()
        );
        return;
    }
    assert!(
        !out.status.success(),
        "{} (Modbus-only) check {} must refuse it: {said}",
        arch.name,
        config.display()
    );
    let problems = said.lines().filter(|l| l.contains(".protocol")).count();
    for (devices, why) in &refused {
        assert_eq!(
            said.matches(why).count(),
            *devices,
            "{} (Modbus-only) check {}: one '{why}' per such device: {said}",
            arch.name,
            config.display()
        );
    }
    assert_eq!(
        problems,
        refused.iter().map(|(d, _)| d).sum::<usize>(),
        "{} (Modbus-only) check {}: only the missing protocols are refused: {said}",
        arch.name,
        config.display()
    );
}

fn tomls_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// `check` under qemu on every example config and every template.
fn shipped_configs_pass_check(arch: &Arch) {
    let Some(binary) = arch.binary() else { return };
    let configs = tomls_in(&workspace().join("configs"));
    let templates = tomls_in(&workspace().join("configs/templates"));
    assert!(configs.len() >= 3 && templates.len() >= 2);
    for config in &configs {
        check_passes(arch, &binary, config);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for template in &templates {
        let config = dir.path().join("templated.toml");
        // A meter template (tags by data identifier) goes on a DL/T 645
        // meter, any other on a Modbus device.
        let text = std::fs::read_to_string(template).expect("template");
        let device = if text.lines().any(|l| l.trim_start().starts_with("di =")) {
            "protocol = \"dlt645\"\nmeter = \"000000000001\""
        } else {
            "protocol = \"modbus-rtu\""
        };
        std::fs::write(
            &config,
            format!(
                "[gateway]\nid = \"gw-1\"\n[uplink]\nendpoint = \"https://127.0.0.1:7600\"\n\
                 token = \"gt_x\"\n[buffer]\ndir = \"buffer\"\n[[devices]]\nid = \"templated\"\n\
                 {device}\nserial_port = \"/dev/ttyUSB0\"\ntemplate = \"{}\"\n",
                template.display()
            ),
        )
        .expect("write config");
        check_passes(arch, &binary, &config);
    }
}

#[test]
fn aarch64_gateway_under_qemu_passes_check_on_every_shipped_config_and_template() {
    shipped_configs_pass_check(&ARCHES[0]);
}

#[test]
fn armv7_gateway_under_qemu_passes_check_on_every_shipped_config_and_template() {
    shipped_configs_pass_check(&ARCHES[1]);
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("valid address")
}

fn close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_f64() || b.is_f64() => (x - y).abs() < 1e-6,
        _ => a == b,
    }
}

/// Simulated Modbus TCP device -> cross gateway under qemu -> native ingest.
async fn modbus_values_arrive(arch: &Arch) -> anyhow::Result<()> {
    let Some(binary) = arch.binary() else {
        return Ok(());
    };
    let gw = format!("gw-{}", arch.name);
    let dir = tempfile::tempdir()?;
    let sim = SimDevice::new();
    let (sim_addr, _task) = sim.serve(any_port()).await?;
    let config = dir.path().join("gateway.toml");
    let buffer = dir.path().join("buffer");
    let device = standard_device_toml("meter-1", sim_addr, "200ms");
    // The cross gateway makes its own key; ingest binds it at registration.
    std::fs::write(
        &config,
        format!(
            "{}{device}",
            gateway_toml(&gw, "127.0.0.1:1".parse()?, "none", &buffer)
        ),
    )?;
    let (algorithm, public_key) = gateway_identity_of(arch.command(&binary), &config)?;
    let data = dir.path().join("ingest");
    let token =
        IngestProc::register_with_algorithm_key(&data, &gw, Some((&algorithm, &public_key)))?;
    let ingest = IngestProc::start(&data, any_port(), any_port()).await?;
    std::fs::write(
        &config,
        format!(
            "{}{device}",
            gateway_toml(&gw, ingest.grpc, &token, &buffer)
        ),
    )?;
    let gateway = GatewayProc::start_command(arch.command(&binary), &config)?;
    let api = ingest.api();
    for (tag, expected) in standard_expected() {
        let got = wait_for(
            &format!("{} tag {tag}", arch.name),
            Duration::from_secs(60),
            || async {
                Ok(api
                    .tag(&gw, "meter-1", tag)
                    .await?
                    .filter(|t| !t["last_value"].is_null()))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}{}", gateway.proc.logs(), ingest.proc.logs()));
        assert!(
            close(&got["last_value"], &expected),
            "{} {tag}: got {} expected {expected}",
            arch.name,
            got["last_value"]
        );
        assert_eq!(got["last_quality"], "good", "{} {tag}", arch.name);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_gateway_under_qemu_delivers_modbus_values_to_ingest() -> anyhow::Result<()> {
    modbus_values_arrive(&ARCHES[0]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_gateway_under_qemu_delivers_modbus_values_to_ingest() -> anyhow::Result<()> {
    modbus_values_arrive(&ARCHES[1]).await
}
