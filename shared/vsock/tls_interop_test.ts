/**
 * `FdSocket` under `node:tls` and `node:http`, as the host and the agent use
 * it: mutual TLS over a unix-socket pair, then HTTP/1.1 over that TLS.
 * A throwaway self-signed P-256 certificate is made with `openssl`.
 */
import assert from "node:assert/strict";
import type { Buffer } from "node:buffer";
import * as http from "node:http";
import * as tls from "node:tls";
import { nextEvent, readToEnd, TempDir, within } from "./_testing.ts";
import type { FdSocket } from "./fd_socket.ts";
import { connectUnix, listenUnix } from "./unix.ts";
import { missingProgram, requires } from "../_requires.ts";

function selfSigned(dir: TempDir, name: string): { key: string; cert: string } {
  const out = new Deno.Command("openssl", {
    args: [
      "req",
      "-x509",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:P-256",
      "-nodes",
      "-keyout",
      dir.join(`${name}.key`),
      "-out",
      dir.join(`${name}.crt`),
      "-days",
      "1",
      "-subj",
      `/CN=${name}`,
    ],
    stdout: "null",
    stderr: "piped",
  }).outputSync();
  assert.ok(out.success, new TextDecoder().decode(out.stderr));
  return {
    key: Deno.readTextFileSync(dir.join(`${name}.key`)),
    cert: Deno.readTextFileSync(dir.join(`${name}.crt`)),
  };
}

const noOpenssl = missingProgram("openssl", "it makes the test certificates");

async function tlsPair(dir: TempDir) {
  const server = selfSigned(dir, "server");
  const client = selfSigned(dir, "client");
  const listener = listenUnix(dir.join("tls.sock"));
  const [rawClient, rawServer] = await Promise.all([
    connectUnix(dir.join("tls.sock")),
    listener.accept(),
  ]);
  listener.close();
  const serverTls = new tls.TLSSocket(rawServer, {
    isServer: true,
    key: server.key,
    cert: server.cert,
    requestCert: true,
    rejectUnauthorized: false,
  });
  const serverSecure = nextEvent(serverTls, "secure", 10000);
  const clientTls = tls.connect({
    socket: rawClient,
    key: client.key,
    cert: client.cert,
    ca: server.cert,
    servername: "server",
    checkServerIdentity: () => undefined,
  });
  await within(
    Promise.all([nextEvent(clientTls, "secureConnect"), serverSecure]),
    10000,
    "TLS handshake",
  );
  return { serverTls, clientTls, rawClient, rawServer, clientCert: client.cert };
}

function destroyAll(...sockets: Array<{ destroy(): void }>): void {
  for (const socket of sockets) socket.destroy();
}

Deno.test(requires(noOpenssl, {
  name: "node:tls runs mutual TLS over an FdSocket pair and sees the client certificate",
  async fn() {
    using dir = new TempDir();
    const { serverTls, clientTls, rawClient, rawServer, clientCert } = await tlsPair(dir);
    try {
      const peer = serverTls.getPeerCertificate(true);
      assert.equal(peer.subject.CN, "client");
      const der = new X509Der(clientCert);
      assert.ok(der.equals(peer.raw), "the server sees the client's certificate");
      serverTls.on("data", (chunk: Buffer) => serverTls.write(chunk));
      const echoed = nextEvent<Buffer>(clientTls, "data");
      clientTls.write("secret over FdSocket");
      assert.equal(String(await echoed), "secret over FdSocket");
      assert.ok(
        rawClient.bytesWritten > "secret over FdSocket".length,
        "bytes went through the fd",
      );
    } finally {
      destroyAll(clientTls, serverTls, rawClient, rawServer);
    }
  },
}));

/** The DER bytes of a PEM certificate. */
class X509Der {
  #bytes: Uint8Array;
  constructor(pem: string) {
    const base64 = pem.replace(/-----[^-]+-----/g, "").replace(/\s+/g, "");
    this.#bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  }
  equals(other: Uint8Array): boolean {
    return other.byteLength === this.#bytes.byteLength &&
      this.#bytes.every((byte, i) => other[i] === byte);
  }
}

Deno.test(requires(noOpenssl, {
  name: "node:http serves a request over node:tls over an FdSocket pair",
  async fn() {
    using dir = new TempDir();
    const { serverTls, clientTls, rawClient, rawServer } = await tlsPair(dir);
    const server = http.createServer((req, res) => {
      res.setHeader("content-type", "application/json");
      res.end(JSON.stringify({ method: req.method, url: req.url }));
    });
    try {
      server.emit("connection", serverTls);
      const response = await within(
        new Promise<http.IncomingMessage>((resolve, reject) => {
          const req = http.request({
            createConnection: () => clientTls as unknown as FdSocket,
            path: "/1.0",
            method: "GET",
            headers: { host: "lxd-agent", connection: "close" },
          }, resolve);
          req.on("error", reject);
          req.end();
        }),
        10000,
        "HTTP response",
      );
      assert.equal(response.statusCode, 200);
      const body = JSON.parse(String(await readToEnd(response)));
      assert.deepEqual(body, { method: "GET", url: "/1.0" });
    } finally {
      server.close();
      destroyAll(clientTls, serverTls, rawClient, rawServer);
    }
  },
}));
