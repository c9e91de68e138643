import assert from "node:assert/strict";
import { errorResponse, syncResponse, unwrapEnvelope } from "./envelope.ts";

Deno.test("syncResponse() writes LXD's sync envelope as JSON with status 200", async () => {
  const response = syncResponse({ api_version: "1.0" });
  assert.equal(response.status, 200);
  assert.equal(response.headers.get("content-type"), "application/json");
  assert.equal(
    await response.text(),
    '{"type":"sync","status":"Success","status_code":200,"operation":"","error_code":0,' +
      '"error":"","metadata":{"api_version":"1.0"}}',
  );
});

Deno.test("syncResponse() takes another HTTP status and a missing metadata as null", async () => {
  const response = syncResponse(undefined, 201);
  assert.equal(response.status, 201);
  assert.equal((await response.json()).metadata, null);
});

Deno.test("errorResponse() writes LXD's error envelope with the HTTP status as error_code", async () => {
  const response = errorResponse(403, "Forbidden");
  assert.equal(response.status, 403);
  assert.deepEqual(await response.json(), {
    type: "error",
    status: "",
    status_code: 0,
    operation: "",
    error_code: 403,
    error: "Forbidden",
    metadata: null,
  });
});

Deno.test("unwrapEnvelope() returns the metadata of a sync envelope and the error of an error one", async () => {
  assert.deepEqual(unwrapEnvelope(await syncResponse(["/1.0"]).json()), {
    ok: true,
    metadata: ["/1.0"],
  });
  assert.deepEqual(unwrapEnvelope(await errorResponse(404, "not found").json()), {
    ok: false,
    status: 404,
    error: "not found",
  });
  // LXD's own minimal error form, as Go's encoder writes it without empty fields.
  assert.deepEqual(unwrapEnvelope({ type: "error", error: "x", error_code: 500 }), {
    ok: false,
    status: 500,
    error: "x",
  });
});

Deno.test("unwrapEnvelope() throws TypeError on anything that is not an envelope", () => {
  for (const body of [null, "sync", [], {}, { type: "nope" }, { type: "error", error: "x" }]) {
    assert.throws(() => unwrapEnvelope(body), TypeError, JSON.stringify(body));
  }
});
