#!/usr/bin/python3
"""lxd_e2e.py [--narrate] [--window S] [--no-compare] stock|ours OUT: the real LXD 5.0.2
daemon drives an agent. Runs inside L1 (fresh; OUT is a directory of the outer machine,
shared read-write with tests/vm/l1 --share).

L1 starts Debian's `lxd` (its own LXD_DIR, `lxd init --preseed`: a dir pool in OUT, no
network) and creates vm1 the way tests/vm can boot under LXD 5.0.2 in L1: raw.qemu boots the
harness's kernel and initramfs directly (-kernel/-initrd/-append, -cpu host, L1's / as 9p
tag "root"), a dummy share takes boot index 0. L2 runs tests/vm/lxd_guest, which sets the
agent up from LXD's own config drive (lxd-agent-setup: agent.crt, agent.key, server.crt,
agent.conf into /run/lxd_agent; the serial port org.linuxcontainers.lxd) and starts it
under tests/vm/guest.py: `stock` is the lxd-agent LXD put on that drive (the control),
`ours` is `deno run -P=agent agent/main.ts`. Asserted against the real daemon, in order:

  1. LXD logs `Instance agent started` (it read STARTED from the ring buffer) within its
     first 10-s poll after the agent started, and sends PUT /1.0; ours logs that PUT and
     writes CONNECTED only after it;
  2. /dev/lxd/sock answers /, /1.0, /1.0/config, /1.0/config/user.probe (set before the
     start), /1.0/meta-data, /1.0/devices; `stock` records the answers in OUT/stock.json,
     `ours` compares its answers with them field by field: every difference must be listed
     in agent/README.md ("Differences from the stock lxd-agent under LXD 5.0.2");
  3. /1.0/events followers in L2 (one plain, one ?type=config,device) get the config event
     of `lxc config set vm1 user.foo bar`; for `lxc config device add vm1 probe disk
     source=<raw image>` LXD 5.0.2 pushes no device event to a VM: what each follower got
     is recorded, and ours must get what the stock agent got;
  4. PATCH /1.0 {"state":"Ready"}: the same answer as the stock agent's; LXD 5.0.2 keeps no
     ready state (no volatile.last_state.ready); ours records Ready to re-send it;
  7. `lxc info vm1`, `lxc list`, `lxc list vm1 -c 4` (L2's eth0: a QEMU user-net NIC from
     raw.qemu, 10.0.2.15/24 set by lxd_guest), `lxc exec vm1 -- true`, `... sh -c 'exit 3'`,
     `... uname -s -m`, `lxc file pull`, `lxc file push --mode 0640 --uid 1234 --gid 1234`
     (stat in L2, pulled back), an interactive `lxc exec vm1 -- sh` on a PTY in L1 (stty
     size, a resize to 40x132 seen by stty, exit 5): recorded; ours must give what the stock
     agent gave in the same run (exit statuses, outputs, the pulled files' content, mode and
     owner, sizes seen, a known process count and memory, no "Could not get VM state");
  6. (ours) with an events follower open, the agent stays CONNECTED for --window seconds
     (default 300): no state change in its log, no second announce in LXD's, devlxd keeps
     answering; checks 3, 4 and 7 run inside that window;
  5. LXD is killed (kill -9) and started again: it re-announces, the agent is CONNECTED
     again, devlxd answers, and ours re-sends Ready.

Prints "figure:" lines (LXD start, VM start -> STARTED, STARTED -> CONNECTED, LXD restart
-> CONNECTED, ...). --narrate prints a short story instead (tests/vm/demo --lxd);
--no-compare skips the comparison with OUT/stock.json. E2E_RUN_ID, when set, must match
the one stock.json was written with (the comparison is within one `make e2e` run).
Exit 0 when all passed, 125 when L2 never came up or its QEMU died (retried), else 1.
"""
import difflib
import fcntl
import json
import os
import re
import select
import signal
import socket
import subprocess
import struct
import sys
import termios
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from topology import Control, Fail, VmFail, logfmt, now  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
LXD_DIR = "/var/lib/lxd-e2e"
NAME = "vm1"
CONTROL_PORT = 7100
STEP = 120.0
README = f"{REPO}/agent/README.md"
PATHS = ["/", "/1.0", "/1.0/config", "/1.0/config/user.probe", "/1.0/meta-data",
         "/1.0/devices"]
STREAMS = ("/1.0/events", "/1.0/events?type=config,device")
# What LXD 5.0.2 logs when an agent cannot give the VM's state (lxc info: "Processes: -1").
STATE_ERROR = "Could not get VM state from agent"


def env() -> dict:
    return dict(os.environ, LXD_DIR=LXD_DIR)


class Log:
    """A log file followed in a thread: (arrival time on L1's clock, line)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.stop = False
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        pos, buf = 0, ""
        while not self.stop:
            try:
                with open(self.path, errors="replace") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
            except OSError:
                chunk = ""
            if chunk:
                buf += chunk
                *full, buf = buf.split("\n")
                with self.cond:
                    self.lines += [(now(), line) for line in full]
                    self.cond.notify_all()
            time.sleep(0.2)

    def find(self, pattern: str, since: float = 0.0):
        for t, line in self.lines:
            if t >= since and re.search(pattern, line):
                return t, line
        return None

    def count(self, pattern: str, since: float = 0.0) -> int:
        return sum(1 for t, line in self.lines if t >= since and re.search(pattern, line))

    def wait(self, pattern: str, what: str, timeout: float = STEP, since: float = 0.0,
             check=lambda: None):
        deadline = now() + timeout
        with self.cond:
            while True:
                hit = self.find(pattern, since)
                if hit:
                    return hit
                check()
                left = deadline - now()
                if left <= 0:
                    raise Fail(f"{what}: {pattern!r} not in {self.path} within {timeout:.0f}s")
                self.cond.wait(min(left, 0.5))


class Lxd:
    """One `lxd` daemon process in L1 with its debug log."""

    def __init__(self, out: str, kind: str, n: int) -> None:
        self.logfile = f"{out}/{kind}-lxd-{n}.log"
        for old in (self.logfile, f"{out}/{kind}-lxd-{n}.stdout"):
            if os.path.exists(old):
                os.remove(old)
        self.t_spawn = now()
        self.proc = subprocess.Popen(
            ["lxd", "--group", "root", "--debug", "--logfile", self.logfile],
            stdin=subprocess.DEVNULL, stdout=open(f"{out}/{kind}-lxd-{n}.stdout", "w"),
            stderr=subprocess.STDOUT, env=env())
        self.log = Log(self.logfile)

    def wait_ready(self, timeout: float = 600) -> float:
        deadline = now() + timeout
        while now() < deadline:
            if self.proc.poll() is not None:
                raise Fail(f"lxd exited ({self.proc.returncode}) before it was ready: "
                           f"{self.errors()}")
            if subprocess.run(["lxd", "waitready", "--timeout", "5"], env=env(),
                              capture_output=True).returncode == 0:
                return now() - self.t_spawn
        raise Fail(f"lxd not ready within {timeout:.0f}s: {self.errors()}")

    def errors(self) -> str:
        return " | ".join(l for _, l in self.log.lines if "level=error" in l or
                          "level=warn" in l)[-1500:]

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.stop = True


class Run:
    def __init__(self, kind: str, out: str, narrate: bool, window: float, compare: bool):
        self.kind, self.out, self.narrate, self.window = kind, out, narrate, window
        self.compare = compare and kind == "ours"
        self.label = "our agent (lxd-vsock-agent)" if kind == "ours" else "stock lxd-agent 5.0.2"
        self.t0 = now()
        self.lxds: list[Lxd] = []
        self.control: Control | None = None
        self.hello: dict | None = None
        self.figures: dict[str, float] = {}
        self.record: dict = {"run_id": os.environ.get("E2E_RUN_ID", ""), "answers": {},
                             "events": {}, "cli": {}}
        self.diffs: list[str] = []
        self.console_thread: threading.Thread | None = None
        self.t_vm_start: float | None = None

    # --- output -----------------------------------------------------------------------
    def step(self, text: str) -> None:
        if not self.narrate:
            print(f"[lxd-{self.kind} {now() - self.t0:6.1f}s] {text}", flush=True)

    def tell(self, text: str) -> None:
        if self.narrate:
            print(text, flush=True)
        else:
            self.step(text)

    def figure(self, key: str, value: float) -> None:
        self.figures[key] = value
        if not self.narrate:
            print(f"figure: lxd-{self.kind} {key}={value:.1f}", flush=True)

    def expect(self, cond: bool, what: str) -> None:
        if not cond:
            raise Fail(what)

    # --- helpers ----------------------------------------------------------------------
    @property
    def lxd(self) -> Lxd:
        return self.lxds[-1]

    def lxc(self, *args: str, ok: bool = True, timeout: float = STEP) -> tuple[int, str]:
        try:
            p = subprocess.run(["lxc", *args], env=env(), capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Fail(f"lxc {' '.join(args)}: no answer within {timeout:.0f}s") from None
        text = (p.stdout + p.stderr).strip()
        if ok and p.returncode != 0:
            raise Fail(f"lxc {' '.join(args)} exited {p.returncode}: {text[-800:]}")
        return p.returncode, text

    def check(self) -> None:
        # L2 reset or stopped by itself (seen under TCG + nested KVM: a guest-reset with
        # nothing on its console, then LXD boots it again): the VM failed, not an assertion.
        if self.t_vm_start is not None and self.lxds and not self.lxd.log.stop:
            hit = self.lxd.log.find(r'msg="Instance stopped"', self.t_vm_start)
            if hit is not None:
                raise VmFail(f"L2 stopped by itself: {hit[1][:200]}")
        if self.control is not None and (rc := self.control.agent_exit()) is not None:
            raise Fail(f"the agent in L2 exited with status {rc}")
        if self.lxds and self.lxd.proc.poll() is not None and not self.lxd.log.stop:
            raise Fail(f"lxd exited ({self.lxd.proc.returncode}): {self.lxd.errors()}")

    def call(self, op: str, **args):
        try:
            return self.control.call(op, check=self.check, **args)
        except VmFail:
            raise
        except Fail:
            self.check()  # a VM that reset explains a closed control connection
            raise

    def agent_lines(self, since: float = 0.0) -> list[tuple[float, str]]:
        """The agent's output lines in L2, stamped on L1's clock (from L2's uptime)."""
        if self.control is None or self.hello is None:
            return []
        offset = self.hello["at"] - self.hello["uptime"]
        with self.control.cond:
            evs = [e for e in self.control.events if e["event"] == "log"]
        lines = [(offset + e["up"], e["line"]) for e in evs]
        return [(t, l) for t, l in lines if t >= since]

    def agent_find(self, pattern: str, since: float = 0.0):
        for t, line in self.agent_lines(since):
            if re.search(pattern, line):
                return t, line
        return None

    def agent_wait(self, pattern: str, what: str, since: float = 0.0, timeout: float = STEP):
        deadline = now() + timeout
        with self.control.cond:
            while True:
                hit = self.agent_find(pattern, since)
                if hit:
                    return hit
                self.check()
                left = deadline - now()
                if left <= 0:
                    raise Fail(f"{what}: {pattern!r} not in the agent's log within "
                               f"{timeout:.0f}s")
                self.control.cond.wait(min(left, 0.5))

    def http(self, method: str, path: str, body: str | None = None) -> dict:
        r = self.call("http", method=method, path=path, client="python",
                      **({} if body is None else {"body": body}))
        return {"status": r["status"], "content_type": r["content_type"], "body": r["body"]}

    # --- L1 ---------------------------------------------------------------------------
    def prepare_l1(self) -> None:
        """What LXD needs of the harness's L1 (initramfs init, chroot, no udev)."""
        sh = "mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup"
        subprocess.run(["sh", "-c", sh], check=True)
        # tests/vm/init.sh runs us chrooted into an overlay. LXD setns()es threads into its
        # own mount namespace, whose root is then the initramfs (ENOENT for the database and
        # QEMU); setns follows mounts stacked on the namespace root, so put ours there.
        if os.stat("/")[:2] != os.stat("/proc/1/root")[:2]:
            subprocess.run(["mount", "--make-rshared", "/"], check=True)
            subprocess.run(["mount", "--no-canonicalize", "--rbind", "/", "/proc/1/root"],
                           check=True)
        if not os.path.exists("/dev/fd"):
            os.symlink("/proc/self/fd", "/dev/fd")  # LXD passes QEMU files as /dev/fd/N
        for dev in ("/dev/kvm", "/dev/vhost-vsock", "/dev/vhost-net"):
            if os.path.exists(dev):
                os.chmod(dev, 0o666)
        os.makedirs(LXD_DIR, exist_ok=True)
        os.makedirs("/run/bootdummy", exist_ok=True)

    def start_lxd(self) -> float:
        self.lxds.append(Lxd(self.out, self.kind, len(self.lxds) + 1))
        return self.lxd.wait_ready()

    def create_vm(self) -> None:
        pool = f"{self.out}/pool-{self.kind}"
        subprocess.run(["rm", "-rf", pool], check=True)
        os.makedirs(pool)
        preseed = json.dumps({
            "storage_pools": [{"name": "default", "driver": "dir", "config": {"source": pool}}],
            "profiles": [{"name": "default", "devices": {
                "root": {"path": "/", "pool": "default", "type": "disk"}}}],
        })
        p = subprocess.run(["lxd", "init", "--preseed"], input=preseed, env=env(),
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise Fail(f"lxd init --preseed exited {p.returncode}: {p.stdout}{p.stderr}")
        vm = dict(l.split("=", 1) for l in open(f"{REPO}/.cache/vm/env").read().split())
        cmdline = (f"console=ttyS0 loglevel=1 panic=-1 mitigations=off rdinit=/init "
                   f"vmtest.mode=root vmtest.ctl=/run/vmtest-ctl vmtest.repo={REPO} "
                   f"vmtest.run={HERE}/lxd_guest vmtest.modules=vsock,vmw_vsock_virtio_transport,virtio_net "
                   f"vmtest.hostname={NAME} lxde2e.agent={self.kind} lxde2e.port={CONTROL_PORT}")
        # The last -cpu wins: plain `host` instead of LXD's `host,hv_passthrough` (with it
        # L1 froze at the first exec). -kernel makes LXD 5.0.2 start without firmware (its
        # OVMF aborts the outer TCG QEMU).
        # A NIC for `lxc list`'s address column: QEMU user networking (no bridge, dnsmasq or
        # tap in L1), no boot ROM; lxd_guest gives L2's eth0 the address 10.0.2.15/24.
        raw = ("-fsdev local,id=l1root,path=/,security_model=none,readonly=on,multidevs=remap "
               "-device virtio-9p-pci,fsdev=l1root,mount_tag=root -cpu host "
               "-netdev user,id=e2enet,restrict=on -device virtio-net-pci,netdev=e2enet,romfile= "
               f"-kernel {vm['VM_KERNEL']} -initrd {vm['VM_INITRD']} -append '{cmdline}'")
        self.lxc("init", "--empty", "--vm", NAME, "-c", "security.secureboot=false",
                 "-c", "limits.memory=768MiB", "-c", "limits.cpu=1", "-c", "user.probe=hello",
                 "-c", "user.meta-data=#cloud-config\nprobe: 1", "-c", f"raw.qemu={raw}",
                 timeout=300)
        # QEMU's -kernel boot ROM wants boot index 0, which LXD gives the root disk: a share
        # with a higher boot priority takes it (9p has no boot ROM).
        self.lxc("config", "device", "add", NAME, "bootdummy", "disk", "source=/run/bootdummy",
                 "path=/mnt/bootdummy", "boot.priority=10")

    def follow_console(self) -> None:
        """L2's console (LXD keeps no log of it for VMs): OUT/<kind>-l2-console.log."""
        path = f"{LXD_DIR}/logs/{NAME}/qemu.console"
        target = f"{self.out}/{self.kind}-l2-console.log"

        def pump() -> None:
            s = socket.socket(socket.AF_UNIX)
            for _ in range(3000):
                try:
                    s.connect(path)
                    break
                except OSError:
                    time.sleep(0.2)
            else:
                return
            with open(target, "ab", buffering=0) as f:
                while data := s.recv(65536):
                    f.write(data)

        self.console_thread = threading.Thread(target=pump, daemon=True)
        self.console_thread.start()

    # --- the run ----------------------------------------------------------------------
    def run(self) -> None:
        self.prepare_l1()
        self.tell(f"starting the real LXD {subprocess.run(['lxd', '--version'], capture_output=True, text=True).stdout.strip()} daemon in L1 (emulated)")
        took = self.start_lxd()
        self.figure("lxd_start_s", took)
        self.tell(f"LXD ready after {took:.1f}s; creating vm1 (dir pool, no LXD network, "
                  f"raw.qemu direct kernel boot, user.probe=hello)")
        self.create_vm()
        self.control = Control(CONTROL_PORT, cid=None)
        self.follow_console()
        t_start = self.t_vm_start = now()
        self.lxc("start", NAME, timeout=300)
        self.figure("lxc_start_s", now() - t_start)
        self.tell(f"lxc start vm1 returned after {now() - t_start:.1f}s: LXD's QEMU boots L2 "
                  f"(nested KVM); {self.label} starts in it")
        try:
            self.hello = self.control.accept(300, self.check)
        except Fail as e:
            raise VmFail(f"L2 never reached L1: {e}") from None
        self.figure("vm_start_to_guest_s", self.hello["at"] - t_start)
        t_spawn, _ = self.agent_wait(r"^guest: starting ", "agent start")
        # The agent has started once it can write its state: ours logs the serial port it
        # opened (Deno takes a while to load from L2's 9p root), the stock agent (a static Go
        # binary) writes STARTED as it starts.
        if self.kind == "ours":
            t_agent, _ = self.agent_wait(r'msg="serial port open"', "the agent opening the "
                                         "serial port", timeout=300)
            self.figure("agent_spawn_to_serial_s", t_agent - t_spawn)
        else:
            t_agent = t_spawn
        self.agent_connected(t_start, t_agent)
        self.devlxd_answers()
        t_follow = now()
        for path in STREAMS:
            self.call("events_open", path=path)
        self.events()
        self.patch_ready()
        self.cli()
        if self.kind == "ours":
            self.no_flip(t_follow)
        self.restart()
        self.finish()

    def agent_connected(self, t_start: float, t_spawn: float) -> None:
        t_seen, line = self.lxd.log.wait(r'msg="Instance agent started"', "LXD reading STARTED",
                                         since=t_start, check=self.check, timeout=300)
        self.figure("vm_start_to_started_s", t_seen - t_start)
        self.figure("agent_start_to_lxd_started_s", t_seen - t_spawn)
        self.tell(f"LXD read STARTED from the ring buffer ({line.split('msg=')[1][:60]}) "
                  f"{t_seen - t_spawn:.1f}s after the agent started, "
                  f"{t_seen - t_start:.1f}s after lxc start")
        # Its poll is every 10 s (restarted by each QMP event, then a QMP round trip under TCG);
        # 15 s is one period plus slack for that and for this measurement, short of a second poll.
        self.expect(t_seen - t_spawn <= 15.0,
                    f"LXD logged 'Instance agent started' {t_seen - t_spawn:.1f}s after the agent "
                    f"started: not within its first 10-s poll")
        self.expect(self.lxd.log.find(r"Failed to advertise vsock address", t_start) is None,
                    f"LXD could not announce itself: "
                    f"{self.lxd.log.find(r'Failed to advertise vsock address', t_start)}")
        if self.kind == "ours":
            t_put, put = self.agent_wait(r'msg="connected to the host" .*source="PUT /1.0"',
                                         "PUT /1.0 from LXD, validated")
            t_conn, _ = self.agent_wait(r'msg="state" .*state=CONNECTED', "CONNECTED")
            early = self.agent_find(r'state=CONNECTED')
            self.expect(early is not None and early[0] >= t_seen - 1.0,
                        "our agent wrote CONNECTED before LXD read STARTED")
            self.figure("started_to_connected_s", t_conn - t_seen)
            self.tell(f"LXD sent PUT /1.0; our agent validated it ({put[:120]}) and wrote "
                      f"CONNECTED {t_conn - t_seen:.1f}s after LXD read STARTED")
        waited = self.call("wait_socket", timeout=STEP)["waited"]
        self.step(f"/dev/lxd/sock accepts connections (waited {waited:.1f}s in L2)")
        if self.kind == "stock":
            self.figure("started_to_devlxd_s", now() - t_seen)

    def devlxd_answers(self) -> None:
        for path in PATHS:
            r = self.http("GET", path)
            self.record["answers"][path] = r
            self.step(f"GET {path} -> {r['status']} {r['content_type']} {r['body']!r}")
            self.expect(r["status"] == 200, f"GET {path} on /dev/lxd/sock -> {r['status']}: "
                                            f"{r['body'][:300]}")
        self.expect(json.loads(self.record["answers"]["/1.0"]["body"]).get("api_version") == "1.0",
                    "GET /1.0 has no api_version 1.0")
        self.expect(self.record["answers"]["/1.0/config/user.probe"]["body"] == "hello",
                    "GET /1.0/config/user.probe is not 'hello'")
        self.expect("/1.0/config/user.probe" in self.record["answers"]["/1.0/config"]["body"],
                    "GET /1.0/config does not list user.probe")
        self.expect(f"local-hostname: {NAME}" in self.record["answers"]["/1.0/meta-data"]["body"],
                    "GET /1.0/meta-data has no local-hostname")
        self.tell(f"/dev/lxd/sock in L2 answers /, /1.0, config, user.probe, meta-data, devices: "
                  f"/1.0 is {self.record['answers']['/1.0']['body'].strip()}")

    def events(self) -> None:
        self.lxc("config", "set", NAME, "user.foo", "bar")
        match = {"type": "config", "metadata.key": "user.foo", "metadata.value": "bar"}
        for path in STREAMS:
            ev = self.call("events_wait", path=path, match=match, wait=60, timeout=90)
            self.record["events"][f"config {path}"] = ev
            self.step(f"config event on {path}: {json.dumps(ev)}")
        # A hot-pluggable device without a network: a raw disk image (QEMU opens it with
        # O_DIRECT, which L1's tmpfs refuses, so it lives in OUT like the pool).
        image = f"{self.out}/probe-{self.kind}.img"
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        t_add = now()
        self.lxc("config", "device", "add", NAME, "probe", "disk", f"source={image}")
        self.lxd.log.wait(r'msg="Adding device" device=probe', "LXD adding the device",
                          since=t_add, check=self.check)
        # LXD 5.0.2 sends a VM no device event (no POST /1.0/events follows "Adding device"
        # in its log, whichever agent runs): recorded; ours must do as the stock agent did.
        device = {"type": "device", "metadata.name": "probe", "metadata.action": "added"}
        for i, path in enumerate(STREAMS):
            try:
                ev = self.control.call("events_wait", path=path, match=device,
                                       wait=30 if i == 0 else 5, timeout=60)
            except Fail:
                ev = None
            self.record["events"][f"device {path}"] = ev
            self.step(f"device event on {path}: {json.dumps(ev)}")
        pushed = [l for t, l in self.lxd.log.lines if t >= t_add and "POST" in l and
                  "/1.0/events" in l]
        self.record["device_event_pushed"] = len(pushed)
        got = [k for k, v in self.record["events"].items() if k.startswith("device") and v]
        self.tell("events in L2: `lxc config set vm1 user.foo bar` in L1 reached both "
                  "/1.0/events followers; `lxc config device add vm1 probe disk`: LXD 5.0.2 "
                  f"{'pushed' if pushed else 'pushed no'} device event to the VM "
                  f"({len(got)} follower(s) got one)")

    def patch_ready(self) -> None:
        r = self.http("PATCH", "/1.0", json.dumps({"state": "Ready"}))
        self.record["patch"] = r
        self.step(f"PATCH /1.0 Ready -> {r['status']} {r['content_type']} {r['body']!r}")
        self.expect(r["status"] == 200, f"PATCH /1.0 -> {r['status']}: {r['body'][:300]}")
        _, ready = self.lxc("config", "get", NAME, "volatile.last_state.ready")
        self.record["volatile.last_state.ready"] = ready
        self.expect(ready == "", f"LXD 5.0.2 has a ready state after all: {ready!r}")
        if self.kind == "ours":
            state = json.loads(self.call("read", path="/run/lxd-vsock-agent/state.json"))
            self.expect(state.get("ready") is True, f"our agent did not keep Ready: {state}")
        self.tell(f"PATCH /1.0 Ready answered {r['status']} {r['body'].strip()[:100]!r}; LXD "
                  f"5.0.2 keeps no ready state (volatile.last_state.ready unset)"
                  f"{'; our agent keeps Ready to re-send it to hosts that do' if self.kind == 'ours' else ''}")

    def cli(self) -> None:
        t = now()
        pulled = "/tmp/lxd-e2e-hostname"
        runs = {
            "info": ["info", NAME],
            "list": ["list", "--format", "csv", "-c", "nsN"],
            "exec": ["exec", NAME, "--", "true"],
            "exec_status": ["exec", NAME, "--", "sh", "-c", "exit 3"],
            "file_pull": ["file", "pull", f"{NAME}/etc/hostname", pulled],
            "list_ipv4": ["list", NAME, "-c", "4", "--format", "csv"],
            "exec_uname": ["exec", NAME, "--", "uname", "-s", "-m"],
        }
        for key, args in runs.items():
            if key == "file_pull" and os.path.exists(pulled):
                os.unlink(pulled)
            rc, text = self.lxc(*args, ok=False, timeout=180)
            self.record["cli"][key] = {"rc": rc, "output": text}
            self.step(f"lxc {' '.join(args)} -> exit {rc}: {text[-400:]!r}")
        cli = self.record["cli"]
        try:
            cli["file_pull"]["content"] = open(pulled, errors="replace").read()
        except OSError:
            cli["file_pull"]["content"] = None
        m = re.search(r"Processes: (-?\d+)", cli["info"]["output"])
        cli["info"]["processes"] = int(m.group(1)) if m else None
        # LXD asks the agent for the state at `lxc info`; it logs this when it cannot.
        cli["info"]["state_error"] = self.lxd.log.find(STATE_ERROR, since=t) is not None
        m = re.search(r"Memory \(current\): (\S+)", cli["info"]["output"])
        cli["info"]["memory_known"] = m is not None
        cli["file_push"] = self.file_push()
        cli["interactive"] = self.interactive()
        # The stock agent is the reference; ours is compared with it (compare_with_stock).
        if self.kind == "stock":
            self.expect(cli["exec"]["rc"] == 0, f"lxc exec with the stock agent failed: {cli['exec']}")
        self.tell("lxc: " + "; ".join(
            f"{k} exit {v['rc']}" +
            (f" ({(v['output'].splitlines() or [''])[-1][:70]})" if v["rc"] else "")
            for k, v in cli.items() if "output" in v))

    def file_push(self) -> dict:
        """`lxc file push --mode 0640 --uid 1234 --gid 1234`, the result's mode and owner as
        `stat` in L2 shows them (lxc exec), then `lxc file pull` of it back."""
        local, back, remote = "/tmp/lxd-e2e-push.txt", "/tmp/lxd-e2e-pulled.txt", "/tmp/pushed.txt"
        body = "pushed by lxc file push\n" * 3
        with open(local, "w") as f:
            f.write(body)
        os.chmod(local, 0o600)
        if os.path.exists(back):
            os.unlink(back)
        out: dict = {}
        rc, text = self.lxc("file", "push", "--mode", "0640", "--uid", "1234", "--gid", "1234",
                            local, f"{NAME}{remote}", ok=False, timeout=180)
        out["push"] = {"rc": rc, "output": text}
        rc, text = self.lxc("exec", NAME, "--", "stat", "-c", "%a %u %g %s", remote, ok=False,
                            timeout=180)
        out["stat"] = {"rc": rc, "output": text}
        rc, text = self.lxc("file", "pull", f"{NAME}{remote}", back, ok=False, timeout=180)
        out["pull"] = {"rc": rc, "output": text}
        try:
            st = os.lstat(back)
            out["pulled"] = {"mode": f"{st.st_mode & 0o7777:o}", "uid": st.st_uid,
                             "gid": st.st_gid, "same_content": open(back).read() == body}
        except OSError as e:
            out["pulled"] = {"error": str(e)}
        rc, text = self.lxc("file", "pull", f"{NAME}/nonexistent/file", back + ".none", ok=False,
                            timeout=180)
        out["pull_missing"] = {"rc": rc, "output": text}
        self.step(f"lxc file push --mode 0640 --uid 1234 --gid 1234 -> exit {out['push']['rc']}; "
                  f"stat in L2: {out['stat']['output']!r}; pulled back: {out['pulled']}; pull "
                  f"of a missing path -> exit {rc}: {text[-200:]!r}")
        return out

    def interactive(self) -> dict:
        """`lxc exec vm1 -- sh` on a PTY in L1 (24x80): `stty size`, then the PTY resized to
        40x132 (the kernel sends lxc SIGWINCH; lxc sends the agent a window-resize), `stty
        size` again until it shows the new size (30 s), then `exit 5`."""
        out: dict = {"before": None, "after": None, "rc": None}
        master, slave = os.openpty()

        def size(fd: int, rows: int, cols: int) -> None:
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

        def controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        size(slave, 24, 80)
        t0 = now()
        p = subprocess.Popen(["lxc", "exec", NAME, "--", "sh"], stdin=slave, stdout=slave,
                             stderr=slave, env=dict(env(), TERM="xterm"), start_new_session=True,
                             preexec_fn=controlling_tty)
        os.close(slave)
        buf = bytearray()

        def until(pattern: bytes, timeout: float):
            deadline = now() + timeout
            while True:
                m = re.search(pattern, buf)
                if m:
                    return m
                left = deadline - now()
                if left <= 0:
                    return None
                ready, _, _ = select.select([master], [], [], min(left, 1.0))
                if ready:
                    try:
                        data = os.read(master, 4096)
                    except OSError:  # EIO: lxc closed the terminal
                        data = b""
                    if not data:
                        return None
                    buf.extend(data)

        try:
            os.write(master, b"echo A-$(stty size)-Z\r")
            m = until(rb"A-(\d+ \d+)-Z", 120)
            out["before"] = m.group(1).decode() if m else None
            out["first_answer_s"] = round(now() - t0, 1)
            if m:
                t1 = now()
                size(master, 40, 132)
                for i in range(15):
                    os.write(master, f"echo B{i}-$(stty size)-Z\r".encode())
                    m = until(rf"B{i}-(\d+ \d+)-Z".encode(), 60)
                    if m is None:
                        break
                    out["after"] = m.group(1).decode()
                    if out["after"] == "40 132":
                        break
                    time.sleep(2)
                out["resize_seen_s"] = round(now() - t1, 1)
                os.write(master, b"exit 5\r")
            try:
                out["rc"] = p.wait(60)
            except subprocess.TimeoutExpired:
                pass
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            os.close(master)
        out["transcript"] = buf.decode(errors="replace")[-600:]
        self.step(f"interactive lxc exec vm1 -- sh on a PTY: stty size {out['before']!r}, after "
                  f"the resize to 40x132 {out['after']!r}, exit {out['rc']} (5 sent); "
                  f"transcript tail {out['transcript'][-300:]!r}")
        return out

    def no_flip(self, t_follow: float) -> None:
        first_conn = self.agent_find(r'state=CONNECTED')[0]
        announces = self.lxd.log.count(r'msg="Instance agent started"')
        self.tell(f"watching the agent's state with an events follower open for "
                  f"{self.window:.0f}s (LXD answers its /1.0/events only with the next event)")
        end = t_follow + self.window
        n = 0
        while now() < end:
            r = self.http("GET", "/1.0")
            self.expect(r["status"] == 200, f"GET /1.0 during the window -> {r}")
            n += 1
            flips = [l for _, l in self.agent_lines(first_conn + 0.001) if 'msg="state"' in l]
            self.expect(not flips, f"the agent's state changed with a follower open: {flips}")
            self.step(f"window: {now() - t_follow:.0f}/{self.window:.0f}s, CONNECTED, "
                      f"GET /1.0 #{n} ok")
            time.sleep(min(20.0, max(0.0, end - now())))
        state = json.loads(self.call("read", path="/run/lxd-vsock-agent/state.json"))
        self.expect(state["state"] == "CONNECTED", f"state file after the window: {state}")
        late = self.agent_find(r"No HTTP response head", first_conn)
        self.expect(late is None, f"the agent gave up on a late head: {late}")
        hit = self.lxd.log.find(r"Failed closing connection", first_conn)
        self.expect(hit is None, f"LXD logged {hit[1] if hit else ''!r} during the window")
        again = self.lxd.log.count(r'msg="Instance agent started"')
        self.expect(again == announces, "LXD saw the agent start again during the window")
        self.figure("window_s", now() - t_follow)
        self.tell(f"no flip: CONNECTED for {now() - t_follow:.0f}s with a follower open, "
                  f"{n} GET /1.0 answered, LXD announced once, no 'Failed closing connection'")

    def restart(self) -> None:
        t_kill = now()
        pid = self.lxd.proc.pid
        self.lxd.kill9()
        self.tell(f"kill -9 of LXD (pid {pid}); starting it again")
        t_restart = now()
        took = self.start_lxd()
        self.figure("lxd_restart_ready_s", took)
        t_seen, _ = self.lxd.log.wait(r'msg="Instance agent started"',
                                      "LXD re-reading STARTED after its restart", timeout=180,
                                      check=self.check)
        self.figure("restart_to_started_s", t_seen - t_restart)
        if self.kind == "ours":
            t_back, _ = self.agent_wait(r'msg="state" .*state=STARTED', "back to STARTED",
                                        since=t_kill)
            t_conn, _ = self.agent_wait(r'msg="state" .*state=CONNECTED', "CONNECTED again",
                                        since=t_back)
            self.figure("restart_to_connected_s", t_conn - t_restart)
            self.agent_wait(r"re-sent the guest's Ready state to the host", "Ready re-sent",
                            since=t_kill)
        # The re-announce (PUT /1.0) follows "Instance agent started" by a few seconds; until
        # it reaches the agent, a devlxd request goes to the old port (the stock agent: 500).
        deadline, tries = now() + 90, 0
        while True:
            tries += 1
            r = self.http("GET", "/1.0")
            if r["status"] == 200:
                break
            self.expect(now() < deadline, f"GET /1.0 after the LXD restart -> {r} ({tries} tries "
                                          f"in 90 s)")
            time.sleep(2)
        self.step(f"GET /1.0 after the restart: 200 at try {tries}")
        r2 = self.http("GET", "/1.0/config/user.foo")
        self.expect(r2["body"] == "bar", f"GET /1.0/config/user.foo after the restart -> {r2}")
        self.figure("restart_to_devlxd_s", now() - t_restart)
        self.tell(f"LXD back after {took:.1f}s, re-announced (Instance agent started "
                  f"{t_seen - t_restart:.1f}s after the restart)"
                  f"{', our agent CONNECTED again and Ready re-sent' if self.kind == 'ours' else ''}"
                  f"; /dev/lxd/sock answers")

    def finish(self) -> None:
        if self.kind == "stock":
            with open(f"{self.out}/stock.json", "w") as f:
                json.dump(self.record, f, indent=1)
            self.step(f"recorded the stock agent's answers in {self.out}/stock.json")
            return
        with open(f"{self.out}/ours.json", "w") as f:
            json.dump(self.record, f, indent=1)
        if self.compare:
            self.compare_with_stock()

    # --- stock vs ours ------------------------------------------------------------------
    def compare_with_stock(self) -> None:
        try:
            stock = json.load(open(f"{self.out}/stock.json"))
        except OSError:
            raise Fail("no stock.json: run the lxd-stock step first (tests/vm/run-e2e "
                       "lxd-stock lxd-ours)") from None
        run_id = os.environ.get("E2E_RUN_ID", "")
        self.expect(not run_id or stock.get("run_id") == run_id,
                    f"stock.json is from another run ({stock.get('run_id')!r}, this is "
                    f"{run_id!r}): run lxd-stock and lxd-ours together")
        diffs: list[tuple[str, str]] = []

        def differ(key: str, a, b) -> None:
            if a != b:
                diffs.append((key, f"stock {a!r}, ours {b!r}"))

        for path in PATHS:
            s, o = stock["answers"][path], self.record["answers"][path]
            differ(f"GET {path} status", s["status"], o["status"])
            differ(f"GET {path} content type", s["content_type"], o["content_type"])
            compare_body(f"GET {path}", s["body"], o["body"], differ)
        s, o = stock["patch"], self.record["patch"]
        differ("PATCH /1.0 status", s["status"], o["status"])
        differ("PATCH /1.0 content type", s["content_type"], o["content_type"])
        compare_body("PATCH /1.0", s["body"], o["body"], differ)
        for key, ev in stock["events"].items():
            mine = self.record["events"].get(key)
            if ev is None or mine is None:
                differ(f"event {key} delivered", ev is not None, mine is not None)
                continue
            differ(f"event {key} fields", list(ev), list(mine))
            differ(f"event {key} metadata", ev.get("metadata"), mine.get("metadata"))
        # lxc against the agent API (exec, files, state): the same outcomes as with the stock agent.
        s, o = stock["cli"], self.record["cli"]
        for key in ("exec", "exec_status", "file_pull"):
            differ(f"lxc {key} exit status", s[key]["rc"], o[key]["rc"])
        differ("lxc file pull content", s["file_pull"].get("content"), o["file_pull"].get("content"))
        differ("lxc info process count known", (s["info"].get("processes") or -1) > 0,
               (o["info"].get("processes") or -1) > 0)
        differ("LXD could not get the VM state", s["info"].get("state_error"),
               o["info"].get("state_error"))
        differ("lxc info memory known", s["info"].get("memory_known"),
               o["info"].get("memory_known"))
        layout = list(difflib.unified_diff(info_layout(s["info"]["output"]),
                                           info_layout(o["info"]["output"]), "stock", "ours",
                                           n=0, lineterm=""))
        if layout:
            diffs.append(("lxc info layout", " | ".join(layout[2:])))
        for key in ("list_ipv4", "exec_uname"):
            differ(f"lxc {key} exit status", s[key]["rc"], o[key]["rc"])
            differ(f"lxc {key} output", s[key]["output"], o[key]["output"])
        sp, op = s["file_push"], o["file_push"]
        for key in ("push", "stat", "pull", "pull_missing"):
            differ(f"lxc file push {key} exit status", sp[key]["rc"], op[key]["rc"])
        differ("lxc file push stat in the VM", sp["stat"]["output"], op["stat"]["output"])
        differ("lxc file push pulled back", sp["pulled"], op["pulled"])
        differ("lxc file pull of a missing path output", sp["pull_missing"]["output"],
               op["pull_missing"]["output"])
        for key in ("before", "after", "rc"):
            differ(f"lxc exec interactive {key}", s["interactive"][key], o["interactive"][key])
        documented = open(README).read()
        missing = []
        for key, what in diffs:
            listed = f"`{key}`" in documented
            self.step(f"difference: {key}: {what} ({'listed in agent/README.md' if listed else 'NOT LISTED'})")
            if not listed:
                missing.append(f"{key}: {what}")
        self.tell(f"compared with the stock agent under the same LXD: {len(diffs)} difference(s)"
                  f"{', all listed in agent/README.md' if not missing else ''}")
        self.expect(not missing, "differences from the stock agent not listed in agent/README.md"
                                 " (fix them or list them with the reason): " + "; ".join(missing))

    # --- failure and cleanup -------------------------------------------------------------
    def dump(self) -> None:
        print(f"--- LXD log (last 40 lines of {len(self.lxds)} daemon(s))")
        for lxd in self.lxds[-1:]:
            for _, l in lxd.log.lines[-40:]:
                print(f"  lxd: {l[:300]}")
        print("--- agent log (last 40 lines)")
        for _, l in self.agent_lines()[-40:]:
            print(f"  agent: {l[:300]}")
        try:
            tail = open(f"{self.out}/{self.kind}-l2-console.log", errors="replace").read()
            print("--- L2 console (last 25 lines)")
            for l in tail.splitlines()[-25:]:
                print(f"  l2: {l[:300]}")
        except OSError:
            pass

    def save_agent_log(self) -> None:
        try:
            with open(f"{self.out}/{self.kind}-agent.log", "w") as f:
                for t, l in self.agent_lines():
                    f.write(f"{t - self.t0:8.2f} {l}\n")
        except OSError:
            pass

    def cleanup(self) -> None:
        self.save_agent_log()
        if self.lxds and self.lxd.proc.poll() is None:
            try:
                self.lxc("stop", "-f", NAME, ok=False, timeout=120)
            except Fail:
                pass
            subprocess.run(["lxd", "shutdown", "--timeout", "60"], env=env(),
                           capture_output=True, timeout=120)
            if self.lxd.proc.poll() is None:
                self.lxd.proc.kill()
        if self.control is not None:
            self.control.srv.close()
            if self.control.sock is not None:
                self.control.sock.close()


def info_layout(text: str) -> list[str]:
    """`lxc info`'s lines with what differs between any two runs masked: sizes, then every
    number (counters, PID, dates, the process count). lxc prints the interfaces under
    "Network usage:" in Go map order (random: eth0 first in one run, lo in the next), so their
    blocks are sorted."""
    sized = re.compile(r"\d+(\.\d+)?(B|kB|MB|GB|KiB|MiB|GiB)\b")
    out: list[str] = []
    blocks: list[list[str]] = []
    in_network = False
    for line in text.splitlines():
        line = re.sub(r"\d+", "#", sized.sub("<size>", line))
        indent = len(line) - len(line.lstrip())
        if in_network and indent == 4 and line.endswith(":"):
            blocks.append([line])
            continue
        if in_network and indent > 4 and blocks:
            blocks[-1].append(line)
            continue
        if blocks:
            out += [l for block in sorted(blocks) for l in block]
            blocks = []
        in_network = line.strip() == "Network usage:"
        out.append(line)
    return out + [l for block in sorted(blocks) for l in block]


def compare_body(what: str, stock: str, ours: str, differ) -> None:
    """JSON: the value field by field, key order, the trailing newline; else the text. What
    differs between any two runs is left out: the instance-id (a new UUID per VM) and the
    order of /1.0/config (LXD lists a Go map: random order)."""
    try:
        s, o = json.loads(stock), json.loads(ours)
    except ValueError:
        uuid = re.compile(r"instance-id: [0-9a-f-]{36}")
        differ(f"{what} body", uuid.sub("instance-id: <uuid>", stock),
               uuid.sub("instance-id: <uuid>", ours))
        return
    if what == "GET /1.0/config" and isinstance(s, list) and isinstance(o, list):
        s, o = sorted(s), sorted(o)
    if isinstance(s, dict) and isinstance(o, dict):
        for k in sorted(set(s) | set(o)):
            differ(f"{what} field {k}", s.get(k, "<absent>"), o.get(k, "<absent>"))
        differ(f"{what} key order", list(s), list(o))
    else:
        differ(f"{what} value", s, o)
    differ(f"{what} trailing newline", stock.endswith("\n"), ours.endswith("\n"))


def main(argv: list[str]) -> int:
    narrate, window, compare, rest = False, 300.0, True, []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--narrate":
            narrate = True
        elif a == "--window":
            window = float(args.pop(0))
        elif a == "--no-compare":
            compare = False
        else:
            rest.append(a)
    if len(rest) != 2 or rest[0] not in ("stock", "ours") or not os.path.isdir(rest[1]):
        print(__doc__, file=sys.stderr)
        return 2
    kind, out = rest[0], os.path.abspath(rest[1])
    uptime = float(open("/proc/uptime").read().split()[0])
    if not narrate:
        print(f"figure: lxd-{kind} l1_uptime_at_start_s={uptime:.1f}", flush=True)
    r = Run(kind, out, narrate, window, compare)
    try:
        r.run()
        print(f"lxd-{kind}: ok", flush=True)
        return 0
    except Exception as e:  # noqa: BLE001 - every failure is reported with the logs
        if not isinstance(e, VmFail):
            # An L2 that reset itself breaks whatever was talking to it (a PTY's broken
            # pipe, a closed connection): LXD's log says so within moments. VM failure.
            deadline = now() + 5
            while now() < deadline and not isinstance(e, VmFail):
                try:
                    r.check()
                    time.sleep(0.2)
                except VmFail as vm:
                    e = VmFail(f"{vm} (seen after: {type(e).__name__}: {e})")
                except Exception:  # noqa: BLE001 - only a VM failure changes the verdict
                    break
        print(f"lxd-{kind}: FAIL: {'' if isinstance(e, Fail) else type(e).__name__ + ': '}{e}",
              flush=True)
        r.dump()
        print(f"lxd-{kind}: FAIL (logs above): {e}", flush=True)
        return 125 if isinstance(e, VmFail) else 1
    finally:
        r.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
