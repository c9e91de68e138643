/**
 * The local admin API, as a Hono app over an {@linkcode InstanceService}:
 * what the CLI uses while the daemon runs (served on `<state-dir>/admin.sock`,
 * mode 0600) and, in-process, when it does not. Answers in the LXD envelope;
 * `GET /1.0/events` is a newline-delimited JSON stream of lifecycle events.
 *
 * Routes: `GET /1.0` (status), `GET|POST /1.0/instances`,
 * `GET|DELETE /1.0/instances/{name}`, `GET|PUT|DELETE /1.0/instances/{name}/config/{key}`
 * (PUT body `{"value":"…"}`), `POST /1.0/instances/{name}/devices` (body
 * `{"name":"…","config":{…}}`), `DELETE /1.0/instances/{name}/devices/{device}`,
 * `GET /1.0/events[?instance=NAME]`, and with `agentProxy` any request to a VM's
 * agent API as `/1.0/instances/{name}/agent/<path>` (`agent_proxy.ts`) and
 * `GET|POST /1.0/instances/{name}/files?path=` (`agent_files.ts`).
 * Needs no permissions of its own.
 * @module
 */

import { Hono } from "hono";
import { bodyLimit } from "hono/body-limit";
import { errorResponse, HttpError, syncResponse } from "../shared/http/mod.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import { ALL_TOPICS } from "./event_hub.ts";
import { own } from "./instance.ts";
import { type AddInstance, type InstanceService, publicInstance } from "./instance_service.ts";
import { MAX_CONFIG_VALUE } from "./instance_validation.ts";
import { RegistryError } from "./registry_error.ts";
import { type AgentProxyOptions, mountAgentProxy } from "./agent_proxy.ts";
import { mountFileRoutes } from "./agent_files.ts";

/** What `GET /1.0` reports. */
export interface DaemonStatus {
  running: boolean;
  version: string;
  stateDir: string;
  pid?: number;
  startedAt?: string;
  /** vsock listener: CID of this host and the port agents dial. */
  vsock?: { cid: number; port: number } | null;
  /** The port agents are told to dial (vsock or hybrid). */
  port?: number;
  transport?: "vsock" | "unix";
  /** Hybrid listeners, `<uds_path>_<port>` per instance. */
  hybridListeners?: Record<string, string>;
  instances?: number;
  /** Open agent connections per instance. */
  connections?: Record<string, number>;
  /** The status monitor's view of each instance (agent state, channel, announces). */
  monitor?: {
    name: string;
    channel: string;
    channelUp: boolean;
    /** ISO time since which the guest has not read its channel (a host write is pending). */
    channelStalled?: string;
    agentState: string;
    lastAnnounce?: string;
    announcedPort?: number;
    queuedEvents: number;
    lastError?: string;
  }[];
}

export interface AdminAppOptions {
  service: InstanceService;
  status: () => DaemonStatus;
  logger?: Logger;
  /** Serves `/1.0/instances/{name}/agent/*` (exec, state, … of the VM's agent). */
  agentProxy?: AgentProxyOptions;
}

async function jsonBody(
  c: { req: { json(): Promise<unknown> } },
): Promise<Record<string, unknown>> {
  let body: unknown;
  try {
    body = await c.req.json();
  } catch {
    throw new HttpError(400, "Invalid request body: expected JSON");
  }
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new HttpError(400, "Invalid request body: expected a JSON object");
  }
  return body as Record<string, unknown>;
}

/** Creates the admin app. */
export function createAdminApp(options: AdminAppOptions): Hono {
  const { service } = options;
  const logger = options.logger ?? silentLogger;
  const app = new Hono();

  app.onError((error) => {
    if (error instanceof HttpError) return errorResponse(error.status, error.message);
    if (error instanceof RegistryError) {
      return errorResponse(
        error.code === "NOT_FOUND" ? 404 : error.code === "ALREADY_EXISTS" ? 409 : 503,
        error.message,
      );
    }
    if (error instanceof TypeError || error instanceof RangeError) {
      return errorResponse(400, error.message);
    }
    logger.error("admin request failed", { error });
    return errorResponse(500, `Internal error: ${(error as Error)?.message ?? error}`);
  });
  app.notFound(() => errorResponse(404, "Not Found"));
  // Registered before the body limit: file bodies have their own (256 MiB); WebSockets (exec
  // streams, events) are relayed and answers stream back unbuffered.
  if (options.agentProxy !== undefined) {
    mountFileRoutes(app, { dial: options.agentProxy.dial });
    mountAgentProxy(app, options.agentProxy);
  }
  app.use(bodyLimit({
    maxSize: MAX_CONFIG_VALUE + 64 * 1024,
    onError: () => errorResponse(413, "Request body too large"),
  }));

  app.get("/1.0", () => syncResponse(options.status()));

  app.get("/1.0/instances", () => syncResponse(service.list().map(publicInstance)));

  app.post("/1.0/instances", async (c) => {
    const body = await jsonBody(c);
    const { instance, configDrive } = await service.add(body as unknown as AddInstance);
    return syncResponse({ instance: publicInstance(instance), configDrive }, 201);
  });

  app.get(
    "/1.0/instances/:name",
    (c) => syncResponse(publicInstance(service.get(c.req.param("name")))),
  );

  app.delete("/1.0/instances/:name", async (c) => {
    const removed = await service.remove(c.req.param("name"));
    return syncResponse({ configDrive: removed.configDrive, driveKept: removed.driveKept });
  });

  app.get("/1.0/instances/:name/config/:key", (c) => {
    const key = c.req.param("key");
    const value = own(service.get(c.req.param("name")).config, key);
    if (value === undefined) throw new HttpError(404, `Config key "${key}" is not set`);
    return syncResponse(value);
  });

  app.put("/1.0/instances/:name/config/:key", async (c) => {
    const body = await jsonBody(c);
    if (typeof body.value !== "string") {
      throw new HttpError(400, 'Invalid request body: "value" must be a string');
    }
    service.setConfig(c.req.param("name"), c.req.param("key"), body.value);
    return syncResponse(null);
  });

  app.delete("/1.0/instances/:name/config/:key", (c) => {
    service.get(c.req.param("name"));
    service.unsetConfig(c.req.param("name"), c.req.param("key"));
    return syncResponse(null);
  });

  app.post("/1.0/instances/:name/devices", async (c) => {
    const body = await jsonBody(c);
    if (typeof body.name !== "string") {
      throw new HttpError(400, 'Invalid request body: "name" must be a string');
    }
    service.addDevice(c.req.param("name"), body.name, body.config as Record<string, string>);
    return syncResponse(null, 201);
  });

  app.delete("/1.0/instances/:name/devices/:device", (c) => {
    service.removeDevice(c.req.param("name"), c.req.param("device"));
    return syncResponse(null);
  });

  // Long poll: answers once the instance is connected (or ready), or after
  // `timeout` ms (at most 300000), with `reached` and the state it saw.
  app.get("/1.0/instances/:name/wait", async (c) => {
    const name = c.req.param("name");
    const target = c.req.query("for");
    if (target !== "connected" && target !== "ready") {
      throw new HttpError(400, 'Invalid "for": use connected or ready');
    }
    const timeoutText = c.req.query("timeout") ?? "30000";
    if (!/^[0-9]{1,9}$/.test(timeoutText)) {
      throw new HttpError(400, 'Invalid "timeout": milliseconds, 0-300000');
    }
    const timeout = Math.min(Number(timeoutText), 300_000);
    const view = () => {
      const { runtime } = service.get(name);
      const reached = target === "connected" ? runtime.agentState === "CONNECTED" : runtime.ready;
      return {
        instance: name,
        for: target,
        reached,
        agentState: runtime.agentState,
        ready: runtime.ready,
      };
    };
    const lifecycle = service.lifecycle;
    if (view().reached || lifecycle === undefined || timeout === 0) return syncResponse(view());
    logger.debug("waiting for an instance", { instance: name, for: target, timeout });
    const signal = c.req.raw.signal;
    await new Promise<void>((resolve) => {
      const finish = () => {
        clearTimeout(timer);
        unsubscribe();
        signal.removeEventListener("abort", finish);
        resolve();
      };
      const unsubscribe = lifecycle.subscribe(name, (event) => {
        if (event.action === "instance-removed") return finish();
        try {
          if (view().reached) finish();
        } catch {
          finish();
        }
      });
      const timer = setTimeout(finish, timeout);
      signal.addEventListener("abort", finish, { once: true });
    });
    return syncResponse(view());
  });

  app.get("/1.0/events", (c) => {
    if (!service.lifecycle) throw new HttpError(503, "No event stream: the daemon is not running");
    const instance = c.req.query("instance");
    logger.debug("lifecycle stream opened", { instance });
    const stream = service.lifecycle.stream(ALL_TOPICS, {
      filter: instance ? (e) => e.instance === instance : undefined,
      signal: c.req.raw.signal,
    });
    return new Response(stream, {
      headers: { "content-type": "application/x-ndjson", "cache-control": "no-store" },
    });
  });

  return app;
}
