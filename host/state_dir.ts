/**
 * The host's state directory: where it is by default, what lives in it, and
 * creating it owner-only (0700), refusing one another user owns. Needs
 * read/write permission on the directory and `--allow-sys=uid`.
 * @module
 */

import { join } from "node:path";

/** Where things live inside a state directory. */
export interface StatePaths {
  dir: string;
  /** The SQLite registry. */
  registry: string;
  /** The admin API's unix socket (mode 0600). */
  adminSocket: string;
  /** The host's server certificate and key, presented to agents. */
  serverCert: string;
  serverKey: string;
  /** Default image directory for `/1.0/images/{fingerprint}/export`. */
  images: string;
  /** Per-instance directories (`instances/<name>/config` is the default config drive). */
  instances: string;
}

/** The paths of the state directory `dir`. */
export function statePaths(dir: string): StatePaths {
  return {
    dir,
    registry: join(dir, "registry.db"),
    adminSocket: join(dir, "admin.sock"),
    serverCert: join(dir, "server.crt"),
    serverKey: join(dir, "server.key"),
    images: join(dir, "images"),
    instances: join(dir, "instances"),
  };
}

/** The default config drive directory of an instance. */
export function defaultConfigDrive(paths: StatePaths, name: string): string {
  return join(paths.instances, name, "config");
}

/**
 * Default state directory: `$LXD_VSOCK_STATE_DIR` if set; `/var/lib/lxd-vsock`
 * for root; else `$XDG_STATE_HOME/lxd-vsock`, or `~/.local/state/lxd-vsock`.
 */
export function defaultStateDir(
  env: { uid: number; vars: Record<string, string | undefined> },
): string {
  const { vars } = env;
  if (vars.LXD_VSOCK_STATE_DIR) return vars.LXD_VSOCK_STATE_DIR;
  if (env.uid === 0) return "/var/lib/lxd-vsock";
  if (vars.XDG_STATE_HOME?.startsWith("/")) return join(vars.XDG_STATE_HOME, "lxd-vsock");
  if (vars.HOME) return join(vars.HOME, ".local", "state", "lxd-vsock");
  return join("/tmp", `lxd-vsock-${env.uid}`);
}

/** A state directory or admin socket that another user owns. */
export class OwnershipError extends Error {
  override name = "OwnershipError";
}

/** This process's user id. */
export function currentUid(): number {
  return Deno.uid() ?? -1;
}

/**
 * Throws {@linkcode OwnershipError} unless `path` (not followed if a link)
 * belongs to this process's user: another user could swap `admin.sock` or
 * read what goes through it.
 */
export async function checkOwner(path: string, what: string, verb = "Refusing"): Promise<void> {
  const info = await Deno.lstat(path);
  const uid = currentUid();
  if (info.uid !== null && info.uid !== uid) {
    throw new OwnershipError(
      `${verb} ${what} ${path}: it is owned by uid ${info.uid}, not by this process's user (uid ${uid}); ` +
        "another user could swap its admin socket or read its traffic. Give it to this user (chown) or use another --state-dir.",
    );
  }
}

/**
 * Creates the state directory (and parents) if needed, refuses one another
 * user owns ({@linkcode OwnershipError}), and makes it 0700.
 */
export async function prepareStateDir(dir: string): Promise<StatePaths> {
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  await checkOwner(await Deno.realPath(dir), "the state directory");
  await Deno.chmod(dir, 0o700);
  return statePaths(dir);
}
