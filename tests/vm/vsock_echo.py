#!/usr/bin/python3
"""vsock_echo.py serve PORT [COUNT] | connect CID PORT [MESSAGE] | selftest CID PORT

A tiny AF_VSOCK echo server and client for checking a VM's vsock plumbing.
  serve:    listen on (VMADDR_CID_ANY, PORT), echo COUNT connections (default 1), print peers
  connect:  connect to (CID, PORT) (retrying for up to 60 s while refused/unreachable),
            send MESSAGE, print the echo; exit 1 if it differs
  selftest: both in one process (a server thread, then a client to CID)
"""
import socket
import sys
import threading
import time


def serve(port: int, count: int = 1, ready: threading.Event | None = None) -> None:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.bind((socket.VMADDR_CID_ANY, port))
    s.listen()
    print(f"vsock echo: listening on port {port}, local CID {socket.ioctl_vsock_cid()}" if hasattr(socket, "ioctl_vsock_cid") else f"vsock echo: listening on port {port}", flush=True)
    if ready:
        ready.set()
    for _ in range(count):
        c, peer = s.accept()
        print(f"vsock echo: accepted from CID {peer[0]} port {peer[1]}", flush=True)
        with c:
            while data := c.recv(65536):
                c.sendall(data)
    s.close()


def connect(cid: int, port: int, message: str) -> int:
    deadline = time.monotonic() + 60
    t0 = time.monotonic()
    while True:
        c = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            c.connect((cid, port))
            break
        except (ConnectionRefusedError, ConnectionResetError, OSError) as e:
            c.close()
            if time.monotonic() > deadline:
                print(f"vsock echo: cannot connect to {cid}:{port}: {e}", flush=True)
                return 1
            time.sleep(0.2)
    c.sendall(message.encode())
    c.shutdown(socket.SHUT_WR)
    got = b""
    while data := c.recv(65536):
        got += data
    c.close()
    ok = got == message.encode()
    print(f"vsock echo: {cid}:{port} echoed {got.decode(errors='replace')!r} "
          f"({'ok' if ok else 'MISMATCH'}, {time.monotonic() - t0:.3f}s)", flush=True)
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"] and len(argv) in (2, 3):
        serve(int(argv[1]), int(argv[2]) if len(argv) == 3 else 1)
        return 0
    if argv[:1] == ["connect"] and len(argv) in (3, 4):
        return connect(int(argv[1]), int(argv[2]), argv[3] if len(argv) == 4 else "ping")
    if argv[:1] == ["selftest"] and len(argv) == 3:
        ready = threading.Event()
        t = threading.Thread(target=serve, args=(int(argv[2]), 1, ready), daemon=True)
        t.start()
        ready.wait(10)
        rc = connect(int(argv[1]), int(argv[2]), f"hello over CID {argv[1]}")
        t.join(10)
        return rc
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
