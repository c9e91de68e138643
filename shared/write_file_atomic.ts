/**
 * Atomic file writes: the text goes to a new temporary file beside `path`
 * (created with `mode`, then set to exactly `mode` whatever the umask, and
 * synced to disk unless `durable` is false), which then replaces `path` by a
 * rename, so a reader sees the old content or the new one, never a part. On
 * failure the temporary file is removed and the error is thrown as it came.
 * {@linkcode writeFileAtomic} and, for callers that must not yield,
 * {@linkcode writeFileAtomicSync}. Needs read and write permission on the
 * directory.
 * @module
 */

/** Options of {@linkcode writeFileAtomic} and {@linkcode writeFileAtomicSync}. */
export interface WriteFileAtomicOptions {
  /** The file's mode. @default 0o600 */
  mode?: number;
  /** fsync the new content before the rename, so it survives a power loss. @default true */
  durable?: boolean;
}

const encoder = new TextEncoder();

function tempPath(path: string): string {
  return `${path}.${crypto.randomUUID()}.tmp`;
}

/** Writes `text` to `path` atomically; see the module doc. */
export async function writeFileAtomic(
  path: string,
  text: string,
  options: WriteFileAtomicOptions = {},
): Promise<void> {
  const { mode = 0o600, durable = true } = options;
  const temp = tempPath(path);
  try {
    {
      using file = await Deno.open(temp, { write: true, createNew: true, mode });
      const data = encoder.encode(text);
      let written = 0;
      while (written < data.length) written += await file.write(data.subarray(written));
      if (durable) await file.sync();
    }
    await Deno.chmod(temp, mode);
    await Deno.rename(temp, path);
  } catch (error) {
    await Deno.remove(temp).catch(() => {});
    throw error;
  }
}

/** Like {@linkcode writeFileAtomic}, without yielding to the event loop. */
export function writeFileAtomicSync(
  path: string,
  text: string,
  options: WriteFileAtomicOptions = {},
): void {
  const { mode = 0o600, durable = true } = options;
  const temp = tempPath(path);
  try {
    {
      using file = Deno.openSync(temp, { write: true, createNew: true, mode });
      const data = encoder.encode(text);
      let written = 0;
      while (written < data.length) written += file.writeSync(data.subarray(written));
      if (durable) file.syncSync();
    }
    Deno.chmodSync(temp, mode);
    Deno.renameSync(temp, path);
  } catch (error) {
    try {
      Deno.removeSync(temp);
    } catch {
      // Never created, or already renamed.
    }
    throw error;
  }
}
