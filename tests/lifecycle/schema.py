#!/usr/bin/env python3
"""Every validation rule of the DerpRegion CRD, on the real API server (issue 14 item 5).

The rules are read from the CRD file itself (crds/derpregions.derpfleet.io.yaml, turned into
JSON by `kubectl create --dry-run=client`): every x-kubernetes-validations rule and every
minimum/maximum/minLength/maxLength/minItems/maxItems/pattern/enum/required, in spec and status.
For each rule there must be at least one object the API server refuses (via `kubectl apply`,
with exactly the errors expected: the rule's own path and message) and one it accepts. A rule
without both, a case naming a rule the CRD no longer has, or a keyword this script does not know
fails the run, so a new rule cannot go untested.

Cases:
  - hand-written below for our own rules (the CEL rules, enums, lengths, item counts), each a
    patch on a small valid region; CEL cases expect the CRD's own message;
  - generated for `required`: from FULL_SPEC / FULL_STATUS (every embedded Kubernetes type filled
    in), one object per required field with that field removed ("<path>: Required value").
Status rules are applied with `kubectl apply --server-side --subresource=status`.

Usage: schema.py CRD_FILE NAMESPACE   (KUBECONFIG/PATH from the rig's env; the namespace exists)
Prints "ok"/"FAIL" lines, then "schema: N passed, N failed".
"""
import copy
import re
import json
import subprocess
import sys
import time

CRD_FILE, NS = sys.argv[1], sys.argv[2]
DELETE = object()  # a patch value that removes the key

# Keys of a schema node that restrict nothing (or are structure this script walks).
NEUTRAL = {"description", "type", "properties", "items", "default", "nullable", "format", "title",
           "additionalProperties", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
           "x-kubernetes-list-type", "x-kubernetes-map-type", "x-kubernetes-list-map-keys",
           "x-kubernetes-embedded-resource", "example", "externalDocs"}
# Keys that restrict, and that this script checks one by one.
RULES = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
         "minItems", "maxItems", "pattern", "enum", "required", "x-kubernetes-validations",
         "multipleOf", "uniqueItems", "minProperties", "maxProperties"}


def enumerate_rules(schema):
    """{rule key: detail} for every restricting keyword; unknown keywords are reported."""
    rules, unknown = {}, []

    def walk(node, path):
        for k, v in node.items():
            if k == "x-kubernetes-validations":
                for i, r in enumerate(v):
                    rules[f"{path} x-kubernetes-validations[{i}]"] = r
            elif k == "required":
                for f in v:
                    rules[f"{path} required {f}"] = f
            elif k in RULES:
                rules[f"{path} {k}"] = v
            elif k not in NEUTRAL:
                unknown.append(f"{path} {k}")
        for f, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{f}" if path else f)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}")

    walk(schema, "")
    return rules, unknown


def merge(base, patch):
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if v is DELETE:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


BASE = {"regionId": 900, "code": "c", "tls": {"selfSigned": {}}}
S253 = "a" * 253
HOST253 = "{node}." + ".".join(["b" * 61] * 4)[: 253 - len("{node}.")]
assert len(HOST253) == 253 and not HOST253.endswith(".")
URL2048 = "https://h.example.com/" + "v" * (2048 - len("https://h.example.com/"))

# CEL rules, by path (index as in the CRD). Each case: (rule key, spec patch, expected errors).
# An expected error: (path, text it contains); CEL rules expect the CRD's own message
# (the string "CEL"); [] means accepted.
CEL = "CEL"


def T(**mode):
    """A tls patch that replaces BASE's selfSigned (merge would add to it)."""
    return {"tls": {"selfSigned": DELETE, "secretName": DELETE, "issuerRef": DELETE, **mode}}


R_RANGE = " x-kubernetes-validations[0]"
HAND = [
    # spec: regionId + maxRegions - 1 <= 2^32-1 in RegionPerNode
    ("spec" + R_RANGE, {"regionId": 4294967286, "publish": {"mode": "RegionPerNode", "maxRegions": 11}},
     [("spec", CEL)]),
    ("spec" + R_RANGE, {"regionId": 4294967289, "publish": {"mode": "RegionPerNode"}}, [("spec", CEL)]),
    ("spec" + R_RANGE, {"regionId": 4294967286, "publish": {"mode": "RegionPerNode", "maxRegions": 10}}, []),
    ("spec" + R_RANGE, {"regionId": 4294967295, "publish": {"mode": "SharedRegion", "maxRegions": 100}}, []),
    # code
    ("spec.code" + R_RANGE, {"code": "Fra-1"}, [("spec.code", CEL)]),
    ("spec.code" + R_RANGE, {"code": "-fra"}, [("spec.code", CEL)]),
    ("spec.code" + R_RANGE, {"code": "fra_1"}, [("spec.code", CEL)]),
    ("spec.code" + R_RANGE, {"code": ""}, [("spec.code", CEL)]),
    ("spec.code" + R_RANGE, {"code": "0-fra-1"}, []),
    ("spec.code maxLength", {"code": "a" * 33}, [("spec.code", "may not be more than 32 bytes")]),
    ("spec.code maxLength", {"code": "a" * 32}, []),
    # hostnameTemplate
    ("spec.hostnameTemplate x-kubernetes-validations[0]", {"hostnameTemplate": "derp.example.com"},
     [("spec.hostnameTemplate", CEL)]),
    ("spec.hostnameTemplate x-kubernetes-validations[0]", {"hostnameTemplate": "{node}.derp.example.com"}, []),
    ("spec.hostnameTemplate x-kubernetes-validations[1]", {"hostnameTemplate": "{node}.Derp.example.com"},
     [("spec.hostnameTemplate", CEL)]),
    ("spec.hostnameTemplate x-kubernetes-validations[1]", {"hostnameTemplate": "{node}..example.com"},
     [("spec.hostnameTemplate", CEL)]),
    ("spec.hostnameTemplate x-kubernetes-validations[1]", {"hostnameTemplate": "{node}_x.example.com"},
     [("spec.hostnameTemplate", CEL)]),
    ("spec.hostnameTemplate x-kubernetes-validations[1]", {"hostnameTemplate": "derp-{node}-1.a-b.example"}, []),
    ("spec.hostnameTemplate maxLength", {"hostnameTemplate": HOST253 + "b"},
     [("spec.hostnameTemplate", "may not be more than 253 bytes")]),
    ("spec.hostnameTemplate maxLength", {"hostnameTemplate": HOST253}, []),
    # ports: each in range, the TCP ports distinct
    ("spec.ports x-kubernetes-validations[0]", {"ports": {"derpPort": 9731}}, [("spec.ports", CEL)]),
    ("spec.ports x-kubernetes-validations[0]", {"ports": {"httpPort": 443}}, [("spec.ports", CEL)]),
    ("spec.ports x-kubernetes-validations[0]", {"ports": {"httpPort": 9100, "metricsPort": 9100}},
     [("spec.ports", CEL)]),
    ("spec.ports x-kubernetes-validations[0]", {"ports": {"derpPort": 8443, "httpPort": 8080, "metricsPort": 9100,
                                                          "stunPort": 8443}}, []),
    ("spec.ports x-kubernetes-validations[0]", {"ports": {"httpPort": -1, "derpPort": 80}}, []),
    ("spec.ports.derpPort" + R_RANGE, {"ports": {"derpPort": 0}}, [("spec.ports.derpPort", CEL)]),
    ("spec.ports.derpPort" + R_RANGE, {"ports": {"derpPort": 65536}}, [("spec.ports.derpPort", CEL)]),
    ("spec.ports.derpPort" + R_RANGE, {"ports": {"derpPort": -1}}, [("spec.ports.derpPort", CEL)]),
    ("spec.ports.derpPort" + R_RANGE, {"ports": {"derpPort": 65535}}, []),
    ("spec.ports.derpPort" + R_RANGE, {"ports": {"derpPort": 1}}, []),
    ("spec.ports.httpPort" + R_RANGE, {"ports": {"httpPort": 0}}, [("spec.ports.httpPort", CEL)]),
    ("spec.ports.httpPort" + R_RANGE, {"ports": {"httpPort": -2}}, [("spec.ports.httpPort", CEL)]),
    ("spec.ports.httpPort" + R_RANGE, {"ports": {"httpPort": 65536}}, [("spec.ports.httpPort", CEL)]),
    ("spec.ports.httpPort" + R_RANGE, {"ports": {"httpPort": -1}}, []),
    ("spec.ports.httpPort" + R_RANGE, {"ports": {"httpPort": 65535}}, []),
    ("spec.ports.metricsPort" + R_RANGE, {"ports": {"metricsPort": 0}}, [("spec.ports.metricsPort", CEL)]),
    ("spec.ports.metricsPort" + R_RANGE, {"ports": {"metricsPort": -1}}, [("spec.ports.metricsPort", CEL)]),
    ("spec.ports.metricsPort" + R_RANGE, {"ports": {"metricsPort": 65536}}, [("spec.ports.metricsPort", CEL)]),
    ("spec.ports.metricsPort" + R_RANGE, {"ports": {"metricsPort": 1}}, []),
    ("spec.ports.stunPort" + R_RANGE, {"ports": {"stunPort": 0}}, [("spec.ports.stunPort", CEL)]),
    ("spec.ports.stunPort" + R_RANGE, {"ports": {"stunPort": 65536}}, [("spec.ports.stunPort", CEL)]),
    ("spec.ports.stunPort" + R_RANGE, {"ports": {"stunPort": -1}}, []),
    ("spec.ports.stunPort" + R_RANGE, {"ports": {"stunPort": 65535}}, []),
    # publish
    ("spec.publish.maxRegions" + R_RANGE, {"publish": {"maxRegions": 0}}, [("spec.publish.maxRegions", CEL)]),
    ("spec.publish.maxRegions" + R_RANGE, {"publish": {"maxRegions": 101}}, [("spec.publish.maxRegions", CEL)]),
    ("spec.publish.maxRegions" + R_RANGE, {"publish": {"maxRegions": 1}}, []),
    ("spec.publish.maxRegions" + R_RANGE, {"publish": {"maxRegions": 100}}, []),
    ("spec.publish.mode enum", {"publish": {"mode": "PerNode"}}, [("spec.publish.mode", 'Unsupported value: "PerNode"')]),
    ("spec.publish.mode enum", {"publish": {"mode": "RegionPerNode"}}, []),
    # regionId
    ("spec.regionId" + R_RANGE, {"regionId": 0}, [("spec.regionId", CEL)]),
    # (SharedRegion at the top of the range: the default RegionPerNode reserves maxRegions ids
    # from regionId on, which the spec-level rule above checks on its own)
    ("spec.regionId" + R_RANGE, {"regionId": 4294967296, "publish": {"mode": "SharedRegion"}}, [("spec.regionId", CEL)]),
    ("spec.regionId" + R_RANGE, {"regionId": 1}, []),
    ("spec.regionId" + R_RANGE, {"regionId": 4294967295, "publish": {"mode": "SharedRegion"}}, []),
    # tls: exactly one mode
    ("spec.tls" + R_RANGE, T(), [("spec.tls", CEL)]),
    ("spec.tls" + R_RANGE, T(selfSigned={}, secretName="s"), [("spec.tls", CEL)]),
    ("spec.tls" + R_RANGE, T(issuerRef={"name": "i"}, secretName="s"), [("spec.tls", CEL)]),
    ("spec.tls" + R_RANGE, T(issuerRef={"name": "i"}, selfSigned={}, secretName="s"),
     [("spec.tls", CEL)]),
    ("spec.tls" + R_RANGE, T(secretName="s"), []),
    ("spec.tls" + R_RANGE, T(issuerRef={"name": "i"}), []),
    ("spec.tls" + R_RANGE, T(selfSigned={"mode": "Pin"}), []),
    ("spec.tls.issuerRef.kind enum", T(issuerRef={"name": "i", "kind": "Foo"}),
     [("spec.tls.issuerRef.kind", 'Unsupported value: "Foo"')]),
    ("spec.tls.issuerRef.kind enum", T(issuerRef={"name": "i", "kind": "ClusterIssuer"}), []),
    ("spec.tls.issuerRef.name minLength", T(issuerRef={"name": ""}),
     [("spec.tls.issuerRef.name", "should be at least 1 chars long")]),
    ("spec.tls.issuerRef.name minLength", T(issuerRef={"name": "i"}), []),
    ("spec.tls.issuerRef.name maxLength", T(issuerRef={"name": S253 + "a"}),
     [("spec.tls.issuerRef.name", "may not be more than 253 bytes")]),
    ("spec.tls.issuerRef.name maxLength", T(issuerRef={"name": S253}), []),
    ("spec.tls.secretName minLength", T(secretName=""),
     [("spec.tls.secretName", "should be at least 1 chars long")]),
    ("spec.tls.secretName minLength", T(secretName="s"), []),
    ("spec.tls.secretName maxLength", T(secretName=S253 + "a"),
     [("spec.tls.secretName", "may not be more than 253 bytes")]),
    ("spec.tls.secretName maxLength", T(secretName=S253), []),
    ("spec.tls.selfSigned.mode enum", {"tls": {"selfSigned": {"mode": "pin"}}},
     [("spec.tls.selfSigned.mode", 'Unsupported value: "pin"')]),
    ("spec.tls.selfSigned.mode enum", {"tls": {"selfSigned": {"mode": "InsecureForTests"}}}, []),
    # verifyClientURL
    ("spec.verifyClientURL" + R_RANGE, {"verifyClientURL": "ftp://h.example.com/verify"},
     [("spec.verifyClientURL", CEL)]),
    ("spec.verifyClientURL" + R_RANGE, {"verifyClientURL": "h.example.com/verify"}, [("spec.verifyClientURL", CEL)]),
    ("spec.verifyClientURL" + R_RANGE, {"verifyClientURL": "http://headscale:8080/verify"}, []),
    ("spec.verifyClientURL maxLength", {"verifyClientURL": URL2048 + "v"},
     [("spec.verifyClientURL", "may not be more than 2048 bytes")]),
    ("spec.verifyClientURL maxLength", {"verifyClientURL": URL2048}, []),
    # lists and enums
    ("spec.addressTypes minItems", {"addressTypes": []}, [("spec.addressTypes", "should have at least 1 items")]),
    ("spec.addressTypes minItems", {"addressTypes": ["InternalIP"]}, []),
    ("spec.addressTypes[] enum", {"addressTypes": ["ExternalIP", "Hostname"]},
     [("spec.addressTypes[1]", 'Unsupported value: "Hostname"')]),
    ("spec.addressTypes[] enum", {"addressTypes": ["InternalIP", "ExternalIP"]}, []),
    ("spec.ipFamilies minItems", {"ipFamilies": []}, [("spec.ipFamilies", "should have at least 1 items")]),
    ("spec.ipFamilies minItems", {"ipFamilies": ["IPv6"]}, []),
    ("spec.ipFamilies[] enum", {"ipFamilies": ["IPv5"]}, [("spec.ipFamilies[0]", 'Unsupported value: "IPv5"')]),
    ("spec.ipFamilies[] enum", {"ipFamilies": ["IPv6", "IPv4"]}, []),
    ("spec.imagePullPolicy enum", {"imagePullPolicy": "Sometimes"},
     [("spec.imagePullPolicy", 'Unsupported value: "Sometimes"')]),
    ("spec.imagePullPolicy enum", {"imagePullPolicy": "Never"}, []),
    ("spec.imagePullPolicy enum", {"imagePullPolicy": None}, []),
    ("spec.name maxLength", {"name": "n" * 129}, [("spec.name", "may not be more than 128 bytes")]),
    ("spec.name maxLength", {"name": "n" * 128}, []),
]

# Every embedded type filled in, so each `required` field can be removed from a valid object.
EXPR = {"matchExpressions": [{"key": "k", "operator": "In", "values": ["v"]}]}
NODE_TERM = {"matchExpressions": [{"key": "k", "operator": "In", "values": ["v"]}],
             "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n"]}]}
POD_TERM = {"labelSelector": EXPR, "namespaceSelector": EXPR, "topologyKey": "kubernetes.io/hostname"}
FULL_SPEC = merge(BASE, {
    **T(issuerRef={"name": "i", "kind": "Issuer"}),
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [NODE_TERM]},
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": NODE_TERM}],
        },
        "podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [POD_TERM],
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": POD_TERM}],
        },
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [POD_TERM],
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": POD_TERM}],
        },
    },
    "resources": {"claims": [{"name": "c"}], "limits": {"memory": "1Gi"}, "requests": {"cpu": "100m"}},
    "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
})
T0 = "2026-01-01T00:00:00Z"
FULL_STATUS = {
    "conditions": [{"type": "Ready", "status": "True", "reason": "R", "message": "", "lastTransitionTime": T0}],
    "nodeRegions": [{"code": "c-0", "nodeName": "n", "regionId": 900}],
    "nodes": [{"hostName": "h", "name": "900a", "nodeName": "n", "ready": True}],
    "probe": {"nodes": [{"name": "900a", "healthy": True, "derpMs": 0, "meshMs": 0, "stunMs": 0, "tlsMs": 0}]},
}
STATUS_HAND = [
    (f"status.probe.nodes[].{f} minimum", {"probe": {"nodes": [{"name": "900a", "healthy": True, f: -1}]}},
     [(f"status.probe.nodes[0].{f}", "should be greater than or equal to 0")])
    for f in ("derpMs", "meshMs", "stunMs", "tlsMs")
] + [
    (f"status.probe.nodes[].{f} minimum", {"probe": {"nodes": [{"name": "900a", "healthy": True, f: 0}]}}, [])
    for f in ("derpMs", "meshMs", "stunMs", "tlsMs")
]


def without(obj, path, field):
    """A copy of obj without `field` at `path` (segments; "x[]" is item 0 of list x)."""
    out = json.loads(json.dumps(obj))  # FULL_SPEC shares sub-dicts: copy without aliasing
    node = out
    for seg in path:
        if seg.endswith("[]"):
            node = node[seg[:-2]][0]
        else:
            node = node[seg]
    if field not in node:
        raise KeyError(field)
    del node[field]
    return out


def required_cases(rules):
    """One refused object per `required` rule, cut from FULL_SPEC/FULL_STATUS."""
    cases, missing = [], []
    for key in rules:
        path, kw, *rest = key.split(" ")
        if kw != "required":
            continue
        field = rest[0]
        # "spec.a[].b" -> "spec", "a[]", "b"; the error path has [0] for each [].
        segs = path.split(".") if path else []
        err_path = (path.replace("[]", "[0]") + "." + field) if path else field
        top = {"spec": FULL_SPEC, "status": FULL_STATUS}
        try:
            if not segs:
                obj = without(top, [], field)
                cases.append((key, "spec", obj.get("spec", DELETE), [(err_path, "Required value")]))
            else:
                obj = without(top, segs, field)
                sub = segs[0]
                cases.append((key, sub, obj[sub], [(err_path, "Required value")]))
        except (KeyError, IndexError, TypeError):
            missing.append(key)
    return cases, missing


def kubectl(args, stdin):
    p = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


# One error of a multi-object apply: 'Error from server (Invalid): error when creating "STDIN":
# DerpRegion.derpfleet.io "case-3" is invalid: <errors>', several errors as "[e1, e2]".
REFUSAL = re.compile(r'^Error from server \(Invalid\): .*? "(?P<name>[a-z0-9-]+)" is invalid: (?P<errs>.*)$')
# Errors inside the brackets start with a field path (messages hold ", " too).
ERR_START = re.compile(r", (?=(?:spec|status|metadata|<nil>)[A-Za-z0-9_.\[\]]*: )")
NOT_CHECKED = "<nil>: Invalid value: null: some validation rules were not checked"


def apply_all(objs, extra):
    """kubectl apply of every object in one List: {name: ("accepted", line) | ("refused", [errors])}."""
    # --validate=false: kubectl would otherwise refuse a missing required field itself, from the
    # OpenAPI it downloads, before the API server sees the object (schema and CEL rules are
    # always enforced by the server; this flag only drops kubectl's copy and the unknown-field check).
    rc, out, err = kubectl(["apply", "--validate=false", *extra, "-f", "-"],
                           json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
    res = {}
    for ln in out.splitlines():
        m = re.match(r"^derpregion\.derpfleet\.io/(\S+) (created|configured|unchanged|serverside-applied)$", ln)
        if m:
            res[m.group(1)] = ("accepted", ln)
    for ln in err.splitlines():
        m = REFUSAL.match(ln)
        if m:
            errs = m.group("errs")
            errs = ERR_START.split(errs[1:-1]) if errs.startswith("[") and errs.endswith("]") else [errs]
            res[m.group("name")] = ("refused", [e for e in errs if not e.startswith(NOT_CHECKED)])
    return res, rc, err


def obj(name, spec=None, status=None):
    o = {"apiVersion": "derpfleet.io/v1alpha1", "kind": "DerpRegion", "metadata": {"name": name, "namespace": NS}}
    if spec is not DELETE and spec is not None:
        o["spec"] = spec
    if status is not None:
        o["status"] = status
    return o


def main():
    rc, out, err = kubectl(["create", "--dry-run=client", "-o", "json", "-f", CRD_FILE], None)
    if rc != 0:
        print(f"FAIL reading {CRD_FILE}: {err}")
        print("schema: 0 passed, 1 failed")
        return 1
    crd = json.loads(out)
    versions = crd["spec"]["versions"]
    rules, unknown = {}, []
    for v in versions:
        r, u = enumerate_rules(v["schema"]["openAPIV3Schema"])
        if len(versions) > 1:
            r = {f"{v['name']}:{k}": d for k, d in r.items()}
        rules.update(r)
        unknown += u
    passed = failed = 0

    def ok(msg):
        nonlocal passed
        passed += 1
        print(f"ok   {msg}")

    def bad(msg):
        nonlocal failed
        failed += 1
        print(f"FAIL {msg}")

    if len(versions) != 1:
        bad(f"the CRD has {len(versions)} versions; the cases here are written for v1alpha1 only")
    for u in unknown:
        bad(f"schema keyword this test does not check: {u} (add it to RULES with cases, or to NEUTRAL)")

    req, missing = required_cases(rules)
    for m in missing:
        bad(f"{m}: FULL_SPEC/FULL_STATUS lack this path, so no case is generated (fill it in)")

    # (key, where: spec|status, the spec or status, expected errors)
    cases = [(k, "spec", merge(BASE, p), e) for k, p, e in HAND]
    cases += [(k, "status", merge(FULL_STATUS, p), e) for k, p, e in STATUS_HAND]
    cases += req
    cases.append(("(every embedded type)", "spec", FULL_SPEC, []))
    cases.append(("(every status field)", "status", FULL_STATUS, []))

    t0 = time.monotonic()
    # Spec cases are objects of their own; a status case goes to the status subresource of an
    # object created (valid) with the spec cases. Two kubectl applies of a List each.
    spec_objs = [obj(f"case-{i}", body) for i, (_, where, body, _) in enumerate(cases) if where == "spec"]
    spec_objs += [obj(f"case-{i}", BASE) for i, (_, where, _, _) in enumerate(cases) if where == "status"]
    got, rc1, err1 = apply_all(spec_objs, [])
    status_objs = [obj(f"case-{i}", status=body) for i, (_, where, body, _) in enumerate(cases) if where == "status"]
    sgot, rc2, err2 = apply_all(status_objs, ["--server-side", "--subresource=status",
                                              "--field-manager=schema-test", "--force-conflicts"])
    elapsed = time.monotonic() - t0
    results = []
    for i, (key, where, _, expected) in enumerate(cases):
        r = (sgot if where == "status" else got).get(f"case-{i}")
        if where == "status" and got.get(f"case-{i}", ("",))[0] != "accepted":
            r = ("no object", got.get(f"case-{i}"))
        results.append((i, key, where, r, expected))
    other = [ln for ln in (err1 + err2).splitlines() if not REFUSAL.match(ln) and not ln.startswith("Warning: ")]
    if other:
        bad(f"kubectl apply said what this test does not parse: {other[:5]}")

    refused, accepted = set(), set()
    for i, key, where, r, expected in results:
        what = f"{key}: case-{i} ({where})"
        if r is None or r[0] not in ("accepted", "refused"):
            bad(f"{what}: kubectl apply reported nothing for it ({r})")
        elif not expected:
            if r[0] == "accepted":
                accepted.add(key)
                ok(f"{what}: accepted")
            else:
                bad(f"{what}: refused, want accepted: {r[1]}")
        elif r[0] == "accepted":
            bad(f"{what}: accepted, want refused")
        else:
            errs = r[1]
            if any(text == CEL for _, text in expected) and "message" not in rules[key]:
                bad(f"{what}: the rule has no fixed message (messageExpression?): give the expected text in the case")
                continue
            want = [(path, rules[key]["message"] if text == CEL else text) for path, text in expected]
            unmatched, missing_errs = list(errs), []
            for path, text in want:
                hit = next((e for e in unmatched if e.startswith(f"{path}: ") and text in e), None)
                if hit is None:
                    missing_errs.append(f"{path}: ...{text}")
                else:
                    unmatched.remove(hit)
            if missing_errs or unmatched:
                bad(f"{what}: want exactly {[f'{p}: ...{t}' for p, t in want]}, got {errs}")
            else:
                refused.add(key)
                ok(f"{what}: refused: {errs[0][:160]}")

    untested = []
    for key in rules:
        lacks = [w for w, s in (("refused", refused), ("accepted", accepted)) if key not in s]
        if key.split(" ")[1] == "required":
            # Accepted: FULL_SPEC/FULL_STATUS, which hold every required field.
            lacks = [w for w in lacks if w != "accepted"]
            full = "(every status field)" if key.startswith("status") else "(every embedded type)"
            if full not in accepted:
                lacks.append("accepted")
        if lacks:
            untested.append(f"{key} (no {' and no '.join(lacks)} case)")
    stale = sorted({c[0] for c in cases if not c[0].startswith("(")} - set(rules))
    for u in untested:
        bad(f"rule without a case: {u}")
    for s in stale:
        bad(f"case for a rule the CRD does not have: {s}")
    if not untested and not stale:
        ok(f"every one of the CRD's {len(rules)} rules has a refused and an accepted case")
    kinds = {}
    for key in rules:
        kw = key.split(" ")[1].split("[")[0]
        kinds[kw] = kinds.get(kw, 0) + 1
    print(f"MEASURED schema: {len(rules)} rules ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}); "
          f"{len(cases)} cases ({len(spec_objs) - len(status_objs)} spec, {len(status_objs)} status) "
          f"in two kubectl applies of a List, {elapsed:.1f}s")
    print(f"schema: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
