//! The chart's dashboard and alerts against the metrics a real derper exports: every PromQL
//! expression of `charts/derp-fleet/files/{dashboard.json,prometheus-rules.yaml}` parses
//! (promql-parser), names only our metrics, and every `derper_*` name in them is offered by a
//! derper started here (on 127.0.0.1, self-signed) and scraped. The operator's own names are
//! checked against a running operator with the prober on, in `e2e_probe.rs` (it needs the rig).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed step panics with its cause

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn chart_promql_parses_and_names_metrics_a_derper_exports() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("monitoring-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (port, metrics) = (free_port(), free_port());
    let _derper = Kill(
        Command::new(common::derper_bin())
            .args(["-a", &format!("127.0.0.1:{port}"), "-hostname", "127.0.0.1"])
            .args(["-certmode", "manual", "-certdir"])
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("derper.key"))
            .args(["-stun=false", "-http-port", "-1"])
            .arg(format!("--metrics-addr=127.0.0.1:{metrics}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (text, _) = common::wait_within("the derper's /metrics", Duration::from_secs(30), || {
        let (status, _, body) = common::http_get(metrics, "/metrics")?;
        (status == 200).then_some(body)
    });
    let exported = common::exported_names(&text);
    assert!(exported.contains("derper_clients"), "{text}");
    let (exprs, names) = common::check_chart_exprs(&exported, &["derper_"]);
    println!("{exprs} expressions parse; {names} derper_* names all exported by the derper");
    let _ = std::fs::remove_dir_all(&dir);
}
