/**
 * `make build-check`: runs the real `deno compile` step of both binaries (the
 * `compile:host` and `compile:agent` tasks of deno.json, output redirected to
 * `.cache/build-check/`) with the Deno CLI standing in for the `denort`
 * runtime, which cannot be downloaded here. Such an output does not run as a
 * program (the CLI is not the runtime), but its embedded payload is the one a
 * real build carries, and `deno compile` prints it: this check reads that file
 * list and fails when anything outside the binary's module graph is embedded
 * (`node_modules`, type packages, tests), or when the payload is over its
 * budget. It prints both payload sizes.
 *
 * The payload is one esbuild bundle (`--bundle`). To show that the bundle
 * works, the same entry point is bundled with `deno bundle`, whose output
 * must appear byte for byte in the compiled file, and that file is run with
 * the binary's own flags (deno.json's run task): `--version`, and for the host `instance add` + `instance
 * list` in a temporary state directory (key generation, SQLite).
 *
 * Usage: deno run -P=test tests/build_check.ts
 * Permissions: the "test" set (runs `deno`, reads deno.json, writes .cache/).
 * @module
 */

import { Buffer } from "node:buffer";
import { runFlags, taskWords, v8FlagsOf } from "./deno_tasks.ts";

const ROOT_URL = new URL("../", import.meta.url);
const ROOT = ROOT_URL.pathname;
const OUT = `${ROOT}.cache/build-check`;
const MiB = 1024 * 1024;

/** What one binary may embed, and its payload budget. */
interface Binary {
  name: string;
  task: string;
  entry: string;
  /** The deno.json task that runs it (`deno run <flags> <entry>`). */
  run: "host" | "agent";
  budget: number;
  smoke: (run: (args: string[]) => Promise<string>) => Promise<void>;
}

const BINARIES: Binary[] = [
  {
    name: "lxd-vsock-agent",
    task: "compile:agent",
    entry: "agent/main.ts",
    run: "agent",
    budget: 3 * MiB,
    smoke: async (run) => {
      expect(await run(["--version"]), /^lxd-vsock-agent \d/);
      expect(await run(["--help"]), /^Usage: lxd-vsock-agent /);
    },
  },
  {
    name: "lxd-vsock-host",
    task: "compile:host",
    entry: "host/main.ts",
    run: "host",
    budget: 5 * MiB,
    smoke: async (run) => {
      expect(await run(["--version"]), /^lxd-vsock-host \d/);
      const state = await Deno.makeTempDir({ prefix: "build-check-" });
      try {
        expect(await run(["instance", "add", "vm1", "--cid", "10", "--state-dir", state]), /vm1/);
        const list = JSON.parse(
          await run(["instance", "list", "--format", "json", "--state-dir", state]),
        ) as { name: string }[];
        if (list.length !== 1 || list[0].name !== "vm1") {
          throw new Error(`instance list gave ${JSON.stringify(list)}`);
        }
      } finally {
        await Deno.remove(state, { recursive: true });
      }
    },
  },
];

/** One embedded file as `deno compile` lists it. */
export interface EmbeddedFile {
  /** Path inside the payload, relative to the project root (`agent/main.ts`). */
  path: string;
  /** Size in bytes, as printed (rounded). */
  size: number;
}

/** The payload of one `deno compile` run: its files and the "Files:" total. */
export interface Payload {
  files: EmbeddedFile[];
  total: number;
}

const UNITS: Record<string, number> = { B: 1, KB: 1024, MB: MiB, GB: 1024 * MiB };

/** Bytes of a size as Deno prints it ("237.03KB", "97.91MB"). */
export function parseSize(text: string): number {
  const match = /^([\d.]+)\s*(B|KB|MB|GB)$/.exec(text.trim());
  if (!match) throw new SyntaxError(`Not a size: ${JSON.stringify(text)}`);
  return Math.round(Number(match[1]) * UNITS[match[2]]);
}

/**
 * Reads the "Embedded Files" tree that `deno compile` prints (ANSI colours
 * removed): one line a file or directory, `├─┬ dir (size)`, `│ ├── file (size)`.
 * Collapsed entries (`node_modules/* (…)`) are kept as they are printed.
 */
export function parseEmbeddedFiles(output: string): Payload {
  // deno-lint-ignore no-control-regex
  const lines = output.replace(/\x1b\[[0-9;]*m/g, "").split("\n");
  const start = lines.findIndex((l) => l.trim() === "Embedded Files");
  const end = lines.findIndex((l) => /^Files:/.test(l.trim()));
  if (start < 0 || end < start) {
    throw new SyntaxError("deno compile printed no 'Embedded Files' list and 'Files:' total");
  }
  const files: EmbeddedFile[] = [];
  const dirs: string[] = [];
  for (const line of lines.slice(start + 1, end)) {
    if (!line.trim()) continue;
    const match = /^([│├└─┬ ]*)(\S.*?)(?: \(([^)]*)\))?$/.exec(line);
    if (!match) throw new SyntaxError(`Unreadable embedded-files line: ${JSON.stringify(line)}`);
    const [, prefix, name, size] = match;
    if (prefix === "") continue; // the binary's own name heads the tree
    const depth = (prefix.length - 2) / 2; // "├── " is depth 1, "│ ├── " depth 2, …
    dirs.length = depth - 1;
    if (prefix.includes("┬")) {
      dirs.push(name);
    } else {
      const bytes = size === undefined ? 0 : parseSize(size.split(" - ")[0]);
      files.push({ path: [...dirs, name].join("/"), size: bytes });
    }
  }
  const total = parseSize(lines[end].trim().slice("Files:".length));
  return { files, total };
}

/** Why an embedded file has no place in the binary of `graph`, or undefined. */
export function misplaced(file: string, graph: ReadonlySet<string>): string | undefined {
  if (/(^|\/)node_modules(\/|$)/.test(file)) return "an npm package directory (node_modules)";
  if (/(^|\/)@types\//.test(file)) return "a type-only package";
  if (/(^|\/)tests\/|_test\.ts$|(^|\/)testdata\//.test(file)) return "test code";
  if (/^\.deno_compile_bundle_[\w-]+\.m?js$/.test(file)) return undefined;
  if (file === "package.json" || file === "deno.json") return undefined; // the config Deno reads
  if (graph.has(file)) return undefined;
  return "not in the entry point's module graph";
}

/** The project-relative paths of the local modules `entry` imports (`deno info --json`). */
async function moduleGraph(entry: string): Promise<Set<string>> {
  const out = await deno(["info", "--json", entry]);
  const info = JSON.parse(out) as { modules: { specifier: string }[] };
  const root = ROOT_URL.href;
  return new Set(
    info.modules.map((m) => m.specifier).filter((s) =>
      s.startsWith(root) && !s.includes("/node_modules/")
    )
      .map((s) => s.slice(root.length)),
  );
}

/** Runs the Deno CLI in the project root: stdout, or stdout + stderr with `both`. */
async function deno(
  args: string[],
  { env = {}, both = false }: { env?: Record<string, string>; both?: boolean } = {},
): Promise<string> {
  const output = await new Deno.Command(Deno.execPath(), {
    args,
    cwd: ROOT,
    env: { DENO_NO_UPDATE_CHECK: "1", NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stdout = new TextDecoder().decode(output.stdout);
  const stderr = new TextDecoder().decode(output.stderr);
  if (!output.success) {
    throw new Error(`deno ${args.join(" ")} failed (${output.code}):\n${stderr}${stdout}`);
  }
  return both ? stdout + stderr : stdout;
}

function expect(output: string, pattern: RegExp): void {
  if (!pattern.test(output)) {
    throw new Error(`expected ${pattern}, got: ${output.split("\n").slice(0, 5).join("\n")}`);
  }
}

/** The compile task's arguments (after `deno`), writing to `output` instead of dist/. */
function compileArgs(task: string, output: string): string[] {
  const words = taskWords(task);
  if (words[0] !== "compile") throw new Error(`deno.json task ${task} is not a 'deno compile'`);
  const at = words.indexOf("--output");
  if (at < 0) throw new Error(`deno.json task ${task} has no --output`);
  words[at + 1] = output;
  return words;
}

function mib(bytes: number): string {
  return `${(bytes / MiB).toFixed(2)} MiB`;
}

async function check(binary: Binary): Promise<string[]> {
  const problems: string[] = [];
  // The binary runs with the V8 flags `deno task` runs it with.
  if (v8FlagsOf(binary.task) !== v8FlagsOf(binary.run)) {
    problems.push(
      `${binary.name}: deno.json's ${binary.task} has ${v8FlagsOf(binary.task) ?? "no V8 flags"}` +
        `, its run task ${v8FlagsOf(binary.run) ?? "none"}`,
    );
  }
  const output = `${OUT}/${binary.name}`;
  const printed = await deno(compileArgs(binary.task, output), {
    env: { DENORT_BIN: Deno.execPath() },
    both: true,
  });
  const payload = parseEmbeddedFiles(printed);
  const graph = await moduleGraph(binary.entry);
  for (const file of payload.files) {
    const why = misplaced(file.path, graph);
    if (why) problems.push(`${binary.name} embeds ${file.path}: ${why}`);
  }
  console.log(
    `${binary.name}: payload ${mib(payload.total)} (budget ${mib(binary.budget)}), ` +
      `${payload.files.length} files: ${payload.files.map((f) => f.path).join(", ")}`,
  );
  if (payload.total > binary.budget) {
    problems.push(`${binary.name}: payload ${mib(payload.total)} is over ${mib(binary.budget)}`);
  }

  const bundle = payload.files.find((f) => f.path.startsWith(".deno_compile_bundle_"));
  if (!bundle) {
    await Deno.remove(output);
    return [...problems, `${binary.name}: no bundle embedded`];
  }
  const mjs = `${OUT}/${binary.name}.mjs`;
  await deno(["bundle", "--platform=deno", "--output", mjs, binary.entry]);
  // The payload holds the bundle verbatim: the file run below is the one embedded.
  const embedded = Buffer.from(await Deno.readFile(output))
    .indexOf(Buffer.from(await Deno.readFile(mjs))) >= 0;
  await Deno.remove(output); // not a program: the CLI stood in for the runtime
  if (!embedded) {
    problems.push(`${binary.name}: the payload does not hold deno bundle's output byte for byte`);
  }
  try {
    const flags = runFlags(binary.run);
    await binary.smoke((args) => deno(["run", ...flags, mjs, ...args]));
    console.log(`${binary.name}: the bundle runs with ${flags.join(" ")}`);
  } catch (error) {
    problems.push(`${binary.name}: the bundle does not run: ${(error as Error).message}`);
  }
  return problems;
}

if (import.meta.main) {
  await Deno.mkdir(OUT, { recursive: true });
  const problems: string[] = [];
  for (const binary of BINARIES) problems.push(...await check(binary));
  for (const problem of problems) console.error(`build-check: FAILED: ${problem}`);
  console.log(
    problems.length === 0 ? "build-check: ok" : `build-check: ${problems.length} problem(s)`,
  );
  Deno.exit(problems.length === 0 ? 0 : 1);
}
