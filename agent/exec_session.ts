/**
 * `POST /1.0/exec` as lxd-agent 5.0.2 runs it (`lxd-agent/exec.go`): the
 * request is parsed and completed with lxd-agent's defaults, then run as a
 * websocket operation whose metadata lists one secret per stream (`fds`:
 * `"0"`, `"1"`, `"2"` and `"control"`; `"0"` and `"control"` when
 * interactive). The client connects each with
 * `GET /1.0/operations/<id>/websocket?secret=…`; once all are connected
 * (within 5 s, else the operation fails with "Timed out waiting for
 * websockets to connect") the command starts:
 *
 * - interactive: on a PTY (`shared/sys/pty.ts`) that is its controlling
 *   terminal, sized `width`×`height` (else 80×25); stream `"0"` carries input
 *   and output;
 * - otherwise on three pipes, one stream each.
 *
 * Data travels as binary messages; an empty text message ends a stream (the
 * "barrier" of LXD's `WebsocketSendStream`/`WebsocketRecvStream`). The control
 * stream takes `{"command":"window-resize","args":{"width":"…","height":"…"}}`
 * and `{"command":"signal","signal":N}`. When the control stream closes
 * before the command ended (the client went away) the command gets SIGKILL,
 * as lxd-agent does, and so does its process group (lxd-agent kills the
 * command only, leaving what it started running). On a PTY the end of input
 * is typed as ^D (lxd-agent closes the PTY, hanging the command up); an input
 * stream that closes without it hangs the terminal up (SIGHUP). Once the
 * command ended and its output is sent, the metadata becomes
 * `{"return": <status>}` (exit code, 128 + signal, 127 not found, 126 not
 * executable) and every stream is closed.
 *
 * Owns: per session, the child, its pipes or PTY and the websockets; all are
 * closed or ended when `run` returns, on every path. Permissions: `--allow-ffi`,
 * `--allow-read` (the command lookup).
 * @module
 */

import type { InstanceExecControl, InstanceExecPost } from "../shared/instance_api.ts";
import { acceptWebSocket, errorResponse, type WebSocketConnection } from "../shared/http/mod.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import {
  type ChildProcess,
  effectiveIdentity,
  SIGNALS,
  spawnChild,
  SpawnError,
} from "../shared/sys/child.ts";
import type { FdStream } from "../shared/sys/fd_stream.ts";
import { Pty } from "../shared/sys/pty.ts";
import type { AgentOperation, OperationSpec } from "./operations.ts";

/** lxd-agent's default PATH. */
export const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/** A bad exec request (answered 400). */
export class ExecRequestError extends Error {
  override name = "ExecRequestError";
}

/** An exec request with lxd-agent's defaults applied. */
export interface ExecRequest {
  command: string[];
  interactive: boolean;
  environment: Record<string, string>;
  width: number;
  height: number;
  user: number;
  group: number;
  cwd: string;
}

function isUint32(value: unknown): value is number {
  return Number.isInteger(value) && (value as number) >= 0 && (value as number) <= 0xffffffff;
}

/**
 * Checks `body` (an `api.InstanceExecPost`) and applies lxd-agent's defaults:
 * PATH (plus `/snap/bin` when it exists), HOME=/root and USER=root for user 0,
 * LANG=C.UTF-8, and the working directory HOME or `/`.
 */
export function parseExecRequest(
  body: unknown,
  options: { snapBin?: boolean } = {},
): ExecRequest {
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new ExecRequestError("Invalid exec request: expected a JSON object");
  }
  const post = body as Partial<InstanceExecPost>;
  if (post["wait-for-websocket"] !== true) {
    throw new ExecRequestError("Websockets are required for VM exec");
  }
  const command = post.command;
  if (
    !Array.isArray(command) || command.length === 0 || command.some((w) => typeof w !== "string")
  ) {
    throw new ExecRequestError("Invalid exec request: command must be a non-empty list of strings");
  }
  const environment: Record<string, string> = {};
  if (post.environment !== undefined && post.environment !== null) {
    if (typeof post.environment !== "object" || Array.isArray(post.environment)) {
      throw new ExecRequestError("Invalid exec request: environment must be an object");
    }
    for (const [key, value] of Object.entries(post.environment)) {
      if (typeof value !== "string" || key === "" || key.includes("=") || key.includes("\0")) {
        throw new ExecRequestError(
          `Invalid exec request: bad environment entry ${JSON.stringify(key)}`,
        );
      }
      environment[key] = value;
    }
  }
  const user = post.user ?? 0;
  const group = post.group ?? 0;
  if (!isUint32(user) || !isUint32(group)) {
    throw new ExecRequestError(
      "Invalid exec request: user and group must be 32-bit unsigned integers",
    );
  }
  const width = post.width ?? 0;
  const height = post.height ?? 0;
  if (!Number.isInteger(width) || !Number.isInteger(height)) {
    throw new ExecRequestError("Invalid exec request: width and height must be integers");
  }
  if (post.cwd !== undefined && typeof post.cwd !== "string") {
    throw new ExecRequestError("Invalid exec request: cwd must be a string");
  }
  environment.PATH ??= DEFAULT_PATH;
  if (options.snapBin) environment.PATH = `${environment.PATH}:/snap/bin`;
  if (user === 0) {
    environment.HOME ??= "/root";
    environment.USER ??= "root";
  }
  environment.LANG ??= "C.UTF-8";
  const cwd = post.cwd || environment.HOME || "/";
  return {
    command,
    interactive: post.interactive === true,
    environment,
    width,
    height,
    user,
    group,
    cwd,
  };
}

/** A random secret (32 bytes, hex), as LXD's `RandomCryptoString`. */
function secret(): string {
  return Array.from(
    crypto.getRandomValues(new Uint8Array(32)),
    (b) => b.toString(16).padStart(2, "0"),
  )
    .join("");
}

/** Options of {@linkcode ExecSession}. */
export interface ExecSessionOptions {
  /**
   * Milliseconds for the client to connect every stream.
   * @default {5000} (lxd-agent)
   */
  connectTimeout?: number;
  /**
   * Milliseconds to keep reading a PTY after the command exited while output
   * still arrives (processes it left behind may hold the terminal).
   * @default {100}
   */
  drainIdle?: number;
  /**
   * Largest websocket message accepted from the client, in bytes.
   * @default {4194304}
   */
  maxMessageSize?: number;
  /**
   * Milliseconds a stream waits for the client's close frame before it is cut.
   * @default {2000}
   */
  closeTimeout?: number;
  logger?: Logger;
}

function delay(ms: number): Promise<"timeout"> {
  return new Promise((resolve) => setTimeout(() => resolve("timeout"), ms));
}

/** One exec: its streams' secrets, their websockets, and the command. */
export class ExecSession {
  readonly request: ExecRequest;
  /** Stream name ("0", "1", "2", "control") → secret. */
  readonly secrets = new Map<string, string>();
  #sockets = new Map<string, WebSocketConnection>();
  #allConnected = Promise.withResolvers<void>();
  #options: ExecSessionOptions;
  #logger: Logger;

  constructor(request: ExecRequest, options: ExecSessionOptions = {}) {
    this.request = request;
    this.#options = options;
    this.#logger = options.logger ?? silentLogger;
    const names = request.interactive ? ["0", "control"] : ["0", "1", "2", "control"];
    for (const name of names) this.secrets.set(name, secret());
  }

  /** The operation's metadata: `fds`, `command`, `environment`, `interactive`. */
  metadata(): Record<string, unknown> {
    return {
      fds: Object.fromEntries(this.secrets),
      command: this.request.command,
      environment: this.request.environment,
      interactive: this.request.interactive,
    };
  }

  /** The operation spec for `Operations.start()`. */
  spec(): OperationSpec {
    return {
      class: "websocket",
      description: "Executing command",
      metadata: this.metadata(),
      run: (operation, signal) => this.run(operation, signal),
      connect: (_operation, request) => this.connect(request),
    };
  }

  /** Answers `GET …/websocket?secret=`: the stream's websocket, 403 for an unknown secret. */
  connect(request: Request): Response {
    const given = new URL(request.url).searchParams.get("secret") ?? "";
    if (given === "") return errorResponse(400, "missing secret");
    const name = [...this.secrets].find(([, value]) => value === given)?.[0];
    if (name === undefined) return errorResponse(403, "Forbidden");
    if (this.#sockets.has(name)) return errorResponse(500, "Websocket number already connected");
    try {
      return acceptWebSocket(request, (ws) => {
        if (this.#sockets.has(name)) {
          ws.close(1008, "Websocket number already connected");
          return;
        }
        this.#sockets.set(name, ws);
        if (this.#sockets.size === this.secrets.size) this.#allConnected.resolve();
      }, {
        maxMessageSize: this.#options.maxMessageSize,
        closeTimeout: this.#options.closeTimeout,
      });
    } catch (error) {
      return errorResponse(400, (error as Error).message);
    }
  }

  /** Waits for the streams, runs the command, reports its status; closes everything. */
  async run(operation: AgentOperation, signal: AbortSignal): Promise<void> {
    try {
      const timeout = this.#options.connectTimeout ?? 5000;
      let timer: ReturnType<typeof setTimeout> | undefined;
      const outcome = await Promise.race([
        this.#allConnected.promise.then(() => "connected" as const),
        new Promise<"timeout">((resolve) => timer = setTimeout(() => resolve("timeout"), timeout)),
        new Promise<"aborted">((resolve) =>
          signal.addEventListener("abort", () => resolve("aborted"), { once: true })
        ),
      ]);
      clearTimeout(timer);
      if (outcome === "timeout") throw new Error("Timed out waiting for websockets to connect");
      if (outcome === "aborted") throw signal.reason;
      await this.#execute(operation, signal);
    } finally {
      for (const ws of this.#sockets.values()) ws.close(1000);
      // A stream connecting after the end finds the operation finished.
      this.#allConnected.resolve();
    }
  }

  async #execute(operation: AgentOperation, signal: AbortSignal): Promise<void> {
    const request = this.request;
    let pty: Pty | undefined;
    let child: ChildProcess;
    try {
      if (request.interactive) {
        const owner = effectiveIdentity(request.user, request.group);
        pty = Pty.open({
          uid: owner.uid,
          gid: owner.gid,
          size: request.width > 0 && request.height > 0
            ? { cols: request.width, rows: request.height }
            : undefined,
        });
      }
      child = spawnChild({
        command: request.command,
        env: request.environment,
        cwd: request.cwd,
        uid: request.user,
        gid: request.group,
        pty,
      });
    } catch (error) {
      pty?.close();
      const status = error instanceof SpawnError ? error.status : -1;
      operation.updateMetadata({ return: status });
      throw error;
    }
    const log = this.#logger.with({ pid: child.pid, interactive: request.interactive });
    log.debug("exec command started", { command: request.command });
    const onAbort = () => child.kill(SIGNALS.SIGKILL, { group: true });
    signal.addEventListener("abort", onAbort, { once: true });
    try {
      const control = this.#sockets.get("control")!;
      const controlDone = this.#control(control, child, pty, log);
      let output: Promise<unknown>;
      if (pty !== undefined) {
        const ws = this.#sockets.get("0")!;
        this.#ptyInput(ws, pty, child);
        output = this.#ptyOutput(ws, pty, child);
      } else {
        this.#pipeInput(this.#sockets.get("0")!, child.stdin!);
        output = Promise.all([
          this.#pipeOutput(this.#sockets.get("1")!, child.stdout!),
          this.#pipeOutput(this.#sockets.get("2")!, child.stderr!),
        ]);
      }
      const status = await child.status;
      pty?.releaseSlave();
      await output;
      log.debug("exec command ended", { status });
      // Not waiting for the client's close frame: LXD's client never reads its
      // control stream, so it would only come with the close timeout.
      control.close(1000);
      controlDone.catch(() => {});
      operation.updateMetadata({ return: status });
    } finally {
      signal.removeEventListener("abort", onAbort);
      child.kill(SIGNALS.SIGKILL);
      child.close();
      pty?.close();
    }
  }

  async #control(
    ws: WebSocketConnection,
    child: ChildProcess,
    pty: Pty | undefined,
    log: Logger,
  ): Promise<void> {
    for (;;) {
      const message = await ws.receive();
      if (message === null) {
        if (!child.exited) {
          log.warn("exec control websocket closed, killing the command");
          child.kill(SIGNALS.SIGKILL, { group: true });
        }
        return;
      }
      let command: InstanceExecControl;
      try {
        command = JSON.parse(new TextDecoder().decode(message.data));
      } catch {
        log.debug("ignoring a control message that is not JSON");
        continue;
      }
      if (command.command === "window-resize" && pty !== undefined) {
        const cols = Number(command.args?.width);
        const rows = Number(command.args?.height);
        try {
          pty.resize({ cols, rows });
        } catch (error) {
          log.debug("cannot resize the terminal", { error: (error as Error).message });
        }
      } else if (command.command === "signal") {
        const number = command.signal;
        if (Number.isInteger(number) && number! > 0 && number! < 65) {
          if (child.kill(number)) log.info("forwarded a signal", { signal: number });
        }
      }
    }
  }

  /**
   * Client → PTY. The end-of-input barrier is typed as the terminal's EOF
   * (^D) — lxd-agent closes the PTY instead, which hangs the command up and
   * cuts its output; a stream that closes without it hangs the terminal up (SIGHUP).
   */
  async #ptyInput(ws: WebSocketConnection, pty: Pty, child: ChildProcess): Promise<void> {
    for (;;) {
      const message = await ws.receive();
      if (message === null) break;
      try {
        if (message.type === "text") {
          await pty.master.write(new Uint8Array([0x04]));
          return;
        }
        await pty.master.write(message.data);
      } catch {
        break;
      }
    }
    child.kill(SIGNALS.SIGHUP);
  }

  /** PTY → client, until EIO, or until no more output comes shortly after the exit; then the barrier. */
  async #ptyOutput(ws: WebSocketConnection, pty: Pty, child: ChildProcess): Promise<void> {
    const buf = new Uint8Array(64 * 1024);
    const idle = this.#options.drainIdle ?? 100;
    const exited = child.status.then(() => "exited" as const);
    for (;;) {
      const n = pty.master.readNow(buf);
      if (n === null) break;
      if (n === undefined) {
        if (child.exited) {
          if (await Promise.race([pty.master.readable(), delay(idle)]) === "timeout") break;
        } else await Promise.race([pty.master.readable(), exited]);
        continue;
      }
      await ws.send(buf.subarray(0, n));
    }
    await ws.send("");
  }

  /** Client → stdin pipe; a barrier or a closed stream closes stdin. */
  async #pipeInput(ws: WebSocketConnection, stdin: FdStream): Promise<void> {
    for (;;) {
      const message = await ws.receive();
      if (message === null || message.type === "text") break;
      try {
        await stdin.write(message.data);
      } catch {
        break; // The command closed its stdin.
      }
    }
    stdin.close();
  }

  /** stdout/stderr pipe → client until EOF, then the barrier; output is read (and dropped) even when the client left. */
  async #pipeOutput(ws: WebSocketConnection, stream: FdStream): Promise<void> {
    const buf = new Uint8Array(64 * 1024);
    for (;;) {
      const n = await stream.read(buf);
      if (n === null) break;
      await ws.send(buf.subarray(0, n));
    }
    await ws.send("");
  }
}
