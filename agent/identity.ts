/**
 * The agent's identity, read from its config directory as LXD's
 * `lxd-agent-setup` lays it out from the config drive: `agent.crt`,
 * `agent.key` (the agent's TLS pair), `server.crt` (the host's per-instance
 * client certificate the agent API pins) and, when present, `agent.conf`
 * (the connection info known at VM start).
 * Needs read permission on the directory.
 * @module
 */

import { type ConnectionInfo, parseConnectionInfo } from "../shared/api.ts";

export interface Identity {
  /** PEM of the agent's certificate, presented on both of its TLS sides. */
  cert: string;
  /** PEM of the agent's private key. */
  key: string;
  /** PEM of the host's client certificate that the agent API requires. */
  serverCert: string;
  /** Connection info from `agent.conf`, when present and valid. */
  connection?: ConnectionInfo;
  /**
   * The host certificate and devlxd flag of an `agent.conf` written before the
   * host first ran (`"port": 0`): enough to serve devlxd and to follow a serial
   * `CONNECT` line, not to dial.
   */
  pendingHost?: { certificate: string; devlxd: boolean };
  /** Why `agent.conf` was present but ignored (main logs it). */
  connectionError?: string;
}

/** A missing, unreadable or malformed identity file; the message names it. */
export class IdentityError extends Error {
  override name = "IdentityError";
  constructor(readonly path: string, message: string, options?: ErrorOptions) {
    super(message, options);
  }
}

function reason(error: unknown): string {
  if (error instanceof Deno.errors.NotFound) return "no such file";
  if (error instanceof Deno.errors.PermissionDenied) return "permission denied";
  if (error instanceof Deno.errors.NotCapable) return "not allowed by Deno permissions";
  if (error instanceof Deno.errors.IsADirectory) return "is a directory";
  return (error as Error).message;
}

async function readPem(path: string, label: RegExp, what: string): Promise<string> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    throw new IdentityError(path, `Cannot read ${what} ${path}: ${reason(error)}`, {
      cause: error,
    });
  }
  if (!label.test(text)) {
    throw new IdentityError(path, `Cannot use ${what} ${path}: not a PEM ${what}`);
  }
  return text;
}

/**
 * Reads the identity files of `dir`. Throws `IdentityError` naming the first
 * file that is missing, unreadable or not PEM. A missing `agent.conf` is
 * normal; an unreadable or invalid one is reported in `connectionError`.
 */
export async function readIdentity(dir: string): Promise<Identity> {
  const cert = await readPem(
    `${dir}/agent.crt`,
    /-----BEGIN CERTIFICATE-----/,
    "certificate",
  );
  const key = await readPem(`${dir}/agent.key`, /-----BEGIN [A-Z ]*PRIVATE KEY-----/, "key");
  const serverCert = await readPem(
    `${dir}/server.crt`,
    /-----BEGIN CERTIFICATE-----/,
    "certificate",
  );
  const identity: Identity = { cert, key, serverCert };
  const confPath = `${dir}/agent.conf`;
  let text: string | undefined;
  try {
    text = await Deno.readTextFile(confPath);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) {
      identity.connectionError = `Cannot read ${confPath}: ${reason(error)}`;
    }
  }
  if (text !== undefined) {
    try {
      const value = JSON.parse(text);
      if (value?.port === 0) {
        const known = parseConnectionInfo({ ...value, port: 1 });
        identity.pendingHost = { certificate: known.certificate, devlxd: known.devlxd };
      } else {
        identity.connection = parseConnectionInfo(value);
      }
    } catch (error) {
      identity.connectionError = `Ignoring ${confPath}: ${(error as Error).message}`;
    }
  }
  return identity;
}
