#!/usr/bin/python3
"""qmp.py SOCKET COMMAND [ARGUMENTS-JSON]: one QMP command, prints its "return" as JSON.

Also a module: Qmp(path).execute(command, **arguments). A minimal client for checking
the VMs by hand and in tests/vm scripts (the project's own QMP client is in host/).
"""
import json
import socket
import sys


class QmpError(Exception):
    pass


class Qmp:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events: list[dict] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise QmpError("QMP connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.sock.close()


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    q = Qmp(sys.argv[1])
    print(json.dumps(q.execute(sys.argv[2], **(json.loads(sys.argv[3]) if len(sys.argv) == 4 else {}))))
    q.close()
