//! `guantong-gateway check` on bad configs: exact messages, exit code 2, no
//! panic; and every example config under configs/ passes.

use std::path::Path;
use std::process::Command;

use guantong_e2e::procs::binary;

const VALID: &str = r#"[gateway]
id = "gw-1"

[uplink]
endpoint = "https://127.0.0.1:7600"
token = "gt_x"

[buffer]
dir = "buffer"

[[devices]]
id = "meter-1"
protocol = "modbus-tcp"
host = "127.0.0.1"
port = 502

[[devices.tags]]
name = "voltage"
table = "holding"
address = 0
type = "f32"
"#;

/// Runs `check` on `text`; returns (exit code, stdout, stderr with the temp path replaced by FILE).
fn check(text: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(binary("guantong-gateway").expect("binary"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    let file = path.display().to_string();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).replace(&file, "FILE"),
        String::from_utf8_lossy(&out.stderr).replace(&file, "FILE"),
    )
}

#[test]
fn a_valid_config_passes() {
    let (code, stdout, stderr) = check(VALID);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "FILE: ok (1 devices, 1 tags)\n");
}

#[test]
fn a_wrong_key_is_named_with_its_path() {
    let (code, _, stderr) = check(&VALID.replace("address = 0", "adress = 0"));
    assert_eq!(code, Some(2));
    assert_eq!(
        stderr,
        "FILE: 1 problem\n  FILE: devices[0].tags[0].adress: unknown field `adress`, expected one of `name`, `table`, `address`, `type`, `bit`, `length`, `order`, `scale`, `offset`, `unit`, `min`, `max`, `interval`\n"
    );
}

#[test]
fn a_wrong_type_is_named_with_what_was_expected() {
    let (code, _, stderr) = check(&VALID.replace("port = 502", "port = \"502\""));
    assert_eq!(code, Some(2));
    assert_eq!(
        stderr,
        "FILE: 1 problem\n  FILE: devices[0].port: invalid type: string \"502\", expected u16\n"
    );
}

#[test]
fn a_missing_field_is_named() {
    let (code, _, stderr) = check(&VALID.replace("id = \"gw-1\"\n", ""));
    assert_eq!(code, Some(2));
    assert_eq!(
        stderr,
        "FILE: 1 problem\n  FILE: gateway: missing field `id`\n"
    );
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = VALID
        .replace("port = 502", "port = 70000")
        .replace("type = \"f32\"", "type = \"float\"")
        .replace("[buffer]", "[buffer]\nsize = 1");
    let (code, _, stderr) = check(&text);
    assert_eq!(code, Some(2));
    assert!(stderr.starts_with("FILE: 3 problems\n"), "{stderr}");
    assert!(
        stderr.contains("buffer.size: unknown field `size`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("devices[0].port: invalid value: integer `70000`, expected u16"),
        "{stderr}"
    );
    assert!(
        stderr.contains("devices[0].tags[0].type: unknown variant `float`"),
        "{stderr}"
    );
}

#[test]
fn garbage_and_missing_files_are_errors_not_panics() {
    for text in [
        "\u{0}\u{1}binary",
        "[[devices]]\nid = 5",
        "devices = 3",
        "[gateway]\nid = \"a/b\"",
    ] {
        let (code, _, stderr) = check(text);
        assert_eq!(code, Some(2), "{text:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = Command::new(binary("guantong-gateway").expect("binary"))
        .args(["check", "--config", "/nonexistent/gateway.toml"])
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the file"));
}

#[test]
fn every_example_config_passes_check() {
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&configs).expect("configs/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(binary("guantong-gateway").expect("binary"))
                .args(["check", "--config"])
                .arg(&path)
                .output()
                .expect("run check");
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n > 0, "no example configs found in {}", configs.display());
}

/// The README's config reference names every key the parser accepts, so the
/// reference cannot silently drift from the code.
#[test]
fn the_readme_config_reference_lists_every_key() {
    assert_reference_lists(
        VALID,
        &[
            ("[gateway]", "id = \"gw-1\"\n"),
            ("[uplink]", "endpoint = \"https://127.0.0.1:7600\"\n"),
            ("[buffer]", "dir = \"buffer\"\n"),
            ("protocol = \"modbus-tcp\"", "protocol = \"modbus-tcp\"\n"),
            ("type = \"f32\"", "type = \"f32\"\n"),
        ],
    );
}

#[test]
fn the_readme_config_reference_lists_every_opcua_key() {
    let opcua = VALID
        .split("[[devices]]")
        .next()
        .unwrap_or_default()
        .to_string()
        + "[[devices]]\nid = \"plc\"\nprotocol = \"opcua\"\nurl = \"opc.tcp://127.0.0.1:4840\"\n[[devices.tags]]\nname = \"t\"\nnode = \"ns=2;s=T\"\n";
    assert_reference_lists(
        &opcua,
        &[
            ("protocol = \"opcua\"", "protocol = \"opcua\"\n"),
            ("node = ", "node = \"ns=2;s=T\"\n"),
        ],
    );
}

/// For each (section, anchor line) of `config`: an unknown key after the
/// anchor makes the parser list the keys it takes; each is in the README's
/// config reference as `| `key` |`.
fn assert_reference_lists(config: &str, sections: &[(&str, &str)]) {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let reference = readme
        .split("### Config reference")
        .nth(1)
        .expect("README has a `### Config reference` section");
    for (section, anchor) in sections {
        let (_, _, stderr) =
            check(&config.replacen(anchor, &format!("{anchor}zz_unknown = 1\n"), 1));
        let listed = stderr
            .split("unknown field `zz_unknown`, expected ")
            .nth(1)
            .unwrap_or_else(|| panic!("{section}: no key list in {stderr}"));
        let listed = listed.trim().trim_start_matches("one of ");
        let keys: Vec<&str> = listed
            .split(", ")
            .flat_map(|k| k.split(" or "))
            .map(|k| k.trim_matches('`'))
            .collect();
        assert!(!keys.is_empty(), "{section}");
        for key in keys {
            assert!(
                reference.contains(&format!("| `{key}` |")),
                "README config reference lacks key `{key}` of {section}"
            );
        }
    }
}

#[test]
fn every_template_passes_check() {
    let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/templates");
    let mut n = 0;
    for entry in std::fs::read_dir(&templates).expect("configs/templates/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        // DL/T 645 templates (dlt645-*.toml) are for meters.
        let device = if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("dlt645-"))
        {
            "protocol = \"dlt645\"\nserial_port = \"/dev/ttyUSB0\"\nmeter = \"000000000001\""
        } else {
            "protocol = \"modbus-rtu\"\nserial_port = \"/dev/ttyUSB0\""
        };
        let text = format!(
            "{}\n[[devices]]\nid = \"templated\"\n{device}\ntemplate = \"{}\"\n",
            VALID.split("[[devices]]").next().expect("VALID has a head"),
            path.display()
        );
        let (code, stdout, stderr) = check(&text);
        assert_eq!(code, Some(0), "{}: {stderr}", path.display());
        assert!(stdout.contains("ok (1 devices"), "{stdout}");
        n += 1;
    }
    assert!(n >= 2, "expected templates in {}", templates.display());
}

#[test]
fn address_notation_mistakes_are_explained() {
    let cases = [
        ("address = 7", "`7` is ambiguous without `table`"),
        ("address = 20001", "leading digit 2 names no table"),
        ("address = 40000", "register number 0 is outside 1-9999"),
        (
            "table = \"holding\"\naddress = \"40001\"",
            "with `table`, `address` is a zero-based offset",
        ),
        (
            "table = \"holding\"\naddress = 70000",
            "70000 is not a zero-based offset 0-65535",
        ),
    ];
    for (address, message) in cases {
        let text = VALID.replace("table = \"holding\"\naddress = 0", address);
        let (code, _, stderr) = check(&text);
        assert_eq!(code, Some(2), "{address}: {stderr}");
        assert!(
            stderr.contains("devices[0].tags[0].address: ") && stderr.contains(message),
            "{address}: {stderr}"
        );
    }
    let (code, _, stderr) =
        check(&VALID.replace("table = \"holding\"\naddress = 0", "address = 40001"));
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn transport_keys_of_another_protocol_are_rejected() {
    let text = VALID.replace("port = 502", "port = 502\nbaud_rate = 9600");
    let (code, _, stderr) = check(&text);
    assert_eq!(code, Some(2));
    assert!(
        stderr
            .contains("devices[0].baud_rate: `baud_rate` does not apply to protocol `modbus-tcp`"),
        "{stderr}"
    );
    // Two devices on one serial line must agree on its settings and units.
    let head = VALID.split("[[devices]]").next().expect("head");
    let dev = |id: &str, unit: u8, baud: u32| {
        format!(
            "[[devices]]\nid = \"{id}\"\nprotocol = \"modbus-rtu\"\nserial_port = \"/dev/ttyS1\"\nbaud_rate = {baud}\nunit = {unit}\n[[devices.tags]]\nname = \"t\"\naddress = 40001\ntype = \"u16\"\n"
        )
    };
    let text = format!(
        "{head}{}{}{}",
        dev("a", 1, 9600),
        dev("b", 1, 9600),
        dev("c", 2, 19200)
    );
    let (code, _, stderr) = check(&text);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("devices[1].unit: unit 1 is already used on serial /dev/ttyS1"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "devices[2]: shares serial /dev/ttyS1 with devices[0] but not its line settings"
        ),
        "{stderr}"
    );
}

/// `identity` runs before the token exists (it comes from registering the
/// key `identity` prints), so a config naming a missing `token_file` works.
#[test]
fn identity_needs_only_the_key_not_the_token_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        VALID.replace("token = \"gt_x\"", "token_file = \"gw-1.token\""),
    )?;
    let out = Command::new(binary("guantong-gateway")?)
        .args(["identity", "--config"])
        .arg(&path)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("register with: guantong-ingest register-gateway gw-1 --key-algorithm ed25519 --public-key "),
        "{stdout}"
    );
    assert!(dir.path().join("gateway.key").exists());
    Ok(())
}
