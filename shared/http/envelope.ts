/**
 * LXD's JSON response envelope (`api.ResponseRaw` in LXD's Go code), which
 * everything the host answers over vsock is wrapped in, so that Go's LXD
 * client code parses it. Plain functions; no permissions.
 *
 * @module
 */

const JSON_HEADERS = { "content-type": "application/json" };

/**
 * A `sync` response: `{"type":"sync","status":"Success","status_code":200,
 * "operation":"","error_code":0,"error":"","metadata":…}` with HTTP `status`.
 */
export function syncResponse(metadata: unknown, status = 200): Response {
  const body = JSON.stringify({
    type: "sync",
    status: "Success",
    status_code: 200,
    operation: "",
    error_code: 0,
    error: "",
    metadata: metadata ?? null,
  });
  return new Response(body, { status, headers: JSON_HEADERS });
}

/**
 * An `error` response: `{"type":"error","status":"","status_code":0,
 * "operation":"","error_code":status,"error":message,"metadata":null}` with
 * that HTTP status.
 */
export function errorResponse(status: number, message: string): Response {
  const body = JSON.stringify({
    type: "error",
    status: "",
    status_code: 0,
    operation: "",
    error_code: status,
    error: message,
    metadata: null,
  });
  return new Response(body, { status, headers: JSON_HEADERS });
}

/** What {@linkcode unwrapEnvelope} found. */
export type Unwrapped =
  | { ok: true; metadata: unknown }
  | { ok: false; status: number; error: string };

/**
 * Unwraps a parsed LXD envelope: `sync` (and `async`) → its metadata;
 * `error` → its `error_code` and `error`.
 *
 * @throws {TypeError} when `body` is not an LXD envelope.
 */
export function unwrapEnvelope(body: unknown): Unwrapped {
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new TypeError("Not an LXD response envelope: not a JSON object");
  }
  const envelope = body as Record<string, unknown>;
  switch (envelope.type) {
    case "sync":
    case "async":
      return { ok: true, metadata: envelope.metadata ?? null };
    case "error": {
      const { error_code: status, error } = envelope;
      if (typeof status !== "number" || !Number.isInteger(status) || typeof error !== "string") {
        throw new TypeError("Not an LXD error envelope: error_code or error missing");
      }
      return { ok: false, status, error };
    }
    default:
      throw new TypeError(`Not an LXD response envelope: type ${JSON.stringify(envelope.type)}`);
  }
}
