/**
 * A tiny real QEMU guest for tests on this machine: a TCG VM (the kernel and initramfs
 * made by `tests/vm/setup`) whose only job is to write given lines to a virtio-serial
 * port backed by `-chardev ringbuf`, so a test can read them with QMP `ringbuf-read`
 * as the host daemon does with LXD's VMs.
 *
 * The guest boots in about 3–5 s under TCG; then it writes `lines` to the port, in
 * order, one `write()` each, at once, and waits. QMP is connectable as soon as
 * {@linkcode startSerialGuest} returns, before the lines are there: a caller polls
 * `ringbuf-read` (with a bounded deadline) until they appear.
 *
 * With `socketPort`, a second virtserialport backed by a unix socket server
 * (`-chardev socket,server=on,wait=off`) echoes back every byte the host writes to it.
 *
 * Owns one QEMU process (killed by pid on close). Needs `--allow-run`, `--allow-read`,
 * `--allow-write` (the dir), `--allow-net=unix:` (to connect to QMP), `--allow-env`
 * (PATH).
 * @module
 */

import { findProgram } from "../../shared/_requires.ts";

const CACHE = new URL("../../.cache/vm/", import.meta.url);
const KERNEL = new URL("vmlinux", CACHE).pathname;
const INITRD = new URL("initramfs.gz", CACHE).pathname;
const QEMU = "qemu-system-x86_64";

/** Options of {@linkcode startSerialGuest}. */
export interface SerialGuestOptions {
  /** Directory for `qmp.sock`, `serial.sock` and `console.log` (must exist). */
  dir: string;
  /** Id of the ring-buffer chardev, the `device` of `ringbuf-read`. @default "vserial" */
  chardevId?: string;
  /** Name of the ring-buffer virtserialport. @default "org.linuxcontainers.lxd" */
  portName?: string;
  /** Ring buffer size in bytes. @default 16 */
  ringbufSize?: number;
  /** Lines the guest writes to the port after boot, in order, one write each. @default [] */
  lines?: string[];
  /** Also add a socket-backed port that echoes back what the host writes. @default false */
  socketPort?: boolean;
  /** Name of the socket-backed port. @default "org.linuxcontainers.lxd.socket" */
  socketPortName?: string;
  /** Aborts the start (QEMU is killed). */
  signal?: AbortSignal;
}

/** Why {@linkcode startSerialGuest} cannot run here, or undefined when it can. */
export function qemuMissing(): string | undefined {
  if (Deno.build.os !== "linux" || Deno.build.arch !== "x86_64") {
    return `QEMU guests need linux/x86_64, not ${Deno.build.target}`;
  }
  try {
    if (findProgram(QEMU) === undefined) return `${QEMU} is not on PATH (run tests/vm/setup)`;
    for (const file of [KERNEL, INITRD]) {
      if (!isFile(file)) return `${file} is missing (run tests/vm/setup)`;
    }
  } catch (error) {
    return `cannot look for QEMU: ${(error as Error).message}`;
  }
  return undefined;
}

/** A running serial guest; close() (or `await using`) kills QEMU. */
export class SerialGuest implements AsyncDisposable {
  /** The QMP socket (`-qmp unix:…,server=on,wait=off`). */
  readonly qmpPath: string;
  /** The echoing socket-backed port's unix socket, when asked for. */
  readonly socketPath?: string;
  /** The guest's serial console (kernel and init messages). */
  readonly consolePath: string;
  readonly #child: Deno.ChildProcess;
  readonly #stderr: Promise<string>;
  #closed?: Promise<void>;

  /** @internal use {@linkcode startSerialGuest} */
  constructor(
    child: Deno.ChildProcess,
    paths: { qmpPath: string; socketPath?: string; consolePath: string },
  ) {
    this.#child = child;
    this.qmpPath = paths.qmpPath;
    this.socketPath = paths.socketPath;
    this.consolePath = paths.consolePath;
    this.#stderr = new Response(child.stderr).text().catch(() => "");
  }

  /** QEMU's process id. */
  get pid(): number {
    return this.#child.pid;
  }

  /** QEMU's exit status, once it has exited. */
  get status(): Promise<Deno.CommandStatus> {
    return this.#child.status;
  }

  /** What QEMU wrote to stderr (complete once it has exited). */
  stderr(): Promise<string> {
    return this.#stderr;
  }

  /** Kills QEMU (SIGTERM, then SIGKILL after 5 s) and waits for it. Idempotent. */
  close(): Promise<void> {
    this.#closed ??= (async () => {
      let exited = false;
      const status = this.#child.status.then(() => exited = true);
      try {
        this.#child.kill("SIGTERM");
      } catch { /* already gone */ }
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([status, new Promise((r) => timer = setTimeout(r, 5000))]);
      clearTimeout(timer);
      if (!exited) {
        try {
          this.#child.kill("SIGKILL");
        } catch { /* already gone */ }
        await status;
      }
      await this.#stderr;
    })();
    return this.#closed;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/**
 * Boots the guest and returns once its QMP socket accepts connections (within 20 s);
 * the guest writes `lines` a few seconds later. Throws if QEMU exits early.
 */
export async function startSerialGuest(options: SerialGuestOptions): Promise<SerialGuest> {
  const {
    dir,
    chardevId = "vserial",
    portName = "org.linuxcontainers.lxd",
    ringbufSize = 16,
    lines = [],
    socketPort = false,
    socketPortName = "org.linuxcontainers.lxd.socket",
    signal,
  } = options;
  for (const [what, value] of [["chardevId", chardevId], ["portName", portName]]) {
    if (!/^[A-Za-z0-9._-]+$/.test(value)) {
      throw new TypeError(`Invalid ${what} ${JSON.stringify(value)}: use [A-Za-z0-9._-]`);
    }
  }
  if (socketPort && !/^[A-Za-z0-9._-]+$/.test(socketPortName)) {
    throw new TypeError(`Invalid socketPortName ${JSON.stringify(socketPortName)}`);
  }
  const missing = qemuMissing();
  if (missing !== undefined) throw new Error(`Cannot start a QEMU guest: ${missing}`);
  signal?.throwIfAborted();

  const qmpPath = `${dir}/qmp.sock`;
  const socketPath = socketPort ? `${dir}/serial.sock` : undefined;
  const consolePath = `${dir}/console.log`;
  for (const path of [qmpPath, socketPath]) {
    if (path && new TextEncoder().encode(path).length > 107) {
      throw new RangeError(`Socket path too long for a unix socket: ${path}`);
    }
    if (path) await Deno.remove(path).catch(() => {});
  }
  const encoded = lines.filter((l) => l !== "").map((l) =>
    btoa(String.fromCharCode(...new TextEncoder().encode(l)))
  );
  const append = [
    "console=ttyS0 loglevel=0 panic=-1 mitigations=off rdinit=/init vmtest.mode=serial",
    `vmtest.port=${portName}`,
    `vmtest.lines=${encoded.join(",")}`,
    socketPort ? `vmtest.echo=${socketPortName}` : "",
  ].filter(Boolean).join(" ");
  if (append.length > 2000) {
    throw new RangeError(`lines too long for the kernel command line (${append.length} > 2000)`);
  }
  const args = [
    ...["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"],
    ...["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "256"],
    ...["-kernel", KERNEL, "-initrd", INITRD, "-append", append],
    ...["-serial", `file:${consolePath}`],
    ...["-device", "virtio-serial-pci,id=vser"],
    ...["-chardev", `ringbuf,id=${chardevId},size=${ringbufSize}`],
    ...["-device", `virtserialport,bus=vser.0,name=${portName},chardev=${chardevId}`],
    ...(socketPath
      ? [
        ...["-chardev", `socket,id=vsock0,path=${socketPath},server=on,wait=off`],
        ...["-device", `virtserialport,bus=vser.0,name=${socketPortName},chardev=vsock0`],
      ]
      : []),
    ...["-qmp", `unix:${qmpPath},server=on,wait=off`],
  ];
  const child = new Deno.Command(findProgram(QEMU)!, {
    args,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const guest = new SerialGuest(child, { qmpPath, socketPath, consolePath });
  try {
    let exited = false;
    child.status.then(() => exited = true);
    const deadline = Date.now() + 20_000;
    for (;;) {
      signal?.throwIfAborted();
      if (exited) {
        throw new Error(
          `QEMU exited during start (${(await child.status).code}): ${
            (await guest.stderr()).trim()
          }`,
        );
      }
      try {
        (await Deno.connect({ transport: "unix", path: qmpPath })).close();
        return guest;
      } catch (error) {
        if (
          !(error instanceof Deno.errors.NotFound || error instanceof Deno.errors.ConnectionRefused)
        ) {
          throw error;
        }
      }
      if (Date.now() > deadline) {
        throw new Error(`QEMU's QMP socket ${qmpPath} did not open in 20 s`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  } catch (error) {
    await guest.close();
    throw error;
  }
}

function isFile(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}
