#!/usr/bin/env python3
"""Turns one pod template of rendered Kubernetes YAML into `podman run` arguments, the way a
kubelet would run it, so tests/images runs an image exactly as the operator or the chart renders
it (securityContext, command, args, env, mounts, host network) instead of restating those here.

  podman-args.py RENDERED.yaml KIND/NAME --node-name N --host-ip IP --work DIR
                 [--secret NAME=DIR]... [--env K=V]... [--sa-dir DIR]

Writes NUL-separated arguments (everything between `podman run` and the image, then the image and
the container's args) to stdout, and the container's probe URLs, one per line, to DIR/probes.

Kubelet semantics followed (k8s.io/kubernetes pkg/kubelet, v1.37):
- env: `value` with $(VAR) expanded against the variables defined before it; fieldRef
  status.hostIP, status.podIP (= the host IP with hostNetwork), spec.nodeName, metadata.name,
  metadata.namespace; $(VAR) in command and args expanded the same way ($$ is a literal $,
  unknown names stay as written).
- volumes: emptyDir -> a fresh directory (0777, group fsGroup, setgid, as kubelet sets ownership);
  secret/configMap -> the atomic-writer layout (..<ts>/ files, ..data symlink, one symlink per
  key), files with the volume's defaultMode and group fsGroup; ConfigMaps come from the rendered
  YAML, Secrets from --secret NAME=DIR (what the controller or cert-manager would write);
  projected serviceAccountToken (kube-api-access-*) -> --sa-dir.
- securityContext: runAsUser/runAsGroup -> --user; fsGroup -> --group-add; capabilities ->
  --cap-drop/--cap-add; readOnlyRootFilesystem -> --read-only without podman's extra tmpfs
  mounts; allowPrivilegeEscalation false -> no-new-privileges; runAsNonRoot is checked as the
  kubelet does (refused for uid 0); seccompProfile RuntimeDefault = podman's default profile.
- hostNetwork -> --network host (the caller runs podman inside the network namespace it made).
Anything else in the spec that would change how the container runs is refused with a message, so
a new field the operator renders cannot be silently dropped here.
"""
import argparse
import json
import os
import re
import sys
import time

import yaml

p = argparse.ArgumentParser()
p.add_argument("rendered")
p.add_argument("object")
p.add_argument("--node-name", required=True)
p.add_argument("--host-ip", required=True)
p.add_argument("--work", required=True)
p.add_argument("--secret", action="append", default=[])
p.add_argument("--env", action="append", default=[], help="extra env the kubelet injects (service links)")
p.add_argument("--sa-dir")
p.add_argument("--pod-name", default="test-pod")
a = p.parse_args()


def die(msg):
    sys.exit(f"podman-args: {msg}")


kind, name = a.object.split("/", 1)
docs = [d for d in yaml.safe_load_all(open(a.rendered)) if d]
objs = {}
for d in docs:
    if d.get("kind") == "List":
        for i in d.get("items", []):
            objs[(i["kind"], i["metadata"]["name"])] = i
    else:
        objs[(d["kind"], d["metadata"]["name"])] = d
obj = objs.get((kind, name))
if obj is None:
    die(f"{kind}/{name} not in {a.rendered} (has: {', '.join(k + '/' + n for k, n in objs)})")
namespace = obj["metadata"].get("namespace", "default")
pod = obj["spec"]["template"]["spec"]
containers = pod["containers"]
if len(containers) != 1 or pod.get("initContainers"):
    die("exactly one container and no init containers are supported")
c = containers[0]

KNOWN_POD = {"containers", "volumes", "securityContext", "hostNetwork", "dnsPolicy", "enableServiceLinks",
             "automountServiceAccountToken", "serviceAccountName", "affinity", "tolerations", "nodeSelector",
             "topologySpreadConstraints", "terminationGracePeriodSeconds", "priorityClassName"}
KNOWN_C = {"name", "image", "imagePullPolicy", "command", "args", "env", "ports", "livenessProbe", "readinessProbe",
           "securityContext", "volumeMounts", "resources"}
for k in pod:
    if k not in KNOWN_POD:
        die(f"pod field {k} is not handled here; teach podman-args.py what the kubelet does with it")
for k in c:
    if k not in KNOWN_C:
        die(f"container field {k} is not handled here; teach podman-args.py what the kubelet does with it")

psc = pod.get("securityContext") or {}
csc = c.get("securityContext") or {}
for k in psc:
    if k not in {"fsGroup", "seccompProfile", "runAsUser", "runAsGroup", "runAsNonRoot"}:
        die(f"pod securityContext.{k} not handled")
for k in csc:
    if k not in {"allowPrivilegeEscalation", "capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup",
                 "runAsNonRoot", "seccompProfile"}:
        die(f"container securityContext.{k} not handled")
sec = dict(psc)
sec.update(csc)
seccomp = (sec.get("seccompProfile") or {}).get("type", "RuntimeDefault")
if seccomp != "RuntimeDefault":
    die(f"seccompProfile {seccomp} not handled")

out = ["--pull=never", "--ulimit=nofile=20000:20000", "--ulimit=nproc=4096:4096"]
host_ip = a.host_ip
# hostNetwork: the caller's network namespace is the node's. A pod-network pod (the operator's
# Deployment) is run there too: no CNI here; the real-kubelet rig runs it on a CNI bridge.
out.append("--network=host")
pod_ip = host_ip

uid = sec.get("runAsUser")
gid = sec.get("runAsGroup")
if sec.get("runAsNonRoot") and (uid is None or uid == 0):
    die("runAsNonRoot with uid 0 or no runAsUser: the kubelet refuses to start it (image USER not checked here)")
if uid is not None:
    out.append(f"--user={uid}:{gid if gid is not None else uid}")
fs_group = psc.get("fsGroup")
if fs_group is not None:
    out.append(f"--group-add={fs_group}")
caps = sec.get("capabilities") or {}
for cap in caps.get("drop") or []:
    out.append(f"--cap-drop={cap.lower()}")
for cap in caps.get("add") or []:
    out.append(f"--cap-add={cap.upper()}")
if sec.get("readOnlyRootFilesystem"):
    out += ["--read-only", "--read-only-tmpfs=false"]
if sec.get("allowPrivilegeEscalation") is False:
    out.append("--security-opt=no-new-privileges")

# Limits as the kubelet passes them to the runtime (requests only steer scheduling and shares).
def quantity(q, cpu):
    m = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|k|M|G)?", str(q))
    if not m:
        die(f"resource quantity {q!r} not handled")
    n, unit = float(m.group(1)), m.group(2) or ""
    if cpu:
        return n / 1000 if unit == "m" else n
    return int(n * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}[unit])


limits = (c.get("resources") or {}).get("limits") or {}
for k in limits:
    if k not in ("cpu", "memory"):
        die(f"resources.limits.{k} not handled")
if "memory" in limits:
    out.append(f"--memory={quantity(limits['memory'], False)}")
if "cpu" in limits:
    out.append(f"--cpus={quantity(limits['cpu'], True)}")

# ---- env -----------------------------------------------------------------------------------
env = {}
order = []
for kv in a.env:
    k, v = kv.split("=", 1)
    env[k] = v
    order.append(k)
VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(s, vars_):
    return VAR.sub(lambda m: "$" if m.group(0) == "$$" else vars_.get(m.group(1), m.group(0)), s)


FIELDS = {"status.hostIP": host_ip, "status.podIP": pod_ip, "spec.nodeName": a.node_name,
          "metadata.name": a.pod_name, "metadata.namespace": namespace,
          "spec.serviceAccountName": pod.get("serviceAccountName", "default")}
for e in c.get("env") or []:
    if "value" in e:
        v = expand(e["value"], env)
    elif "valueFrom" in e and "fieldRef" in e["valueFrom"]:
        fp = e["valueFrom"]["fieldRef"]["fieldPath"]
        if fp not in FIELDS:
            die(f"env {e['name']}: fieldRef {fp} not handled")
        v = FIELDS[fp]
    else:
        die(f"env {e['name']}: only value and fieldRef are handled")
    env[e["name"]] = v
    if e["name"] not in order:
        order.append(e["name"])
for k in order:
    out.append(f"--env={k}={env[k]}")

# ---- volumes ---------------------------------------------------------------------------------
secrets = dict(s.split("=", 1) for s in a.secret)
vols = {v["name"]: v for v in pod.get("volumes") or []}
os.makedirs(a.work, exist_ok=True)
stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.000000000", time.gmtime())


def atomic_dir(vname, files, mode):
    """kubelet's AtomicWriter layout: the payload in a timestamped dir, ..data -> it, keys -> ..data/key."""
    d = os.path.join(a.work, "volumes", vname)
    os.makedirs(os.path.join(d, stamp), exist_ok=True)
    for key, data in files.items():
        f = os.path.join(d, stamp, key)
        with open(f, "wb") as fh:
            fh.write(data)
        os.chmod(f, mode)
        if fs_group is not None:
            os.chown(f, 0, fs_group)
        os.symlink(os.path.join("..data", key), os.path.join(d, key))
    os.symlink(stamp, os.path.join(d, "..data"))
    os.chmod(os.path.join(d, stamp), 0o755)
    os.chmod(d, 0o1777)  # a kubelet secret/configMap volume is a tmpfs: drwxrwxrwt
    return d


for m in c.get("volumeMounts") or []:
    if "subPath" in m or "subPathExpr" in m or m.get("mountPropagation"):
        die(f"volumeMount {m['name']}: subPath/propagation not handled")
    v = vols.get(m["name"])
    if v is None:
        die(f"volumeMount {m['name']} names no volume")
    if "emptyDir" in v:
        if v["emptyDir"].get("medium"):
            die(f"emptyDir medium {v['emptyDir']['medium']} not handled")
        d = os.path.join(a.work, "volumes", m["name"])
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o777)
        if fs_group is not None:
            os.chown(d, 0, fs_group)
            os.chmod(d, 0o2777)
    elif "secret" in v:
        sname = v["secret"]["secretName"]
        src = secrets.get(sname)
        if src is None:
            die(f"volume {m['name']}: Secret {sname} not given (--secret {sname}=DIR)")
        files = {f: open(os.path.join(src, f), "rb").read() for f in sorted(os.listdir(src))}
        d = atomic_dir(m["name"], files, v["secret"].get("defaultMode", 0o644))
    elif "configMap" in v:
        cname = v["configMap"]["name"]
        cm = objs.get(("ConfigMap", cname))
        if cm is None:
            die(f"volume {m['name']}: ConfigMap {cname} not in the rendered YAML")
        files = {k: str(val).encode() for k, val in (cm.get("data") or {}).items()}
        d = atomic_dir(m["name"], files, v["configMap"].get("defaultMode", 0o644))
    elif "projected" in v and any("serviceAccountToken" in s for s in v["projected"]["sources"]):
        if not a.sa_dir:
            die(f"volume {m['name']}: a service account token volume needs --sa-dir")
        d = a.sa_dir
    else:
        die(f"volume {m['name']}: kind {sorted(v)} not handled")
    out.append(f"--volume={d}:{m['mountPath']}:{'ro' if m.get('readOnly') else 'rw'}")
# A pod's token is mounted by the kubelet when automountServiceAccountToken is not false.
if a.sa_dir and pod.get("automountServiceAccountToken") is not False and not any(
        "/var/run/secrets/kubernetes.io/serviceaccount" == m["mountPath"] for m in c.get("volumeMounts") or []):
    out.append(f"--volume={a.sa_dir}:/var/run/secrets/kubernetes.io/serviceaccount:ro")

# ---- command, args, image ---------------------------------------------------------------------
if c.get("command"):
    out.append("--entrypoint=" + json.dumps([expand(x, env) for x in c["command"]]))
out.append(c["image"])
out += [expand(x, env) for x in c.get("args") or []]

# ---- probes: the URLs a kubelet would GET --------------------------------------------------------
ports = {pt.get("name"): pt["containerPort"] for pt in c.get("ports") or []}
with open(os.path.join(a.work, "probes"), "w") as fh:
    for kind_ in ("readinessProbe", "livenessProbe"):
        pr = c.get(kind_)
        if not pr:
            continue
        g = pr.get("httpGet")
        if not g:
            die(f"{kind_}: only httpGet is handled")
        port = g["port"]
        port = ports.get(port, port) if isinstance(port, str) else port
        host = g.get("host") or pod_ip
        fh.write(f"{kind_} {g.get('scheme', 'HTTP').lower()}://{host}:{port}{g.get('path', '/')}\n")
sys.stdout.write("\0".join(out) + "\0")
