#!/usr/bin/env python3
"""Small helpers for bench/operator-scale/run (stdlib only)."""
import http.client, json, sys, time

def get(port, path, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    return r.status, dict(r.getheaders()), body

def regions_yaml(args):
    """R ns first_id [part parts] -> the regions (only those with i % parts == part)"""
    n, ns, first_id = int(args[0]), args[1], int(args[2])
    part, parts = (int(args[3]), int(args[4])) if len(args) > 4 else (0, 1)
    out = []
    for i in range(part, n, parts):
        out.append(
            "apiVersion: derpfleet.io/v1alpha1\nkind: DerpRegion\n"
            f"metadata: {{name: r{i}, namespace: {ns}}}\n"
            f"spec:\n  regionId: {first_id + i}\n  code: r{i}\n"
            f"  nodeSelector: {{derp-group: \"{i}\"}}\n"
            "  tls: {selfSigned: {}}\n  bindToNodeIP: true\n"
            "  ports: {derpPort: 8443, stunPort: 3478, httpPort: -1, metricsPort: 9731}\n")
    sys.stdout.write("---\n".join(out))

def count_ready(_args):
    v = json.load(sys.stdin)
    n = 0
    for it in v.get("items", []):
        for c in (it.get("status") or {}).get("conditions") or []:
            if c.get("type") == "Ready" and c.get("status") == "True":
                n += 1
    print(f"{n} {len(v.get('items', []))}")

def map_complete(args):
    """port R per_group first_id -> 'regions_complete nodes_total bytes etag'"""
    port, r, per, first = int(args[0]), int(args[1]), int(args[2]), int(args[3])
    try:
        st, h, body = get(port, "/derpmap.json")
    except Exception:
        print("0 0 0 -"); return
    if st != 200:
        print("0 0 0 -"); return
    m = json.loads(body)
    regs = m.get("Regions") or {}
    complete, nodes = 0, 0
    for i in range(r):
        reg = regs.get(str(first + i))
        if not reg:
            continue
        k = len(reg.get("Nodes") or [])
        nodes += k
        if k >= per:
            complete += 1
    etag = {k.lower(): v for k, v in h.items()}.get("etag", "-")
    print(f"{complete} {nodes} {len(body)} {etag}")

def wait_node_gone(args):
    """port node_name timeout_s: poll the map (If-None-Match, every 5 ms) until node_name is absent.
    Prints the monotonic time (s) it was first seen gone; exits 1 on timeout."""
    port, name, timeout = int(args[0]), args[1], float(args[2])
    t_start = float(args[3]) if len(args) > 3 else time.time()
    etag = None
    deadline = time.time() + timeout
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    while time.time() < deadline:
        hdr = {"If-None-Match": etag} if etag else {}
        c.request("GET", "/derpmap.json", headers=hdr)
        r = c.getresponse(); body = r.read()
        if r.status == 200:
            etag = r.getheader("ETag")
            m = json.loads(body)
            names = {n.get("Name") for reg in (m.get("Regions") or {}).values() for n in (reg.get("Nodes") or [])}
            if name not in names:
                print(f"{time.time() - t_start:.4f}"); return
        time.sleep(0.005)
    sys.exit(1)

def metric(args):
    name = args[0]
    for l in sys.stdin:
        if l.startswith(name + " "):
            print(l.split()[-1]); return
    print("null")

if __name__ == "__main__":
    {"regions-yaml": regions_yaml, "count-ready": count_ready, "map-complete": map_complete,
     "wait-node-gone": wait_node_gone, "metric": metric}[sys.argv[1]](sys.argv[2:])
