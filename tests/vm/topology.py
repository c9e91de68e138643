#!/usr/bin/python3
"""topology.py [--narrate] [--bench N] [--concurrency 1,8,64] ours|stock: the full topology,
run inside L1 (fresh).

L1 runs QEMU and `lxd-vsock-host daemon` (deno run --no-check -P=host host/main.ts, started
once L2's agent is set up, so the agent learns the host's port only from the announce); L2
(tests/vm/l2: nested KVM, vhost-vsock guest-cid 3, virtio-serial port backed by a 16-byte
ringbuf the daemon reads over QMP) boots with the host's config drive and runs
tests/vm/guest.py, which starts the agent (ours, or Debian's stock lxd-agent 5.0.2) and
acts for this script inside the VM over a vsock control connection. Asserted in order:

  boot -> the host sees STARTED (QMP) -> announces (PUT /1.0 to 3:8443) -> CONNECTED ->
  /dev/lxd/sock in L2 answers GET /1.0, config, meta-data, devices as set on the host ->
  config and device events reach a /1.0/events follower in L2 -> PATCH Ready -> the host
  shows ready (instance list) -> N x GET /1.0 timed -> identity over real vsock (a second
  instance vm2 at CID 4: its certificate from CID 3 -> 401, vm1's -> 200, both from L1's
  CID 1 -> 401, vm2's after its removal -> 401) -> the operator commands through the daemon
  (exec uname -a, exit 3 passed through, state --format json with processes and memory,
  file push --mode 0640 --uid/--gid 1234 then pull) -> host restarted on a new port ->
  the agent is re-announced and reaches it, ready kept -> agent SIGTERM -> host sees
  STOPPED -> VM powers off.

Prints each step with its time, "figure:" lines (boot, STARTED->CONNECTED, restart->
re-announced; GET /1.0: N sequential (--bench, default 100) p50/p99, then with
--concurrency req/s, p50/p99 and failed requests at each level, as get_1.0_p50_ms, c8_rps,
c8_errors, ...) and, on failure, what the host, the agent and L2 logged.
--narrate prints only a short story (for tests/vm/demo). Exit 0 when every step passed,
125 when L2 itself failed (never reached the control port, its QEMU died, or it stopped
answering the control connection), else 1.
"""
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from guest import vsock_tls_request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DENO = f"{REPO}/node_modules/deno/deno"
HOST = [DENO, "run", "--no-check", "-q", "-P=host", "host/main.ts"]
CONTROL_PORT = 7100
NAME = "vm1"
BOOT_TIMEOUT = 240.0
STEP_TIMEOUT = 120.0


class Fail(Exception):
    pass


class VmFail(Fail):
    """L2 itself failed (never booted, or its QEMU died): exit 125, which make e2e retries."""


def now() -> float:
    return time.monotonic()


def logfmt(line: str) -> dict:
    """`level=info msg="agent state" state=STARTED` -> {"level": "info", "msg": ...}."""
    out = {}
    for key, value in re.findall(r'([\w.-]+)=("(?:[^"\\]|\\.)*"|\S*)', line):
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


class Daemon:
    """One `lxd-vsock-host daemon` process; its log lines, timestamped as they arrive."""

    def __init__(self, state: str, port: int) -> None:
        self.port = port
        self.started = now()
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            HOST + ["daemon", "--state-dir", state, "--port", str(port), "--log-level", "debug"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=dict(os.environ, NO_COLOR="1", DENO_NO_UPDATE_CHECK="1"))
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for raw in self.proc.stderr:
            with self.cond:
                self.lines.append((now(), raw.decode(errors="replace").rstrip("\n")))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def find(self, msg: str, fields: dict, start: int = 0):
        """The first line from `start` with this msg and these field values: (index, time, line)."""
        for i in range(start, len(self.lines)):
            got = logfmt(self.lines[i][1])
            if got.get("msg") == msg and all(got.get(k) == str(v) for k, v in fields.items()):
                return i, self.lines[i][0], self.lines[i][1]
        return None

    def wait(self, msg: str, fields: dict, what: str, timeout: float = STEP_TIMEOUT,
             start: int = 0, check=lambda: None):
        deadline = now() + timeout
        with self.cond:
            while True:
                hit = self.find(msg, fields, start)
                if hit:
                    return hit
                if self.proc.poll() is not None:
                    raise Fail(f"{what}: the host daemon exited ({self.proc.returncode})")
                check()
                left = deadline - now()
                if left <= 0:
                    raise Fail(f"{what}: not seen in the host log within {timeout:.0f}s")
                self.cond.wait(min(left, 0.5))

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise Fail(f"the host daemon did not exit within {timeout:.0f}s of SIGTERM")


class Control:
    """The vsock control connection from guest.py in L2."""

    def __init__(self, port: int, cid: int | None = 3) -> None:
        """`cid`: the only guest CID accepted (None: any, e.g. the CID LXD chose)."""
        self.cid = cid
        self.srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        self.srv.bind((socket.VMADDR_CID_ANY, port))
        self.srv.listen(1)
        self.srv.settimeout(0.5)
        self.sock: socket.socket | None = None
        self.cond = threading.Condition()
        self.replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self.closed = False
        self.next_id = 0

    def accept(self, timeout: float, check) -> dict:
        deadline = now() + timeout
        while self.sock is None:
            try:
                self.sock, peer = self.srv.accept()
            except socket.timeout:
                check()
                if now() > deadline:
                    raise VmFail(f"L2 did not connect to the control port within {timeout:.0f}s")
                continue
            self.peer_cid = peer[0]
            if self.cid is not None and peer[0] != self.cid:
                raise Fail(f"control connection from CID {peer[0]}, expected {self.cid}")
        threading.Thread(target=self._pump, daemon=True).start()
        return self.wait_event("hello", timeout, check)

    def _pump(self) -> None:
        try:
            for line in self.sock.makefile("rb"):
                obj = json.loads(line)
                with self.cond:
                    if "event" in obj:
                        obj["at"] = now()  # arrival, on L1's clock
                        self.events.append(obj)
                    else:
                        self.replies[obj["id"]] = obj
                    self.cond.notify_all()
        except OSError:
            pass
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def agent_exit(self):
        for e in self.events:
            if e["event"] == "agent-exited":
                return e["rc"]
        return None

    def wait_event(self, name: str, timeout: float, check) -> dict:
        deadline = now() + timeout
        with self.cond:
            while True:
                for e in self.events:
                    if e["event"] == name:
                        return e
                if self.closed:
                    raise Fail(f"the control connection closed before {name}")
                check()
                left = deadline - now()
                if left <= 0:
                    raise Fail(f"no {name} from L2 within {timeout:.0f}s")
                self.cond.wait(min(left, 0.5))

    def call(self, op: str, timeout: float = STEP_TIMEOUT, check=lambda: None, **args):
        self.next_id += 1
        rid = self.next_id
        self.sock.sendall(json.dumps({"id": rid, "op": op, **args}).encode() + b"\n")
        deadline = now() + timeout
        with self.cond:
            while rid not in self.replies:
                if self.closed:
                    raise Fail(f"{op}: the control connection closed")
                if op != "stop_agent":
                    check()
                left = deadline - now()
                if left <= 0:
                    if timeout >= STEP_TIMEOUT and op != "bench":
                        # guest.py bounds each of these operations by 60 s: silence this
                        # long means L2 itself (or the control connection) is frozen.
                        raise VmFail(f"{op}: no answer from L2 within {timeout:.0f}s (L2 frozen?)")
                    raise Fail(f"{op}: no answer from L2 within {timeout:.0f}s")
                self.cond.wait(min(left, 0.5))
            reply = self.replies.pop(rid)
        if not reply["ok"]:
            raise Fail(f"{op} in L2 failed: {reply['error']}")
        return reply["result"]


class Run:
    def __init__(self, kind: str, narrate: bool, bench: int, concurrency: list[int]) -> None:
        self.kind = kind
        self.label = "our agent" if kind == "ours" else "stock lxd-agent"
        self.narrate = narrate
        self.bench_n = bench
        self.concurrency = concurrency
        self.base = f"/run/topology-{kind}"
        self.state = f"{self.base}/state"
        self.ctl = f"{self.base}/ctl"
        self.qmp = f"{self.base}/qmp.sock"
        self.agent_log = f"{self.ctl}/agent.log"
        self.daemons: list[Daemon] = []
        self.control: Control | None = None
        self.qemu_pid: int | None = None
        self.t0 = now()
        self.figures: dict[str, float] = {}
        self.ready = True  # whether this agent forwards PATCH /1.0 (stock 5.0.2 does not)

    # --- output -------------------------------------------------------------------
    def step(self, text: str) -> None:
        if not self.narrate:
            print(f"[{self.kind} {now() - self.t0:6.1f}s] {text}", flush=True)

    def tell(self, text: str) -> None:
        if self.narrate:
            print(text, flush=True)
        else:
            self.step(text)

    def figure(self, key: str, value: float) -> None:
        self.figures[key] = value
        if not self.narrate:
            print(f"figure: {self.kind} {key}={value:.3f}", flush=True)

    def bench_level(self, c: dict) -> None:
        """Figures and one line for a concurrency level of guest.py's bench."""
        nan = float("nan")
        key = f"c{c['level']}"
        self.figure(f"{key}_n", c["n"])
        self.figure(f"{key}_rps", c["rps"])
        self.figure(f"{key}_p50_ms", nan if c["p50_ms"] is None else c["p50_ms"])
        self.figure(f"{key}_p99_ms", nan if c["p99_ms"] is None else c["p99_ms"])
        self.figure(f"{key}_errors", c["errors"])
        lat = (f"p50 {c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms" if c["ok"] else
               "no request succeeded")
        self.step(f"GET /1.0 x{c['n']} from {c['level']} thread(s) (new connection each) in "
                  f"{c['wall_s']:.1f}s{' (time budget hit)' if c['capped'] else ''}: "
                  f"{c['rps']:.1f} req/s, {lat}, {c['errors']} failed"
                  f"{'; first: ' + c['first_error'] if c['first_error'] else ''}")

    # --- helpers ------------------------------------------------------------------
    @property
    def daemon(self) -> Daemon:
        return self.daemons[-1]

    def check(self) -> None:
        if self.control is not None and (rc := self.control.agent_exit()) is not None:
            raise Fail(f"the agent in L2 exited with status {rc}")
        if self.qemu_pid is not None and os.path.exists(f"{self.ctl}/rc"):
            raise Fail(f"L2's command ended (exit {open(f'{self.ctl}/rc').read().strip()})")
        if self.qemu_pid is not None and not os.path.exists(f"/proc/{self.qemu_pid}"):
            raise VmFail("L2's QEMU exited without an exit code from its command (crashed?)")

    def cli(self, *args: str) -> str:
        p = self.cli_run(*args)
        if p.returncode != 0:
            raise Fail(f"lxd-vsock-host {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def cli_run(self, *args: str, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess:
        """`lxd-vsock-host ARGS --state-dir STATE` (before a `--`), whatever its exit status
        (stdin: /dev/null, no terminal). Deno dying of SIGILL (`trap invalid opcode` in L1's
        kernel log, seen once under TCG at `instance add`) is the VM's failure, not ours."""
        args = list(args)
        at = args.index("--") if "--" in args else len(args)
        args[at:at] = ["--state-dir", self.state]
        try:
            p = subprocess.run(HOST + args, cwd=REPO, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=timeout,
                               env=dict(os.environ, NO_COLOR="1", DENO_NO_UPDATE_CHECK="1"))
        except subprocess.TimeoutExpired:
            raise Fail(f"lxd-vsock-host {' '.join(args)}: no exit within {timeout:.0f}s") from None
        if p.returncode == -signal.SIGILL:
            raise VmFail(f"lxd-vsock-host {' '.join(args)} died of SIGILL (the emulated CPU)")
        return p

    def instance(self) -> dict:
        for i in json.loads(self.cli("instance", "list", "--format", "json")):
            if i["name"] == NAME:
                return i
        raise Fail(f"instance list has no {NAME}")

    def http(self, method: str, path: str, body=None, status: int = 200) -> dict:
        r = self.control.call("http", check=self.check, method=method, path=path,
                              **({} if body is None else {"body": json.dumps(body)}))
        if r["status"] != status:
            raise Fail(f"{method} {path} on /dev/lxd/sock -> {r['status']} (expected {status}): "
                       f"{r['body'][:300]}")
        return r

    def json_get(self, path: str):
        r = self.http("GET", path)
        try:
            return json.loads(r["body"])
        except ValueError:
            raise Fail(f"GET {path}: not JSON: {r['body'][:300]!r}") from None

    def expect(self, cond: bool, what: str) -> None:
        if not cond:
            raise Fail(what)

    # --- the run ------------------------------------------------------------------
    def run(self) -> None:
        os.makedirs(self.ctl, exist_ok=True)
        self.step("registering the instance (CID 3, QMP ring buffer, config drive)")
        self.cli("instance", "add", NAME, "--cid", "3", "--qmp", self.qmp, "--chardev", "vserial",
                 "-c", "user.foo=bar", "-c", "user.meta-data=#cloud-config\nfoo: 1")
        self.cli("device", "add", NAME, "eth0", "type=nic", "network=lxdbr0", "name=eth0")
        port1 = random.randint(20000, 40000)
        self.control = Control(CONTROL_PORT)
        t_boot = now()
        out = subprocess.run(
            [f"{HERE}/l2", "--detach", "--quiet", "--ctl", self.ctl, "--qmp", self.qmp,
             "--config-drive", f"{self.state}/instances/{NAME}/config", "--timeout", "900", "--",
             "/usr/bin/python3", "tests/vm/guest.py", self.kind, str(CONTROL_PORT),
             self.agent_log], check=True, capture_output=True, text=True)
        self.qemu_pid = int(out.stdout.strip())
        hello = self.control.accept(BOOT_TIMEOUT, self.check)
        self.figure("l2_boot_s", now() - t_boot)
        self.figure("l2_uptime_at_guest_script_s", hello["uptime"])
        self.tell(f"VM booted: L2 (nested KVM, vsock CID 3) up in {now() - t_boot:.1f}s "
                  f"(its kernel uptime {hello['uptime']:.1f}s); {self.label} starting")

        # The host starts once the guest has copied the config drive, whose agent.conf then
        # has no port yet: the agent learns it only from the host's announce (PUT /1.0).
        self.daemons.append(Daemon(self.state, port1))
        self.daemon.wait("listening", {"port": port1}, "host listening", check=self.check)
        self.step(f"host daemon listening on vsock port {port1} "
                  f"({now() - self.daemon.started:.1f}s after start)")

        i, t_started, _ = self.daemon.wait("agent state", {"instance": NAME, "state": "STARTED"},
                                           "STARTED read from the ring buffer over QMP",
                                           BOOT_TIMEOUT, check=self.check)
        self.figure("boot_to_started_s", t_started - t_boot)
        self.tell(f"agent STARTED (the host read it from the QMP ring buffer "
                  f"{t_started - t_boot:.1f}s after QEMU started, "
                  f"{t_started - self.daemon.started:.1f}s after the host started)")
        _, t_ann, line = self.daemon.wait("announced", {"instance": NAME, "port": port1},
                                          "announce (PUT /1.0 to 3:8443)", start=i,
                                          check=self.check)
        _, t_conn, _ = self.daemon.wait("agent state", {"instance": NAME, "state": "CONNECTED"},
                                        "CONNECTED", start=i, check=self.check)
        self.figure("started_to_connected_s", t_conn - t_started)
        self.tell(f"host announced port {port1} to the agent (PUT /1.0 at 3:8443); CONNECTED "
                  f"{t_conn - t_started:.2f}s after STARTED")
        if not self.narrate:
            status = json.loads(self.cli("status", NAME, "--format", "json"))
            self.step(f"host status: {json.dumps(status)[:600]}")

        waited = self.control.call("wait_socket", check=self.check)["waited"]
        r = self.http("GET", "/1.0")
        doc = json.loads(r["body"])
        self.step(f"/dev/lxd/sock GET /1.0 ({r['client']}, socket up after {waited:.1f}s): {r['body']}")
        self.expect(doc.get("api_version") == "1.0" and
                    doc.get("instance_type") == "virtual-machine" and
                    doc.get("state") == "Started", f"GET /1.0: unexpected {doc}")
        self.tell(f"/dev/lxd/sock answered (curl in L2): {r['body'].strip()}")
        keys = self.json_get("/1.0/config")
        self.expect("/1.0/config/user.foo" in keys, f"GET /1.0/config lacks user.foo: {keys}")
        value = self.http("GET", "/1.0/config/user.foo")["body"]
        self.expect(value == "bar", f"GET /1.0/config/user.foo: {value!r}, expected 'bar'")
        meta = self.http("GET", "/1.0/meta-data")["body"]
        self.expect(f"local-hostname: {NAME}" in meta and "foo: 1" in meta,
                    f"GET /1.0/meta-data: {meta!r}")
        devices = self.json_get("/1.0/devices")
        self.expect(devices.get("eth0", {}).get("type") == "nic", f"GET /1.0/devices: {devices}")
        self.http("GET", "/1.0/config/security.devlxd", status=403)
        self.step(f"config {keys}, user.foo={value!r}, meta-data {meta!r}, devices {devices}")

        # Two followers: the default stream and one asking for both types explicitly.
        streams = ("/1.0/events", "/1.0/events?type=config,device")
        for path in streams:
            self.control.call("events_open", check=self.check, path=path)
        self.cli("config", "set", NAME, "user.foo", "baz")
        for path in streams:
            ev = self.control.call("events_wait", check=self.check, path=path, match={
                "type": "config", "metadata.key": "user.foo", "metadata.value": "baz"})
            self.step(f"config event in L2 on {path}: {json.dumps(ev)}")
        self.cli("device", "add", NAME, "eth1", "type=nic", "network=lxdbr0", "name=eth1")
        device = {"type": "device", "metadata.name": "eth1", "metadata.action": "added"}
        ev = self.control.call("events_wait", check=self.check, path=streams[1], match=device)
        self.step(f"device event in L2 on {streams[1]}: {json.dumps(ev)}")
        # Without ?type= the stock lxd-agent 5.0.2 sends config events only: noted, not asserted.
        try:
            self.control.call("events_wait", path=streams[0], match=device, timeout=2)
            self.step(f"the device event also reached {streams[0]}")
        except Fail:
            self.step(f"the device event did not reach {streams[0]} (no ?type=)")
        value = self.http("GET", "/1.0/config/user.foo")["body"]
        self.expect(value == "baz", f"GET /1.0/config/user.foo after set: {value!r}")

        t_ready = now()
        patch = self.http("PATCH", "/1.0", {"state": "Ready"})
        inst = self.instance()
        ready = inst["runtime"].get("ready") is True
        if not ready and self.kind == "stock" and '"api_version"' in patch["body"]:
            # lxd-agent 5.0.2 predates PATCH /1.0 on devlxd: it answers it as a GET (its log
            # shows a GET /1.0 to the host) and never forwards it. Said, not asserted.
            self.ready = False
            self.tell("NOTE: stock lxd-agent 5.0.2 answered PATCH /1.0 like a GET "
                      f"({patch['body'].strip()}) and did not forward it: no Ready with this agent")
        else:
            self.expect(ready, f"instance list does not show ready: {inst['runtime']}")
            doc = self.json_get("/1.0")
            self.expect(doc.get("state") == "Ready", f"GET /1.0 after PATCH: {doc}")
            self.tell(f"guest PATCHed Ready; host shows ready (instance list) "
                      f"{now() - t_boot:.1f}s after boot")

        if self.bench_n > 0:
            b = self.control.call("bench", timeout=600, check=self.check, n=self.bench_n,
                                  concurrency=self.concurrency)
            self.figure("get_1.0_p50_ms", b["p50_ms"])
            self.figure("get_1.0_p99_ms", b["p99_ms"])
            self.step(f"GET /1.0 x{b['n']} over /dev/lxd/sock (python, new connection each): "
                      f"p50 {b['p50_ms']:.1f} ms, p90 {b['p90_ms']:.1f} ms, "
                      f"p99 {b['p99_ms']:.1f} ms, min {b['min_ms']:.1f}, max {b['max_ms']:.1f}")
            for c in b["concurrency"]:
                self.bench_level(c)

        self.identity(port1)
        self.operator()

        port2 = port1 + 1
        rc = self.daemon.stop()
        self.expect(rc == 0, f"the host daemon exited {rc} on SIGTERM")
        self.step("host daemon stopped (exit 0); starting it again on a new port")
        self.daemons.append(Daemon(self.state, port2))
        t_restart = self.daemon.started
        _, t_listen, _ = self.daemon.wait("listening", {"port": port2},
                                          "restarted host listening", check=self.check)
        i, t_ann2, _ = self.daemon.wait("announced", {"instance": NAME, "port": port2},
                                        "re-announce after the restart", check=self.check)
        hit = self.daemon.find("agent connected", {"instance": NAME})
        self.expect(hit is not None and hit[0] < i,
                    "the agent did not reach the restarted host before the announce completed")
        self.figure("restart_to_reannounced_s", t_ann2 - t_restart)
        self.figure("listening_to_reannounced_ms", (t_ann2 - t_listen) * 1000)
        state = "Ready" if self.ready else "Started"
        doc = self.json_get("/1.0")
        self.expect(doc.get("state") == state, f"GET /1.0 after the host restart: {doc}")
        inst = self.instance()
        self.expect(inst["runtime"].get("ready") is self.ready and
                    inst["runtime"].get("agentState") == "CONNECTED",
                    f"after the restart, instance list shows {inst['runtime']}")
        self.tell(f"host restarted on port {port2} -> agent re-announced and CONNECTED in "
                  f"{(t_ann2 - t_listen) * 1000:.0f} ms after it listened "
                  f"({t_ann2 - t_restart:.1f}s after the process started)"
                  f"{'; ready kept' if self.ready else ''}")

        n = len(self.daemon.lines)
        stopped = self.control.call("stop_agent", check=self.check)
        rc = stopped["rc"]
        self.step(f"agent stopped by SIGTERM (exit {rc})")
        env_crash = False
        if rc != 0:
            segv = [l for l in stopped.get("dmesg", []) if "segfault" in l]
            self.step(f"{self.label} exited {rc} on SIGTERM; L2 kernel: "
                      f"{segv or stopped.get('dmesg')}")
            if rc == -signal.SIGSEGV and self.kind == "ours":
                # A bare Deno segfaults on SIGTERM here in about 2 of 3 tries (make e2e,
                # 2026-12-05), the agent in 3 of 3: up to 3 tries before blaming the agent.
                for attempt in range(1, 4):
                    probe = self.control.call("deno_sigterm_probe", check=self.check)
                    env_crash = probe["ready"] == "ready" and probe["rc"] == -signal.SIGSEGV
                    self.step(f"bare `deno eval` with a SIGTERM listener in this L2 (try "
                              f"{attempt}): exit {probe['rc']}; L2 kernel: {probe['dmesg']}")
                    if env_crash:
                        break
            self.expect(env_crash, f"the agent exited {rc} on SIGTERM")
            # Deno itself, not the agent, dies on SIGTERM here: the agent's STOPPED line cannot
            # be checked in this VM; the host's STOPPED is checked when the VM powers off.
            self.tell("ENVIRONMENT: any Deno 2.9.6 process segfaults on SIGTERM in L2 (nested KVM "
                      "inside TCG; a bare `deno eval` does too): the agent's STOPPED-on-SIGTERM is "
                      "NOT checked here (in L1 the agent exits 0 on SIGTERM: "
                      "tests/agent_vsock_test.ts); the host's STOPPED is checked at power-off")
        else:
            self.daemon.wait("agent state", {"instance": NAME, "state": "STOPPED"},
                             "STOPPED from the agent", start=n, timeout=60)
        self.control.call("exit")
        deadline = now() + 60
        while os.path.exists(f"/proc/{self.qemu_pid}") and now() < deadline:
            time.sleep(0.1)
        self.expect(not os.path.exists(f"/proc/{self.qemu_pid}"), "L2 did not power off in 60s")
        l2rc = open(f"{self.ctl}/rc").read().strip() if os.path.exists(f"{self.ctl}/rc") else None
        self.expect(l2rc == "0", f"L2's command exit code: {l2rc}")
        self.qemu_pid = None
        if env_crash:
            self.daemon.wait("agent state", {"instance": NAME, "state": "STOPPED"},
                             "STOPPED after the VM powered off", start=n, timeout=60)
        rc = self.daemon.stop()
        self.expect(rc == 0, f"the host daemon exited {rc} on SIGTERM")
        self.tell("VM powered off -> host saw STOPPED; host stopped" if env_crash else
                  "agent stopped -> host saw STOPPED; VM powered off; host stopped")

    def agent_pair(self, name: str) -> tuple[str, str]:
        """The agent certificate and key the host generated for `name` (its config drive)."""
        drive = f"{self.state}/instances/{name}/config"
        return open(f"{drive}/agent.crt").read(), open(f"{drive}/agent.key").read()

    def identity(self, port: int) -> None:
        """Issue 13 over real vsock: the host serves a certificate only from its instance's
        CID. A second instance (vm2, CID 4, its own agent pair) is registered beside vm1;
        a python client in L2 (CID 3) makes mutual-TLS requests to the host's port, and one
        in L1 (vsock loopback: CID 1, registered to no instance)."""
        other = "vm2"
        self.cli("instance", "add", other, "--cid", "4")
        own, theirs = self.agent_pair(NAME), self.agent_pair(other)
        self.expect(own[0] != theirs[0], "vm2 got vm1's agent certificate")

        def from_l2(pair: tuple[str, str]) -> dict:
            return self.control.call("tls_request", check=self.check, cid=2, port=port,
                                     cert=pair[0], key=pair[1], path="/1.0")

        def from_l1(pair: tuple[str, str]) -> dict:
            return vsock_tls_request(1, port, pair[0], pair[1],
                                     path="/1.0", timeout=30)

        cases = [("CID 3 presenting vm2's certificate (vm2 at CID 4)", lambda: from_l2(theirs), 401),
                 ("CID 3 presenting its own (vm1's) certificate", lambda: from_l2(own), 200),
                 ("CID 1 (L1, no instance) presenting vm2's certificate", lambda: from_l1(theirs), 401),
                 ("CID 1 (L1, no instance) presenting vm1's certificate", lambda: from_l1(own), 401)]
        results = []
        for what, call, want in cases:
            r = call()
            results.append((what, r, want))
        self.cli("instance", "remove", other)
        r = from_l2(theirs)
        results.append(("CID 3 presenting vm2's certificate after vm2 was removed", r, 401))
        for what, r, want in results:
            got = r["status"] if r["status"] is not None else r["error"]
            self.step(f"identity: {what} -> {got}" +
                      (f" {r['body'].strip()[:120]}" if r.get("body") else ""))
        bad = [f"{what}: {r['status'] or r.get('error')} (expected {want})"
               for what, r, want in results if r["status"] != want]
        self.expect(not bad, "host identity over real vsock: " + "; ".join(bad))
        self.tell("identity over real vsock: vm2's certificate from CID 3 -> 401, vm1's -> 200, "
                  "valid certificates from CID 1 (no instance) -> 401, vm2's after its removal "
                  "-> 401")

    def operator(self) -> None:
        """Issue 15: the host's operator commands (exec, state, file push/pull) against this
        agent, through the daemon's admin socket; what each gave goes to the log."""
        t = now()
        p = self.cli_run("exec", NAME, "--", "uname", "-a")
        self.step(f"operator: exec -- uname -a -> exit {p.returncode} ({now() - t:.1f}s): "
                  f"{p.stdout.strip()[:200]!r}{' stderr ' + repr(p.stderr.strip()[:300]) if p.stderr.strip() else ''}")
        self.expect(p.returncode == 0 and p.stdout.startswith("Linux "),
                    f"exec -- uname -a: exit {p.returncode}, {p.stdout!r} {p.stderr!r}")
        t = now()
        p = self.cli_run("exec", NAME, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
        self.step(f"operator: exec -- sh -c 'echo out; echo err >&2; exit 3' -> exit "
                  f"{p.returncode} ({now() - t:.1f}s), stdout {p.stdout!r}, stderr {p.stderr!r}")
        self.expect(p.returncode == 3 and p.stdout == "out\n" and p.stderr == "err\n",
                    f"exec of exit 3: exit {p.returncode}, stdout {p.stdout!r}, stderr {p.stderr!r}")
        t = now()
        p = self.cli_run("state", NAME, "--format", "json")
        self.expect(p.returncode == 0, f"state: exit {p.returncode}: {p.stderr.strip()}")
        state = json.loads(p.stdout)
        nets = {k: [a["address"] for a in (v.get("addresses") or [])]
                for k, v in (state.get("network") or {}).items()}
        self.step(f"operator: state --format json ({now() - t:.1f}s): processes "
                  f"{state.get('processes')}, memory {state.get('memory')}, cpu "
                  f"{state.get('cpu')}, disk {state.get('disk')}, network {nets}, status "
                  f"{state.get('status')!r}, pid {state.get('pid')}")
        self.expect((state.get("processes") or 0) > 0, f"state: processes {state.get('processes')}")
        self.expect((state.get("memory") or {}).get("usage", 0) > 0,
                    f"state: memory {state.get('memory')}")
        # file push with mode and owner, checked in L2, then pulled back.
        local, back, remote = f"{self.ctl}/push.txt", f"{self.ctl}/pulled.txt", "/tmp/pushed.txt"
        body = f"pushed by lxd-vsock-host to the {self.label}\n" * 3
        with open(local, "w") as f:
            f.write(body)
        os.chmod(local, 0o600)
        t = now()
        p = self.cli_run("file", "push", local, f"{NAME}{remote}", "--mode", "0640",
                         "--uid", "1234", "--gid", "1234")
        self.expect(p.returncode == 0, f"file push: exit {p.returncode}: {p.stderr.strip()}")
        st = self.control.call("stat", check=self.check, path=remote)
        text = self.control.call("read", check=self.check, path=remote)
        self.step(f"operator: file push --mode 0640 --uid 1234 --gid 1234 ({now() - t:.1f}s): "
                  f"in L2 mode {st['mode']:o}, uid {st['uid']}, gid {st['gid']}, "
                  f"{st['size']} bytes, content {'same' if text == body else 'DIFFERENT'}")
        self.expect((st["mode"], st["uid"], st["gid"]) == (0o640, 1234, 1234) and text == body,
                    f"file push: in L2 {st}, content {text!r}")
        if os.path.exists(back):
            os.unlink(back)
        t = now()
        p = self.cli_run("file", "pull", f"{NAME}{remote}", back)
        self.expect(p.returncode == 0, f"file pull: exit {p.returncode}: {p.stderr.strip()}")
        lst = os.lstat(back)
        got = open(back).read()
        self.step(f"operator: file pull ({now() - t:.1f}s): in L1 mode {lst.st_mode & 0o7777:o}, "
                  f"uid {lst.st_uid}, gid {lst.st_gid}, content "
                  f"{'same' if got == body else 'DIFFERENT'}")
        self.expect(got == body and lst.st_mode & 0o7777 == 0o640 and
                    (lst.st_uid, lst.st_gid) == (1234, 1234),
                    f"file pull: mode {lst.st_mode & 0o7777:o}, owner {lst.st_uid}:{lst.st_gid}, "
                    f"content {got!r}")
        p = self.cli_run("file", "pull", f"{NAME}/nonexistent/file", back + ".none")
        self.step(f"operator: file pull of a missing path -> exit {p.returncode}: "
                  f"{p.stderr.strip()[:200]!r}")
        self.expect(p.returncode != 0, "file pull of a missing path succeeded")
        self.tell(f"operator commands against {self.label}: exec (uname, exit 3 passed "
                  f"through), state (processes {state.get('processes')}), file push/pull "
                  f"(mode 0640, owner 1234:1234) all as expected")

    def dump(self) -> None:
        print(f"---- {self.kind}: what the host logged (last 80 lines of each daemon run)")
        for n, d in enumerate(self.daemons):
            for t, line in d.lines[-80:]:
                print(f"  host#{n + 1} {t - self.t0:6.1f}s {line}")
        for title, path, count in (("the agent's log in L2", self.agent_log, 80),
                                   ("L2 console", f"{self.ctl}/console.log", 30),
                                   ("L2 QEMU", f"{self.ctl}/qemu.log", 20)):
            print(f"---- {self.kind}: {title} ({path})")
            try:
                with open(path, errors="replace") as f:
                    for line in f.readlines()[-count:]:
                        print(f"  {line.rstrip()[:400]}")
            except OSError as e:
                print(f"  ({e})")
        try:  # the vm script's markers (timed-out, lockup, rc, ...) say who stopped L2
            print(f"---- {self.kind}: L2 control directory: {sorted(os.listdir(self.ctl))}")
        except OSError as e:
            print(f"---- {self.kind}: L2 control directory: ({e})")
        # A QEMU that died by a signal (nested KVM under TCG) shows only in L1's kernel log.
        print(f"---- {self.kind}: L1 kernel log (last 15 lines)")
        k = subprocess.run(["dmesg"], capture_output=True, text=True)
        for line in (k.stdout or k.stderr).strip().splitlines()[-15:]:
            print(f"  {line.rstrip()[:400]}")

    def cleanup(self) -> None:
        if self.qemu_pid is not None:
            try:
                os.kill(self.qemu_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for d in self.daemons:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
        if self.control is not None:
            self.control.srv.close()
            if self.control.sock is not None:
                self.control.sock.close()


def main(argv: list[str]) -> int:
    narrate, bench, concurrency, kinds = False, 100, [], []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--narrate":
            narrate = True
        elif a == "--bench":
            bench = int(args.pop(0))
        elif a == "--concurrency":
            concurrency = [int(c) for c in args.pop(0).split(",") if c]
        elif a in ("ours", "stock"):
            kinds.append(a)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    if len(kinds) != 1:
        # One topology per L1: a second L2 (same CID 3, same control port) in the same L1
        # never reached the control port in a trial run (not investigated).
        print(__doc__, file=sys.stderr)
        return 2
    uptime = float(open("/proc/uptime").read().split()[0])
    if narrate:
        print(f"L1 (TCG VM on this machine, runs the host daemon and QEMU) up after {uptime:.1f}s")
    else:
        print(f"figure: l1_uptime_at_start_s={uptime:.1f}", flush=True)
    results, vm_failed = {}, False
    for kind in kinds:
        r = Run(kind, narrate, bench, concurrency)
        try:
            r.run()
            results[kind] = r.figures
            print(f"topology {kind}: ok", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported with the logs
            print(f"topology {kind}: FAIL: {type(e).__name__ + ': ' if not isinstance(e, Fail) else ''}{e}",
                  flush=True)
            r.dump()
            # Again after the logs, so the last lines of the output say why.
            print(f"topology {kind}: FAIL (logs above): {e}", flush=True)
            results[kind] = None
            vm_failed = isinstance(e, VmFail)
        finally:
            r.cleanup()
    if all(results.values()):
        return 0
    return 125 if vm_failed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
