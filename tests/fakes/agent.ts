/**
 * Test helper: certificates, and a fake in-VM agent API (mutual TLS over a
 * unix socket, pinning the host's client certificate) that records `PUT /1.0`
 * and `POST /1.0/events` and answers `GET /1.0` like a stock lxd-agent.
 *
 * Needs `--allow-read`, `--allow-write`, `--allow-net=unix:<path>`.
 * @module
 */

import { Buffer } from "node:buffer";
import http from "node:http";
import net from "node:net";
import type { Duplex } from "node:stream";
import { acceptTls } from "../../shared/tls/mod.ts";
import { generateKeyPair } from "../../shared/tls/key_pair.ts";
import type { ConnectionInfo, DevlxdEvent } from "../../shared/api.ts";
import type { AgentTarget } from "../../host/monitor/announcer.ts";

/** A PEM certificate and its PKCS#8 PEM key. */
export interface Identity {
  cert: string;
  key: string;
}

/** A self-signed ECDSA P-256 certificate (fast to make) valid for a day. */
export function makeIdentity(cn: string): Promise<Identity> {
  return generateKeyPair({ commonName: cn, curve: "P-256", days: 1 });
}

/** An agent identity and the host's client identity for it, as an AgentTarget. */
export async function makeTarget(name: string): Promise<{ target: AgentTarget; agent: Identity }> {
  const [agent, client] = await Promise.all([makeIdentity("agent"), makeIdentity("host")]);
  return {
    target: { name, agentCert: agent.cert, clientCert: client.cert, clientKey: client.key },
    agent,
  };
}

/** A `connect` function for the announcer that dials a unix socket. */
export function unixConnect(path: string): (signal: AbortSignal) => Promise<Duplex> {
  return (signal) =>
    new Promise((resolve, reject) => {
      const socket = net.connect({ path });
      const onAbort = () => {
        socket.destroy();
        reject(signal.reason);
      };
      signal.addEventListener("abort", onAbort, { once: true });
      socket.once("connect", () => {
        signal.removeEventListener("abort", onAbort);
        resolve(socket);
      });
      socket.once("error", (error) => {
        signal.removeEventListener("abort", onAbort);
        reject(error);
      });
    });
}

/** How the fake agent answers `PUT /1.0`. */
export type PutBehaviour = (info: ConnectionInfo) => number;

export interface FakeAgentOptions {
  /** The agent's identity (cert it presents). */
  agent: Identity;
  /** PEM of the only client certificate accepted. */
  clientCert: string;
  /** Status for `PUT /1.0`. @default 200 */
  onPut?: PutBehaviour;
  /** Called after each successful PUT, before the answer (e.g. to call agentSeen). */
  afterPut?: (info: ConnectionInfo) => void | Promise<void>;
  /** `environment.server_pid` reported by `GET /1.0`. @default 1234 */
  pid?: number;
  /** `connection` reported by `GET /1.0` (as our agent does); absent when undefined. */
  connection?: { cid: number; port: number } | null;
}

/** A fake agent API on a unix socket; `close()` stops it. */
export class FakeAgent implements AsyncDisposable {
  readonly puts: ConnectionInfo[] = [];
  readonly events: DevlxdEvent[] = [];
  /** Requests as `METHOD path`, in order. */
  readonly requests: string[] = [];
  /** TLS connections rejected because of the client certificate. */
  rejectedClients = 0;
  pid: number;
  #server: net.Server;
  #http: http.Server;
  #sockets = new Set<Duplex>();
  #waiters: Array<() => void> = [];
  readonly ready: Promise<void>;

  constructor(readonly path: string, readonly options: FakeAgentOptions) {
    this.pid = options.pid ?? 1234;
    this.#http = http.createServer((req, res) => this.#handle(req, res));
    this.#server = net.createServer((raw) => {
      this.#sockets.add(raw);
      raw.on("close", () => this.#sockets.delete(raw));
      raw.on("error", () => {});
      acceptTls(raw, {
        cert: options.agent.cert,
        key: options.agent.key,
        pinned: options.clientCert,
      })
        .then(({ socket }) => this.#http.emit("connection", socket))
        .catch(() => this.rejectedClients++);
    });
    this.ready = new Promise((resolve) => this.#server.listen(path, resolve));
  }

  /** Resolves once `predicate()` holds, re-checked after every request. */
  async waitFor(predicate: () => boolean): Promise<void> {
    while (!predicate()) await new Promise<void>((resolve) => this.#waiters.push(resolve));
  }

  #handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const chunks: Uint8Array[] = [];
    req.on("data", (c: Uint8Array) => chunks.push(c));
    req.on("end", async () => {
      const text = Buffer.concat(chunks).toString("utf8");
      const key = `${req.method} ${req.url}`;
      let status = 200;
      let metadata: unknown = {};
      if (key === "PUT /1.0") {
        const info = JSON.parse(text) as ConnectionInfo;
        status = this.options.onPut?.(info) ?? 200;
        if (status === 200) {
          this.puts.push(info);
          await this.options.afterPut?.(info);
        }
      } else if (key === "POST /1.0/events") {
        this.events.push(JSON.parse(text));
      } else if (key === "GET /1.0") {
        const info: Record<string, unknown> = {
          environment: { server: "lxd-agent", server_pid: this.pid },
        };
        if (this.options.connection !== undefined) info.connection = this.options.connection;
        metadata = info;
      } else {
        status = 404;
      }
      this.requests.push(key);
      const body = status === 200
        ? { type: "sync", status: "Success", status_code: 200, error: "", metadata }
        : {
          type: "error",
          error: status === 404 ? "not found" : "failed to connect to host",
          error_code: status,
        };
      res.writeHead(status, { "content-type": "application/json" });
      res.end(JSON.stringify(body));
      for (const wake of this.#waiters.splice(0)) wake();
    });
  }

  async close(): Promise<void> {
    for (const s of this.#sockets) s.destroy();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
    this.#http.close();
    await Deno.remove(this.path).catch(() => {});
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
