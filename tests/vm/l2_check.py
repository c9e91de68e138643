#!/usr/bin/python3
"""l2_check.py: run inside L1. Checks the L1 <-> L2 plumbing the host and agent rely on.

Boots L2 (tests/vm/l2 --detach) whose command writes STARTED to its
org.linuxcontainers.lxd port (ringbuf), reads "CONNECT <cid>:<port>" from a second,
socket-backed port (org.linuxcontainers.lxd.socket), answers "ACK ..." on it, and then
connects to that vsock address (CID 2 = L1, an echo on port 5002). L1 reads STARTED
with QMP ringbuf-read (and checks the read consumed it), sends the CONNECT line and
serves the echo. Prints timings from QEMU start; exit 0 when all of it worked.
"""
import os
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp import Qmp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PORT = 5002
DEADLINE = 120.0


def main() -> int:
    ctl = "/run/l2-check"
    qmp_path = f"{ctl}.qmp"
    os.makedirs(ctl, exist_ok=True)
    srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    srv.bind((socket.VMADDR_CID_ANY, PORT))
    srv.listen()
    accepted: dict = {}

    def serve() -> None:
        c, peer = srv.accept()
        accepted["t"] = time.monotonic()
        accepted["peer"] = peer
        with c:
            while data := c.recv(4096):
                c.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    cmd = ("printf 'STARTED\\n' > /dev/virtio-ports/org.linuxcontainers.lxd && "
           "exec 3<>/dev/virtio-ports/org.linuxcontainers.lxd.socket && "
           "until read -r verb addr <&3; do sleep 0.2; done && echo \"ACK $verb $addr\" >&3 && exec 3>&- && "
           "exec /usr/bin/python3 tests/vm/vsock_echo.py connect ${addr%%:*} ${addr#*:} hello-from-l2")
    sock_path = f"{ctl}.sock"
    t0 = time.monotonic()
    pid = int(subprocess.run(
        [f"{HERE}/l2", "--detach", "--ctl", ctl, "--qmp", qmp_path, "--timeout", "200",
         "--socket-port", f"org.linuxcontainers.lxd.socket={sock_path}",
         "--", "sh", "-c", cmd],
        check=True, capture_output=True, text=True).stdout.strip())
    ok = True
    try:
        q = None
        while q is None:
            try:
                q = Qmp(qmp_path)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() - t0 > 20:
                    raise
                time.sleep(0.05)
        print(f"l2 check: QMP connected after {time.monotonic() - t0:.1f}s", flush=True)
        got = ""
        while "STARTED\n" not in got:
            got += q.execute("ringbuf-read", device="vserial", size=16, format="utf8")
            if time.monotonic() - t0 > DEADLINE:
                print(f"l2 check: FAIL: no STARTED in the ring buffer (read {got!r})")
                return 1
            time.sleep(0.1)
        print(f"l2 check: QMP ringbuf-read got {got!r} after {time.monotonic() - t0:.1f}s", flush=True)
        again = q.execute("ringbuf-read", device="vserial", size=16, format="utf8")
        print(f"l2 check: a second ringbuf-read returned {again!r} (consumed: {again == ''})")
        ok &= again == ""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(DEADLINE)
        sock.connect(sock_path)
        sock.sendall(f"CONNECT 2:{PORT}\n".encode())
        reply = b""
        while not reply.endswith(b"\n"):
            data = sock.recv(100)
            if not data:
                break
            reply += data
        sock.close()
        print(f"l2 check: socket port answered {reply.decode()!r} after {time.monotonic() - t0:.1f}s",
              flush=True)
        ok &= reply == f"ACK CONNECT 2:{PORT}\n".encode()
        while "t" not in accepted and time.monotonic() - t0 < DEADLINE:
            time.sleep(0.1)
        if "t" not in accepted:
            print("l2 check: FAIL: L2 did not connect over vsock")
            return 1
        print(f"l2 check: vsock connect from CID {accepted['peer'][0]} after "
              f"{accepted['t'] - t0:.1f}s", flush=True)
        ok &= accepted["peer"][0] == 3
        while not os.path.exists(f"{ctl}/rc") and time.monotonic() - t0 < DEADLINE:
            time.sleep(0.1)
        with open(f"{ctl}/console.log") as f:
            sys.stdout.write("".join(f"  l2 console: {l}" for l in f.readlines()))
        rc = open(f"{ctl}/rc").read().strip() if os.path.exists(f"{ctl}/rc") else "none"
        print(f"l2 check: L2 command exit code {rc} after {time.monotonic() - t0:.1f}s")
        ok &= rc == "0"
        q.close()
    finally:
        if not ok or not os.path.exists(f"{ctl}/rc"):
            try:
                with open(f"{ctl}/console.log") as f:
                    sys.stdout.write("".join(f"  l2 console: {l}" for l in f.readlines()))
            except OSError:
                pass
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
    print("l2 check:", "ok" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
