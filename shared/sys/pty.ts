/**
 * `Pty`: a pseudo-terminal pair allocated through libc (`posix_openpt`,
 * `grantpt`, `unlockpt`, `ptsname_r`), with the window size set by the
 * `TIOCSWINSZ` ioctl on the master. The slave is opened by the child itself
 * (a `posix_spawn` file action after `POSIX_SPAWN_SETSID`, see `child.ts`),
 * which makes the PTY the child's controlling terminal; the parent also keeps
 * one slave fd open (`O_NOCTTY`) until the child exits, as lxd-agent does, so
 * the master does not read EIO before the child opened its side.
 *
 * Owns: the master fd (an {@linkcode FdStream}) and the parent's slave fd;
 * `close()` releases both. Permissions: `--allow-ffi`.
 * @module
 */

import * as libc from "../vsock/_libc.ts";
import { socketError } from "../vsock/socket_error.ts";
import { FdStream } from "./fd_stream.ts";

/** A terminal size in character cells. */
export interface WindowSize {
  cols: number;
  rows: number;
}

/** Options of {@linkcode Pty.open}. */
export interface PtyOptions {
  /** Owner of the slave (LXD chowns it to the command's user). @default {undefined} (unchanged) */
  uid?: number;
  /** @default {undefined} (unchanged) */
  gid?: number;
  /** Initial size. @default {{ cols: 80, rows: 25 }} (LXD's default) */
  size?: WindowSize;
}

/** A PTY pair: `master` is what the parent reads and writes, `path` names the slave. */
export class Pty implements Disposable {
  readonly master: FdStream;
  readonly path: string;
  #slaveFd: number;

  private constructor(master: FdStream, path: string, slaveFd: number) {
    this.master = master;
    this.path = path;
    this.#slaveFd = slaveFd;
  }

  /** Allocates a PTY pair. Throws a `SocketError` naming the failing call. */
  static open(options: PtyOptions = {}): Pty {
    const fd = libc.posixOpenpt(libc.O_RDWR | libc.O_NOCTTY | libc.O_CLOEXEC | libc.O_NONBLOCK);
    if (fd < 0) throw socketError("posix_openpt", -fd, "Cannot allocate a PTY");
    let slave = -1;
    try {
      let r = libc.grantpt(fd);
      if (r < 0) throw socketError("grantpt", -r, "Cannot allocate a PTY");
      r = libc.unlockpt(fd);
      if (r < 0) throw socketError("unlockpt", -r, "Cannot allocate a PTY");
      const path = libc.ptsname(fd);
      if (typeof path === "number") throw socketError("ptsname_r", -path, "Cannot allocate a PTY");
      const own = options.uid === undefined || options.uid === libc.getuid();
      const ownGroup = options.gid === undefined || options.gid === libc.getgid();
      if (!own || !ownGroup) {
        r = libc.chown(path, options.uid ?? -1 >>> 0, options.gid ?? -1 >>> 0);
        if (r < 0) throw socketError("chown", -r, `Cannot give ${path} to the command's user`);
      }
      slave = libc.openPath(path, libc.O_RDWR | libc.O_NOCTTY | libc.O_CLOEXEC);
      if (slave < 0) throw socketError("open", -slave, `Cannot open ${path}`);
      const pty = new Pty(new FdStream(fd, "the PTY master"), path, slave);
      pty.resize(options.size ?? { cols: 80, rows: 25 });
      return pty;
    } catch (error) {
      if (slave >= 0) libc.close(slave);
      libc.close(fd);
      throw error;
    }
  }

  /** Sets the window size (the foreground process group gets SIGWINCH). */
  resize(size: WindowSize): void {
    if (!Number.isInteger(size.cols) || !Number.isInteger(size.rows)) {
      throw new TypeError(`Invalid window size ${size.cols}x${size.rows}`);
    }
    if (size.cols < 0 || size.rows < 0 || size.cols > 0xffff || size.rows > 0xffff) {
      throw new RangeError(`Window size out of range: ${size.cols}x${size.rows}`);
    }
    // struct winsize { unsigned short ws_row, ws_col, ws_xpixel, ws_ypixel; }
    const winsize = new Uint16Array([size.rows, size.cols, 0, 0]);
    const r = libc.ioctl(this.master.fd, libc.TIOCSWINSZ, new Uint8Array(winsize.buffer));
    if (r < 0) throw socketError("ioctl", -r, "Cannot set the PTY's window size");
  }

  /** The window size now. */
  size(): WindowSize {
    const winsize = new Uint16Array(4);
    const r = libc.ioctl(this.master.fd, libc.TIOCGWINSZ, new Uint8Array(winsize.buffer));
    if (r < 0) throw socketError("ioctl", -r, "Cannot read the PTY's window size");
    return { rows: winsize[0], cols: winsize[1] };
  }

  /** Closes the parent's slave fd (once the child runs or has exited): the master then reads EOF when the last user goes. */
  releaseSlave(): void {
    if (this.#slaveFd < 0) return;
    libc.close(this.#slaveFd);
    this.#slaveFd = -1;
  }

  /** Closes the slave fd and the master. Idempotent. */
  close(): void {
    this.releaseSlave();
    this.master.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
