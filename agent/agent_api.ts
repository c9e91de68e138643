/**
 * The agent API (vsock port 8443, mutual TLS pinning `server.crt`), as the
 * Hono app `createAgentApi()`; the TLS listener lives in `agent.ts`.
 *
 * - `GET /1.0`: the agent's status (LXD's shape, plus `connection`, `state`,
 *   `devlxd` and `ready`, which our host reads to tell whether the agent lost
 *   its address).
 * - `PUT /1.0`: new connection info `{"cid","port","certificate","devlxd"}`;
 *   validated, applied (one request to the host), 200 or 500 as LXD answers.
 * - `POST /1.0/events`: an event pushed by the host, handed to local subscribers.
 * - The rest of lxd-agent's API (state, metrics, exec, operations) comes from
 *   `guest_api.ts`, mounted here when `guest` is given.
 *
 * Answers use the LXD envelope. Needs no permissions of its own.
 * @module
 */

import { Hono } from "hono";
import { type ConnectionInfo, parseConnectionInfo } from "../shared/api.ts";
import { errorResponse, HttpError, syncResponse } from "../shared/http/mod.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import { certificateValidity } from "../shared/tls/mod.ts";
import type { StatusSnapshot } from "./agent_state.ts";
import { BodyTooLargeError, readBody } from "./read_body.ts";
import {
  AGENT_API_EXTENSIONS,
  type GuestFacts,
  readGuestFacts,
  serverEnvironment,
} from "./guest_info.ts";
import { type GuestApiOptions, mountGuestApi } from "./guest_api.ts";

export interface AgentApiOptions {
  /** The agent's current status. */
  status: () => StatusSnapshot;
  /** Stores and tries new connection info; rejects with a sentence when the host is not reachable. */
  applyConnection: (info: ConnectionInfo) => Promise<void>;
  /** Hands a pushed event to local subscribers. */
  publish: (event: unknown) => void;
  version: string;
  /**
   * Largest request body accepted, in bytes.
   * @default {65536}
   */
  maxBodySize?: number;
  logger?: Logger;
  /**
   * The guest's facts for `GET /1.0` (uname, os-release).
   * @default {readGuestFacts} (read once, on first use)
   */
  facts?: () => GuestFacts;
  /** Serves state, metrics, exec and operations (`guest_api.ts`); without it they answer 404. */
  guest?: GuestApiOptions;
}

/** Parses a PEM certificate; throws HttpError 400 naming the problem. */
export function checkCertificate(pem: string): void {
  let cert: { notBefore: Date; notAfter: Date };
  try {
    cert = certificateValidity(pem);
  } catch (error) {
    throw new HttpError(400, `Invalid certificate: ${(error as Error).message}`);
  }
  const now = Date.now();
  if (cert.notAfter.getTime() < now) {
    throw new HttpError(400, `Invalid certificate: expired on ${cert.notAfter.toISOString()}`);
  }
  if (cert.notBefore.getTime() > now + 60_000) {
    throw new HttpError(
      400,
      `Invalid certificate: not valid before ${cert.notBefore.toISOString()}`,
    );
  }
}

async function readJson(request: Request, max: number): Promise<unknown> {
  const length = request.headers.get("content-length");
  if (length !== null && Number(length) > max) throw new HttpError(413, "Request body too large");
  let bytes: Uint8Array;
  try {
    bytes = await readBody(request.body, max);
  } catch (error) {
    if (error instanceof BodyTooLargeError) throw new HttpError(413, "Request body too large");
    throw error;
  }
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    throw new HttpError(400, "Invalid request body: not JSON");
  }
}

export function createAgentApi(options: AgentApiOptions): Hono {
  const logger = options.logger ?? silentLogger;
  const max = options.maxBodySize ?? 64 * 1024;
  const app = new Hono();

  app.get("/", () => syncResponse(["/1.0"]));

  let facts: GuestFacts | undefined;
  app.get("/1.0", () => {
    const status = options.status();
    facts ??= (options.facts ?? readGuestFacts)();
    return syncResponse({
      api_extensions: options.guest === undefined ? [] : [...AGENT_API_EXTENSIONS],
      api_status: "stable",
      api_version: "1.0",
      auth: "trusted",
      auth_methods: ["tls"],
      public: false,
      environment: serverEnvironment(facts, status.pid, options.version),
      state: status.state,
      connection: status.host === null ? null : { cid: status.host.cid, port: status.host.port },
      devlxd: status.devlxd.serving,
      ready: status.ready,
    });
  });

  app.put("/1.0", async (c) => {
    const body = await readJson(c.req.raw, max);
    let info: ConnectionInfo;
    try {
      info = parseConnectionInfo(body);
    } catch (error) {
      throw new HttpError(400, (error as Error).message);
    }
    checkCertificate(info.certificate);
    try {
      await options.applyConnection(info);
    } catch (error) {
      throw new HttpError(500, `Failed connecting to the host: ${(error as Error).message}`);
    }
    // LXD answers {}; the pid spares the host a GET /1.0 (a third TLS connection)
    // to learn which agent process it announced to.
    return syncResponse({ environment: { server_pid: options.status().pid } });
  });

  app.post("/1.0/events", async (c) => {
    const event = await readJson(c.req.raw, max);
    if (typeof event !== "object" || event === null || Array.isArray(event)) {
      throw new HttpError(400, "Invalid event: expected a JSON object");
    }
    if (typeof (event as { type?: unknown }).type !== "string") {
      throw new HttpError(400, "Invalid event: no type");
    }
    options.publish(event);
    return syncResponse({});
  });

  if (options.guest !== undefined) mountGuestApi(app, options.guest);

  app.notFound(() => errorResponse(404, "not found"));

  app.onError((error) => {
    if (error instanceof HttpError) {
      if (error.status >= 500) logger.warn("agent API request failed", { error: error.message });
      return errorResponse(error.status, error.message);
    }
    logger.error("agent API handler failed", { error });
    return errorResponse(500, (error as Error).message);
  });
  return app;
}
