/**
 * `lxd-vsock-agent --status`: reads the state file the running agent rewrites
 * atomically and says, in a few human lines or JSON, the ring-buffer state it
 * last wrote, the host it uses, when it last connected or failed and why,
 * whether devlxd is served and whether the guest is Ready — or that no agent
 * is running. Exit code 0 only when CONNECTED.
 * Needs read permission on the state file, net on the liveness socket.
 * @module
 */

import type { StatusSnapshot } from "./agent_state.ts";
import { isAgentAlive, livenessPath } from "./liveness.ts";

export type StatusReport =
  | { running: true; status: StatusSnapshot }
  | { running: false; reason: string; status?: StatusSnapshot };

/**
 * Reads the state file and tells whether its agent is still running
 * (`isAlive`: by default, whether it answers on its liveness socket).
 */
export async function readStatus(
  stateFile: string,
  isAlive: () => Promise<boolean> = () => isAgentAlive(livenessPath(stateFile)),
): Promise<StatusReport> {
  let text: string;
  try {
    text = Deno.readTextFileSync(stateFile);
  } catch (error) {
    const why = error instanceof Deno.errors.NotFound
      ? "no state file"
      : `cannot read the state file: ${(error as Error).message}`;
    return { running: false, reason: `No agent is running (${why} at ${stateFile}).` };
  }
  let status: StatusSnapshot;
  try {
    status = JSON.parse(text);
    if (typeof status?.pid !== "number" || typeof status.state !== "string") {
      throw new Error("unexpected content");
    }
  } catch {
    return { running: false, reason: `No agent is running (${stateFile} is not a state file).` };
  }
  if (status.state === "STOPPED") {
    return {
      running: false,
      reason: `No agent is running (pid ${status.pid} stopped at ${status.updatedAt}).`,
      status,
    };
  }
  if (!(await isAlive())) {
    return {
      running: false,
      reason: `No agent is running (pid ${status.pid}, last seen ${status.updatedAt}, is gone).`,
      status,
    };
  }
  return { running: true, status };
}

/** The exit code of `--status`: 0 if CONNECTED, 1 otherwise. */
export function statusExitCode(report: StatusReport): number {
  return report.running && report.status.state === "CONNECTED" ? 0 : 1;
}

/** Formats a report as a few human lines, or as JSON. */
export function formatStatus(report: StatusReport, format: "text" | "json"): string {
  if (format === "json") {
    return JSON.stringify(
      report.running
        ? { running: true, ...report.status }
        : { running: false, reason: report.reason, last: report.status ?? null },
      null,
      2,
    );
  }
  if (!report.running) return report.reason;
  const s = report.status;
  const lines = [
    `State:      ${s.state} (pid ${s.pid}, written to ${s.serialPort ?? "no serial port"})`,
    `Host:       ${
      s.host === null
        ? "unknown (waiting for connection info)"
        : `vsock ${s.host.cid}:${s.host.port}`
    }${s.hostSource === null ? "" : ` from ${s.hostSource}`}`,
    `Connected:  ${s.lastConnected ?? "never"}`,
    `Last error: ${
      s.lastFailure === null ? "none" : `${s.lastFailure.at} ${s.lastFailure.reason}`
    }`,
    `devlxd:     ${
      s.devlxd.serving
        ? `serving ${s.devlxd.socket}`
        : s.devlxd.enabled
        ? `enabled, not serving${s.devlxd.error ? `: ${s.devlxd.error}` : ""}`
        : "off"
    }`,
    `Ready:      ${s.ready ? "yes" : "no"}`,
  ];
  return lines.join("\n");
}
