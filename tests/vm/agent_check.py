#!/usr/bin/python3
"""agent_check.py [stock|ours]: run inside L1. Boots L2 with an agent set up as LXD does
it (config drive = 9p tag "config", copied to /run/lxd_agent by the lxd-agent package's
own lxd-agent-setup): Debian's stock lxd-agent 5.0.2 (default), or ours
(deno run $AGENT_PERMISSIONS agent/main.ts --config-dir /run/lxd_agent; -P=agent unless set). Then from L1: reads STARTED with QMP ringbuf-read, and calls the
agent's API over vsock 3:8443 with mutual TLS (GET /1.0 with the "server" certificate the
agent trusts). Prints timings from QEMU start; exit 0 when it all worked.
Needs openssl (for the test certificates) and tests/vm/setup's lxd-agent.
"""
import json
import os
import socket
import ssl
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp import Qmp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
AGENT_DIR = f"{REPO}/.cache/vm/lxd-agent"
DEADLINE = 300.0


def make_cert(path: str, cn: str) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={cn}", "-keyout", f"{path}.key",
         "-out", f"{path}.crt"], check=True, capture_output=True)


def main(argv: list[str]) -> int:
    which = argv[0] if argv else "stock"
    if which not in ("stock", "ours"):
        print(__doc__, file=sys.stderr)
        return 2
    name = f"{which} agent"
    base = f"/run/{which}-agent"
    config = f"{base}/config"
    ctl = f"{base}/ctl"
    os.makedirs(config, exist_ok=True)
    make_cert(f"{config}/agent", "lxd-agent")
    make_cert(f"{base}/server", "lxd-host")
    with open(f"{base}/server.crt") as src, open(f"{config}/server.crt", "w") as dst:
        dst.write(src.read())
    setup = f"{AGENT_DIR}/lib/systemd/lxd-agent-setup && ls /run/lxd_agent && "
    if which == "stock":
        cmd = setup + f"cd /run/lxd_agent && exec {AGENT_DIR}/usr/bin/lxd-agent --debug"
    else:
        perms = os.environ.get("AGENT_PERMISSIONS", "-P=agent")
        cmd = setup + (f"cd {REPO} && exec node_modules/deno/deno run {perms} agent/main.ts "
                       "--config-dir /run/lxd_agent --log-level debug")
    qmp_path = f"{base}/qmp.sock"
    t0 = time.monotonic()
    pid = int(subprocess.run(
        [f"{HERE}/l2", "--detach", "--ctl", ctl, "--qmp", qmp_path, "--config-drive", config,
         "--timeout", "420", "--", "sh", "-c", cmd],
        check=True, capture_output=True, text=True).stdout.strip())
    ok = False
    try:
        q = None
        while q is None:
            try:
                q = Qmp(qmp_path)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() - t0 > 20:
                    raise
                time.sleep(0.05)
        got = ""
        while "STARTED\n" not in got:
            got += q.execute("ringbuf-read", device="vserial", size=16, format="utf8")
            if time.monotonic() - t0 > DEADLINE or os.path.exists(f"{ctl}/rc"):
                print(f"{name}: FAIL: no STARTED in the ring buffer (read {got!r})")
                return 1
            time.sleep(0.2)
        print(f"{name}: ringbuf-read got {got!r} after {time.monotonic() - t0:.1f}s", flush=True)

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(f"{config}/agent.crt")
        ctx.load_cert_chain(f"{base}/server.crt", f"{base}/server.key")
        body = b""
        while True:
            s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            s.settimeout(30)
            try:
                s.connect((3, 8443))
                break
            except OSError as e:
                s.close()
                if time.monotonic() - t0 > DEADLINE:
                    print(f"{name}: FAIL: cannot connect to 3:8443: {e}")
                    return 1
                time.sleep(0.5)
        with ctx.wrap_socket(s) as tls:
            print(f"{name}: TLS {tls.version()} to 3:8443 after {time.monotonic() - t0:.1f}s",
                  flush=True)
            tls.sendall(b"GET /1.0 HTTP/1.1\r\nHost: lxd-agent\r\nConnection: close\r\n\r\n")
            while data := tls.recv(65536):
                body += data
        head, _, payload = body.partition(b"\r\n\r\n")
        status = head.split(b"\r\n")[0].decode()
        print(f"{name}: GET /1.0 -> {status}")
        if b"chunked" in head.lower():
            chunks, rest = b"", payload
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                n = int(size, 16)
                if n == 0:
                    break
                chunks, rest = chunks + rest[:n], rest[n + 2:]
            payload = chunks
        doc = json.loads(payload)
        print(f"{name}: type={doc.get('type')} status_code={doc.get('status_code')} "
              f"metadata keys={sorted((doc.get('metadata') or {}).keys())}")
        ok = " 200 " in status and doc.get("status_code") == 200
    finally:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
        time.sleep(0.5)
        try:
            with open(f"{ctl}/console.log") as f:
                sys.stdout.write("".join(f"  l2 console: {l}" for l in f.readlines()[-15:]))
        except OSError:
            pass
    print(f"{name}:", "ok" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
