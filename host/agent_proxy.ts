/**
 * The operator's way to a VM's agent API (ours or a stock lxd-agent):
 * {@linkcode dialAgent} opens one mutual-TLS connection to an instance's agent
 * (AF_VSOCK `<cid>:8443`, or the hybrid `<uds>` + `CONNECT 8443`), presenting
 * the instance's client certificate and pinning its `agent.crt`, with the
 * mutual-TLS client (`shared/http/mtls_client.ts`).
 * {@linkcode mountAgentProxy} adds `/1.0/instances/{name}/agent/<path>` to the
 * admin API: any request there is sent to the agent's `<path>` on a new
 * connection and its answer streamed back; a WebSocket request (exec streams,
 * events) is connected to the agent first (so a refusal keeps its status and
 * message) and then relayed message by message — how `exec` works behind the
 * admin socket.
 *
 * Owns: each proxied connection, closed when its request or WebSocket ends.
 * Permissions: `--allow-ffi` (vsock and unix sockets).
 * @module
 */

import type { Hono } from "hono";
import type { Duplex } from "node:stream";
import { AGENT_API_PORT } from "../shared/api.ts";
import {
  connectWebSocket,
  dialMtls,
  errorResponse,
  httpRequest,
  type WebSocketConnection,
  WebSocketHandshakeError,
} from "../shared/http/mod.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import { connectHybrid, connectVsock } from "../shared/vsock/mod.ts";
import type { Instance } from "./instance.ts";

/** Options of {@linkcode dialAgent}. */
export interface DialAgentOptions {
  /**
   * Milliseconds for the connect and for the TLS handshake, each.
   * @default {3000}
   */
  timeout?: number;
  signal?: AbortSignal;
}

/**
 * A mutual-TLS connection to `instance`'s agent API, through the mutual-TLS
 * client; rejects with an `MtlsError`.
 */
export function dialAgent(
  instance: Pick<Instance, "name" | "cid" | "hybrid" | "agentCert" | "clientCert" | "clientKey">,
  options: DialAgentOptions = {},
): Promise<Duplex> {
  const { timeout = 3000, signal } = options;
  return dialMtls({
    name: `the agent of ${instance.name}`,
    connect: (bound) =>
      instance.hybrid === undefined
        ? connectVsock(instance.cid, AGENT_API_PORT, { timeout, signal: bound })
        : connectHybrid(instance.hybrid, AGENT_API_PORT, { timeout, signal: bound }),
    cert: instance.clientCert,
    key: instance.clientKey,
    pinned: instance.agentCert,
  }, { connectTimeout: timeout, handshakeTimeout: timeout, signal });
}

/** Options of {@linkcode mountAgentProxy}. */
export interface AgentProxyOptions {
  /** A new connection to the named instance's agent API (throws for an unknown name). */
  dial: (name: string) => Promise<Duplex>;
  /**
   * Milliseconds for the agent's answer head.
   * @default {30000}
   */
  timeout?: number;
  logger?: Logger;
}

const HEADERS_PASSED = ["content-type", "accept", "location"];

/** A close code that may be sent (1005/1006 and codes out of range are not). */
function closeCode(code: number): number {
  return code === 1000 || (code >= 1001 && code <= 1003) || (code >= 1007 && code < 5000)
    ? code
    : 1000;
}

/** Relays messages both ways until either side closes, then closes the other. */
function relay(client: WebSocket, agent: WebSocketConnection): void {
  client.binaryType = "arraybuffer";
  client.onmessage = (event) => {
    const data = typeof event.data === "string" ? event.data : new Uint8Array(event.data);
    agent.send(data);
  };
  client.onclose = (event) => agent.close(closeCode(event.code));
  client.onerror = () => agent.close(1001);
  client.onopen = async () => {
    for (;;) {
      const message = await agent.receive();
      if (message === null) break;
      if (client.readyState !== WebSocket.OPEN) break;
      client.send(message.type === "text" ? new TextDecoder().decode(message.data) : message.data);
    }
    const info = await agent.closed;
    if (client.readyState === WebSocket.OPEN || client.readyState === WebSocket.CONNECTING) {
      client.close(closeCode(info.code));
    }
  };
}

/** Adds `/1.0/instances/{name}/agent/*` to `app`. */
export function mountAgentProxy(app: Hono, options: AgentProxyOptions): void {
  const logger = options.logger ?? silentLogger;
  app.all("/1.0/instances/:name/agent/*", async (c) => {
    const name = c.req.param("name");
    const url = new URL(c.req.url);
    const prefix = `/1.0/instances/${encodeURIComponent(name)}/agent`;
    const path = url.pathname.startsWith(prefix) ? url.pathname.slice(prefix.length) : "";
    if (!path.startsWith("/")) return errorResponse(404, "Not Found");
    const target = `https://agent${path}${url.search}`;
    const request = c.req.raw;
    let socket: Duplex;
    try {
      socket = await options.dial(name);
    } catch (error) {
      const message = (error as Error).message;
      const status = /not found|unknown instance/i.test(message) ? 404 : 502;
      return errorResponse(status, `Cannot reach the agent of ${name}: ${message}`);
    }
    if (request.headers.get("upgrade")?.toLowerCase() === "websocket") {
      let agent: WebSocketConnection;
      try {
        agent = await connectWebSocket(socket, target, { timeout: options.timeout ?? 30_000 });
      } catch (error) {
        if (error instanceof WebSocketHandshakeError) {
          return errorResponse(error.status, error.message);
        }
        return errorResponse(
          502,
          `The agent of ${name} did not open the stream: ${(error as Error).message}`,
        );
      }
      let upgraded: { socket: WebSocket; response: Response };
      try {
        upgraded = Deno.upgradeWebSocket(request);
      } catch (error) {
        agent.close(1001);
        return errorResponse(400, (error as Error).message);
      }
      relay(upgraded.socket, agent);
      logger.debug("agent websocket relayed", { instance: name, path });
      return upgraded.response;
    }
    const headers = new Headers();
    for (const header of HEADERS_PASSED) {
      const value = request.headers.get(header);
      if (value !== null) headers.set(header, value);
    }
    const body = request.body === null ? undefined : new Uint8Array(await request.arrayBuffer());
    try {
      const response = await httpRequest(
        socket,
        new Request(target, { method: request.method, headers, body }),
        { timeout: options.timeout ?? 30_000, signal: request.signal },
      );
      const out = new Headers();
      for (const header of HEADERS_PASSED) {
        const value = response.headers.get(header);
        if (value !== null) out.set(header, header === "location" ? prefix + value : value);
      }
      return new Response(response.body, { status: response.status, headers: out });
    } catch (error) {
      socket.destroy();
      return errorResponse(502, `The agent of ${name} did not answer: ${(error as Error).message}`);
    }
  });
}
