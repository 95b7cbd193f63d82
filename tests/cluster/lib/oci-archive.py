#!/usr/bin/env python3
"""Writes a one-layer OCI image archive (what `ctr images import` reads) holding the given files.

  oci-archive.py OUT.tar IMAGE-NAME ENTRYPOINT SRC=DEST[:MODE]...

The rig's pause (sandbox) image is made this way: no registry is reachable, and containerd's CRI
plugin only needs an image under the name of its sandbox_image. The image name is set in the
index as io.containerd.image.name, which `ctr images import` uses as the image's name.
"""
import gzip
import hashlib
import io
import json
import sys
import tarfile
import time

out, name, entrypoint, *files = sys.argv[1:]
if not files:
    sys.exit("usage: oci-archive.py OUT.tar IMAGE-NAME ENTRYPOINT SRC=DEST[:MODE]...")

# The layer: fixed owners and mtimes, so the same inputs give the same digest.
raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
    for spec in files:
        src, dest = spec.split("=", 1)
        mode = 0o755
        if ":" in dest:
            dest, m = dest.rsplit(":", 1)
            mode = int(m, 8)
        data = open(src, "rb").read()
        info = tarfile.TarInfo(dest.lstrip("/"))
        info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, 0, 0, 0
        t.addfile(info, io.BytesIO(data))
layer_tar = raw.getvalue()
layer_gz = gzip.compress(layer_tar, mtime=0)


def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


config = json.dumps({
    "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(__import__("platform").machine(), "amd64"),
    "os": "linux",
    "config": {"Entrypoint": [entrypoint], "User": "65535:65535"},
    "rootfs": {"type": "layers", "diff_ids": [blob(layer_tar)]},
    "created": "1970-01-01T00:00:00Z",
}, sort_keys=True).encode()
manifest = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(config), "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob(layer_gz),
                "size": len(layer_gz)}],
}, sort_keys=True).encode()
index = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob(manifest),
                   "size": len(manifest),
                   "annotations": {"io.containerd.image.name": name,
                                   "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}}],
}, sort_keys=True).encode()

with tarfile.open(out, "w") as t:
    def add(path, data):
        info = tarfile.TarInfo(path)
        info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
        t.addfile(info, io.BytesIO(data))
    add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    add("index.json", index)
    for data in (config, manifest, layer_gz):
        add("blobs/sha256/" + blob(data)[7:], data)
