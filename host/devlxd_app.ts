/**
 * The devlxd API a VM's agent reaches over vsock, as a Hono app that knows
 * only `Request`/`Response`. The transport authenticates the peer and passes
 * the matching instance as the `instance` binding:
 * `app.fetch(request, { instance })`. Every answer is in the LXD envelope
 * except the two streams (`/1.0/events`, image export). See PROTOCOL.md.
 * Needs read permission on the image directory.
 * @module
 */

import { Hono } from "hono";
import type { DevlxdEvent, DevlxdInfo } from "../shared/api.ts";
import { isGuestVisibleKey } from "../shared/api.ts";
import { errorResponse, HttpError, syncResponse } from "../shared/http/mod.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import type { EventHub } from "./event_hub.ts";
import { devlxdEnabled, devlxdImagesEnabled, type Instance, own } from "./instance.ts";
import { isValidConfigKey } from "./instance_validation.ts";

export interface HostDevlxdAppOptions {
  /** Stores PATCH /1.0 `Ready`/`Started`. */
  setReady: (name: string, ready: boolean) => void;
  /** The devlxd events by instance name, for `/1.0/events`. */
  events: EventHub<DevlxdEvent>;
  /** The `location` of `GET /1.0` (the host's name). */
  location: string;
  /** Where `<fingerprint>` files live for image export. */
  imagesDir: string;
  logger?: Logger;
}

export type DevlxdEnv = { Bindings: { instance: Readonly<Instance> } };

const EVENT_TYPES = ["config", "device"];
const FINGERPRINT_RE = /^[0-9a-f]{64}$/;

/** Creates the devlxd app. */
export function createHostDevlxdApp(options: HostDevlxdAppOptions): Hono<DevlxdEnv> {
  const logger = options.logger ?? silentLogger;
  const app = new Hono<DevlxdEnv>();

  app.onError((error, c) => {
    if (error instanceof HttpError) return errorResponse(error.status, error.message);
    logger.error("devlxd request failed", {
      instance: c.env?.instance?.name,
      path: c.req.path,
      error,
    });
    return errorResponse(500, "Internal Server Error");
  });
  app.notFound(() => errorResponse(404, "Not Found"));

  app.use(async (c, next) => {
    if (!c.env?.instance) throw new HttpError(401, "Unauthorized");
    if (!devlxdEnabled(c.env.instance)) throw new HttpError(403, "Forbidden");
    await next();
  });

  const methodNotAllowed = () => {
    throw new HttpError(405, "Method Not Allowed");
  };

  app.get("/", () => syncResponse(["/1.0"]));

  app.get("/1.0", (c) => {
    const info: DevlxdInfo = {
      api_version: "1.0",
      location: options.location,
      instance_type: "virtual-machine",
      state: c.env.instance.runtime.ready ? "Ready" : "Started",
    };
    return syncResponse(info);
  });

  app.patch("/1.0", async (c) => {
    let body: unknown;
    try {
      body = await c.req.json();
    } catch {
      throw new HttpError(400, "Invalid request body");
    }
    if (typeof body !== "object" || body === null || Array.isArray(body)) {
      throw new HttpError(400, "Invalid request body");
    }
    const state = (body as { state?: unknown }).state;
    if (state !== "Ready" && state !== "Started") throw new HttpError(400, "Invalid state");
    options.setReady(c.env.instance.name, state === "Ready");
    return syncResponse(null);
  });

  app.get("/1.0/config", (c) => {
    const keys = Object.keys(c.env.instance.config).filter(isGuestVisibleKey).sort();
    return syncResponse(keys.map((k) => `/1.0/config/${k}`));
  });

  app.get("/1.0/config/:key", (c) => {
    const key = c.req.param("key");
    if (!isValidConfigKey(key)) throw new HttpError(400, "Invalid config key");
    if (!isGuestVisibleKey(key)) throw new HttpError(403, "Forbidden");
    const value = own(c.env.instance.config, key);
    if (value === undefined) throw new HttpError(404, "Not Found");
    return syncResponse(value);
  });

  app.get("/1.0/meta-data", (c) => {
    const { name, config } = c.env.instance;
    const text = `instance-id: ${name}\nlocal-hostname: ${name}\n${
      own(config, "user.meta-data") ?? ""
    }`;
    return syncResponse(text);
  });

  app.get("/1.0/devices", (c) => syncResponse(c.env.instance.devices));

  app.get("/1.0/events", (c) => {
    const typeParam = c.req.query("type");
    const types = typeParam === undefined || typeParam === ""
      ? EVENT_TYPES
      : typeParam.split(",").map((t) => t.trim());
    const unknown = types.find((t) => !EVENT_TYPES.includes(t));
    if (unknown !== undefined) {
      throw new HttpError(400, `Invalid event type "${unknown.slice(0, 32)}"`);
    }
    const stream = options.events.stream(c.env.instance.name, {
      filter: (event) => types.includes(event.type),
      signal: c.req.raw.signal,
    });
    return new Response(stream, {
      headers: { "content-type": "application/x-ndjson", "cache-control": "no-store" },
    });
  });

  app.get("/1.0/images/:fingerprint/export", async (c) => {
    if (!devlxdImagesEnabled(c.env.instance)) throw new HttpError(403, "Forbidden");
    const fingerprint = c.req.param("fingerprint");
    if (!FINGERPRINT_RE.test(fingerprint)) throw new HttpError(400, "Invalid fingerprint");
    let file: Deno.FsFile;
    try {
      file = await Deno.open(`${options.imagesDir}/${fingerprint}`, { read: true });
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) throw new HttpError(404, "Not Found");
      throw error;
    }
    const info = await file.stat();
    if (!info.isFile) {
      file.close();
      throw new HttpError(404, "Not Found");
    }
    return new Response(file.readable, {
      headers: {
        "content-type": "application/octet-stream",
        "content-length": String(info.size),
        "content-disposition": `attachment; filename=${fingerprint}`,
      },
    });
  });

  for (
    const path of ["/", "/1.0", "/1.0/config", "/1.0/config/:key", "/1.0/meta-data", "/1.0/devices"]
  ) {
    app.all(path, methodNotAllowed);
  }
  app.all("/1.0/events", methodNotAllowed);
  app.all("/1.0/images/:fingerprint/export", methodNotAllowed);

  return app;
}
