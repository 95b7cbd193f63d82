#!/usr/bin/env python3
"""Probes and the report of tests/headscale-day (issue 12 item 1: a day in the life, measured).

  day.py flow-sink --listen 127.0.0.1:PORT --log FILE
      Accepts TCP connections and logs "<unix time> <bytes>" at most every 0.1 s while bytes
      arrive: the arrival gaps are the stream's stalls.
  day.py flow --socks 127.0.0.1:PORT --to IP:PORT --log FILE [--chunk 2048] [--interval 0.05]
      Sends a steady stream through a SOCKS5 server (tailscaled --socks5-server) to the peer's
      tailnet address, one connection for as long as it lives; logs connects and errors, and
      reconnects after an error.
  day.py poll --out FILE --derpers IP:PORT,... --map URL [--client-sock SOCK --tailscale BIN]
      Every 0.5 s: each derper's /metrics (clients, accepts, home connections), the node names of
      the map Service and, every second poll, the map the client got from Headscale. JSON lines.
  day.py analyze --dir W [--markdown]
      Reads the logs of a run and prints the table, one row per scenario and client; writes
      W/results.json for the run script's checks.

Every probe runs until killed or for --max-seconds (bounded).
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

# The story's stream tool holds the socket helpers (SOCKS5 through a userspace tailscaled).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "story"))
from stream import hostport, read_exact, socks5_connect  # noqa: E402


# ---- probes ----------------------------------------------------------------------------------

def flow_sink(a):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(hostport(a.listen))
    ls.listen(8)
    out = open(a.log, "a", buffering=1)
    lock = threading.Lock()
    out.write("%.3f listen %s\n" % (time.time(), a.listen))

    def serve(c, peer):
        got, last = 0, 0.0
        c.settimeout(a.max_seconds)
        try:
            while True:
                b = c.recv(1 << 16)
                if not b:
                    break
                got += len(b)
                now = time.time()
                if now - last >= 0.1:
                    with lock:
                        out.write("%.3f %d\n" % (now, got))
                    got, last = 0, now
        except OSError as e:
            with lock:
                out.write("%.3f error %s\n" % (time.time(), e))
        finally:
            c.close()
            with lock:
                out.write("%.3f closed %s\n" % (time.time(), peer))

    end = time.time() + a.max_seconds
    ls.settimeout(5)
    while time.time() < end:
        try:
            c, peer = ls.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()
    return 0


def flow(a):
    out = open(a.log, "a", buffering=1)
    data = os.urandom(a.chunk)
    end = time.time() + a.max_seconds
    while time.time() < end:
        try:
            c = socks5_connect(a.socks, a.to, 10)
            # A stalled path blocks sendall; only a dead connection ends it.
            c.settimeout(120)
            out.write("%.3f connected %s\n" % (time.time(), a.to))
            nxt = time.time()
            while time.time() < end:
                c.sendall(data)
                nxt += a.interval
                time.sleep(max(0.0, nxt - time.time()))
            c.close()
        except OSError as e:
            out.write("%.3f error %s\n" % (time.time(), e))
            time.sleep(0.5)
    return 0


METRICS = re.compile(r"^(derper_(?:clients|accepts_total|home_connections|connections|http_requests_total))(?:\{[^}]*\})?\s+([0-9.eE+-]+)$")


def metrics(url):
    """The derper's gauges and counters this harness reads, labelled series summed."""
    vals = {}
    with urllib.request.urlopen(url, timeout=0.4) as r:
        for line in r.read().decode(errors="replace").splitlines():
            m = METRICS.match(line)
            if m:
                vals[m.group(1)] = vals.get(m.group(1), 0.0) + float(m.group(2))
    return vals


def derpmap_nodes(body):
    m = json.loads(body)
    return sorted("%s/%s" % (rid, n.get("Name", "")) for rid, r in (m.get("Regions") or {}).items()
                  if r for n in (r.get("Nodes") or []))


def poll(a):
    out = open(a.out, "a", buffering=1)
    end = time.time() + a.max_seconds
    i = 0
    while time.time() < end:
        t = time.time()
        rec = {"t": round(t, 3), "derp": {}}
        for d in a.derpers.split(","):
            try:
                rec["derp"][d] = metrics("http://%s/metrics" % d)
            except Exception:  # noqa: BLE001 - a derper that is down is a data point
                rec["derp"][d] = None
        try:
            with urllib.request.urlopen(a.map, timeout=0.4) as r:
                rec["map"] = derpmap_nodes(r.read())
        except Exception as e:  # noqa: BLE001
            rec["map"] = None
            rec["map_error"] = str(e)[:80]
        if a.client_sock and i % 2 == 0:
            try:
                p = subprocess.run([a.tailscale, "--socket=" + a.client_sock, "debug", "derp-map"],
                                   capture_output=True, timeout=2)
                rec["cmap"] = derpmap_nodes(p.stdout) if p.returncode == 0 else None
            except Exception:  # noqa: BLE001
                rec["cmap"] = None
        out.write(json.dumps(rec) + "\n")
        i += 1
        time.sleep(max(0.0, a.interval - (time.time() - t)))
    return 0


# ---- analysis --------------------------------------------------------------------------------

def stamped(path):
    """(unix time, text) of each line of a log written through `stamp`."""
    res = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                p = line.split(" ", 1)
                try:
                    res.append((float(p[0]), p[1].rstrip("\n") if len(p) > 1 else ""))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return res


def longest_gap(times, t0, t1):
    """Longest interval inside [t0, t1] without an event, the window's edges counting as events
    only when an event came before t0 (a probe that never answered in the window stalls it all)."""
    ts = [t for t in times if t0 <= t <= t1]
    before = [t for t in times if t < t0]
    pts = ([t0] if before else []) + ts + [t1]
    if not ts and not before:
        return None
    return max((b - a) for a, b in zip(pts, pts[1:])) if len(pts) > 1 else t1 - t0


def analyze(a):
    W = a.dir
    scen = [json.loads(l) for l in open(os.path.join(W, "scenarios.jsonl")) if l.strip()]
    clients = json.load(open(os.path.join(W, "clients.json")))
    refresh = [t for t, s in stamped(os.path.join(W, "headscale.log")) if "fetching DERPMap updates" in s]
    hs_err = [t for t, s in stamped(os.path.join(W, "headscale.log")) if "failed to build new DERPMap" in s]
    tslog = {c: stamped(os.path.join(W, "tailscaled-%s.log" % c)) for c in clients}
    pongs = {c: [t for t, s in stamped(os.path.join(W, "ping-%s.log" % c)) if s.startswith("pong")] for c in clients}
    flows = {}
    for c in clients:
        flows[c] = [t for t, s in stamped(os.path.join(W, "flow-sink-%s.log" % c)) if re.match(r"^\d+$", s)]
    polls = []
    try:
        polls = [json.loads(l) for l in open(os.path.join(W, "poll.jsonl")) if l.strip()]
    except FileNotFoundError:
        pass
    res = []
    conn_re = re.compile(r"magicsock: derp-(\d+) connected; connGen")
    home_re = re.compile(r"magicsock: home is now derp-(\d+)")
    for s in scen:
        t0, t1 = s["t0"], s["t1"]
        nref = sum(1 for t in refresh if t0 <= t <= t1)
        nerr = sum(1 for t in hs_err if t0 <= t <= t1)
        # DERP connections our derpers accepted in the window: TCP accepts less plain HTTP
        # requests (tailscaled's netcheck latency probes); counters, a restarted derper starts at 0
        acc = 0
        inw = [p for p in polls if t0 <= p["t"] <= t1]
        last = {}
        for p in inw:
            for d, v in p["derp"].items():
                if not v or "derper_accepts_total" not in v:
                    continue
                x = v["derper_accepts_total"] - v.get("derper_http_requests_total", 0.0)
                if d in last:
                    acc += x - last[d] if x >= last[d] else x
                last[d] = x
        # did the client's map (from Headscale) keep every node of our regions? min and max count
        cm = [len(p["cmap"]) for p in inw if p.get("cmap") is not None]
        sm = [len(p["map"]) for p in inw if p.get("map") is not None]
        used = None
        if s.get("t_recover") and s.get("recovered_derpers"):
            for p in polls:
                if p["t"] < s["t_recover"]:
                    continue
                if any((p["derp"].get(d) or {}).get("derper_clients", 0) > 0 for d in s["recovered_derpers"]):
                    used = p["t"] - s["t_recover"]
                    break
        sres = {"mode": s["mode"], "scenario": s["name"], "seconds": round(t1 - t0, 1), "refreshes": nref,
                "headscale_errors": nerr, "accepts": int(acc), "client_map_nodes": [min(cm), max(cm)] if cm else None,
                "service_map_nodes": [min(sm), max(sm)] if sm else None, "usable_after": s.get("usable_after"),
                "used_after": None if used is None else round(used, 2), "note": s.get("note", ""), "clients": {}}
        for c in clients:
            lines = [(t, x) for t, x in tslog[c] if t0 <= t <= t1]
            conns = [conn_re.search(x).group(1) for t, x in lines if conn_re.search(x)]
            redef = sum(1 for t, x in lines if "derp-region-redefined" in x)
            homes = [m.group(1) for m in (home_re.search(x) for t, x in lines) if m]
            pg = longest_gap(pongs[c], t0, t1)
            fg = longest_gap(flows[c], t0, t1)
            cr = {"connects": len(conns), "connect_regions": sorted(set(conns)), "redefined": redef,
                  "home_changes": homes, "ping_stall": None if pg is None else round(pg, 2),
                  "stream_stall": None if fg is None else round(fg, 2),
                  "pongs": sum(1 for t in pongs[c] if t0 <= t <= t1)}
            sres["clients"][c] = cr
        res.append(sres)
    json.dump(res, open(os.path.join(W, "results.json"), "w"), indent=1)

    def f(x, unit=""):
        return "-" if x is None else ("%s%s" % (x, unit))
    hdr = ["mode", "scenario", "s", "refreshes", "client", "DERP connects", "region-redefined",
           "home moves", "longest ping stall", "longest stream stall", "DERP connections accepted (all derpers)",
           "client map nodes min-max", "usable again / used again", "Headscale fetch errors"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for s in res:
        for i, (c, cr) in enumerate(sorted(s["clients"].items())):
            first = i == 0
            cmn = s["client_map_nodes"]
            print("| " + " | ".join([
                s["mode"] if first else "", s["scenario"] if first else "", str(s["seconds"]) if first else "",
                str(s["refreshes"]) if first else "", c, str(cr["connects"]), str(cr["redefined"]),
                str(len(cr["home_changes"])), f(cr["ping_stall"], " s"), f(cr["stream_stall"], " s"),
                str(s["accepts"]) if first else "",
                ("%d-%d" % tuple(cmn) if cmn else "-") if first else "",
                ("%s / %s" % (f(s["usable_after"], " s"), f(s["used_after"], " s"))) if first else "",
                str(s["headscale_errors"]) if first else ""]) + " |")
    print()
    # The same, one row per scenario, the clients' figures as a/b/c (the README's table).
    hdr = ["mode", "scenario", "refreshes", "DERP connects", "region-redefined", "longest ping stall s",
           "longest stream stall s", "DERP conns accepted", "client map nodes", "usable / used again s"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for s in res:
        cs = [cr for _, cr in sorted(s["clients"].items())]
        j = lambda k: "/".join(f(cr[k]) for cr in cs)  # noqa: E731
        cmn = s["client_map_nodes"]
        print("| " + " | ".join([
            s["mode"], s["scenario"], str(s["refreshes"]), j("connects"), j("redefined"), j("ping_stall"),
            j("stream_stall"), str(s["accepts"]), ("%d-%d" % tuple(cmn)) if cmn else "-",
            "%s / %s" % (f(s["usable_after"]), f(s["used_after"]))]) + " |")
    print()
    for s in res:
        if s["note"]:
            print("- %s %s: %s" % (s["mode"], s["scenario"], s["note"]))
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("flow-sink")
    s.add_argument("--listen", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--max-seconds", type=float, default=7200)
    s = sub.add_parser("flow")
    s.add_argument("--socks", required=True)
    s.add_argument("--to", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--chunk", type=int, default=2048)
    s.add_argument("--interval", type=float, default=0.05)
    s.add_argument("--max-seconds", type=float, default=7200)
    s = sub.add_parser("poll")
    s.add_argument("--out", required=True)
    s.add_argument("--derpers", required=True)
    s.add_argument("--map", required=True)
    s.add_argument("--client-sock")
    s.add_argument("--tailscale")
    s.add_argument("--interval", type=float, default=0.5)
    s.add_argument("--max-seconds", type=float, default=7200)
    s = sub.add_parser("analyze")
    s.add_argument("--dir", required=True)
    a = p.parse_args()
    return {"flow-sink": flow_sink, "flow": flow, "poll": poll, "analyze": analyze}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
