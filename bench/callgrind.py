#!/usr/bin/env python3
"""Instructions per message under callgrind: the method of bench/PROFILE.md.

The server runs under `valgrind --tool=callgrind` (wm-host with
`--trace-children=yes`, so the workers it fork+execs are counted; one
output file per process). A client (this script: its own speed does not
enter the counts) drives a fixed load twice, R1 then R2 rounds, each on a
fresh server; per unit = (Ir of the R2 run - Ir of the R1 run) / (units in
R2 - units in R1), so start-up and shutdown cancel out. User space only;
the counts do not depend on the machine's load (the share of per-wake-up
work does, a little: see bench/PROFILE.md).

    bench/callgrind.py echo --proto frame            # wm-host, echo plugin
    bench/callgrind.py echo --proto websocket --baseline
    bench/callgrind.py echo --proto http             # bench-hello-plugin, TechEmpower plaintext
    bench/callgrind.py echo --proto http --batch 1 --runs 200,400   # one in flight
    bench/callgrind.py broadcast --conns 2000        # 4 workers, test plugin; Ir of all processes
    bench/callgrind.py broadcast --conns 10000 --perf   # natively: CPU per broadcast (perf)

echo: 10 connections, each writing 16 messages (32 B payloads; HTTP: the
plaintext request) at once and reading the 16 answers, per round; the
worker's Ir. broadcast: N websocket connections `join g`, then one sends
`gsend g <32 B>` and every connection reads the frame, per broadcast;
the counters are zeroed once all joined and dumped after the last
broadcast (callgrind_control), Ir summed over the master and the workers
(the relay is part of the cost), per member. `--perf`: no valgrind, the
server on CPU 0 under `perf record -C 0` during the broadcasts, this
client on CPU 1; the server processes' samples give CPU per broadcast
(cache misses included, which callgrind does not see). `--keep DIR`
keeps the callgrind (or perf) files.
"""

import argparse
import os
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.environ.get("WM_RELEASE", os.path.join(ROOT, "target", "release"))
CONNS, BATCH, SIZE = 10, 16, 32
PLAINTEXT = (
    b"GET /plaintext HTTP/1.1\r\nHost: tfb-server\r\n"
    b"Accept: text/plain,text/html;q=0.9,application/xhtml+xml;q=0.9,"
    b"application/xml;q=0.8,*/*;q=0.7\r\nConnection: keep-alive\r\n\r\n"
)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit("server did not listen in time")


class Server:
    """wm-host or wm-baseline under callgrind."""

    def __init__(self, args, scheme, plugin, workers, out):
        self.args, self.out = args, out
        self.port = free_port()
        vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p"]
        if getattr(args, "perf", False):
            # Natively, on CPU 0; this client moves to CPU 1.
            vg = ["taskset", "-c", "0"]
            os.sched_setaffinity(0, {1})
        if args.baseline:
            proto = "ws-group" if args.cmd == "broadcast" else scheme
            cmd = vg + [f"{REL}/wm-baseline", "--proto", proto,
                        "--listen", f"127.0.0.1:{self.port}"]
        else:
            self.config = os.path.join(out, "wm.toml")
            with open(self.config, "w") as f:
                f.write(
                    f'[host]\nruntime_dir = "run"\nstop_timeout = "5s"\n'
                    f'start_timeout = "120s"\n\n[[worker]]\nname = "bench"\n'
                    f'listen = "{scheme}://127.0.0.1:{self.port}"\ncount = {workers}\n'
                    f'plugin = "{REL}/{plugin}"\n'
                )
            trace = [] if getattr(args, "perf", False) else ["--trace-children=yes"]
            cmd = vg + trace + [f"{REL}/wm-host", "start", "-c", self.config]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(out, "server.log"), "w"))
        wait_port(self.port, self.proc)

    def begin(self):
        """The broadcasts start: zero the counters (or start perf)."""
        time.sleep(1)
        self.pids = pids_of(self.proc)
        if getattr(self.args, "perf", False):
            self.perf = subprocess.Popen(
                ["perf", "record", "-q", "-C", "0", "-F", str(PERF_HZ), "-o",
                 os.path.join(self.out, "perf.data")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        else:
            control("-z", self.pids)

    def end(self):
        """The broadcasts are over: dump the counters (or stop perf)."""
        if getattr(self.args, "perf", False):
            self.perf.send_signal(signal.SIGINT)
            self.perf.wait()
        else:
            control("-d", self.pids)

    def stop(self):
        if self.args.baseline:
            self.proc.send_signal(signal.SIGTERM)
        else:
            r = subprocess.run([f"{REL}/wm-host", "stop", "-c", self.config],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode != 0:
                print(f"wm-host stop: {r.stderr.strip()}", file=sys.stderr)
        self.proc.wait(timeout=120)

    def totals(self):
        """Ir per process: {cmd: Ir}, the worker(s) and the master."""
        got = {}
        for name in os.listdir(self.out):
            if not name.startswith("cg."):
                continue
            cmd, ir = "", None
            with open(os.path.join(self.out, name)) as f:
                for line in f:
                    if line.startswith("cmd:"):
                        cmd = line[4:].strip()
                    elif line.startswith("totals:") or line.startswith("summary:"):
                        ir = int(line.split()[1])
            if ir is not None:
                got[f"{name} {cmd}"] = ir
        return got


def ws_handshake(s):
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("handshake: closed")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    if b" 101 " not in head.split(b"\r\n")[0]:
        sys.exit(f"handshake refused: {head!r}")
    return rest


def ws_frame(payload):
    mask = b"\x11\x22\x33\x44"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    else:
        head = bytes([0x81, 0x80 | 126]) + struct.pack(">H", n)
    return head + mask + masked


def recv_exact(s, n, have=b""):
    buf = have
    while len(buf) < n:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("connection closed")
        buf += chunk
    return buf[n:], buf[:n]


def echo_load(proto, port, rounds, conns=CONNS, batch=BATCH):
    payload = b"x" * (SIZE - 1) + b"\n" if proto == "text" else b"y" * SIZE
    if proto == "text":
        msg, answer = payload, len(payload)
    elif proto == "frame":
        msg = struct.pack(">I", SIZE + 4) + payload
        answer = len(msg)
    elif proto == "websocket":
        msg, answer = ws_frame(payload), 2 + SIZE
    else:
        msg, answer = PLAINTEXT, None
    socks, left = [], []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        left.append(ws_handshake(s) if proto == "websocket" else b"")
        socks.append(s)
    BATCH = batch
    batch = msg * BATCH
    for _ in range(rounds):
        for s in socks:
            s.sendall(batch)
        for i, s in enumerate(socks):
            if answer is not None:
                left[i], got = recv_exact(s, answer * BATCH, left[i])
                if proto != "http" and got != (msg if proto != "websocket" else
                                               b"\x81" + bytes([SIZE]) + payload) * BATCH:
                    sys.exit(f"wrong echo: {got[:80]!r}")
            else:
                buf = left[i]
                while buf.count(b"Hello, World!") < BATCH:
                    chunk = s.recv(65536)
                    if not chunk:
                        sys.exit("connection closed")
                    buf += chunk
                if buf.count(b"Hello, World!") != BATCH or not buf.endswith(b"Hello, World!"):
                    sys.exit(f"unexpected answers: {buf[-200:]!r}")
                left[i] = b""
    for s in socks:
        s.close()
    return rounds * conns * BATCH


def read_frames(s, buf):
    """Complete server frames in buf: (payloads, rest)."""
    out = []
    while len(buf) >= 2:
        n = buf[1] & 0x7F
        head = 2
        if n == 126:
            if len(buf) < 4:
                break
            n, head = struct.unpack(">H", buf[2:4])[0], 4
        if len(buf) < head + n:
            break
        out.append(buf[head:head + n])
        buf = buf[head + n:]
    return out, buf


def broadcast_load(port, conns, sends, srv=None):
    socks = []
    for i in range(conns):
        s = socket.socket()
        # Several source addresses, as the suite does: ports run out otherwise.
        s.bind((f"127.0.0.{2 + i % 4}", 0))
        s.connect(("127.0.0.1", port))
        rest = ws_handshake(s)
        s.sendall(ws_frame(b"join g"))
        while True:
            got, rest = read_frames(s, rest)
            if got:
                assert got == [b"ok"], got
                break
            rest += s.recv(4096)
        socks.append(s)
    # Joins reach the other workers through the master: wait for them.
    sender = socks[0]
    while True:
        sender.sendall(ws_frame(b"count g"))
        _, got = recv_exact(sender, 2 + len(str(conns)))
        if got[2:] == str(conns).encode():
            break
        time.sleep(0.2)
    if srv is not None:
        srv.begin()
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    payload = b"z" * SIZE
    frame = ws_frame(b"gsend g " + payload)
    for _ in range(sends):
        sender.setblocking(True)
        sender.sendall(frame)
        sender.setblocking(False)
        waiting, bufs = set(socks), {}
        while waiting:
            for key, _ in sel.select(timeout=60):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                buf = bufs.get(s, b"") + data
                got, buf = read_frames(s, buf)
                bufs[s] = buf
                if got:
                    assert got == [payload], got
                    waiting.discard(s)
    if srv is not None:
        srv.end()
    for s in socks:
        s.close()
    return sends * conns


def pids_of(proc):
    """The valgrind'ed server process and its children (wm-host's workers)."""
    pids = [proc.pid]
    r = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids += [int(p) for p in r.stdout.split()]
    return pids


def control(flag, pids):
    for pid in pids:
        subprocess.run(["callgrind_control", flag, str(pid)], capture_output=True, check=True)


def run_broadcast(args):
    """Counters zeroed once every member joined, dumped after the
    broadcasts: only the broadcasts count (no second run needed)."""
    out = tempfile.mkdtemp(prefix="wm-cg-")
    srv = Server(args, "websocket", "libtest_plugin.so", args.workers, out)
    sends = args.runs[-1]
    units = broadcast_load(srv.port, args.conns, sends, srv)
    srv.stop()
    if args.perf:
        return perf_summary(args, srv, out, sends)
    total, rows = 0, []
    for name in sorted(os.listdir(out)):
        if name.startswith("cg.") and name.count(".") == 2:
            cmd, ir = "", 0
            with open(os.path.join(out, name)) as f:
                for line in f:
                    if line.startswith("cmd:"):
                        cmd = line[4:].strip()
                    elif line.startswith("totals:") or line.startswith("summary:"):
                        ir = int(line.split()[1])
            rows.append((name, cmd, ir))
            total += ir
    for name, cmd, ir in rows:
        print(f"  {ir:>14,} Ir  {name} {cmd}")
    if args.keep:
        shutil.rmtree(args.keep, ignore_errors=True)
        shutil.copytree(out, args.keep)
    shutil.rmtree(out, ignore_errors=True)
    print(f"{sends} broadcasts to {args.conns}: {total:,} Ir")
    print(f"per member per broadcast: {total / units:,.0f} instructions")


PERF_HZ = 2000


def perf_summary(args, srv, out, sends):
    """Server CPU per broadcast from perf's samples on CPU 0 (the server's
    processes only: the machine may be shared), and where it went."""
    data = os.path.join(out, "perf.data")
    pids = ",".join(str(p) for p in srv.pids)
    rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "-n", "--sort", "sym",
                          "--pid", pids, "--stdio"], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in rep.splitlines() if "%" in line and not line.startswith("#")]
    total = sum(int(r[1]) for r in rows if len(r) == 3)
    print(f"server CPU per broadcast: {total / PERF_HZ / sends * 1e3:.1f} ms "
          f"({total} samples at {PERF_HZ} Hz, {sends} broadcasts to {args.conns})")
    for r in rows[:20]:
        print(f"  {int(r[1]):6}  {r[2][:110]}")
    if args.keep:
        shutil.rmtree(args.keep, ignore_errors=True)
        shutil.copytree(out, args.keep)
    shutil.rmtree(out, ignore_errors=True)


def run(args, units_of):
    results = []
    for n in args.runs:
        out = tempfile.mkdtemp(prefix="wm-cg-")
        if args.cmd == "broadcast":
            srv = Server(args, "websocket", "libtest_plugin.so", args.workers, out)
            units = broadcast_load(srv.port, args.conns, n)
        else:
            plugin = "libbench_hello_plugin.so" if args.proto == "http" else "libecho_plugin.so"
            srv = Server(args, args.proto, plugin, 1, out)
            units = echo_load(args.proto, srv.port, n, args.conns, args.batch)
        srv.stop()
        per = srv.totals()
        if args.cmd == "broadcast" or args.baseline:
            ir = sum(per.values())
        else:
            ir = sum(v for k, v in per.items() if " worker" in k)
        results.append((units, ir, per))
        if args.keep:
            dst = os.path.join(args.keep, f"run{n}")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(out, dst)
        shutil.rmtree(out, ignore_errors=True)
    (u1, ir1, p1), (u2, ir2, p2) = results
    for (u, ir, per) in results:
        for k, v in sorted(per.items()):
            print(f"  {u:>8} units  {v:>14,} Ir  {k}")
    per_unit = (ir2 - ir1) / (u2 - u1)
    print(f"{units_of}: {per_unit:,.0f} instructions")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--proto", choices=["text", "frame", "websocket", "http"], required=True)
    e.add_argument("--runs", type=lambda s: [int(x) for x in s.split(",")], default=[100, 200],
                   help="rounds of the two runs (default 100,200)")
    e.add_argument("--conns", type=int, default=CONNS)
    e.add_argument("--batch", type=int, default=BATCH,
                   help="messages written at once per connection (1: one in flight)")
    b = sub.add_parser("broadcast")
    b.add_argument("--conns", type=int, default=2000)
    b.add_argument("--workers", type=int, default=4)
    b.add_argument("--runs", type=lambda s: [int(x) for x in s.split(",")], default=[20],
                   help="broadcasts (the last number; default 20)")
    b.add_argument("--perf", action="store_true",
                   help="no valgrind: the server natively on CPU 0 under perf record -C 0, "
                        "this client on CPU 1; prints server CPU per broadcast and its symbols")
    for x in (e, b):
        x.add_argument("--baseline", action="store_true")
        x.add_argument("--keep", help="copy the callgrind files here")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
    if args.cmd == "broadcast":
        run_broadcast(args)
    else:
        run(args, "per message" if args.proto != "http" else "per request")


if __name__ == "__main__":
    main()
