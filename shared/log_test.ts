import assert from "node:assert/strict";
import { createLogger, formatLogLine, parseLogLevel } from "./log.ts";

Deno.test("formatLogLine() quotes values with spaces and skips undefined", () => {
  assert.equal(
    formatLogLine("info", "listening", { port: 1234, name: "a b", gone: undefined }),
    'level=info msg="listening" port=1234 name="a b"',
  );
});

Deno.test("createLogger() drops lines below its level and merges fields", () => {
  const lines: string[] = [];
  const log = createLogger({ level: "warn", write: (l) => lines.push(l) }).with({ vm: "v1" });
  log.info("hidden");
  log.error("failed", { err: new Error("boom") });
  assert.deepEqual(lines, ['level=error msg="failed" vm=v1 err=boom']);
});

Deno.test("parseLogLevel() rejects unknown levels", () => {
  assert.equal(parseLogLevel("debug"), "debug");
  assert.throws(() => parseLogLevel("loud"), /use one of debug, info, warn, error/);
});
