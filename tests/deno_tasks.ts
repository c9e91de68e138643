/**
 * How the binaries are run, read from the one place it is written: the tasks
 * of deno.json (`host`, `agent`: `deno run <flags> <entry>`; `compile:*`).
 * Tests, benchmarks and the build check start the binaries with the same
 * Deno flags (permission set, V8 flags) as `deno task` and `deno compile`.
 * Permissions: read of deno.json.
 * @module
 */

const ROOT = new URL("../", import.meta.url);

/** The words of deno.json's task `name` (after a leading `deno`). */
export function taskWords(name: string): string[] {
  const config = JSON.parse(Deno.readTextFileSync(new URL("deno.json", ROOT))) as {
    tasks: Record<string, string>;
  };
  const words = config.tasks[name]?.trim().split(/\s+/);
  if (!words || words[0] !== "deno") throw new Error(`deno.json has no 'deno …' task ${name}`);
  return words.slice(1);
}

/**
 * The Deno flags of the `host` or `agent` task (between `run` and the entry
 * point): its permission set and V8 flags, e.g. `["-P=agent", "--v8-flags=…"]`.
 */
export function runFlags(binary: "host" | "agent"): string[] {
  const words = taskWords(binary);
  if (words[0] !== "run" || !words.at(-1)!.endsWith(".ts")) {
    throw new Error(`deno.json task ${binary} is not 'deno run <flags> <entry>'`);
  }
  return words.slice(1, -1);
}

/** The `--v8-flags=…` of a task, or undefined. */
export function v8FlagsOf(task: string): string | undefined {
  return taskWords(task).find((w) => w.startsWith("--v8-flags="));
}
