import assert from "node:assert/strict";
import { createLogger, formatLogLine, LogSummary, parseLogLevel } from "./log.ts";

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

Deno.test("LogSummary logs the first event at once and the rest of the interval as one line", async () => {
  const lines: string[] = [];
  const { promise: flushed, resolve } = Promise.withResolvers<void>();
  const logger = createLogger({
    write: (line) => {
      lines.push(line);
      if (lines.length === 2) resolve();
    },
  });
  using summary = new LogSummary(logger, { interval: 50 });
  for (let i = 0; i < 100; i++) summary.note("warn", "connection refused", { peer: `p${i}` });
  assert.equal(lines.length, 1);
  await flushed;
  assert.match(lines[1], /msg="connection refused" peer=p99 count=99 /);
});
