//! The `tests/cluster` rig as the operator's e2e tests use it: start (or reuse) a rig, run
//! kubectl/rigctl, start and stop operator replicas, read the served map and metrics, and wait
//! with a bound. Shared by every `tests/e2e_*.rs` (each is its own crate, hence `dead_code`).
//!
//! A rig named by `DERP_FLEET_RIG_STATE` (a state dir of `tests/cluster/up`) is reused as is;
//! otherwise one is built (cached) and started with the requested components and stopped when
//! the [`Rig`] drops, on success and on panic alike (then its logs are kept and named).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Bound of every wait: the rig is a busy 2-core machine shared with builds.
pub const WAIT: Duration = Duration::from_secs(90);

/// A /24-sized prefix `127.A.B` of loopback addresses for this test process's nodes, derived from
/// its pid so that tests running at once (and the derpers they start) never share an address.
pub fn loopback_net() -> String {
    let pid = std::process::id();
    format!("127.{}.{}", 100 + pid % 100, 1 + (pid / 100) % 250)
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The derper binary (`DERP_FLEET_E2E_DERPER` if set, as for the operator) next to the test's own (`cargo build -p derper`; `cargo test --workspace`
/// builds it).
pub fn derper_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DERP_FLEET_E2E_DERPER") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/e2e_x-<hash> -> target/<profile>/derper
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("derper");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p derper` (cargo test --workspace does)",
        bin.display()
    );
    bin
}

/// The operator binary: `DERP_FLEET_E2E_OPERATOR` if set (a copy of one build, safe from
/// other worktrees relinking the shared target dir), else the one cargo built for this test.
pub fn operator_bin() -> PathBuf {
    std::env::var_os("DERP_FLEET_E2E_OPERATOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_operator")))
}

/// The bin dir of Tailscale's tools and our Go checks at the pinned version (`tests/interop/build`,
/// cached after the first build).
pub fn tailscale_bin() -> PathBuf {
    let out = Command::new(repo_root().join("tests/interop/build"))
        .output()
        .expect("running tests/interop/build");
    assert!(
        out.status.success(),
        "tests/interop/build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap().trim());
    assert!(dir.join("derpprobe").exists(), "no derpprobe in {dir:?}");
    dir
}

/// What to start besides etcd, the API server, controller-manager, scheduler and kwok.
#[derive(Default)]
pub struct RigOptions {
    /// cert-manager's controllers (and its CRDs).
    pub certmanager: bool,
    /// The process kubelet, with these `--image-bin REPO=BIN` mappings.
    pub process_kubelet: bool,
    pub image_bins: Vec<(String, PathBuf)>,
}

/// The rig: its env (KUBECONFIG, PATH with kubectl and rigctl) and whether we own it.
pub struct Rig {
    pub state: PathBuf,
    pub env: Vec<(String, String)>,
    owned: bool,
    pub operators: Vec<Child>,
    pub logs: Vec<PathBuf>,
}

impl Rig {
    pub fn start(opts: RigOptions) -> Rig {
        if let Ok(state) = std::env::var("DERP_FLEET_RIG_STATE") {
            let state = PathBuf::from(state);
            return Rig {
                env: read_env(&state),
                state,
                owned: false,
                operators: vec![],
                logs: vec![],
            };
        }
        let cluster = repo_root().join("tests/cluster");
        if !cluster.join("up").exists() {
            panic!(
                "rig not available: {} has no `up` script",
                cluster.display()
            );
        }
        // `up` builds (or reuses from the cache) exactly the components it starts.
        // Not under /tmp: the process kubelet rewrites a pod's `/tmp` mount path wherever it
        // stands as a path prefix, host paths of other volumes under /tmp/... included.
        let test = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let test = test.split('-').next().unwrap_or_default().to_string();
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("rig-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let mut up = Command::new(cluster.join("up"));
        up.arg("--state").arg(&base);
        if !opts.certmanager {
            up.arg("--no-certmanager");
        }
        if !opts.process_kubelet {
            up.arg("--no-process-kubelet");
        }
        for (image, bin) in &opts.image_bins {
            up.arg("--image-bin")
                .arg(format!("{image}={}", bin.display()));
        }
        let t0 = Instant::now();
        let up = up.output().expect("running tests/cluster/up");
        if !up.status.success() {
            panic!(
                "rig not available: tests/cluster/up failed:\n{}{}",
                String::from_utf8_lossy(&up.stdout),
                String::from_utf8_lossy(&up.stderr)
            );
        }
        println!("rig up in {:?}", t0.elapsed());
        Rig {
            env: read_env(&base),
            state: base,
            owned: true,
            operators: vec![],
            logs: vec![],
        }
    }

    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs a command of the rig; panics with its output on failure.
    pub fn run(&self, prog: &str, args: &[&str]) -> String {
        self.run_stdin(prog, args, None)
    }

    pub fn run_stdin(&self, prog: &str, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.try_run(prog, args, stdin, &[]);
        assert!(
            out.status.success(),
            "{prog} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command with extra env; returns its output whatever its status.
    pub fn try_run(
        &self,
        prog: &str,
        args: &[&str],
        stdin: Option<&str>,
        env: &[(&str, &str)],
    ) -> std::process::Output {
        let mut c = self.cmd(prog);
        c.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap_or_else(|e| panic!("{prog} {args:?}: {e}"));
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        self.run("kubectl", args)
    }

    pub fn apply(&self, yaml: &str) {
        self.run_stdin("kubectl", &["apply", "-f", "-"], Some(yaml));
    }

    pub fn json(&self, args: &[&str]) -> Option<Value> {
        let mut c = self.cmd("kubectl");
        c.args(args).args(["-o", "json"]);
        let out = c.output().ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Applies the CRD from `crds/` and waits until it is served.
    pub fn install_crd(&self) {
        let crd = repo_root().join("crds/derpregions.derpfleet.io.yaml");
        self.kubectl(&["apply", "--server-side", "-f", crd.to_str().unwrap()]);
        // Polled rather than `kubectl wait`: right after the create the CRD has no conditions
        // yet, and kubectl 1.37's wait then fails at once (".status.conditions accessor error:
        // <nil>") instead of waiting, which failed a warm run's e2e_rollout.
        wait_within(
            "the DerpRegion CRD to be Established",
            Duration::from_secs(30),
            || {
                let crd = self.json(&["get", "crd", "derpregions.derpfleet.io"])?;
                (condition(&crd, "Established")?.0 == "True").then_some(())
            },
        );
    }

    /// `rigctl create-nodes` labelled `derp-fleet.test/role=<role>` (process-kubelet nodes when
    /// `process`), then waits until they are Ready.
    pub fn create_nodes(
        &self,
        prefix: &str,
        count: u32,
        first_ip: &str,
        role: &str,
        process: bool,
    ) {
        let count = count.to_string();
        let label = format!("derp-fleet.test/role={role}");
        let mut args = vec![
            "create-nodes",
            "--count",
            &count,
            "--prefix",
            prefix,
            "--first-ip",
            first_ip,
            "--label",
            &label,
        ];
        if process {
            args.push("--process");
        }
        self.run("rigctl", &args);
        // kwok (or the process kubelet) initialises new nodes within a few seconds.
        self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            "node",
            "-l",
            &label,
            "--timeout=60s",
        ]);
    }

    /// Starts an operator replica; returns (index, map port).
    pub fn start_operator(&mut self, identity: &str, grace: Duration) -> (usize, u16) {
        self.start_operator_with(identity, grace, &[])
    }

    /// [`Rig::start_operator`] with more `operator run` arguments.
    pub fn start_operator_with(
        &mut self,
        identity: &str,
        grace: Duration,
        extra: &[&str],
    ) -> (usize, u16) {
        let port: u16 = self.run("rigctl", &["freeport"]).trim().parse().unwrap();
        let log = self.state.join(format!("operator-{identity}.log"));
        // Appended: a replica restarted under the same identity keeps its predecessor's log.
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = self
            .cmd(operator_bin().to_str().unwrap())
            .args([
                "run",
                "--map-addr",
                &format!("127.0.0.1:{port}"),
                "--not-ready-grace",
                &format!("{}ms", grace.as_millis()),
                "--derper-image",
                "ghcr.io/derp-fleet/derper:e2e",
            ])
            .args(extra)
            .env("POD_NAME", identity)
            .env("POD_NAMESPACE", "default")
            .env("RUST_LOG", "info,kube=warn")
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("starting the operator");
        self.operators.push(child);
        self.logs.push(log);
        (self.operators.len() - 1, port)
    }

    /// Starts a replica and waits until it serves a map and leads.
    pub fn start_leader(&mut self, identity: &str, grace: Duration) -> u16 {
        self.start_leader_with(identity, grace, &[])
    }

    /// [`Rig::start_leader`] with more `operator run` arguments.
    pub fn start_leader_with(&mut self, identity: &str, grace: Duration, extra: &[&str]) -> u16 {
        let (_, port) = self.start_operator_with(identity, grace, extra);
        let (_, d) = wait_for("operator ready (caches synced, first map built)", || {
            let ok = http_get(port, "/readyz")?.0 == 200
                && metric(port, "derpfleet_operator_leader")? == 1;
            ok.then_some(())
        });
        println!("operator start -> ready and leading: {d:?}");
        port
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    pub fn stop_operator(&mut self, i: usize) -> std::process::ExitStatus {
        let pid = self.operators[i].id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.operators[i].try_wait().unwrap() {
                println!("operator {i} stopped on SIGTERM in {:?}", t0.elapsed());
                return s;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = self.operators[i].kill();
                panic!("operator {i} did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops every operator replica still running, each cleanly.
    pub fn stop_operators(&mut self) {
        for i in 0..self.operators.len() {
            if self.operators[i].try_wait().unwrap().is_none() {
                assert!(self.stop_operator(i).success());
            }
        }
    }

    /// Also dump this file's tail on failure (e.g. a pod's log).
    pub fn add_log(&mut self, path: PathBuf) {
        self.logs.push(path);
    }

    /// Log file of a process-backed pod's container.
    pub fn pod_log(&self, ns: &str, pod: &str, container: &str) -> PathBuf {
        self.state
            .join("process-kubelet/logs")
            .join(format!("{ns}_{pod}_{container}.log"))
    }

    fn dump_logs(&self) {
        for l in &self.logs {
            if let Ok(s) = std::fs::read_to_string(l) {
                let tail: Vec<&str> = s.lines().rev().take(25).collect();
                eprintln!("--- {} (last lines)", l.display());
                for line in tail.into_iter().rev() {
                    let mut end = line.len().min(600);
                    while !line.is_char_boundary(end) {
                        end -= 1;
                    }
                    eprintln!("{}", &line[..end]);
                }
            }
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for c in &mut self.operators {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.owned {
            let _ = Command::new(repo_root().join("tests/cluster/down"))
                .arg("--state")
                .arg(&self.state)
                .output();
            if !std::thread::panicking() {
                let _ = std::fs::remove_dir_all(&self.state);
            } else {
                eprintln!("rig state and logs kept in {}", self.state.display());
            }
        }
    }
}

fn read_env(state: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(state.join("env"))
        .unwrap_or_else(|e| panic!("rig not available: {}: {e}", state.join("env").display()));
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(kv) = line.strip_prefix("export ") else {
            continue;
        };
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let v = v.replace("$PATH", &std::env::var("PATH").unwrap_or_default());
        out.push((k.to_string(), v));
    }
    out
}

/// One HTTP GET on `host:port`: (status, headers, body).
pub fn http_get_at(host: &str, port: u16, path: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect((host, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head.to_string(), body.to_string()))
}

/// One HTTP GET on 127.0.0.1.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String, String)> {
    http_get_at("127.0.0.1", port, path)
}

/// The served map: (exact bytes, parsed).
pub fn map(port: u16) -> Option<(String, Value)> {
    let (status, _, body) = http_get(port, "/derpmap.json")?;
    if status != 200 {
        return None;
    }
    let v = serde_json::from_str(&body).ok()?;
    Some((body, v))
}

/// DERP node names of region `id` in the served map.
pub fn map_nodes(port: u16, id: u32) -> Option<Vec<String>> {
    let (_, v) = map(port)?;
    let nodes = v.pointer(&format!("/Regions/{id}/Nodes"))?.as_array()?;
    Some(
        nodes
            .iter()
            .filter_map(|n| n.get("Name")?.as_str().map(str::to_string))
            .collect(),
    )
}

/// A metric sample from Prometheus text: `name` may carry labels (`x{reason="ok"}`).
pub fn metric_text(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
        .rsplit(' ')
        .next()?
        .parse::<f64>()
        .ok()
        .map(|v| v as u64)
}

pub fn metric(port: u16, name: &str) -> Option<u64> {
    let (_, _, body) = http_get(port, "/metrics")?;
    metric_text(&body, name)
}

/// Polls `f` every 20 ms until it returns Some, at most `within`; returns the value and the time.
pub fn wait_within<T>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> (T, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, t0.elapsed());
        }
        assert!(
            t0.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_within`] [`WAIT`].
pub fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> (T, Duration) {
    wait_within(what, WAIT, f)
}

/// The named steps of one scenario on one rig. Starting a rig costs tens of seconds on this
/// machine, so a scenario's steps share one instead of being separate `#[test]`s; each step runs
/// under `catch_unwind` so that a failing step is reported and the later ones still run (the first
/// failure does not hide the rest). A step whose result the later ones need returns it: `None`
/// means it failed, and the caller ends the scenario with [`Steps::finish`].
pub struct Steps {
    scenario: &'static str,
    only: String,
    failed: Vec<String>,
    t_all: Instant,
}

impl Steps {
    pub fn new(scenario: &'static str) -> Steps {
        Steps {
            scenario,
            only: String::new(),
            failed: Vec::new(),
            t_all: Instant::now(),
        }
    }

    /// Runs only the steps whose name contains the value of `var` (when it is set and not empty):
    /// for rerunning one step by hand on a reused rig.
    pub fn only_from_env(mut self, var: &str) -> Steps {
        self.only = std::env::var(var).unwrap_or_default();
        self
    }

    /// Runs step `name`; `None` when it panicked or was filtered out.
    pub fn run<T>(&mut self, name: &str, step: impl FnOnce() -> T) -> Option<T> {
        if !self.only.is_empty() && !name.contains(self.only.as_str()) {
            println!("{}: step {name}: not selected", self.scenario);
            return None;
        }
        self.required(name, step)
    }

    /// Runs step `name` even when a filter leaves it out: the later steps need its result.
    /// `None` when it panicked.
    pub fn required<T>(&mut self, name: &str, step: impl FnOnce() -> T) -> Option<T> {
        let t0 = Instant::now();
        println!("{}: step {name}", self.scenario);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)) {
            Ok(v) => {
                println!(
                    "{}: step {name}: passed in {:?}",
                    self.scenario,
                    t0.elapsed()
                );
                Some(v)
            }
            Err(_) => {
                println!(
                    "{}: step {name}: FAILED after {:?}",
                    self.scenario,
                    t0.elapsed()
                );
                self.failed.push(name.to_string());
                None
            }
        }
    }

    /// Ends the scenario: panics naming every failed step (the panic of each was printed when it
    /// happened), and names the step that stopped the scenario early, if one did.
    pub fn finish(self, stopped_after: Option<&str>) {
        println!("{} done in {:?}", self.scenario, self.t_all.elapsed());
        if let Some(step) = stopped_after {
            println!("{}: later steps not run: they need {step}", self.scenario);
        }
        assert!(
            self.failed.is_empty(),
            "{}: failed steps: {:?}",
            self.scenario,
            self.failed
        );
    }
}

/// (status, reason) of condition `type_` of an object.
pub fn condition(obj: &Value, type_: &str) -> Option<(String, String)> {
    obj.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}

/// A DerpRegion manifest (`bindToNodeIP: true`, no port 80).
pub struct RegionYaml<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    pub id: u32,
    pub code: &'a str,
    pub selector: &'a str,
    pub tls: &'a str,
    /// (derp, stun, metrics)
    pub ports: (u16, u16, u16),
    /// More spec lines, each indented by two spaces and ending in a newline.
    pub extra: &'a str,
}

impl RegionYaml<'_> {
    /// Without a `publish:` line in `extra`, the region is a `SharedRegion`: these tests cover
    /// the shared region's mesh and in-region failover, written before `RegionPerNode` became
    /// the default.
    pub fn yaml(&self) -> String {
        let (derp, stun, metrics) = self.ports;
        let publish = if self.extra.contains("publish:") {
            ""
        } else {
            "  publish: {mode: SharedRegion}\n"
        };
        format!(
            "apiVersion: derpfleet.io/v1alpha1\nkind: DerpRegion\nmetadata: {{name: {}, namespace: {}}}\n\
             spec:\n  regionId: {}\n  code: {}\n  nodeSelector: {{derp-fleet.test/role: {}}}\n  \
             tls: {}\n  bindToNodeIP: true\n  \
             ports: {{derpPort: {derp}, stunPort: {stun}, httpPort: -1, metricsPort: {metrics}}}\n{publish}{}",
            self.name, self.ns, self.id, self.code, self.selector, self.tls, self.extra
        )
    }
}

/// The usual test region: ports 8443/3478/9731.
pub fn region_yaml(
    ns: &str,
    name: &str,
    id: u32,
    code: &str,
    selector: &str,
    tls: &str,
    extra: &str,
) -> String {
    RegionYaml {
        ns,
        name,
        id,
        code,
        selector,
        tls,
        ports: (8443, 3478, 9731),
        extra,
    }
    .yaml()
}

/// `sha256-raw:<hex>` of the leaf a TLS server at `addr` presents for `sni` (openssl, bounded).
pub fn served_pin(addr: &str, sni: &str) -> Option<String> {
    let script = format!(
        "timeout 10 openssl s_client -connect {addr} -servername {sni} </dev/null 2>/dev/null \
         | openssl x509 -outform DER 2>/dev/null | sha256sum"
    );
    let out = Command::new("sh").args(["-c", &script]).output().ok()?;
    let hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()?
        .to_string();
    // sha256sum of empty input: nothing was served.
    (hex.len() == 64 && hex != "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        .then(|| format!("sha256-raw:{hex}"))
}

/// `sha256-raw:<hex>` of the leaf in a PEM (openssl).
pub fn pem_pin(pem: &str) -> String {
    let script = "openssl x509 -outform DER | sha256sum";
    let mut c = Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(pem.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    let hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    format!("sha256-raw:{hex}")
}

/// A Secret's key, decoded.
pub fn secret_data(secret: &Value, key: &str) -> Option<String> {
    use base64::Engine;
    let b64 = secret.pointer(&format!("/data/{}", key.replace('/', "~1")))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.as_str()?)
        .ok()?;
    String::from_utf8(raw).ok()
}

/// Every PromQL expression of the chart: (where, expression), from the dashboard's panels and
/// the PrometheusRule's alerts.
pub fn chart_exprs() -> Vec<(String, String)> {
    let files = repo_root().join("charts/derp-fleet/files");
    let mut out = Vec::new();
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(files.join("dashboard.json")).unwrap())
            .unwrap();
    fn walk(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                let here = m
                    .get("title")
                    .and_then(Value::as_str)
                    .map_or_else(|| at.to_string(), |t| format!("dashboard panel {t:?}"));
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr", Value::String(e)) => out.push((here.clone(), e.clone())),
                        _ => walk(x, &here, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, at, out)),
            _ => {}
        }
    }
    walk(&dash, "dashboard", &mut out);
    let rules: yaml_serde::Value = yaml_serde::from_str(
        &std::fs::read_to_string(files.join("prometheus-rules.yaml")).unwrap(),
    )
    .unwrap();
    for g in rules["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            out.push((
                format!("alert {}", r["alert"].as_str().unwrap()),
                r["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// The metric names an expression selects; panics with the parser's message if it does not
/// parse.
pub fn expr_metric_names(at: &str, expr: &str) -> Vec<String> {
    use promql_parser::parser::{self, Expr};
    use promql_parser::util::{ExprVisitor, walk_expr};
    struct Names(Vec<String>);
    impl ExprVisitor for Names {
        type Error = ();
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, ()> {
            let vs = match e {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            };
            if let Some(vs) = vs {
                let by_matcher = vs
                    .matchers
                    .matchers
                    .iter()
                    .filter(|m| m.name == "__name__")
                    .map(|m| m.value.clone());
                self.0.extend(vs.name.clone().into_iter().chain(by_matcher));
            }
            Ok(true)
        }
    }
    let ast = parser::parse(expr).unwrap_or_else(|e| panic!("{at}: {expr:?} does not parse: {e}"));
    let mut names = Names(Vec::new());
    let _ = walk_expr(&mut names, &ast);
    assert!(!names.0.is_empty(), "{at}: {expr:?} selects no metric");
    names.0
}

/// The series names a Prometheus text exposition offers: every sample's name, and for each
/// `# TYPE` line the names its samples take (a labelled family with no child yet still counts).
pub fn exported_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let mut it = t.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    out.insert(format!("{}_total", name.trim_end_matches("_total")));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        out.insert(format!("{name}{s}"));
                    }
                }
                _ => {
                    out.insert(name.to_string());
                }
            }
        } else if !line.starts_with('#')
            && let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty())
        {
            out.insert(name.to_string());
        }
    }
    out
}

/// Checks every chart expression parses and that each metric it names with one of `prefixes`
/// is in `exported`; returns how many expressions and names were checked.
pub fn check_chart_exprs(
    exported: &std::collections::BTreeSet<String>,
    prefixes: &[&str],
) -> (usize, usize) {
    let exprs = chart_exprs();
    let mut checked = 0;
    let mut missing = Vec::new();
    for (at, e) in &exprs {
        for n in expr_metric_names(at, e) {
            assert!(
                ["derper_", "derp_fleet_", "derpfleet_"]
                    .iter()
                    .any(|p| n.starts_with(p)),
                "{at}: {n} is not one of our metrics"
            );
            if prefixes.iter().any(|p| n.starts_with(p)) {
                checked += 1;
                if !exported.contains(&n) {
                    missing.push(format!("{at}: {n}"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the chart names metrics nobody exports: {missing:#?}"
    );
    (exprs.len(), checked)
}
