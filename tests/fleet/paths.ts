/**
 * Where the fleet simulator puts instance `i`'s sockets and files (short
 * paths: a unix socket path holds at most 107 bytes). Needs no permissions.
 * @module
 */

import { join } from "node:path";

/** Paths of one simulated instance. */
export interface FleetPaths {
  name: string;
  cid: number;
  /** Hybrid vsock `uds_path` (host listens on `<hybrid>_<port>`, agent on `<hybrid>`). */
  hybrid: string;
  /** The QMP socket the host polls. */
  qmp: string;
  /** The guest end of the serial port (the agent connects). */
  serialGuest: string;
  devlxd: string;
  stateFile: string;
  /** The config drive the host wrote (identity and agent.conf). */
  configDrive: string;
}

/** The directories under the fleet directory that {@linkcode fleetPaths} points into. */
export const FLEET_SUBDIRS = ["v", "q", "s", "d", "a"];

export function fleetPaths(dir: string, stateDir: string, i: number): FleetPaths {
  const name = `vm${i}`;
  return {
    name,
    cid: 1000 + i,
    hybrid: join(dir, "v", `${i}`),
    qmp: join(dir, "q", `${i}`),
    serialGuest: join(dir, "s", `${i}`),
    devlxd: join(dir, "d", `${i}`),
    stateFile: join(dir, "a", `${i}`, "state.json"),
    configDrive: join(stateDir, "instances", name, "config"),
  };
}
