/**
 * How `--status` tells whether the agent that wrote the state file still
 * runs: the daemon listens on a unix socket beside the state file
 * (`agent.sock`), accepting and closing each connection at once; a connect
 * that succeeds means it runs. (A pid check would need `/proc`, which Deno
 * only opens to `--allow-all`; a killed daemon leaves a socket file that
 * refuses connections.)
 * Permissions: `--allow-net=unix:<path>`, read/write on the directory.
 * @module
 */

/** The liveness socket path for a state file. */
export function livenessPath(stateFile: string): string {
  const i = stateFile.lastIndexOf("/");
  return `${i === -1 ? "." : stateFile.slice(0, i) || ""}/agent.sock`;
}

/** The daemon's end: accepts and closes connections until closed. */
export class LivenessSocket {
  #listener: Deno.UnixListener;
  #loop: Promise<void>;

  constructor(readonly path: string) {
    try {
      Deno.removeSync(path);
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
    const listener = Deno.listen({ transport: "unix", path });
    this.#listener = listener;
    this.#loop = (async () => {
      try {
        for await (const conn of listener) conn.close();
      } catch {
        // closed
      }
    })();
  }

  /** Stops listening (Deno removes the socket file). Idempotent. */
  async close(): Promise<void> {
    try {
      this.#listener.close();
    } catch {
      // already closed
    }
    await this.#loop;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** Whether an agent answers on `path`. */
export async function isAgentAlive(path: string): Promise<boolean> {
  try {
    const conn = await Deno.connect({ transport: "unix", path });
    conn.close();
    return true;
  } catch {
    return false;
  }
}
