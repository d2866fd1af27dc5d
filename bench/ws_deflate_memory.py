"""Memory per idle websocket connection with and without permessage-deflate.

    python3 bench/ws_deflate_memory.py [N]      (after cargo build --release)

For each scenario a fresh wm-host (release build, one worker running the echo
plugin on a websocket:// listener with ws_deflate = true) gets N connections;
each connection does its handshake and, where the scenario says, echoes one
compressed message; then all stay open and idle, and the worker's RSS growth
divided by N is the cost of one connection. Scenarios:

- plain: no extension offered;
- deflate, no context takeover: the offer browsers' libraries and Autobahn
  make with client_no_context_takeover, one compressed message each;
- deflate, context takeover: the offer Chrome and Firefox make
  ("permessage-deflate; client_max_window_bits"), one compressed message
  each, so the worker keeps each client's compression context; once with
  a small message, once with 48 KiB, which fills the 32 KiB window.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
HOST = os.path.join(REL, "wm-host")
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def read_head(s):
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        b = s.recv(1)
        if not b:
            raise RuntimeError("closed during the handshake")
        head += b
    return head.decode()


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            raise RuntimeError("closed")
        out += b
    return out


def frame(payload, opcode=1, rsv1=False):
    mask = os.urandom(4)
    first = 0x80 | opcode | (0x40 if rsv1 else 0)
    n = len(payload)
    if n < 126:
        head = bytes([first, 0x80 | n])
    else:
        head = bytes([first, 0x80 | 126]) + n.to_bytes(2, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def read_frame(s):
    h = recv_exact(s, 2)
    n = h[1] & 0x7F
    if n == 126:
        n = int.from_bytes(recv_exact(s, 2), "big")
    elif n == 127:
        n = int.from_bytes(recv_exact(s, 8), "big")
    return h[0], recv_exact(s, n)


def connect(port, offer, message):
    s = socket.create_connection(("127.0.0.1", port))
    ext = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else ""
    s.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
        ).encode()
    )
    head = read_head(s)
    assert head.startswith("HTTP/1.1 101"), head
    if message:
        c = zlib.compressobj(1, zlib.DEFLATED, -15)
        z = c.compress(message) + c.flush(zlib.Z_SYNC_FLUSH)
        s.sendall(frame(z[:-4], rsv1=True))
        first, payload = read_frame(s)
        assert first & 0x40, "a compressed answer"
        d = zlib.decompressobj(-15)
        assert d.decompress(payload + b"\x00\x00\xff\xff") == message
    return s


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def measure(n, offer, message):
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="wm-deflate-mem-")
    conf = os.path.join(tmp, "wm.toml")
    with open(conf, "w") as f:
        f.write(
            f'[host]\nruntime_dir = "run"\nstrict_modes = false\n\n'
            f'[[worker]]\nname = "ws"\nlisten = "websocket://127.0.0.1:{port}"\n'
            f'plugin = "{REL}/libecho_plugin.so"\nws_deflate = true\n'
        )
    subprocess.run([HOST, "start", "-d", "-c", conf], check=True, capture_output=True)
    try:
        status = json.loads(
            subprocess.run(
                [HOST, "status", "--json", "-c", conf], check=True, capture_output=True
            ).stdout
        )
        pid = status["workers"][0]["pid"]
        # Warm up: the first connection and message allocate the worker's
        # own buffers and, with deflate, its lent compressor.
        warm = [connect(port, offer, message) for _ in range(10)]
        time.sleep(0.3)
        before = rss_kib(pid)
        conns = [connect(port, offer, message) for _ in range(n)]
        time.sleep(0.5)
        after = rss_kib(pid)
        for s in conns + warm:
            s.close()
        return (after - before) * 1024 / n
    finally:
        subprocess.run([HOST, "stop", "-c", conf], capture_output=True)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    msg = b'{"user":"alice","text":"hello, hello, hello"}' * 4
    # Text that does not repeat within the window, so it all lands in it.
    big = b"".join(b"%08x " % ((i * 2654435761) % (1 << 32)) for i in range(5500))[: 48 << 10]
    rows = [
        ("plain (no extension)", None, None),
        (
            "deflate, no context takeover",
            "permessage-deflate; client_no_context_takeover; client_max_window_bits",
            msg,
        ),
        ("deflate, context takeover", "permessage-deflate; client_max_window_bits", msg),
        (
            "deflate, context takeover, 48 KiB message (window filled)",
            "permessage-deflate; client_max_window_bits",
            big,
        ),
    ]
    print(f"| {n} idle connections, one worker | RSS per connection |")
    print("|---|---:|")
    for name, offer, message in rows:
        per = measure(n, offer, message)
        print(f"| {name} | {per / 1024:.1f} KiB ({per:.0f} B) |", flush=True)


if __name__ == "__main__":
    main()
