#!/usr/bin/env python3
"""Turns bench/run's raw JSON (one file per measurement) into latest.json, latest.md and
latest.png: every metric for Go, ours and the ratio, the issue 7 targets, the cross-check."""
import json
import os
import sys

raw, out = sys.argv[1], sys.argv[2]


def load(name):
    path = os.path.join(raw, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    return json.loads(text) if text else None


machine = load("machine")
sizes = sorted(
    int(f[len("go-max-"):-len(".json")]) for f in os.listdir(raw) if f.startswith("go-max-")
)

metrics = []  # dicts: name, unit, go, ours, better ("higher"/"lower")


def add(name, unit, go, ours, better):
    if go is None or ours is None:
        return
    ratio = (ours / go) if go else None
    metrics.append(dict(name=name, unit=unit, go=go, ours=ours, ratio=ratio, better=better))


def get(d, *path):
    for p in path:
        if d is None:
            return None
        d = d.get(p) if isinstance(d, dict) else None
    return d


per_size = {}
for s in sizes:
    row = {}
    for kind in ("go", "ours"):
        mx, half = load(f"{kind}-max-{s}"), load(f"{kind}-half-{s}")
        row[kind] = dict(
            pps=get(mx, "load", "pps"),
            mb_per_s=get(mx, "load", "mb_per_s"),
            cpu_s_per_gb=get(mx, "server_cpu_s_per_gb"),
            cpu_util=get(mx, "server_cpu_util"),
            sat_latency=get(mx, "load", "latency"),
            half_rate=get(half, "load", "rate_target_pps"),
            half_pps=get(half, "load", "pps"),
            half_latency=get(half, "load", "latency"),
        )
    per_size[s] = row
    g, o = row["go"], row["ours"]
    add(f"relay {s} B, max packets/s", "pkt/s", g["pps"], o["pps"], "higher")
    add(f"relay {s} B, max MB/s", "MB/s", g["mb_per_s"], o["mb_per_s"], "higher")
    add(f"relay {s} B, server CPU s per GB", "s/GB", g["cpu_s_per_gb"], o["cpu_s_per_gb"], "lower")
for s in sizes:
    g, o = per_size[s]["go"], per_size[s]["ours"]
    if g["half_latency"] and o["half_latency"]:
        rate = g["half_rate"]
        for q in ("p50", "p99", "p999"):
            add(f"latency {s} B at {rate:.0f} pkt/s (half load), {q}", "µs",
                g["half_latency"][q + "_us"], o["half_latency"][q + "_us"], "lower")

for kind_step in (0, 1):
    gi, oi = load("go-idle"), load("ours-idle")
    if gi and oi and len(gi["steps"]) > kind_step and len(oi["steps"]) > kind_step:
        n = gi["steps"][kind_step]["clients"]
        add(f"RSS per idle client at {n} clients", "KiB",
            gi["steps"][kind_step]["kib_per_client"], oi["steps"][kind_step]["kib_per_client"], "lower")

gs, os_ = load("go-stun"), load("ours-stun")
if gs and os_:
    add("STUN requests/s (closed loop, 4x64 outstanding)", "req/s", gs["rps"], os_["rps"], "higher")
    add("STUN latency p50 (same run)", "µs", gs["latency"]["p50_us"], os_["latency"]["p50_us"], "lower")
    if gs.get("server_cpu_us_per_req") is not None and os_.get("server_cpu_us_per_req") is not None:
        add("STUN server CPU per answered request (same run)", "µs",
            gs["server_cpu_us_per_req"], os_["server_cpu_us_per_req"], "lower")
        add("STUN server CPU use during the run (1.0 = its core)", "cores",
            gs["server_cpu_util"], os_["server_cpu_util"], "lower")
gl, ol = load("go-stun-load"), load("ours-stun-load")
if gl and ol:
    add("STUN requests/s while relaying 1 KiB at half load (2x8 outstanding)", "req/s",
        gl["stun"]["rps"], ol["stun"]["rps"], "higher")
    for q in ("p50", "p99"):
        add(f"STUN latency {q} while relaying", "µs",
            gl["stun"]["latency"][q + "_us"], ol["stun"]["latency"][q + "_us"], "lower")
gq, oq = load("go-qd"), load("ours-qd")
if gq and oq:
    for q in ("p50", "p99", "max"):
        add(f"queuing delay {q}, 260 B at 100/s under full 1 KiB load", "µs",
            gq["probe"]["latency"][q + "_us"], oq["probe"]["latency"][q + "_us"], "lower")
    add("queuing-delay probe packets dropped (>5 s or lost)", "pkts",
        gq["probe"]["lost"], oq["probe"]["lost"], "lower")

echo = load("tls-echo")
big = max(sizes) if sizes else None

# ---- targets --------------------------------------------------------------------------------
def m(name):
    for x in metrics:
        if x["name"] == name:
            return x
    return None


targets = []


def target(desc, ok, detail):
    targets.append(dict(target=desc, met=bool(ok), detail=detail))


t = m("relay 1024 B, max packets/s")
if t:
    target("1 KiB relay throughput >= 1.5x Go", t["ratio"] >= 1.5, f"{t['ratio']:.2f}x")
if echo and big:
    frac = per_size[big]["ours"]["mb_per_s"] / echo["mb_per_s"]
    target(f"{big} B relay throughput >= 80% of plain TLS echo", frac >= 0.8,
           f"{per_size[big]['ours']['mb_per_s']:.0f} of {echo['mb_per_s']:.0f} MB/s = {frac:.0%}")
t = m("latency 1024 B at %.0f pkt/s (half load), p99" % (per_size.get(1024, {}).get("go", {}).get("half_rate") or 0))
if t:
    target("p99 latency at half load <= Go's (1 KiB)", t["ours"] <= t["go"], f"{t['ours']:.0f} vs {t['go']:.0f} µs")
idle = [x for x in metrics if x["name"].startswith("RSS per idle client")]
if idle:
    t = idle[-1]
    target(f"memory per idle client <= 1/2 Go's ({t['name'][len('RSS per idle client '):]})",
           t["ratio"] <= 0.5, f"{t['ours']:.1f} vs {t['go']:.1f} KiB ({t['ratio']:.2f}x)")
t = m("STUN requests/s (closed loop, 4x64 outstanding)")
if t:
    target("STUN requests/s >= 2x Go", t["ratio"] >= 2, f"{t['ratio']:.2f}x")

# ---- cross-check ----------------------------------------------------------------------------
cross = []
for kind in ("go", "ours"):
    for s in (1024, 16384):
        g, r = load(f"{kind}-goload-{s}"), load(f"{kind}-rsload-{s}")
        if g and r:
            cross.append(dict(server=kind, size=s, go_client_mb_per_s=g["mb_per_s"],
                              rust_client_mb_per_s=r["load"]["mb_per_s"],
                              go_client_pps=g["pps"], rust_client_pps=r["load"]["pps"],
                              go_client_p50_us=g["p50_us"], rust_client_p50_us=r["load"]["latency"]["p50_us"]))

result = dict(machine=machine, metrics=metrics, targets=targets, per_size=per_size,
              tls_echo_baseline=echo, crosscheck=cross,
              idle=dict(go=load("go-idle"), ours=load("ours-idle")))
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "latest.json"), "w") as f:
    json.dump(result, f, indent=1)


def fmt(v):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


la = machine["loadavg_1m"]
lines = [
    f"Machine: {machine['cpu']} ({machine['cores']} cores), kernel {machine['kernel']}, "
    f"{machine['rustc']}, {machine['go']}, Tailscale derper {machine['tailscale']}, commit {machine['commit']}, "
    f"{machine['date']}{' (quick run)' if machine['quick'] else ''}.",
    f"Load: {machine['pairs']} pairs, window {machine['window']}, {machine['duration']} per point. "
    f"1-minute load average during the run: min {min(la):.2f}, max {max(la):.2f}, mean {sum(la) / len(la):.2f}.",
    "",
    "| metric | unit | Go | ours | ours/Go |",
    "|---|---|---:|---:|---:|",
]
for x in metrics:
    r = "-" if x["ratio"] is None else f"{x['ratio']:.2f}x"
    lines.append(f"| {x['name']} | {x['unit']} | {fmt(x['go'])} | {fmt(x['ours'])} | {r} |")
if echo:
    lines.append(f"| plain TLS echo baseline (rustls, {echo['conns']} conns, {echo['cipher']}) | MB/s | | {fmt(echo['mb_per_s'])} | |")
lines += ["", "| target | met | measured |", "|---|---|---|"]
for t in targets:
    lines.append(f"| {t['target']} | {'yes' if t['met'] else '**no**'} | {t['detail']} |")
if cross:
    lines += ["", "Cross-check, same server, Rust load generator vs Go derphttp load generator:", "",
              "| server | size | Rust gen MB/s | Go gen MB/s | Go/Rust | Rust gen p50 µs | Go gen p50 µs |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for c in cross:
        lines.append(f"| {c['server']} | {c['size']} | {fmt(c['rust_client_mb_per_s'])} | {fmt(c['go_client_mb_per_s'])} "
                     f"| {c['go_client_mb_per_s'] / c['rust_client_mb_per_s']:.2f} | {fmt(c['rust_client_p50_us'])} | {fmt(c['go_client_p50_us'])} |")
md = "\n".join(lines) + "\n"
with open(os.path.join(out, "latest.md"), "w") as f:
    f.write(md)
print(md)

# ---- chart ----------------------------------------------------------------------------------
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
for kind, color in (("go", "tab:blue"), ("ours", "tab:orange")):
    xs = [s for s in sizes if per_size[s][kind]["mb_per_s"] is not None]
    a1.plot(xs, [per_size[s][kind]["mb_per_s"] for s in xs], "o-", color=color,
            label=f"{'Go derper' if kind == 'go' else 'ours'}")
    xs = [s for s in sizes if per_size[s][kind]["half_latency"]]
    a2.plot(xs, [per_size[s][kind]["half_latency"]["p50_us"] for s in xs], "o--", color=color,
            label=f"{'Go' if kind == 'go' else 'ours'} p50")
    a2.plot(xs, [per_size[s][kind]["half_latency"]["p99_us"] for s in xs], "s-", color=color,
            label=f"{'Go' if kind == 'go' else 'ours'} p99")
if echo:
    a1.axhline(echo["mb_per_s"], color="gray", ls=":", label="plain TLS echo")
for a in (a1, a2):
    a.set_xscale("log", base=2)
    a.set_xlabel("packet size (bytes)")
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
a1.set_yscale("log")
a1.set_ylabel("relayed MB/s (max, window-bound)")
a1.set_title("Relay throughput")
a2.set_yscale("log")
a2.set_ylabel("one-way latency (µs)")
a2.set_title("Latency at half of the slower server's max")
fig.suptitle(f"DERP relay on loopback, server pinned to 1 core: {machine['commit']}, load avg "
             f"{sum(la) / len(la):.1f}", fontsize=9)
fig.tight_layout()
fig.savefig(os.path.join(out, "latest.png"), dpi=90)
