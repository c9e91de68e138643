import assert from "node:assert/strict";
import { misplaced, parseEmbeddedFiles, parseSize } from "./build_check.ts";

// As `deno compile` 2.9.6 printed it for the agent before --bundle (shortened).
const UNBUNDLED = `Compile agent/main.ts to dist/lxd-vsock-agent

Embedded Files

lxd-vsock-agent
├─┬ agent (236.3KB)
│ ├── agent.ts (36.74KB)
│ └── main.ts (11.9KB)
├── node_modules/* (188.3MB - 97.1MB unique)
├── package.json (374B)
└─┬ shared (442.53KB)
  ├── api.ts (11.3KB)
  └─┬ vsock (239.97KB)
    └── _fd.ts (17.25KB)

Files: 97.91MB
Metadata: 1.92KB
`;

Deno.test("parseEmbeddedFiles() gives each file's project path and size, collapsed entries as printed", () => {
  const payload = parseEmbeddedFiles(UNBUNDLED);
  assert.deepEqual(payload.files.map((f) => f.path), [
    "agent/agent.ts",
    "agent/main.ts",
    "node_modules/*",
    "package.json",
    "shared/api.ts",
    "shared/vsock/_fd.ts",
  ]);
  assert.equal(payload.files[0].size, parseSize("36.74KB"));
  assert.equal(payload.files[2].size, parseSize("188.3MB"));
  assert.equal(payload.total, Math.round(97.91 * 1024 * 1024));
});

Deno.test("parseEmbeddedFiles() refuses output without the file list", () => {
  assert.throws(() => parseEmbeddedFiles("Compile agent/main.ts\n"), SyntaxError);
});

Deno.test("misplaced() names npm directories, type packages and tests; allows the graph, the bundle and config", () => {
  const graph = new Set(["agent/main.ts", "shared/api.ts"]);
  assert.match(misplaced("node_modules/*", graph)!, /node_modules/);
  assert.match(misplaced("node_modules/deno/deno", graph)!, /node_modules/);
  assert.match(misplaced("@types/node/index.d.ts", graph)!, /type-only/);
  assert.match(misplaced("tests/agent_harness.ts", graph)!, /test code/);
  assert.match(misplaced("agent/agent_test.ts", graph)!, /test code/);
  assert.match(misplaced("host/main.ts", graph)!, /module graph/);
  assert.equal(misplaced("agent/main.ts", graph), undefined);
  assert.equal(misplaced(".deno_compile_bundle_9da89624.mjs", graph), undefined);
  assert.equal(misplaced("package.json", graph), undefined);
});
