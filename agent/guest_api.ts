/**
 * The part of lxd-agent's API that acts on the guest itself, mounted on the
 * agent API app (`agent_api.ts`) by {@linkcode mountGuestApi}:
 *
 * - `GET /1.0/state`: `api.InstanceState` (`guest_state.ts`); `PUT` answers
 *   501 as lxd-agent 5.0.2 does.
 * - `GET /1.0/metrics`: lxd-agent's metrics document (`guest_metrics.ts`).
 *
 * Answers use the LXD envelope. Needs what its collectors need (ffi,
 * sys=networkInterfaces).
 * @module
 */

import type { Hono } from "hono";
import { errorResponse, syncResponse } from "../shared/http/envelope.ts";
import type { AgentMetrics, InstanceState } from "../shared/instance_api.ts";
import { collectMetrics } from "./guest_metrics.ts";
import { collectState } from "./guest_state.ts";

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
}

/** Adds the guest routes to `app`. */
export function mountGuestApi(app: Hono, options: GuestApiOptions = {}): void {
  const state = options.state ?? (() => collectState());
  const metrics = options.metrics ?? (() => collectMetrics());

  app.get("/1.0/state", () => syncResponse(state()));
  app.put("/1.0/state", () => errorResponse(501, "Not implemented"));
  app.get("/1.0/metrics", () => syncResponse(metrics()));
}
