#!/usr/bin/env python3
"""A TCP stream through the tailnet, checked end to end by SHA-256.

  stream.py sink --listen 127.0.0.1:PORT [--max-conns N]
      Accepts connections (one at a time, at most N): reads an 8-byte big-endian length, then
      that many bytes, and answers "<bytes> <sha256 hex>\n". Logs one line per connection.

  stream.py send --socks 127.0.0.1:PORT --to 100.64.0.2:PORT --bytes N [--timeout S]
      Connects through a SOCKS5 server (tailscaled --socks5-server) to the peer's tailnet
      address, sends N random bytes framed as above, and compares the sink's answer with the
      SHA-256 of what it sent. Prints one line; exit 0 only if the digests match.

tailscaled in userspace-networking mode hands a TCP connection to its own tailnet IP to
127.0.0.1:<same port> on its host, so a sink on 127.0.0.1 receives what reached the peer's
netstack through WireGuard (over DERP).
"""
import argparse
import hashlib
import os
import socket
import struct
import sys
import time


def hostport(s):
    h, p = s.rsplit(":", 1)
    return h, int(p)


def read_exact(c, n):
    buf = bytearray()
    while len(buf) < n:
        b = c.recv(min(1 << 20, n - len(buf)))
        if not b:
            raise EOFError("closed after %d of %d bytes" % (len(buf), n))
        buf += b
    return bytes(buf)


def sink(a):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(hostport(a.listen))
    ls.listen(4)
    print("sink: listening on %s" % a.listen, flush=True)
    for _ in range(a.max_conns):
        c, peer = ls.accept()
        c.settimeout(120)
        t0 = time.monotonic()
        try:
            n = struct.unpack(">Q", read_exact(c, 8))[0]
            h = hashlib.sha256()
            left = n
            while left:
                b = c.recv(min(1 << 20, left))
                if not b:
                    raise EOFError("closed after %d of %d bytes" % (n - left, n))
                h.update(b)
                left -= len(b)
            c.sendall(b"%d %s\n" % (n, h.hexdigest().encode()))
            print("sink: %s: %d bytes in %.2fs sha256 %s" % (peer, n, time.monotonic() - t0, h.hexdigest()), flush=True)
        except Exception as e:  # noqa: BLE001 - logged, next connection
            print("sink: %s: %s" % (peer, e), flush=True)
        finally:
            c.close()


def socks5_connect(proxy, dest, timeout):
    c = socket.create_connection(hostport(proxy), timeout=timeout)
    c.sendall(b"\x05\x01\x00")
    if read_exact(c, 2) != b"\x05\x00":
        raise OSError("SOCKS5: no-auth method refused")
    host, port = hostport(dest)
    c.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack(">H", port))
    rep = read_exact(c, 4)
    if rep[1] != 0:
        raise OSError("SOCKS5: CONNECT %s refused, reply code %d" % (dest, rep[1]))
    alen = {1: 4, 4: 16}.get(rep[3])
    if alen is None:
        alen = read_exact(c, 1)[0]
    read_exact(c, alen + 2)
    return c


def send(a):
    data = os.urandom(a.bytes)
    want = hashlib.sha256(data).hexdigest()
    t0 = time.monotonic()
    try:
        c = socks5_connect(a.socks, a.to, a.timeout)
        c.settimeout(a.timeout)
        c.sendall(struct.pack(">Q", len(data)))
        view = memoryview(data)
        for i in range(0, len(data), 1 << 16):
            c.sendall(view[i:i + (1 << 16)])
        line = b""
        while not line.endswith(b"\n"):
            b = c.recv(256)
            if not b:
                break
            line += b
        c.close()
    except Exception as e:  # noqa: BLE001 - reported as the verdict
        print("sent %d bytes via SOCKS5 %s to %s: error after %.2fs: %s" % (a.bytes, a.socks, a.to, time.monotonic() - t0, e))
        return 1
    dt = time.monotonic() - t0
    parts = line.decode(errors="replace").split()
    got_n, got = (int(parts[0]), parts[1]) if len(parts) == 2 else (-1, "?")
    ok = got == want and got_n == len(data)
    print("%d bytes via SOCKS5 %s -> %s in %.2fs (%.1f MB/s); sha256 sent %s.. received %s.. (%d bytes): %s" % (
        len(data), a.socks, a.to, dt, len(data) / dt / 1e6, want[:16], got[:16], got_n, "intact" if ok else "MISMATCH"))
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--listen", required=True)
    s.add_argument("--max-conns", type=int, default=20)
    t = sub.add_parser("send")
    t.add_argument("--socks", required=True)
    t.add_argument("--to", required=True)
    t.add_argument("--bytes", type=int, default=4 << 20)
    t.add_argument("--timeout", type=float, default=60)
    a = p.parse_args()
    sys.exit(sink(a) if a.cmd == "sink" else send(a))


if __name__ == "__main__":
    main()
