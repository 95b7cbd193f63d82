//! The `derper` binary as users start it: the classic Docker recipe's environment and command
//! line, Go-style flags, the printed map, clear errors, and SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_derper");

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn classic_docker_recipe_starts_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let stun = free_udp_port();
    // The environment of the seed recipe and the command line of the most-used derper image.
    let mut child = Command::new(BIN)
        .env("DERP_DOMAIN", "127.0.0.1")
        .env("DERP_CERT_MODE", "manual")
        .env("DERP_CERT_DIR", dir.path().join("certs"))
        .env("DERP_ADDR", port.to_string())
        .env("DERP_STUN", "true")
        .env("DERP_STUN_PORT", stun.to_string())
        .env("DERP_HTTP_PORT", "-1")
        .env("DERP_VERIFY_CLIENTS", "false")
        .env("DERP_VERIFY_CLIENT_URL", "")
        .args([
            "--hostname=127.0.0.1",
            "--certmode=manual",
            &format!("--certdir={}", dir.path().join("certs").display()),
            &format!("--a={port}"),
            "--stun=true",
            &format!("--stun-port={stun}"),
            "--http-port=-1",
            "--verify-clients=false",
            "--verify-client-url=",
            // Non-root needs -c, exactly as with Go.
            "-c",
            &dir.path().join("derper.key").display().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let t0 = Instant::now();
    while !printed.contains("derpport:") {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "stdout ended: {printed}"
        );
        printed.push_str(&line);
        assert!(t0.elapsed() < Duration::from_secs(20));
    }
    assert!(printed.contains("\"CertName\": \"sha256-raw:"), "{printed}");
    assert!(
        printed.contains(&format!("\"DERPPort\": {port}")),
        "{printed}"
    );
    assert!(printed.contains("regions:\n  900:"), "{printed}");
    assert!(dir.path().join("certs/127.0.0.1.crt").exists());
    // It serves TLS on the port and answers the probe.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    // SIGTERM: exit 0 within the shutdown timeout.
    let t0 = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(6),
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(BIN)
        .args(args)
        .env_remove("DERP_ADDR")
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn print_derpmap_json_and_yaml_match() {
    let dir = tempfile::tempdir().unwrap();
    let certdir = dir.path().join("c");
    let key = dir.path().join("k");
    let base = [
        "-a",
        "127.0.0.1:8443",
        "-hostname",
        "192.0.2.10",
        "-certmode",
        "manual",
        "-certdir",
        certdir.to_str().unwrap(),
        "-c",
        key.to_str().unwrap(),
        "--region-id=901",
        "--region-code=home",
        "-stun-port",
        "3478",
    ];
    let (code, json, err) = run(&[&base[..], &["--print-derpmap"]].concat());
    assert_eq!(code, 0, "{err}");
    let map: serde_json::Value = serde_json::from_str(&json).unwrap();
    let node = &map["Regions"]["901"]["Nodes"][0];
    assert_eq!(node["HostName"], "192.0.2.10");
    assert_eq!(node["IPv4"], "192.0.2.10");
    assert_eq!(node["DERPPort"], 8443);
    assert!(
        node.get("STUNPort").is_none(),
        "3478 is the default and omitted"
    );
    let pin = node["CertName"].as_str().unwrap().to_string();
    let (code, yaml, _) = run(&[&base[..], &["--print-derpmap=yaml"]].concat());
    assert_eq!(code, 0);
    assert!(
        yaml.contains(&format!("certname: {pin}")),
        "same certificate: {yaml}"
    );
    assert!(yaml.contains("regioncode: home"));
    let (_, insecure, _) = run(&[&base[..], &["--print-derpmap", "--insecure-for-tests"]].concat());
    assert!(insecure.contains("\"InsecureForTests\": true") && !insecure.contains("CertName"));
}

#[test]
fn bad_flags_get_clear_errors() {
    let (code, _, err) = run(&["-nosuchflag=1"]);
    assert_eq!(code, 2);
    assert!(err.contains("nosuchflag"), "{err}");
    let (code, _, err) = run(&["-a", ":8443", "-secrets-url", "https://x", "-c", "/tmp/k"]);
    assert_eq!(code, 2);
    assert!(err.contains("-secrets-url"), "{err}");
    let (code, _, err) = run(&[
        "-a",
        ":8443",
        "-mesh-with",
        "derp2.example.com",
        "-c",
        "/tmp/k",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("mesh key"), "{err}");
    let (code, out, _) = run(&["-version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("derper "), "{out}");
}
