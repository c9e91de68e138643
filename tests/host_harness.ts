/**
 * Helpers for the host's cross-process tests: run `host/main.ts` (the daemon
 * with the `host` permission set, or a CLI command) as a child process, wait
 * for its log lines with a bound, and talk to it as an agent would over the
 * unix ("hybrid vsock") transport with real mutual TLS.
 * Needs the `test` permission set.
 * @module
 */

import "reflect-metadata";
import { join } from "node:path";
import type { Duplex } from "node:stream";
import { httpRequest } from "../shared/http/mod.ts";
import { connectTls } from "../shared/tls/mod.ts";
import { connectUnix, type FdSocket } from "../shared/vsock/mod.ts";
import { readConfigDrive } from "../host/config_drive.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const MAIN = join(ROOT, "host", "main.ts");

function denoArgs(args: string[]): string[] {
  return ["run", "-P=host", MAIN, ...args];
}

/** Runs one CLI command to completion. */
export async function cli(
  args: string[],
): Promise<{ code: number; stdout: string; stderr: string }> {
  const output = await new Deno.Command(Deno.execPath(), {
    args: denoArgs(args),
    cwd: ROOT,
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" },
  }).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr).replace(/^.*Permissions in the config file.*\n/gm, ""),
  };
}

/** Like `cli()`, but throws unless it exits 0; returns stdout. */
export async function cliOk(args: string[]): Promise<string> {
  const r = await cli(args);
  if (r.code !== 0) throw new Error(`${args.join(" ")} exited ${r.code}: ${r.stderr}`);
  return r.stdout;
}

/**
 * Registers instance `vm1` (CID 10) on the hybrid path `<stateDir>/vm1.vsock`
 * with `lxd-vsock-host instance add`, adding `args`; returns the hybrid path.
 */
export async function addHybridInstance(stateDir: string, args: string[] = []): Promise<string> {
  const hybrid = join(stateDir, "vm1.vsock");
  await cliOk([
    "instance",
    "add",
    "vm1",
    "--cid",
    "10",
    "--hybrid",
    hybrid,
    ...args,
    "--state-dir",
    stateDir,
  ]);
  return hybrid;
}

/** Rejects `promise` after `ms` with a message naming what was awaited. */
export function bounded<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`Timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A daemon child process and its log. */
export class DaemonProcess implements AsyncDisposable {
  readonly stateDir: string;
  readonly process: Deno.ChildProcess;
  readonly lines: string[] = [];
  port = 0;
  #waiters: { re: RegExp; left: number; resolve: (line: string) => void }[] = [];
  #pump: Promise<void>;
  #status: Promise<Deno.CommandStatus>;

  private constructor(stateDir: string, extra: string[]) {
    this.stateDir = stateDir;
    const child = new Deno.Command(Deno.execPath(), {
      args: denoArgs([
        "daemon",
        "--state-dir",
        stateDir,
        "--transport",
        "unix",
        "--log-level",
        "debug",
        ...extra,
      ]),
      cwd: ROOT,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
      env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" },
    }).spawn();
    this.process = child;
    this.#status = child.status;
    this.#pump = (async () => {
      let buffer = "";
      for await (const chunk of child.stderr.pipeThrough(new TextDecoderStream())) {
        buffer += chunk;
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + 1);
          this.lines.push(line);
          this.#waiters = this.#waiters.filter((w) => {
            if (!w.re.test(line) || --w.left > 0) return true;
            w.resolve(line);
            return false;
          });
        }
      }
    })();
  }

  /** Starts a daemon on `stateDir` (hybrid listeners only) and waits until it listens. */
  static async start(stateDir: string, extra: string[] = []): Promise<DaemonProcess> {
    const daemon = new DaemonProcess(stateDir, extra);
    const line = await bounded(
      Promise.race([
        daemon.waitFor(/msg="listening"/, 30_000),
        daemon.#status.then((s) => {
          throw new Error(`daemon exited ${s.code} before listening:\n${daemon.lines.join("\n")}`);
        }),
      ]),
      30_000,
      "the daemon to listen",
    );
    daemon.port = Number(/ port=(\d+)/.exec(line)![1]);
    return daemon;
  }

  /** The next (or an already seen) log line matching `re`. */
  waitFor(re: RegExp, ms = 10_000): Promise<string> {
    return this.waitForCount(re, 1, ms);
  }

  /** Resolves with the `count`-th log line (seen so far or next) matching `re`. */
  waitForCount(re: RegExp, count: number, ms = 10_000): Promise<string> {
    const seen = this.lines.filter((l) => re.test(l));
    if (seen.length >= count) return Promise.resolve(seen[count - 1]);
    const { promise, resolve } = Promise.withResolvers<string>();
    this.#waiters.push({ re, left: count - seen.length, resolve });
    return bounded(promise, ms, `${count} log lines ${re}`);
  }

  /** Sends `signal` and waits for the exit status (bounded). */
  async stop(signal: Deno.Signal = "SIGTERM", ms = 15_000): Promise<Deno.CommandStatus> {
    try {
      this.process.kill(signal);
    } catch {
      // Already exited.
    }
    const status = await bounded(this.#status, ms, `the daemon to exit on ${signal}`);
    await this.#pump;
    return status;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop("SIGKILL").catch(() => {});
  }
}

/** A temporary directory removed on dispose. */
export async function tempDir(prefix: string): Promise<{ path: string } & AsyncDisposable> {
  const path = await Deno.makeTempDir({ prefix });
  return { path, [Symbol.asyncDispose]: () => Deno.remove(path, { recursive: true }) };
}

/** An agent's TLS identity and the host certificate it pins, from a config drive. */
export interface AgentIdentity {
  cert: string;
  key: string;
  serverCert: string;
}

/** Reads the agent identity from an instance's default config drive. */
export async function agentIdentity(stateDir: string, name: string): Promise<AgentIdentity> {
  const drive = await readConfigDrive(join(stateDir, "instances", name, "config"));
  return { cert: drive.agentCert, key: drive.agentKey, serverCert: drive.info.certificate };
}

/** Connects to a hybrid instance's host listener `<hybrid>_<port>` (raw, no TLS). */
export function connectHybridListener(hybrid: string, port: number): Promise<FdSocket> {
  return connectUnix(`${hybrid}_${port}`, { timeout: 5000 });
}

/** An agent connection: TLS over the hybrid listener, ready for requests. */
export async function agentConnection(
  hybrid: string,
  port: number,
  identity: AgentIdentity,
): Promise<Duplex & Disposable> {
  const raw = await connectHybridListener(hybrid, port);
  // The host may close the connection (a cap, idle eviction, shutdown): a write
  // then fails on the raw socket; the TLS layer reports it, nothing is uncaught.
  let tls: Duplex | undefined;
  raw.on("error", () => tls?.destroy());
  try {
    tls = await connectTls(raw, {
      cert: identity.cert,
      key: identity.key,
      pinned: identity.serverCert,
      handshakeTimeout: 5000,
    });
    const secure = tls;
    return Object.assign(secure, {
      [Symbol.dispose]: () => {
        secure.destroy();
        raw.destroy();
      },
    });
  } catch (error) {
    raw.destroy();
    throw error;
  }
}

/** One request as the agent of `identity`, on a new connection; returns status and JSON body. */
export async function agentRequest(
  hybrid: string,
  port: number,
  identity: AgentIdentity,
  path: string,
  init: RequestInit = {},
): Promise<{ status: number; body: Record<string, unknown> }> {
  using connection = await agentConnection(hybrid, port, identity);
  const response = await httpRequest(connection, new Request(`http://devlxd${path}`, init), {
    timeout: 10_000,
  });
  return { status: response.status, body: await response.json() };
}

/**
 * Sends a request head announcing a 100-byte body, then one body byte per
 * second; resolves with what the server wrote once it closes the connection.
 */
export async function trickleBody(socket: Duplex, what: string): Promise<string> {
  let text = "";
  const closed = new Promise<void>((resolve) => {
    socket.on("data", (chunk) => text += chunk);
    socket.once("end", () => resolve());
    socket.once("close", () => resolve());
    socket.once("error", () => resolve());
  });
  socket.write("PATCH /1.0 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{");
  const timer = setInterval(() => {
    if (socket.writable) socket.write(" ");
  }, 1000);
  try {
    await bounded(closed, 25_000, `${what} to cut off a body trickled at 1 byte/s`);
  } finally {
    clearInterval(timer);
  }
  return text;
}
