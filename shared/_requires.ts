/**
 * What a test needs from the machine beyond Deno (Go, QEMU, openssl, python3,
 * vsock loopback, root), for tests only: a test whose need is missing is
 * reported by `deno test` as ignored, never as ok, and says why in one line.
 *
 *     Deno.test(requires(missingProgram("go", "it builds the Go peer"), { name, fn }));
 *
 * Programs are looked up on PATH without running them: `new Deno.Command(name)`
 * throws synchronously for a missing program (Deno 2.9.6), which a promise
 * guard does not catch.
 *
 * Permissions: `--allow-env=PATH`, `--allow-read` of the PATH directories.
 */

/** The absolute path of `name` on PATH (an executable regular file), or undefined. */
export function findProgram(name: string): string | undefined {
  const path = Deno.env.get("PATH") ?? "/usr/local/bin:/usr/bin:/bin";
  for (const dir of path.split(":")) {
    if (!dir) continue;
    const candidate = `${dir}/${name}`;
    try {
      const info = Deno.statSync(candidate);
      if (info.isFile && ((info.mode ?? 0o111) & 0o111) !== 0) return candidate;
    } catch (error) {
      // Missing, not a directory, or a directory this user cannot search: not there.
      if (
        !(error instanceof Deno.errors.NotFound || error instanceof Deno.errors.NotADirectory ||
          error instanceof Deno.errors.PermissionDenied)
      ) throw error;
    }
  }
  return undefined;
}

/** Why a test cannot run when `name` is not on PATH (`purpose` says what it is for), else undefined. */
export function missingProgram(name: string, purpose: string): string | undefined {
  return findProgram(name) === undefined ? `${name} is not on PATH (${purpose})` : undefined;
}

/**
 * The test definition, ignored when `missing` gives a reason; that reason is
 * printed as one line naming the test. `missing` may list several reasons: the
 * first one given counts.
 */
export function requires<T extends { name: string }>(
  missing: string | undefined | readonly (string | undefined)[],
  definition: T,
): T & { ignore: boolean } {
  const reason = typeof missing === "string" || missing === undefined
    ? missing
    : missing.find((r) => r !== undefined);
  if (reason !== undefined) console.error(`skipped "${definition.name}": ${reason}`);
  return { ...definition, ignore: reason !== undefined };
}
