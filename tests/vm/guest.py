#!/usr/bin/python3
"""guest.py stock|ours CONTROL_PORT AGENT_LOG: the L2 side of tests/vm/topology.py and
tests/vm/lxd_e2e.py.

Runs in L2 (the VM). Sets the agent up as LXD does (lxd-agent-setup copies the config
drive, 9p tag "config", to /run/lxd_agent), starts the agent: Debian's stock lxd-agent
5.0.2, or ours (deno run --no-check $AGENT_PERMISSIONS agent/main.ts, -P=agent unless
set), its output to AGENT_LOG (a file L1 can read; "-": sent to L1 as {"event":"log"}
lines on the control connection, for a VM that cannot write to L1). The stock agent is
the lxd-agent of the config drive when LXD put one there, else Debian's from .cache/vm.
Then connects to L1 over vsock
(CID 2, CONTROL_PORT) and does what L1 asks, one JSON object a line each way:

  {"id":1,"op":"http","method":"GET","path":"/1.0"}      a request on /dev/lxd/sock (curl
                                                          when present, else python)
  {"id":2,"op":"wait_socket","timeout":60}               until /dev/lxd/sock accepts
  {"id":3,"op":"events_open","path":P}, {"op":"events_wait","path":P,"match":{...},
   "wait":S}                                              follow P (default /1.0/events)
  {"id":4,"op":"bench","n":100,"path":"/1.0",           N sequential GETs (p50/p90/p99), then
   "concurrency":[1,8,64],"budget":20}                    per level L: max(100, 4L) GETs from L
                                                          threads (no new ones after BUDGET s):
                                                          req/s, p50/p99, failed count; python
                                                          client, a new connection each
  {"id":5,"op":"stop_agent","timeout":60}                SIGTERM, exit code
  {"id":6,"op":"read","path":P}                          the text of file P in L2
  {"id":8,"op":"stat","path":P}                          P's mode bits, uid, gid, size
  {"id":9,"op":"tls_request","cid":2,"port":N,"cert":PEM, one request to CID:N over vsock,
   "key":PEM,"path":"/1.0"}                               mutual TLS presenting PEM: status
  {"id":7,"op":"exit"}                                    end (the VM powers off)

Answers {"id":N,"ok":true,"result":...} or {"id":N,"ok":false,"error":"..."}; unasked:
{"event":"hello","uptime":S} on connect and {"event":"agent-exited","rc":N} if the agent
stops before stop_agent. Exits 1 if it cannot reach L1 within 120 s.
"""
import http.client
import json
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
LXD_AGENT_DIR = f"{REPO}/.cache/vm/lxd-agent"
DEVLXD = "/dev/lxd/sock"
# A request's bound: under the 120 s L1 waits for an answer on the control connection
# (topology.STEP_TIMEOUT). LXD 5.0.2 in an L1 on a loaded machine (load 10) took 58 s to answer
# the stock agent's first GET /1.0 (make e2e, 2026-12-05): 60 s was too tight.
REQUEST_TIMEOUT = 100.0


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("lxd", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def py_request(method: str, path: str, body: str | None = None,
               timeout: float = REQUEST_TIMEOUT) -> dict:
    conn = UnixConnection(DEVLXD, timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return {"status": r.status, "content_type": r.getheader("Content-Type", ""),
                "body": r.read().decode(errors="replace"), "client": "python"}
    finally:
        conn.close()


def curl_request(method: str, path: str, body: str | None = None,
                 timeout: float = REQUEST_TIMEOUT) -> dict:
    cmd = ["curl", "-sS", "--max-time", str(int(timeout)), "--unix-socket", DEVLXD, "-X", method,
           "-w", "\n%{http_code} %{content_type}"]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", body]
    cmd.append(f"lxd{path}")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)
    if p.returncode != 0:
        raise RuntimeError(f"curl exited {p.returncode}: {p.stderr.strip()}")
    text, _, tail = p.stdout.rpartition("\n")
    code, _, ctype = tail.partition(" ")
    return {"status": int(code), "content_type": ctype, "body": text, "client": "curl"}


def vsock_tls_request(cid: int, port: int, cert_pem: str, key_pem: str, method: str = "GET",
                      path: str = "/1.0", timeout: float = 60) -> dict:
    """One HTTPS request to CID:PORT over AF_VSOCK, mutual TLS 1.3 presenting CERT_PEM (an
    agent's certificate, as the agent does to the host); the server's certificate is not
    checked (the host's identity is not what is tested). {"status", "body"}, or
    {"status": None, "error"} when the connection failed or closed before an answer."""
    with tempfile.TemporaryDirectory() as d:
        cf, kf = os.path.join(d, "c.crt"), os.path.join(d, "c.key")
        with open(cf, "w") as f:
            f.write(cert_pem)
        with open(kf, "w") as f:
            f.write(key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cf, kf)
    raw = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    raw.settimeout(timeout)
    try:
        raw.connect((cid, port))
        tls = ctx.wrap_socket(raw, server_hostname="lxd")
        conn = http.client.HTTPConnection("lxd", timeout=timeout)
        conn.sock = tls
        conn.request(method, path)
        r = conn.getresponse()
        return {"status": r.status, "body": r.read().decode(errors="replace")}
    except (OSError, http.client.HTTPException) as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"}
    finally:
        raw.close()


def uptime() -> float:
    return float(open("/proc/uptime").read().split()[0])


def percentile(sorted_ms: list[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least q of the samples at or below it."""
    if not sorted_ms:
        return None
    return sorted_ms[max(0, min(len(sorted_ms), math.ceil(q * len(sorted_ms))) - 1)]


def timed_get(path: str) -> tuple[float, str | None]:
    """One GET on a new connection: (milliseconds, None) on a 200, else (ms, what failed)."""
    t = time.perf_counter()
    try:
        r = py_request("GET", path)
        err = None if r["status"] == 200 else f"GET {path} -> {r['status']} {r['body'][:200]}"
    except Exception as e:  # noqa: BLE001 - counted and reported, not raised
        err = f"GET {path}: {type(e).__name__}: {e}"
    return (time.perf_counter() - t) * 1000, err


def bench_level(path: str, level: int, total: int, budget: float) -> dict:
    """`total` GETs from `level` threads, none started after `budget` s. req/s counts the
    200s over the wall time; p50/p99 are of the 200s; failures (non-200 or an exception)
    are counted, the first one's text kept."""
    lock = threading.Lock()
    issued, times, errors, first_error = 0, [], 0, None
    deadline = time.monotonic() + budget

    def worker() -> None:
        nonlocal issued, errors, first_error
        while True:
            with lock:
                if issued >= total or time.monotonic() > deadline:
                    return
                issued += 1
            ms, err = timed_get(path)
            with lock:
                if err is None:
                    times.append(ms)
                else:
                    errors += 1
                    first_error = first_error or err

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(level)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    times.sort()
    return {"level": level, "n": issued, "ok": len(times), "errors": errors,
            "first_error": first_error, "capped": issued < total, "wall_s": wall,
            "rps": len(times) / wall, "p50_ms": percentile(times, 0.5),
            "p99_ms": percentile(times, 0.99)}


def bench(path: str, n: int, warmup: int, levels: list[int], budget: float) -> dict:
    """N sequential GETs (raises on a non-200), then each concurrency level (counts failures)."""
    for _ in range(warmup):
        py_request("GET", path)
    times = []
    for _ in range(n):
        ms, err = timed_get(path)
        if err is not None:
            raise RuntimeError(err)
        times.append(ms)
    times.sort()
    return {"n": n, "p50_ms": percentile(times, 0.5), "p90_ms": percentile(times, 0.9),
            "p99_ms": percentile(times, 0.99), "min_ms": times[0], "max_ms": times[-1],
            "concurrency": [bench_level(path, level, max(100, 4 * level), budget)
                            for level in levels]}


class Events:
    """Follows GET /1.0/events on /dev/lxd/sock in a thread; keeps every JSON object."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.raw = b""
        self.items: list[dict] = []
        self.cond = threading.Condition()
        self.error: str | None = None
        # No timeout: the stream stays quiet between events (L1 bounds the wait for headers).
        self.conn = UnixConnection(DEVLXD, None)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()
        if self.resp.status != 200:
            raise RuntimeError(f"GET {path} -> {self.resp.status}: {self.resp.read()[:200]!r}")
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        buf, dec = "", json.JSONDecoder()
        try:
            while chunk := self.resp.read1(65536):
                self.raw = (self.raw + chunk)[-2000:]
                buf += chunk.decode(errors="replace")
                while True:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    try:
                        obj, end = dec.raw_decode(buf)
                    except json.JSONDecodeError:
                        break
                    buf = buf[end:]
                    with self.cond:
                        self.items.append(obj)
                        self.cond.notify_all()
            self.error = "the events stream ended"
        except Exception as e:  # noqa: BLE001 - reported to L1
            self.error = f"the events stream failed: {e}"
        with self.cond:
            self.cond.notify_all()

    def wait(self, match: dict, timeout: float) -> dict:
        def matches(obj: dict) -> bool:
            for k, v in match.items():
                cur = obj
                for part in k.split("."):
                    cur = cur.get(part) if isinstance(cur, dict) else None
                if cur != v:
                    return False
            return True

        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for obj in self.items:
                    if matches(obj):
                        return obj
                if self.error:
                    raise RuntimeError(f"{self.error}; got {self.items}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"GET {self.path}: no event matching {match} in {timeout}s; "
                                       f"got {self.items}; last bytes {self.raw[-600:]!r}")
                self.cond.wait(left)


class Guest:
    def __init__(self, kind: str, port: int, log_path: str) -> None:
        self.kind = kind
        self.port = port
        self.log_path = log_path
        self.agent: subprocess.Popen | None = None
        self.stopping = False
        self.sock: socket.socket | None = None
        self.wlock = threading.Lock()
        self.events: dict[str, Events] = {}
        self.curl = shutil.which("curl") is not None
        self.pending_log: list[tuple[float, str]] = []

    def send(self, obj: dict) -> None:
        with self.wlock:
            if self.sock is not None:
                self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def start_agent(self) -> None:
        setup = subprocess.run([f"{LXD_AGENT_DIR}/lib/systemd/lxd-agent-setup"],
                               capture_output=True, text=True)
        stream = self.log_path == "-"
        log = open("/tmp/agent.log" if stream else self.log_path, "a", buffering=1)
        log.write(f"guest: lxd-agent-setup exit {setup.returncode} {setup.stdout}{setup.stderr}"
                  f"guest: /run/lxd_agent holds {sorted(os.listdir('/run/lxd_agent'))}\n")
        if self.kind == "stock":
            drive = "/run/lxd_agent/lxd-agent"
            binary = drive if os.access(drive, os.X_OK) else f"{LXD_AGENT_DIR}/usr/bin/lxd-agent"
            cmd, cwd = [binary, "--debug"], "/run/lxd_agent"
        else:
            perms = os.environ.get("AGENT_PERMISSIONS", "-P=agent").split()
            cmd = [f"{REPO}/node_modules/deno/deno", "run", "--no-check", *perms, "agent/main.ts",
                   "--config-dir", "/run/lxd_agent", "--log-level", "debug"]
            cwd = REPO
        log.write(f"guest: starting {' '.join(cmd)}\n")
        env = dict(os.environ, NO_COLOR="1", DENO_NO_UPDATE_CHECK="1")
        if stream:
            log.close()
            with open("/tmp/agent.log") as f:
                self.pending_log = [(uptime(), line) for line in f.read().splitlines()]
        self.agent = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE if stream else log,
                                      stderr=subprocess.STDOUT, env=env)
        if stream:
            threading.Thread(target=self._pump_log, daemon=True).start()
        threading.Thread(target=self._watch_agent, daemon=True).start()

    def _pump_log(self) -> None:
        """Agent output to L1 as log events stamped with L2's uptime (kept until the control
        connection is up)."""
        for raw in self.agent.stdout:
            line, up = raw.decode(errors="replace").rstrip("\n"), uptime()
            with self.wlock:
                if self.sock is None:
                    self.pending_log.append((up, line))
                    continue
            self.send({"event": "log", "line": line, "up": up})

    def _watch_agent(self) -> None:
        rc = self.agent.wait()
        if not self.stopping:
            self.send({"event": "agent-exited", "rc": rc})

    def connect(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect((2, self.port))
                s.settimeout(None)
                self.sock = s
                return
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def request(self, method: str, path: str, body: str | None = None,
                client: str = "auto") -> dict:
        use_curl = client == "curl" or (client == "auto" and self.curl)
        return (curl_request if use_curl else py_request)(method, path, body)

    def handle(self, msg: dict):
        op = msg.get("op")
        if op == "http":
            return self.request(msg.get("method", "GET"), msg["path"], msg.get("body"),
                                msg.get("client", "auto"))
        if op == "wait_socket":
            t0 = time.monotonic()
            while True:
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(DEVLXD)
                    s.close()
                    return {"waited": time.monotonic() - t0}
                except OSError as e:
                    s.close()
                    if time.monotonic() - t0 > msg.get("timeout", 60):
                        raise RuntimeError(f"{DEVLXD} does not accept connections: {e}")
                    if self.agent.poll() is not None:
                        raise RuntimeError(f"the agent exited ({self.agent.returncode})")
                    time.sleep(0.1)
        if op == "events_open":
            path = msg.get("path", "/1.0/events")
            self.events[path] = Events(path)
            return {"open": path}
        if op == "events_wait":
            return self.events[msg.get("path", "/1.0/events")].wait(
                msg["match"], msg.get("wait", msg.get("timeout", 60)))
        if op == "bench":
            return bench(msg.get("path", "/1.0"), msg.get("n", 100), msg.get("warmup", 5),
                         msg.get("concurrency", [1, 8, 64]), msg.get("budget", 20))
        if op == "stop_agent":
            self.stopping = True
            self.agent.send_signal(signal.SIGTERM)
            rc = self.agent.wait(msg.get("timeout", 60))
            out = {"rc": rc}
            if rc < 0:  # killed by a signal: the kernel's line says where (segfault at ... in ...)
                k = subprocess.run(["dmesg"], capture_output=True, text=True)
                out["dmesg"] = (k.stdout or k.stderr).strip().splitlines()[-6:]
            return out
        if op == "deno_sigterm_probe":
            # Does a bare Deno with a SIGTERM listener survive SIGTERM here? (agent code ruled out)
            code = ('Deno.addSignalListener("SIGTERM", () => Deno.exit(0)); '
                    'setInterval(() => {}, 1000); console.log("ready");')
            p = subprocess.Popen([f"{REPO}/node_modules/deno/deno", "eval", code],
                                 stdout=subprocess.PIPE, text=True)
            ready = p.stdout.readline().strip()
            p.send_signal(signal.SIGTERM)
            rc = p.wait(msg.get("timeout", 60))
            k = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
            return {"ready": ready, "rc": rc, "dmesg": [l for l in k if "segfault" in l][-2:]}
        if op == "tls_request":
            return vsock_tls_request(msg.get("cid", 2), msg["port"], msg["cert"], msg["key"],
                                     msg.get("method", "GET"), msg.get("path", "/1.0"))
        if op == "stat":
            st = os.lstat(msg["path"])
            return {"mode": st.st_mode & 0o7777, "uid": st.st_uid, "gid": st.st_gid,
                    "size": st.st_size}
        if op == "read":
            with open(msg["path"], errors="replace") as f:
                return f.read()
        if op == "uptime":
            return float(open("/proc/uptime").read().split()[0])
        raise RuntimeError(f"unknown op {op!r}")

    def serve(self) -> None:
        self.send({"event": "hello", "uptime": uptime(),
                   "curl": self.curl})
        with self.wlock:
            pending, self.pending_log = self.pending_log, []
        for up, line in pending:
            self.send({"event": "log", "line": line, "up": up})
        f = self.sock.makefile("rb")
        for line in f:
            msg = json.loads(line)
            if msg.get("op") == "exit":
                self.send({"id": msg.get("id"), "ok": True, "result": None})
                return
            try:
                self.send({"id": msg.get("id"), "ok": True, "result": self.handle(msg)})
            except Exception as e:  # noqa: BLE001 - reported to L1
                self.send({"id": msg.get("id"), "ok": False, "error": f"{type(e).__name__}: {e}"})


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("stock", "ours"):
        print(__doc__, file=sys.stderr)
        return 2
    g = Guest(argv[0], int(argv[1]), argv[2])
    g.start_agent()
    g.connect()
    try:
        g.serve()
    finally:
        if g.agent.poll() is None:
            g.stopping = True
            g.agent.send_signal(signal.SIGTERM)
            try:
                g.agent.wait(30)
            except subprocess.TimeoutExpired:
                g.agent.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
