/**
 * `lxd-vsock-host`: entry point. Parses the command line, creates the logger,
 * wires SIGTERM/SIGINT to one AbortController, runs the daemon or a registry
 * command, and is the only module that writes to the console.
 * Exit status: 0 ok, 1 failure, 2 usage error.
 * Permissions: the `host` set in deno.json.
 * @module
 */

import { createLogger } from "../shared/log.ts";
import { type Command, parseConfig, PROGRAM, UsageError } from "./cli.ts";
import { VERSION } from "./version.ts";
import { CommandError, runCommand } from "./commands.ts";
import { type AgentCommandIO, runAgentCommand } from "./agent_commands.ts";
import { currentUid } from "../shared/sys/ids.ts";
import { Daemon } from "./daemon.ts";
import { RegistryError } from "./registry_error.ts";
import { OwnershipError } from "./state_dir.ts";

const encoder = new TextEncoder();
const stdout = (text: string) => Deno.stdout.writeSync(encoder.encode(text));
const stderr = (text: string) => Deno.stderr.writeSync(encoder.encode(text));

/**
 * The user id (`Deno.uid()`, granted by the `host` set's `sys: uid`; reading
 * /proc/self/status would need --allow-all); -1 when unknown (non-root).
 */
function effectiveUid(): number {
  try {
    return Deno.uid() ?? -1;
  } catch {
    return -1;
  }
}

function onSignals(controller: AbortController): () => void {
  const abort = () => controller.abort();
  const signals: Deno.Signal[] = ["SIGTERM", "SIGINT"];
  for (const s of signals) Deno.addSignalListener(s, abort);
  return () => {
    for (const s of signals) Deno.removeSignalListener(s, abort);
  };
}

async function runDaemon(command: Extract<Command, { kind: "daemon" }>): Promise<number> {
  const logger = createLogger({ level: command.logLevel });
  const controller = new AbortController();
  const removeSignals = onSignals(controller);
  try {
    const daemon = await Daemon.start({ ...command, logger });
    if (!controller.signal.aborted) {
      await new Promise((resolve) =>
        controller.signal.addEventListener("abort", resolve, { once: true })
      );
    }
    await daemon.close();
    return 0;
  } catch (error) {
    if (
      (error instanceof RegistryError && error.code === "LOCKED") ||
      error instanceof OwnershipError
    ) {
      stderr(`${PROGRAM}: cannot start: ${error.message}\n`);
    } else {
      logger.error("daemon failed", { error });
    }
    return 1;
  } finally {
    removeSignals();
  }
}

/** `exec` and `state`: the console, the terminal and signals handed to `agent_commands.ts`. */
async function runAgent(command: Parameters<typeof runAgentCommand>[0]): Promise<number> {
  // What lxc exec forwards (lxc/exec_unix.go), minus SIGABRT and SIGSEGV, which Deno cannot catch.
  const numbers: Record<string, number> = {
    SIGHUP: 1,
    SIGINT: 2,
    SIGQUIT: 3,
    SIGUSR1: 10,
    SIGUSR2: 12,
    SIGTERM: 15,
    SIGCONT: 18,
    SIGTSTP: 20,
    SIGTTIN: 21,
    SIGTTOU: 22,
  };
  const signals = Object.keys(numbers) as Deno.Signal[];
  const io: AgentCommandIO = {
    stdout: (bytes) => void Deno.stdout.writeSync(bytes),
    stderr: (bytes) => void Deno.stderr.writeSync(bytes),
    stdin: Deno.stdin.readable,
    stdinIsTerminal: Deno.stdin.isTerminal(),
    stdoutIsTerminal: Deno.stdout.isTerminal(),
    setRaw: (raw) => Deno.stdin.setRaw(raw),
    consoleSize: () => {
      try {
        return Deno.consoleSize();
      } catch {
        return undefined;
      }
    },
    onResize: (handler) => {
      Deno.addSignalListener("SIGWINCH", handler);
      return () => Deno.removeSignalListener("SIGWINCH", handler);
    },
    onSignal: (handler) => {
      const listeners = signals.map((s) => [s, () => handler(numbers[s])] as const);
      for (const [s, l] of listeners) Deno.addSignalListener(s, l);
      return () => listeners.forEach(([s, l]) => Deno.removeSignalListener(s, l));
    },
    env: { TERM: Deno.env.get("TERM") },
    uid: currentUid(),
  };
  try {
    return await runAgentCommand(command, io);
  } catch (error) {
    const known = error instanceof CommandError || error instanceof RegistryError ||
      error instanceof TypeError || error instanceof RangeError;
    stderr(
      `Error: ${known ? (error as Error).message : String((error as Error)?.stack ?? error)}\n`,
    );
    return 1;
  }
}

async function main(args: string[]): Promise<number> {
  let command: Command;
  try {
    command = parseConfig(args, { uid: effectiveUid(), vars: Deno.env.toObject() });
  } catch (error) {
    if (error instanceof UsageError) {
      stderr(`${PROGRAM}: ${error.message}\nRun "${PROGRAM} --help" for usage.\n`);
      return 2;
    }
    throw error;
  }
  switch (command.kind) {
    case "help":
      stdout(command.text + "\n");
      return 0;
    case "version":
      stdout(`${PROGRAM} ${VERSION}\n`);
      return 0;
    case "daemon":
      return await runDaemon(command);
    case "exec":
    case "state":
    case "file-push":
    case "file-pull":
      return await runAgent(command);
    default: {
      const controller = new AbortController();
      const removeSignals = onSignals(controller);
      try {
        await runCommand(command, { stdout, stderr, signal: controller.signal });
        return 0;
      } catch (error) {
        const known = error instanceof CommandError || error instanceof RegistryError ||
          error instanceof OwnershipError || error instanceof TypeError ||
          error instanceof RangeError;
        stderr(
          `Error: ${known ? (error as Error).message : String((error as Error)?.stack ?? error)}\n`,
        );
        return 1;
      } finally {
        removeSignals();
      }
    }
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
