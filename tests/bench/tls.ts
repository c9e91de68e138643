/**
 * Benchmark of the project's hot path: a new connection, a mutual TLS 1.3
 * handshake (ECDSA, pinned both ways) and one `GET /1.0` request/response,
 * client and server in this one process, over unix sockets.
 *
 * Settings (each sequential and at concurrency 8, figures are per setting):
 * - `own_tls_net_*`: shared/tls + shared/http (own HTTP/1.1 codec) over
 *   `node:net` unix sockets;
 * - `own_tls_fd_*`: the same over the FFI `FdSocket` of shared/vsock (the
 *   transport the daemons use);
 * - `nodehttp_tls_net_*`: the same TLS, with `node:http`
 *   (`server.emit("connection")` / `http.request({ createConnection })`)
 *   instead of the own codec;
 * - `own_plain_*` / `nodehttp_plain_*`: no TLS (new unix connection + one
 *   request), to isolate the HTTP layer;
 * - `own_keepalive_*`: requests on one kept-alive plain connection (codec only);
 * - `own_tls_xproc_*`: own codec and TLS with the server in a child Deno
 *   process; `_server_cpu_us` is the server's CPU per request (the host's
 *   share of the hot path).
 * Keys: `<setting>_rps` (requests/s), `_p50_ms`, `_p99_ms` (per request),
 * `_cpu_us` (CPU time of this process, client and server together, per
 * request: the figure that stays meaningful when other work shares the cores).
 *
 * `benchTls()` returns the figures; run directly to print them:
 * `deno run -P=test tests/bench/tls.ts [P-256|P-384]`.
 *
 * Owns: a temporary directory for the sockets and keys, and the child server
 * (both gone on return). Permissions: `--allow-read`, `--allow-write`,
 * `--allow-net` (unix sockets), `--allow-ffi` (FdSocket), `--allow-run` (the child).
 *
 * @module
 */

import * as http from "node:http";
import * as net from "node:net";
import { cpuUsage } from "node:process";
import type { Duplex } from "node:stream";
import { acceptTls, connectTls } from "../../shared/tls/mod.ts";
import {
  generateKeyPair,
  type KeyPair,
  readKeyPair,
  writeKeyPair,
} from "../../shared/tls/key_pair.ts";
import { httpRequest, serveHttp, syncResponse } from "../../shared/http/mod.ts";
import { connectUnix, listenUnix } from "../../shared/vsock/mod.ts";

/** Options of {@linkcode benchTls}. */
export interface BenchTlsOptions {
  /**
   * Milliseconds measured per setting (after a short warm-up).
   * @default 2000
   */
  duration?: number;
  /**
   * Certificate curve.
   * @default "P-384" (as LXD)
   */
  curve?: "P-256" | "P-384";
  /**
   * Also measure against a server in a child Deno process, reporting the
   * server's own CPU per request (`own_tls_xproc_*_server_cpu_us`): the host's
   * share, for the per-core target.
   * @default true
   */
  crossProcess?: boolean;
}

const BODY = {
  api_version: "1.0",
  location: "host",
  instance_type: "virtual-machine",
  state: "Started",
};

function handler(): Response {
  return syncResponse(BODY);
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p / 100 * sorted.length) - 1))];
}

function round(value: number, digits = 2): number {
  const factor = 10 ** digits;
  return Math.round(value * factor) / factor;
}

/** Runs `once` for `duration` ms with `concurrency` loops; requests/s and latency percentiles. */
async function measure(
  name: string,
  once: () => Promise<void>,
  concurrency: number,
  duration: number,
  figures: Record<string, number>,
): Promise<void> {
  for (let i = 0; i < 20; i++) await once(); // warm-up
  const samples: number[] = [];
  const cpuBefore = cpuUsage();
  const start = performance.now();
  const deadline = start + duration;
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (performance.now() < deadline) {
      const t0 = performance.now();
      await once();
      samples.push(performance.now() - t0);
    }
  }));
  const elapsed = performance.now() - start;
  const cpu = cpuUsage(cpuBefore);
  samples.sort((a, b) => a - b);
  figures[`${name}_rps`] = Math.round(samples.length / (elapsed / 1000));
  figures[`${name}_p50_ms`] = round(percentile(samples, 50));
  figures[`${name}_p99_ms`] = round(percentile(samples, 99));
  // CPU of this process (client and server together) per request: robust to other load.
  figures[`${name}_cpu_us`] = Math.round((cpu.user + cpu.system) / samples.length);
}

/** Checks one response; every iteration must really get the body. */
async function expectBody(response: Response): Promise<void> {
  const text = await response.text();
  if (response.status !== 200 || !text.includes('"api_version":"1.0"')) {
    throw new Error(`Unexpected response ${response.status}: ${text}`);
  }
}

function nodeNetServer(path: string, onSocket: (socket: net.Socket) => void): Promise<net.Server> {
  const server = net.createServer(onSocket);
  return new Promise((resolve) => server.listen(path, () => resolve(server)));
}

function closeServer(server: net.Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}

function netConnect(path: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(path);
    socket.once("connect", () => resolve(socket));
    socket.once("error", reject);
  });
}

function serveOwnTls(socket: Duplex, server: KeyPair, client: KeyPair): void {
  acceptTls(socket, { ...server, pinned: client.cert })
    .then(({ socket }) => serveHttp(socket, handler))
    .catch(() => {});
}

async function requestOwnTls(socket: Duplex, server: KeyPair, client: KeyPair): Promise<void> {
  const secure = await connectTls(socket, { ...client, pinned: server.cert });
  await expectBody(await httpRequest(secure, new Request("http://lxd-vsock/1.0")));
}

/** node:http over the same TLS sockets: one server instance, a connection emitted per accept. */
function nodeHttpServer(): http.Server {
  return http.createServer((_request, response) => {
    const body = JSON.stringify({
      type: "sync",
      status: "Success",
      status_code: 200,
      operation: "",
      error_code: 0,
      error: "",
      metadata: BODY,
    });
    response.writeHead(200, { "content-type": "application/json" });
    response.end(body);
  });
}

function nodeHttpRequest(socket: Duplex): Promise<void> {
  return new Promise((resolve, reject) => {
    const request = http.request({
      createConnection: () => socket as net.Socket,
      path: "/1.0",
      headers: { host: "lxd-vsock", connection: "close" },
    }, (response) => {
      let text = "";
      response.setEncoding("utf8");
      response.on("data", (chunk: string) => text += chunk);
      response.on("end", () => {
        socket.destroy();
        if (response.statusCode === 200 && text.includes('"api_version":"1.0"')) resolve();
        else reject(new Error(`Unexpected response ${response.statusCode}: ${text}`));
      });
      response.on("error", reject);
    });
    request.on("error", reject);
    request.end();
  });
}

/** Measures every setting; returns the figures. */
export async function benchTls(options: BenchTlsOptions = {}): Promise<Record<string, number>> {
  const { duration = 2000, curve = "P-384", crossProcess = true } = options;
  const server = await generateKeyPair({ commonName: "host", curve });
  const client = await generateKeyPair({ commonName: "agent", curve });
  const figures: Record<string, number> = {};
  const dir = await Deno.makeTempDir({ prefix: "bench-tls-" });
  try {
    // Own codec, mutual TLS, node:net unix sockets.
    {
      const path = `${dir}/own-net.sock`;
      const listener = await nodeNetServer(path, (socket) => serveOwnTls(socket, server, client));
      const once = async () => requestOwnTls(await netConnect(path), server, client);
      await measure("own_tls_net_seq", once, 1, duration, figures);
      await measure("own_tls_net_c8", once, 8, duration, figures);
      await closeServer(listener);
    }
    // Own codec, mutual TLS, FFI FdSocket unix sockets.
    {
      const path = `${dir}/own-fd.sock`;
      const listener = listenUnix(path);
      const accepting = (async () => {
        try {
          for await (const socket of listener) serveOwnTls(socket, server, client);
        } catch {
          // closed
        }
      })();
      const once = async () => requestOwnTls(await connectUnix(path), server, client);
      await measure("own_tls_fd_seq", once, 1, duration, figures);
      await measure("own_tls_fd_c8", once, 8, duration, figures);
      listener.close();
      await accepting;
    }
    // Own codec, mutual TLS, server in a child process: the server's CPU alone.
    if (crossProcess) {
      const path = `${dir}/xproc.sock`;
      await writeKeyPair(dir, "server", server);
      await writeKeyPair(dir, "client", client);
      const child = new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "--allow-read",
          "--allow-write",
          "--allow-net",
          import.meta.filename!,
          "--serve",
          path,
          dir,
        ],
        stdout: "piped",
        stderr: "inherit",
      }).spawn();
      const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
      try {
        if ((await lines.read()).value?.trim() !== "ready") {
          throw new Error("bench server did not start");
        }
        const once = async () => requestOwnTls(await netConnect(path), server, client);
        const serverCpu = async () => {
          const secure = await connectTls(await netConnect(path), {
            ...client,
            pinned: server.cert,
          });
          const usage = await (await httpRequest(secure, new Request("http://lxd-vsock/cpu")))
            .json();
          return usage.user + usage.system;
        };
        for (
          const [name, concurrency] of [["own_tls_xproc_seq", 1], ["own_tls_xproc_c8", 8]] as const
        ) {
          const before = await serverCpu();
          const count = { n: 0 };
          await measure(
            name,
            async () => {
              await once();
              count.n++;
            },
            concurrency,
            duration,
            figures,
          );
          const after = await serverCpu();
          // The warm-up's 20 requests and one /cpu request are included in the delta.
          figures[`${name}_server_cpu_us`] = Math.round((after - before) / (count.n + 1));
        }
      } finally {
        child.kill();
        await child.status;
        await lines.cancel();
      }
    }
    // node:http, mutual TLS, node:net unix sockets.
    {
      const path = `${dir}/node-net.sock`;
      const httpServer = nodeHttpServer();
      const listener = await nodeNetServer(path, (socket) => {
        acceptTls(socket, { ...server, pinned: client.cert })
          .then(({ socket }) => httpServer.emit("connection", socket))
          .catch(() => {});
      });
      const once = async () => {
        const secure = await connectTls(await netConnect(path), { ...client, pinned: server.cert });
        await nodeHttpRequest(secure);
      };
      await measure("nodehttp_tls_net_seq", once, 1, duration, figures);
      await measure("nodehttp_tls_net_c8", once, 8, duration, figures);
      await closeServer(listener);
      httpServer.close();
    }
    // HTTP layer alone: plain unix connection per request.
    {
      const path = `${dir}/own-plain.sock`;
      const listener = await nodeNetServer(path, (socket) => void serveHttp(socket, handler));
      const once = async () =>
        expectBody(await httpRequest(await netConnect(path), new Request("http://lxd-vsock/1.0")));
      await measure("own_plain_seq", once, 1, duration, figures);
      await measure("own_plain_c8", once, 8, duration, figures);
      await closeServer(listener);
    }
    {
      const path = `${dir}/node-plain.sock`;
      const httpServer = nodeHttpServer();
      const listener = await nodeNetServer(path, (socket) => httpServer.emit("connection", socket));
      const once = async () => nodeHttpRequest(await netConnect(path));
      await measure("nodehttp_plain_seq", once, 1, duration, figures);
      await measure("nodehttp_plain_c8", once, 8, duration, figures);
      await closeServer(listener);
      httpServer.close();
    }
    // Codec only: one kept-alive connection, raw request bytes, responses counted.
    {
      const path = `${dir}/keepalive.sock`;
      const listener = await nodeNetServer(path, (socket) => void serveHttp(socket, handler));
      const socket = await netConnect(path);
      let wake = () => {};
      let received = "";
      socket.setEncoding("latin1");
      socket.on("data", (chunk: string) => {
        received += chunk;
        if (received.endsWith("}}")) {
          received = "";
          wake();
        }
      });
      const request = "GET /1.0 HTTP/1.1\r\nHost: lxd-vsock\r\n\r\n";
      const once = () => {
        const done = new Promise<void>((resolve) => wake = resolve);
        socket.write(request);
        return done;
      };
      await measure("own_keepalive_seq", once, 1, duration, figures);
      socket.destroy();
      await closeServer(listener);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  return figures;
}

/** Child-process server for the cross-process setting: `--serve <socket path> <key dir>`. */
async function serveChild(path: string, dir: string): Promise<void> {
  const server = await readKeyPair(dir, "server");
  const client = await readKeyPair(dir, "client");
  const listener = net.createServer((socket) => {
    acceptTls(socket, { ...server, pinned: client.cert })
      .then(({ socket }) =>
        serveHttp(
          socket,
          (request) =>
            new URL(request.url).pathname === "/cpu" ? Response.json(cpuUsage()) : handler(),
        )
      )
      .catch(() => {});
  });
  await new Promise<void>((resolve) => listener.listen(path, resolve));
  console.log("ready");
}

if (import.meta.main && Deno.args[0] === "--serve") {
  await serveChild(Deno.args[1], Deno.args[2]);
} else if (import.meta.main) {
  const curve = Deno.args[0] === "P-256" ? "P-256" : "P-384";
  const figures = await benchTls({ curve });
  console.log(`curve ${curve}`);
  for (const [key, value] of Object.entries(figures)) console.log(`${key.padEnd(28)} ${value}`);
}
