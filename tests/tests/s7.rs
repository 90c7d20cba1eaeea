//! S7 end to end against a third-party S7comm server (python-snap7's, in
//! `.venv-peers/`, `tests/peers/s7_server.py`): the gateway binary reads
//! every type from data blocks, the markers, a timer and a counter into a
//! real ingest, values checked one by one, and the CPU's identity (SZL) into
//! the manifest; an address the PLC refuses is Bad with its item code
//! while its neighbours keep their values; a PLC that goes away turns Bad
//! with a link code while a second PLC's values keep coming, and its values
//! return when it does.

use std::net::SocketAddr;

use std::process::Command;
use std::time::Duration;

use guantong_e2e::procs::{
    GatewayProc, IngestProc, gateway_toml, register_keyed_gateway, wait_for,
};
use guantong_e2e::s7::Plc;
use serde_json::Value;

const GW: &str = "gw-s7";

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

const TAGS: &str = r#"
[[devices.tags]]
name = "u16"
address = "DB1.DBW0"
type = "u16"

[[devices.tags]]
name = "i16"
address = "DB1.DBW2"
type = "i16"

[[devices.tags]]
name = "f32"
address = "DB1.DBD4"
type = "f32"

[[devices.tags]]
name = "i32"
address = "DB1.DBD8"
type = "i32"

[[devices.tags]]
name = "u32"
address = "DB1.DBD12"
type = "u32"

[[devices.tags]]
name = "lreal"
address = "DB1.DBD16"
type = "f64"

[[devices.tags]]
name = "on"
address = "DB1.DBX24.3"
type = "bool"

[[devices.tags]]
name = "off"
address = "DB1.DBX24.2"
type = "bool"

[[devices.tags]]
name = "u8"
address = "DB1.DBB25"
type = "u8"

[[devices.tags]]
name = "text"
address = "DB1.DBB26"
type = "string"
length = 10

[[devices.tags]]
name = "counter"
address = "DB1.DBW40"
type = "u16"

[[devices.tags]]
name = "marker"
address = "MW10"
type = "u16"

[[devices.tags]]
name = "date"
address = "DB1.DBW44"
type = "date"

[[devices.tags]]
name = "tod"
address = "DB1.DBD48"
type = "time_of_day"

[[devices.tags]]
name = "dt"
address = "DB1.DBB52"
type = "date_and_time"

[[devices.tags]]
name = "dtl"
address = "DB2.DBB0"
type = "dtl"

[[devices.tags]]
name = "time"
address = "DB2.DBD12"
type = "time"

[[devices.tags]]
name = "timer"
address = "T1"
type = "f64"

[[devices.tags]]
name = "count"
address = "C2"
type = "u16"

[[devices.tags]]
name = "missing"
address = "DB99.DBW0"
type = "u16"

[[devices.tags]]
name = "beyond"
address = "DB1.DBW62"
type = "u16"

[[devices.tags]]
name = "past_the_end"
address = "DB1.DBW70"
type = "u16"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_reads_every_type_from_a_third_party_s7_server_and_survives_its_loss()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("ingest");
    let config = dir.path().join("gateway.toml");
    let buffer = dir.path().join("buffer");
    let token = register_keyed_gateway(&data, GW, &config, &buffer)?;
    let ingest = IngestProc::start(
        &data,
        "127.0.0.1:0".parse::<SocketAddr>()?,
        "127.0.0.1:0".parse::<SocketAddr>()?,
    )
    .await?;
    let api = ingest.api();
    let port = free_port()?;
    let plc = Plc::start(port, dir.path())?;
    // A second PLC, to show that one going away costs only its own tags.
    let other_port = free_port()?;
    let _other = Plc::start(other_port, dir.path())?;
    std::fs::write(
        &config,
        gateway_toml(GW, ingest.grpc, &token, &buffer)
            + &format!(
                "\n[[devices]]\nid = \"plc-01\"\nprotocol = \"s7\"\nhost = \"127.0.0.1\"\nport = {port}\nrack = 0\nslot = 1\npoll_interval = \"200ms\"\ntimeout = \"1s\"\nmax_backoff = \"1s\"\n{TAGS}"
            )
            + &format!(
                "\n[[devices]]\nid = \"plc-02\"\nprotocol = \"s7\"\nhost = \"127.0.0.1\"\nport = {other_port}\npoll_interval = \"200ms\"\ntimeout = \"1s\"\n\n[[devices.tags]]\nname = \"counter\"\naddress = \"DB1.DBW40\"\ntype = \"u16\"\n"
            ),
    )?;
    let gateway = GatewayProc::start(&config)?;

    let last = |tag: &'static str| {
        let api = &api;
        async move {
            let t = api.tag(GW, "plc-01", tag).await?;
            Ok::<_, anyhow::Error>(t.unwrap_or(Value::Null))
        }
    };
    wait_for("S7 values at ingest", Duration::from_secs(30), || async {
        Ok(last("counter").await?["last_quality"]
            .eq("good")
            .then_some(()))
    })
    .await
    .map_err(|e| {
        let plc_log = std::fs::read_to_string(dir.path().join(format!("s7-{port}.log")));
        anyhow::anyhow!(
            "{e}\ngateway log:\n{}\nS7 server log:\n{plc_log:?}",
            gateway.proc.logs()
        )
    })?;
    for (tag, expected) in [
        ("u16", serde_json::json!(4242)),
        ("i16", serde_json::json!(-1234)),
        ("f32", serde_json::json!(-0.1)),
        ("i32", serde_json::json!(-100000)),
        ("u32", serde_json::json!(3_000_000_000u64)),
        ("lreal", serde_json::json!(12345.678)),
        ("on", serde_json::json!(true)),
        ("off", serde_json::json!(false)),
        ("u8", serde_json::json!(200)),
        ("text", serde_json::json!("hello")),
        ("marker", serde_json::json!(777)),
        ("date", serde_json::json!("2024-09-11")),
        ("tod", serde_json::json!("12:34:56.789")),
        ("dt", serde_json::json!("2026-12-03T13:45:07.250")),
        ("dtl", serde_json::json!("2026-12-03T13:45:07.250")),
        ("time", serde_json::json!(-1500)),
        ("timer", serde_json::json!(12.3)),
        ("count", serde_json::json!(42)),
    ] {
        let t = last(tag).await?;
        assert_eq!(t["last_value"], expected, "{tag}: {t:#}");
        assert_eq!(t["last_quality"], "good", "{tag}: {t:#}");
    }
    // The CPU's identity, from its system status list, is in the manifest.
    let summary = api.get("/api/v1/summary").await?;
    let device = &summary["gateways"][0]["devices"][0];
    assert_eq!(
        device["identity"]["order_number"], "6ES7 315-2EH14-0AB0",
        "{device}"
    );
    assert_eq!(
        device["identity"]["module_type"], "CPU 315-2 PN/DP",
        "{device}"
    );
    assert_eq!(
        device["identity"]["serial_number"], "S C-C2UR28922012",
        "{device}"
    );
    // The counter moves: polled, not read once.
    let first = last("counter").await?["last_value"].as_u64().unwrap_or(0);
    wait_for("the counter to move", Duration::from_secs(10), || async {
        Ok((last("counter").await?["last_value"].as_u64().unwrap_or(0) != first).then_some(()))
    })
    .await?;
    // Refused addresses: Bad with the PLC's item code, nothing else lost.
    // python-snap7 answers a missing block and a read past a block's end
    // with its own codes; either way the code is an S7 item code.
    for tag in ["missing", "past_the_end"] {
        let t = wait_for(&format!("{tag} Bad"), Duration::from_secs(10), || async {
            let t = last(tag).await?;
            Ok(t["last_quality"].eq("bad").then_some(t))
        })
        .await?;
        let code = t["last_quality_code"].as_u64().unwrap_or(0);
        assert_eq!(
            code & 0xFFFF_FF00,
            0x0006_0000,
            "{tag}: an S7 item code: {t:#}"
        );
    }
    let t = last("beyond").await?;
    assert_eq!(
        t["last_quality"], "good",
        "the last word of DB1 reads: {t:#}"
    );

    // The PLC goes away: Bad with a link code; back: values again.
    drop(plc);
    wait_for(
        "Bad while the PLC is gone",
        Duration::from_secs(15),
        || async {
            let t = last("u16").await?;
            let code = t["last_quality_code"].as_u64().unwrap_or(0);
            Ok((t["last_quality"] == "bad" && code >> 16 == 2).then_some(()))
        },
    )
    .await?;
    // Meanwhile the other PLC's values keep coming, good and moving.
    let other = || async {
        let t = api
            .tag(GW, "plc-02", "counter")
            .await?
            .unwrap_or(Value::Null);
        Ok::<_, anyhow::Error>(t)
    };
    let before = other().await?;
    assert_eq!(before["last_quality"], "good", "{before:#}");
    wait_for(
        "the other PLC's counter to move while the first is gone",
        Duration::from_secs(10),
        || async {
            let t = other().await?;
            Ok(
                (t["last_quality"] == "good" && t["last_value"] != before["last_value"])
                    .then_some(()),
            )
        },
    )
    .await?;
    let t = last("u16").await?;
    assert_eq!(t["last_quality"], "bad", "still gone: {t:#}");
    let _plc = Plc::start(port, dir.path())?;
    wait_for(
        "values after the PLC returned",
        Duration::from_secs(20),
        || async { Ok(last("u16").await?["last_quality"].eq("good").then_some(())) },
    )
    .await?;
    Ok(())
}

/// Runs `guantong-gateway probe s7 ARGS`: (exit code, stdout, stderr).
fn probe(args: &str) -> anyhow::Result<(Option<i32>, String, String)> {
    let out = Command::new(guantong_e2e::procs::binary("guantong-gateway")?)
        .args(["probe", "s7"])
        .args(args.split_whitespace())
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn the_probe_reads_memory_as_every_type_finds_a_value_and_names_the_cpu() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let _plc = Plc::start(port, dir.path())?;
    let target = format!("--host 127.0.0.1 --port {port}");

    // -0.1 as the HMI shows it: found at DB1.DBD4 as f32, with the
    // line to put in the config.
    let (code, out, err) = probe(&format!("{target} read DB1.DBB0 --count 12 --expect -0.1"))?;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("PDU "), "{out}");
    assert!(
        out.contains("  DB1.DBW0        u16           4242\n"),
        "{out}"
    );
    assert!(
        out.contains("-0.1 (±0.05) found as:\n  address = \"DB1.DBD4\", type = \"f32\"\n"),
        "{out}"
    );
    // An S7 STRING where it is, timers by number.
    let (code, out, err) = probe(&format!("{target} read DB1.DBB26 --count 12"))?;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("  DB1.DBB26       string        \"hello\"\n"),
        "{out}"
    );
    let (code, out, err) = probe(&format!("{target} read T1 --count 1"))?;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("T1  raw 0x1123\n  T1              f64           12.3\n"),
        "{out}"
    );

    let (code, out, err) = probe(&format!("{target} identify"))?;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("  order_number: 6ES7 315-2EH14-0AB0\n"),
        "{out}"
    );
    assert!(out.contains("  serial_number: S C-C2UR28922012\n"), "{out}");

    // What the installer reads when something is wrong.
    let (code, _, err) = probe(&format!("{target} read DB99.DBB0"))?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the PLC refused DB99.DBB0"), "{err}");
    let (code, _, err) = probe(&format!("{target} read DB1.XYZ"))?;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("`DB1.XYZ`: expected STEP 7 absolute notation"),
        "{err}"
    );
    let closed = free_port()?;
    let (code, _, err) = probe(&format!("--host 127.0.0.1 --port {closed} identify"))?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{closed}")), "{err}");
    Ok(())
}
