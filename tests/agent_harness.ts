/**
 * Test harness for the agent's cross-process tests: a test host (the devlxd
 * API in the LXD envelope, served over the hybrid/unix transport with real
 * mutual TLS), a host-side client for the agent API, a simulated serial port
 * (the host end of a socket-backed virtserialport) and the agent process
 * itself, spawned with the "agent" permission set as the compiled binary runs.
 * Needs the "test" permission set.
 * @module
 */

import { Hono } from "hono";
import type { Duplex } from "node:stream";
import { errorResponse, httpRequest, serveHttp, syncResponse } from "../shared/http/mod.ts";
import { acceptTls, connectTls } from "../shared/tls/mod.ts";
import { LineBuffer } from "../shared/line_buffer.ts";
import { connectHybrid, type Listener, listenUnix } from "../shared/vsock/mod.ts";
import { makeTestPair, type TestPair, within } from "../agent/_testing.ts";
import { runFlags } from "./deno_tasks.ts";

export { makeTestPair, type TestPair, within };

const encoder = new TextEncoder();

/** LXD's envelope (the project's own helpers, as the host answers). */
export const sync = (metadata: unknown): Response => syncResponse(metadata);

export const envelopeError = errorResponse;

/** Every certificate of one test: the agent's, the host's server and client identities. */
export interface Pairs {
  agent: TestPair;
  hostServer: TestPair;
  hostClient: TestPair;
}

export async function makePairs(): Promise<Pairs> {
  const [agent, hostServer, hostClient] = await Promise.all([
    makeTestPair("agent"),
    makeTestPair("host server"),
    makeTestPair("host client"),
  ]);
  return { agent, hostServer, hostClient };
}

/** Writes the agent's config directory as lxd-agent-setup lays it out. */
export async function writeConfigDir(
  dir: string,
  pairs: Pairs,
  conf?: { cid: number; port: number; devlxd: boolean },
): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(`${dir}/agent.crt`, pairs.agent.cert);
  await Deno.writeTextFile(`${dir}/agent.key`, pairs.agent.key);
  await Deno.writeTextFile(`${dir}/server.crt`, pairs.hostClient.cert);
  if (conf !== undefined) {
    await Deno.writeTextFile(
      `${dir}/agent.conf`,
      JSON.stringify({ ...conf, certificate: pairs.hostServer.cert }),
    );
  }
}

/** Waits for a condition that changes when `notify()` is called. */
class Signal {
  #waiters: (() => void)[] = [];
  notify(): void {
    this.#waiters.splice(0).forEach((w) => w());
  }
  async until<T>(check: () => T | undefined | false, what: string, ms = 10_000): Promise<T> {
    const deadline = Date.now() + ms;
    for (;;) {
      const value = check();
      if (value !== undefined && value !== false) return value;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`Timed out waiting for ${what}`);
      await within(new Promise<void>((r) => this.#waiters.push(r)), what, left).catch(() => {});
    }
  }
}

/**
 * The test host: the devlxd API over `${uds}_${port}` (where a hybrid guest's
 * connect to CID 2:port lands), TLS with the host server pair, pinning the
 * agent's certificate.
 */
export class TestHost {
  readonly requests: { method: string; path: string; body: string }[] = [];
  /** Transport connections accepted (probes included). */
  connections = 0;
  /** Connections that completed the TLS handshake. */
  tlsConnections = 0;
  /** Of those, the ones still open. */
  openTlsConnections = 0;
  config: Record<string, string> = { "user.foo": "bar", "security.secret": "no" };
  state: "Started" | "Ready" = "Started";
  /**
   * Answers `/1.0/events` only with the first event, as LXD 5.0.2 does (Go
   * writes the response head lazily): until then the request has no head.
   */
  lateEventHead = false;
  /** `/1.0/events` requests waiting for their head (`lateEventHead`). */
  pendingEventHeads = 0;
  #firstEvent = Promise.withResolvers<string>();
  readonly changed = new Signal();
  #eventStreams = new Set<ReadableStreamDefaultController<Uint8Array>>();
  #listener: Listener;
  #sockets = new Set<Duplex>();
  #loop: Promise<void>;
  #abort = new AbortController();

  constructor(listener: Listener, readonly pairs: Pairs) {
    this.#listener = listener;
    this.#loop = this.#accept();
  }

  /** A host reached by a hybrid guest's connect to CID 2:`port`: `${uds}_${port}`. */
  static hybrid(uds: string, port: number, pairs: Pairs): TestHost {
    return new TestHost(listenUnix(`${uds}_${port}`, { replace: true }), pairs);
  }

  /** The address the host listens on. */
  get address(): Listener["address"] {
    return this.#listener.address;
  }

  /** Open pull subscriptions to `/1.0/events`. */
  get eventStreams(): number {
    return this.#eventStreams.size;
  }

  /** Sends an event to every open `/1.0/events` stream. */
  streamEvent(event: unknown): void {
    const line = JSON.stringify(event) + "\n";
    for (const c of this.#eventStreams) c.enqueue(encoder.encode(line));
    this.#firstEvent.resolve(line); // a late head goes out with this event
  }

  async #accept(): Promise<void> {
    const app = this.#app();
    try {
      for await (const socket of this.#listener) {
        this.connections++;
        this.changed.notify();
        this.#sockets.add(socket);
        (async () => {
          try {
            const { socket: tlsSocket } = await acceptTls(socket, {
              cert: this.pairs.hostServer.cert,
              key: this.pairs.hostServer.key,
              pinned: this.pairs.agent.cert,
              handshakeTimeout: 3000,
              signal: this.#abort.signal,
            });
            this.#sockets.add(tlsSocket);
            this.tlsConnections++;
            this.openTlsConnections++;
            this.changed.notify();
            try {
              await serveHttp(tlsSocket, app.fetch, { signal: this.#abort.signal });
            } finally {
              this.openTlsConnections--;
              this.changed.notify();
            }
          } catch {
            // probes and refused handshakes end here
          } finally {
            socket.destroy();
            this.#sockets.delete(socket);
          }
        })();
      }
    } catch {
      // listener closed
    }
  }

  #app(): Hono {
    const app = new Hono();
    app.use(async (c, next) => {
      this.requests.push({
        method: c.req.method,
        path: new URL(c.req.url).pathname,
        body: await c.req.raw.clone().text(),
      });
      this.changed.notify();
      await next();
    });
    app.get("/1.0", () =>
      sync({
        api_version: "1.0",
        location: "testhost",
        instance_type: "virtual-machine",
        state: this.state,
      }));
    app.patch("/1.0", async (c) => {
      const body = await c.req.json();
      this.state = body.state;
      this.changed.notify();
      return sync({});
    });
    app.get("/1.0/config", () => sync(Object.keys(this.config).map((k) => `/1.0/config/${k}`)));
    app.get("/1.0/config/user.halfway", () =>
      new Response(
        new ReadableStream({
          start(controller) {
            controller.enqueue(encoder.encode('{"type":"sync","metadata":"trunc'));
          },
          // Fails on a later turn, once the head and the first bytes are sent:
          // the server can only cut the connection.
          pull: () => new Promise((_, reject) => setTimeout(() => reject(new Error("cut")), 0)),
        }),
        { headers: { "content-type": "application/json" } },
      ));
    app.get("/1.0/config/:key", (c) => {
      const value = this.config[c.req.param("key")];
      return value === undefined ? envelopeError(404, "not found") : sync(value);
    });
    app.get("/1.0/meta-data", () => sync("instance-id: t1\nlocal-hostname: t1\n"));
    app.get("/1.0/devices", () => sync({ eth0: { name: "eth0", type: "nic" } }));
    app.get("/1.0/events", async () => {
      let first: string | undefined;
      if (this.lateEventHead) {
        this.pendingEventHeads++;
        this.changed.notify();
        first = await this.#firstEvent.promise;
        this.pendingEventHeads--;
      }
      let controller!: ReadableStreamDefaultController<Uint8Array>;
      const body = new ReadableStream<Uint8Array>({
        start: (c) => {
          controller = c;
          if (first !== undefined) c.enqueue(encoder.encode(first));
          this.#eventStreams.add(c);
          this.changed.notify();
        },
        cancel: () => {
          this.#eventStreams.delete(controller);
          this.changed.notify();
        },
      });
      return new Response(body, { headers: { "content-type": "application/json" } });
    });
    app.get("/1.0/images/:fp/export", () => {
      let n = 0;
      return new Response(
        new ReadableStream<Uint8Array>({
          pull(controller) {
            if (n++ === 64) return controller.close();
            controller.enqueue(new Uint8Array(16 * 1024).fill(n & 0xff));
          },
        }),
        { headers: { "content-type": "application/octet-stream" } },
      );
    });
    return app;
  }

  /** Stops listening and drops every connection (the host went away). */
  async close(): Promise<void> {
    this.#abort.abort();
    this.#listener.close();
    for (const c of this.#eventStreams) {
      try {
        c.error(new Error("host stopped"));
      } catch {
        // closed
      }
    }
    this.#eventStreams.clear();
    for (const socket of this.#sockets) socket.destroy();
    await this.#loop;
  }
}

/** How the host reaches the agent API of a hybrid guest: `CONNECT <port>` on its uds. */
/**
 * The host announces itself: `put()` (a PUT /1.0 to the agent API) is tried
 * again while the agent API does not listen yet (up to 15 s); resolves once
 * the agent writes CONNECTED after it (it writes CONNECTED only once a host
 * announced itself, as LXD 5.0.2 needs).
 */
export async function announceTo(
  serial: SerialPeer,
  put: () => Promise<Response>,
): Promise<void> {
  const from = serial.lines.length;
  const deadline = Date.now() + 15_000;
  for (;;) {
    try {
      const res = await put();
      if (res.status !== 200) {
        throw new Error(`PUT /1.0 answered ${res.status}: ${await res.text()}`);
      }
      await res.body?.cancel();
      break;
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  await serial.waitForAfter(from, "CONNECTED");
}

export function hybridAgent(uds: string, port = 8443): () => Promise<Duplex> {
  return () => connectHybrid(uds, port, { timeout: 3000 });
}

/** One request from the host to the agent API (mutual TLS over `connect()`). */
export async function callAgent(
  connect: () => Promise<Duplex>,
  client: TestPair,
  agentCert: string,
  request: Request,
): Promise<Response> {
  const socket = await connect();
  try {
    const tlsSocket = await connectTls(socket, {
      cert: client.cert,
      key: client.key,
      pinned: agentCert,
      handshakeTimeout: 3000,
    });
    return await httpRequest(tlsSocket, request, { timeout: 10_000 });
  } catch (error) {
    socket.destroy();
    throw error;
  }
}

/** Reads a whole response body as JSON (the LXD envelope). */
export async function envelope(response: Response): Promise<Record<string, unknown>> {
  return await response.json();
}

/** The host end of the socket-backed serial port: reads the agent's lines, sends CONNECT. */
export class SerialPeer {
  readonly lines: string[] = [];
  readonly changed = new Signal();
  #listener: Deno.UnixListener;
  #conns = new Set<Deno.UnixConn>();
  #current: Deno.UnixConn | undefined;
  #loop: Promise<void>;

  constructor(readonly path: string) {
    this.#listener = Deno.listen({ transport: "unix", path });
    this.#loop = this.#accept();
  }

  async #accept(): Promise<void> {
    try {
      for await (const conn of this.#listener) {
        this.#conns.add(conn);
        this.#current = conn;
        this.changed.notify();
        this.#read(conn);
      }
    } catch {
      // closed
    }
  }

  async #read(conn: Deno.UnixConn): Promise<void> {
    const lines = new LineBuffer(64);
    const buf = new Uint8Array(256);
    try {
      for (;;) {
        const n = await conn.read(buf);
        if (n === null) break;
        for (const line of lines.push(buf.subarray(0, n))) {
          this.lines.push(line);
          this.changed.notify();
        }
      }
    } catch {
      // closed
    }
    this.#conns.delete(conn);
    if (this.#current === conn) this.#current = [...this.#conns].at(-1);
    try {
      conn.close();
    } catch {
      // closed
    }
  }

  /** The last state line the agent wrote. */
  get last(): string | undefined {
    return this.lines.at(-1);
  }

  /** Waits until the agent's last line is `state` (as a host polling the ring buffer sees it). */
  async waitFor(state: string, ms = 10_000): Promise<void> {
    await this.changed.until(() => this.last === state, `serial state ${state}`, ms);
  }

  /** Waits until `state` appears after the line count `from`. */
  async waitForAfter(from: number, state: string, ms = 10_000): Promise<void> {
    await this.changed.until(
      () => this.lines.slice(from).includes(state),
      `serial state ${state}`,
      ms,
    );
  }

  /** Sends raw bytes to the agent. */
  async send(text: string): Promise<void> {
    const conn = await this.changed.until(() => this.#current, "the agent to open the port");
    await conn.write(encoder.encode(text));
  }

  /** The port disappears: the listener and connections close. */
  async close(): Promise<void> {
    this.#listener.close();
    for (const conn of this.#conns) {
      try {
        conn.close();
      } catch {
        // closed
      }
    }
    await this.#loop;
  }
}

/** Paths of one agent test. */
export interface AgentPaths {
  dir: string;
  configDir: string;
  uds: string;
  serial: string;
  devlxdSocket: string;
  stateFile: string;
}

export async function agentPaths(): Promise<AgentPaths> {
  const dir = await Deno.makeTempDir({ prefix: "agent-e2e-" });
  return {
    dir,
    configDir: `${dir}/lxd_agent`,
    uds: `${dir}/v.sock`,
    serial: `${dir}/serial.sock`,
    devlxdSocket: `${dir}/dev-lxd/sock`,
    stateFile: `${dir}/run/state.json`,
  };
}

const ROOT = new URL("../", import.meta.url).pathname;

/** The agent as a child process, run as the compiled binary is (`-P=agent`). */
export class AgentProcess {
  readonly child: Deno.ChildProcess;
  stderr = "";
  readonly changed = new Signal();
  #stderrDone: Promise<void>;

  /** `prefix` runs the agent through a command, e.g. `["prlimit", "--nofile=128"]`. */
  constructor(args: string[], prefix: string[] = []) {
    const deno = ["run", "-q", ...runFlags("agent"), ...agentFlags(), "agent/main.ts", ...args];
    const child = new Deno.Command(prefix[0] ?? Deno.execPath(), {
      args: prefix.length === 0 ? deno : [...prefix.slice(1), Deno.execPath(), ...deno],
      cwd: ROOT,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    this.child = child;
    this.#stderrDone = (async () => {
      for await (const chunk of child.stderr.pipeThrough(new TextDecoderStream())) {
        this.stderr += chunk;
        this.changed.notify();
      }
    })();
  }

  /** Starts the agent with the paths of a test and short test periods (hybrid unless told). */
  static start(paths: AgentPaths, extra: string[] = [], prefix: string[] = []): AgentProcess {
    return new AgentProcess([
      `--config-dir=${paths.configDir}`,
      `--serial-port=${paths.serial}`,
      ...(extra.some((a) => a.startsWith("--transport"))
        ? []
        : [`--transport=hybrid:${paths.uds}`]),
      `--devlxd-socket=${paths.devlxdSocket}`,
      `--state-file=${paths.stateFile}`,
      "--rewrite-interval=200ms",
      "--log-level=debug",
      ...extra,
    ], prefix);
  }

  /** Waits for a log line matching `pattern`. */
  async waitForLog(pattern: RegExp, ms = 15_000): Promise<void> {
    await this.changed.until(() => pattern.test(this.stderr), `log ${pattern}`, ms);
  }

  /** Sends `signal` and resolves to the exit code (bounded). */
  async stop(signal: Deno.Signal = "SIGTERM"): Promise<number> {
    try {
      this.child.kill(signal);
    } catch {
      // already exited
    }
    return await this.exited();
  }

  /** Resolves to the exit code (bounded), with stdout read. */
  async exited(ms = 15_000): Promise<number> {
    const status = await within(this.child.status, "the agent to exit", ms);
    await this.#stderrDone;
    await this.child.stdout.cancel().catch(() => {});
    return status.code;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    try {
      this.child.kill("SIGKILL");
    } catch {
      // already exited
    }
    await this.child.status;
    await this.#stderrDone.catch(() => {});
    await this.child.stdout.cancel().catch(() => {});
  }
}

/** fetch over the devlxd unix socket. */
export async function devlxd(
  socket: string,
  path: string,
  init: RequestInit = {},
): Promise<Response> {
  const client = Deno.createHttpClient({ proxy: { transport: "unix", path: socket } });
  try {
    const response = await fetch(`http://lxd${path}`, { ...init, client });
    const body = new Uint8Array(await response.arrayBuffer());
    return new Response(body, { status: response.status, headers: response.headers });
  } finally {
    client.close();
  }
}

/** Runs `lxd-vsock-agent` with `args` to completion: code, stdout, stderr. */
export async function runAgentCommand(
  args: string[],
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-q", ...runFlags("agent"), "agent/main.ts", ...args],
    cwd: ROOT,
    stdin: "null",
    env: { NO_COLOR: "1" },
  }).output();
  const decoder = new TextDecoder();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

/** Extra Deno flags for agent processes (`BENCH_AGENT_FLAGS`, e.g. `--v8-flags=...`). */
export function agentFlags(): string[] {
  return (Deno.env.get("BENCH_AGENT_FLAGS") ?? "").split(" ").filter(Boolean);
}
