import assert from "node:assert/strict";
import { classifyFailure, MtlsError } from "./mtls_client.ts";

Deno.test("classifyFailure() maps errno codes to failure reasons (no refusedCodes: only ECONNREFUSED)", () => {
  const err = (code: string) => Object.assign(new Error(code), { code });
  const agent = { name: "the agent of vm1" };
  const classifyAgentError = (error: unknown, phase: "connect" | "tls") =>
    classifyFailure(error, phase, agent);
  assert.equal(classifyAgentError(err("ECONNREFUSED"), "connect").reason, "refused");
  assert.equal(classifyAgentError(err("ETIMEDOUT"), "connect").reason, "timeout");
  assert.equal(classifyAgentError(new Deno.errors.TimedOut("t"), "connect").reason, "timeout");
  assert.equal(classifyAgentError(err("ENOENT"), "connect").reason, "unreachable");
  assert.equal(classifyAgentError(new Error("bad"), "tls").reason, "tls");
});

Deno.test("classifyFailure() keeps an existing MtlsError", () => {
  const error = new MtlsError("x.", "timeout");
  assert.equal(classifyFailure(error, "request", { name: "the host at vsock 2:1" }), error);
});
