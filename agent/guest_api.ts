/**
 * The part of lxd-agent's API that acts on the guest itself, mounted on the
 * agent API app (`agent_api.ts`) by {@linkcode mountGuestApi}:
 *
 * - `GET /1.0/state`: `api.InstanceState` (`guest_state.ts`); `PUT` answers
 *   501 as lxd-agent 5.0.2 does.
 * - `GET /1.0/metrics`: lxd-agent's metrics document (`guest_metrics.ts`).
 * - `POST /1.0/exec`: a websocket operation running a command
 *   (`exec_session.ts`); 202 with the operation, as LXD answers.
 * - `GET /1.0/operations` (`?recursion=1` for the full objects),
 *   `GET|DELETE /1.0/operations/{id}`, `GET /1.0/operations/{id}/wait`
 *   (`?timeout=` seconds; LXD's daemon has it, lxd-agent 5.0.2 does not) and
 *   `GET /1.0/operations/{id}/websocket?secret=`.
 * - `GET /1.0/events[?type=…]`: operation events and the events the host
 *   pushes (`POST /1.0/events`), as a WebSocket (what LXD's Go client uses to
 *   wait for an operation) or a stream of JSON lines.
 * - `GET /1.0/sftp` with `Upgrade: sftp`: the connection becomes an SFTP
 *   session (`sftp_server.ts`), what LXD's `lxc file` uses for VMs; without
 *   the header 400 "Missing or invalid upgrade header", as lxd-agent.
 *
 * Answers use the LXD envelope. Needs what its collectors and commands need
 * (ffi, read, sys=networkInterfaces).
 * @module
 */

import type { Hono } from "hono";
import {
  acceptWebSocket,
  errorResponse,
  syncResponse,
  upgradeResponse,
} from "../shared/http/mod.ts";
import type { AgentMetrics, InstanceState } from "../shared/instance_api.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import { BodyTooLargeError, readBody } from "./read_body.ts";
import { ExecRequestError, ExecSession, parseExecRequest } from "./exec_session.ts";
import { collectMetrics } from "./guest_metrics.ts";
import { SftpServer } from "./sftp_server.ts";
import { collectState } from "./guest_state.ts";
import { type AgentEvent, Operations, TooManyOperationsError } from "./operations.ts";

/** Options of {@linkcode mountGuestApi}. */
export interface GuestApiOptions {
  /**
   * The guest's state now.
   * @default {collectState}
   */
  state?: () => InstanceState;
  /**
   * The guest's metrics now.
   * @default {collectMetrics}
   */
  metrics?: () => AgentMetrics;
  /** The operation registry (its owner closes it). Without it, exec and operations answer 404. */
  operations?: Operations;
  /**
   * Milliseconds for an exec client to connect every stream.
   * @default {5000}
   */
  execConnectTimeout?: number;
  /**
   * Milliseconds an exec stream waits for the client's close frame.
   * @default {2000}
   */
  execCloseTimeout?: number;
  /**
   * Largest exec request body, in bytes.
   * @default {65536}
   */
  maxBodySize?: number;
  logger?: Logger;
}

function statusOf(query: string | undefined): number {
  const n = Number(query);
  return Number.isFinite(n) ? n : -1;
}

/** Adds the guest routes to `app`. */
export function mountGuestApi(app: Hono, options: GuestApiOptions = {}): void {
  const state = options.state ?? (() => collectState());
  const metrics = options.metrics ?? (() => collectMetrics());
  const logger = options.logger ?? silentLogger;

  app.get("/1.0/state", () => syncResponse(state()));
  app.put("/1.0/state", () => errorResponse(501, "Not implemented"));
  app.get("/1.0/metrics", () => syncResponse(metrics()));
  app.get("/1.0/sftp", (c) => {
    if (c.req.header("upgrade") !== "sftp") {
      return errorResponse(400, "Missing or invalid upgrade header");
    }
    return upgradeResponse(
      (socket, head) =>
        void new SftpServer(socket, head, { logger: logger.with({ part: "sftp" }) }).serve(),
      { Upgrade: "sftp", Connection: "Upgrade" },
    );
  });

  const operations = options.operations;
  if (operations === undefined) return;

  app.post("/1.0/exec", async (c) => {
    const max = options.maxBodySize ?? 64 * 1024;
    let body: unknown;
    try {
      body = JSON.parse(new TextDecoder().decode(await readBody(c.req.raw.body, max)));
    } catch (error) {
      if (error instanceof BodyTooLargeError) return errorResponse(413, "Request body too large");
      return errorResponse(400, `Invalid exec request: ${(error as Error).message}`);
    }
    let session: ExecSession;
    try {
      let snapBin = false;
      try {
        snapBin = Deno.statSync("/snap/bin").isDirectory;
      } catch {
        // No snapd.
      }
      session = new ExecSession(parseExecRequest(body, { snapBin }), {
        connectTimeout: options.execConnectTimeout,
        closeTimeout: options.execCloseTimeout,
        logger: logger.with({ part: "exec" }),
      });
    } catch (error) {
      if (error instanceof ExecRequestError) return errorResponse(400, error.message);
      throw error;
    }
    try {
      const operation = operations.start(session.spec());
      return new Response(
        JSON.stringify({
          type: "async",
          status: "Operation created",
          status_code: 100,
          operation: operation.url,
          error_code: 0,
          error: "",
          metadata: operation.render(),
        }) + "\n",
        {
          status: 202,
          headers: { "Content-Type": "application/json", Location: operation.url },
        },
      );
    } catch (error) {
      if (error instanceof TooManyOperationsError) return errorResponse(503, error.message);
      throw error;
    }
  });

  app.get("/1.0/operations", (c) => {
    const recursion = c.req.query("recursion") === "1";
    const byStatus: Record<string, unknown[]> = {};
    for (const operation of operations.list()) {
      const rendered = operation.render();
      (byStatus[rendered.status.toLowerCase()] ??= []).push(
        recursion ? rendered : operation.url,
      );
    }
    return syncResponse(byStatus);
  });

  const notFound = (id: string) => errorResponse(404, `Operation '${id}' doesn't exist`);

  app.get("/1.0/operations/:id", (c) => {
    const operation = operations.get(c.req.param("id"));
    return operation === undefined ? notFound(c.req.param("id")) : syncResponse(operation.render());
  });

  app.delete("/1.0/operations/:id", (c) => {
    const operation = operations.get(c.req.param("id"));
    if (operation === undefined) return notFound(c.req.param("id"));
    return errorResponse(400, "This operation can't be cancelled");
  });

  app.get("/1.0/operations/:id/wait", async (c) => {
    const operation = operations.get(c.req.param("id"));
    if (operation === undefined) return notFound(c.req.param("id"));
    const timeout = statusOf(c.req.query("timeout"));
    let timer: ReturnType<typeof setTimeout> | undefined;
    const waits: Promise<unknown>[] = [operation.done];
    if (timeout >= 0) {
      waits.push(new Promise((resolve) => timer = setTimeout(resolve, timeout * 1000)));
    }
    const aborted = c.req.raw.signal;
    waits.push(
      new Promise((resolve) => aborted.addEventListener("abort", resolve, { once: true })),
    );
    await Promise.race(waits);
    clearTimeout(timer);
    return syncResponse(operation.render());
  });

  app.get("/1.0/operations/:id/websocket", (c) => {
    const operation = operations.get(c.req.param("id"));
    if (operation === undefined) return notFound(c.req.param("id"));
    if (operation.spec.connect === undefined) {
      return errorResponse(500, "Only websocket operations can be connected");
    }
    if (operation.final) return errorResponse(500, "Only running operations can be connected");
    return operation.spec.connect(operation, c.req.raw);
  });

  app.get("/1.0/events", (c) => {
    const types = (c.req.query("type") || "logging,operation,lifecycle,config").split(",");
    const wanted = (event: AgentEvent) => types.includes(event.type);
    if (c.req.header("upgrade")?.toLowerCase() === "websocket") {
      try {
        return acceptWebSocket(c.req.raw, (ws) => {
          const unsubscribe = operations.subscribe((event) => {
            if (wanted(event)) ws.send(JSON.stringify(event));
          });
          (async () => {
            // Messages from the client are ignored; the stream ends when it goes.
            while (await ws.receive() !== null) { /* ignore */ }
            unsubscribe();
          })();
        });
      } catch (error) {
        return errorResponse(400, (error as Error).message);
      }
    }
    let unsubscribe = () => {};
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        unsubscribe = operations.subscribe((event) => {
          if (wanted(event)) {
            controller.enqueue(new TextEncoder().encode(JSON.stringify(event) + "\n"));
          }
        });
        c.req.raw.signal.addEventListener("abort", () => {
          unsubscribe();
          try {
            controller.close();
          } catch {
            // Already closed.
          }
        }, { once: true });
      },
      cancel() {
        unsubscribe();
      },
    });
    return new Response(body, { headers: { "Content-Type": "application/json" } });
  });
}
