/**
 * The guest's facts for `GET /1.0` of the agent API, as LXD 5.0.2's
 * lxd-agent reports them (`lxd-agent/api_1.0.go` `api10Get`): an
 * `api.Server` whose `environment` carries `kernel` (uname sysname),
 * `kernel_architecture` (uname machine), `kernel_version` (uname *release*,
 * as lxd-agent fills it), `server_name` (host name), `server_pid` and
 * `server_version`; every other field of LXD's `api.ServerEnvironment` is
 * present with its zero value, as Go encodes it. We also fill `os_name` and
 * `os_version` from `/etc/os-release` (lxd-agent 5.0.2 leaves them empty).
 *
 * `api_extensions` lists the extensions LXD's Go client checks before using
 * what this agent implements (`client/lxd_instances.go` `ExecInstance`):
 * `container_exec_user_group_cwd` (exec with `user`, `group` or `cwd` is
 * refused by the client without it), `container_exec_recording` (checked
 * when `record-output` is set; LXD records on its side, the agent ignores
 * the flag as lxd-agent does), `container_exec_signal_handling` and `metrics`.
 *
 * Permissions: `--allow-ffi` (uname), `--allow-read=/etc/os-release`.
 * @module
 */

import { kernelInfo } from "../shared/sys/fs.ts";

/** The API extensions this agent implements (names from LXD's `shared/version/api.go`). */
export const AGENT_API_EXTENSIONS = [
  "container_exec_recording",
  "container_exec_user_group_cwd",
  "container_exec_signal_handling",
  "metrics",
] as const;

/** `NAME` and `VERSION_ID` of an os-release file (quotes removed); "" when absent. */
export function parseOsRelease(text: string): { name: string; version: string } {
  const values = new Map<string, string>();
  for (const line of text.split("\n")) {
    const match = /^([A-Z_]+)=(.*)$/.exec(line.trim());
    if (match === null) continue;
    let value = match[2];
    if (/^".*"$/.test(value) || /^'.*'$/.test(value)) value = value.slice(1, -1);
    values.set(match[1], value.replace(/\\(.)/g, "$1"));
  }
  return { name: values.get("NAME") ?? "", version: values.get("VERSION_ID") ?? "" };
}

function readOsRelease(): { name: string; version: string } {
  for (const path of ["/etc/os-release", "/usr/lib/os-release"]) {
    try {
      return parseOsRelease(Deno.readTextFileSync(path));
    } catch {
      // Next candidate.
    }
  }
  return { name: "", version: "" };
}

/** Facts that do not change while the agent runs, read once. */
export interface GuestFacts {
  kernel: string;
  kernelArchitecture: string;
  kernelRelease: string;
  kernelBuild: string;
  osName: string;
  osVersion: string;
  hostname: string;
}

/** Reads the guest's facts (uname, os-release). */
export function readGuestFacts(): GuestFacts {
  const uname = kernelInfo();
  const os = readOsRelease();
  return {
    kernel: uname.sysname,
    kernelArchitecture: uname.machine,
    kernelRelease: uname.release,
    kernelBuild: uname.version,
    osName: os.name,
    osVersion: os.version,
    hostname: uname.nodename,
  };
}

/** `api.ServerEnvironment` as lxd-agent fills it, zero values included. */
export function serverEnvironment(
  facts: GuestFacts,
  pid: number,
  version: string,
): Record<string, unknown> {
  return {
    addresses: null,
    architectures: null,
    certificate: "",
    certificate_fingerprint: "",
    driver: "",
    driver_version: "",
    firewall: "",
    kernel: facts.kernel,
    kernel_architecture: facts.kernelArchitecture,
    kernel_features: null,
    kernel_version: facts.kernelRelease,
    lxc_features: null,
    os_name: facts.osName,
    os_version: facts.osVersion,
    project: "",
    // LXD's client treats a server as an agent only when this says "lxd-agent"
    // (client IsAgent()); otherwise it sends exec and state requests to
    // /1.0/containers/{name}/…, which no agent serves ("Error: not found").
    server: "lxd-agent",
    server_clustered: false,
    server_event_mode: "",
    server_name: facts.hostname,
    server_pid: pid,
    server_version: version,
    storage: "",
    storage_version: "",
    storage_supported_drivers: null,
  };
}
