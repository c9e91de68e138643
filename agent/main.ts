/**
 * `lxd-vsock-agent`: the in-VM agent of lxd-vsock, a drop-in for LXD's
 * `lxd-agent` on the devlxd side. The only module that writes to the console.
 *
 * Run: reads its identity from `--config-dir`, reports STARTED / CONNECTED /
 * STOPPED on the virtio-serial port, serves the agent API on vsock :8443 and
 * `/dev/lxd/sock`, tells systemd READY=1 once serving, and on SIGTERM/SIGINT
 * writes STOPPED, closes its sockets and exits 0.
 * `--status` prints the running agent's state (exit 0 only when CONNECTED).
 * Exit codes: 0 success, 1 failure, 2 usage error.
 *
 * Permissions: the "agent" set of deno.json (read, write, net, ffi, env,
 * sys=hostname,networkInterfaces: the addresses `GET /1.0/state` reports).
 * Commands run by `exec` are spawned through libc (posix_spawn), so no `run`.
 * @module
 */

import { createLogger } from "../shared/log.ts";
import { hybridGuestTransport, vsockTransport } from "../shared/vsock/mod.ts";
import { Agent } from "./agent.ts";
import { GuestAgentStatus } from "./agent_state.ts";
import { parseConfig, USAGE, UsageError, VERSION } from "./config.ts";
import { IdentityError, readIdentity } from "./identity.ts";
import { livenessPath, LivenessSocket } from "./liveness.ts";
import { formatStatus, readStatus, statusExitCode } from "./status_command.ts";
import { notifySystemd } from "./systemd_notify.ts";

/** Runs the command line; resolves to the exit code. */
export async function main(args: string[]): Promise<number> {
  let config;
  try {
    config = parseConfig(args, Deno.env.toObject());
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`lxd-vsock-agent: ${error.message}\n\n${USAGE}`);
    return 2;
  }
  if (config.command === "help") {
    console.log(USAGE);
    return 0;
  }
  if (config.command === "version") {
    console.log(`lxd-vsock-agent ${VERSION}`);
    return 0;
  }
  if (config.command === "status") {
    const report = await readStatus(config.stateFile);
    console.log(formatStatus(report, config.format));
    return statusExitCode(report);
  }

  const logger = createLogger({ level: config.logLevel });
  // A daemon logs a stray error and keeps serving rather than dying on it.
  globalThis.addEventListener("unhandledrejection", (event) => {
    event.preventDefault();
    logger.error("unhandled rejection", { error: event.reason });
  });
  globalThis.addEventListener("error", (event) => {
    event.preventDefault();
    logger.error("uncaught exception", { error: event.error ?? event.message });
  });
  let identity;
  try {
    identity = await readIdentity(config.configDir);
  } catch (error) {
    if (!(error instanceof IdentityError)) throw error;
    console.error(`lxd-vsock-agent: ${error.message}`);
    return 1;
  }
  if (identity.connectionError !== undefined) logger.warn(identity.connectionError);
  const stop = Promise.withResolvers<Deno.Signal>();
  const signals: Deno.Signal[] = ["SIGTERM", "SIGINT"];
  const onSignal = signals.map((signal) => {
    const handler = () => stop.resolve(signal);
    Deno.addSignalListener(signal, handler);
    return () => Deno.removeSignalListener(signal, handler);
  });

  const status = new GuestAgentStatus({
    stateFile: config.stateFile,
    devlxdSocket: config.devlxdSocket,
    version: VERSION,
    logger,
  });
  const agent = new Agent({
    identity,
    transport: config.transport.kind === "vsock"
      ? vsockTransport
      : hybridGuestTransport(config.transport.path),
    status,
    serialPorts: config.serialPorts,
    agentPort: config.agentPort,
    devlxdSocket: config.devlxdSocket,
    devlxdMode: config.devlxdMode,
    rewriteInterval: config.rewriteInterval,
    hostIdleTimeout: config.hostIdleTimeout,
    hostWait: config.hostWait,
    responseTimeout: config.responseTimeout,
    version: VERSION,
    logger,
  });
  try {
    await agent.start();
  } catch (error) {
    console.error(`lxd-vsock-agent: cannot start: ${(error as Error).message}`);
    await agent.stopped();
    await agent.close();
    onSignal.forEach((remove) => remove());
    return 1;
  }
  let liveness: LivenessSocket | undefined;
  try {
    liveness = new LivenessSocket(livenessPath(config.stateFile));
  } catch (error) {
    logger.warn("cannot open the liveness socket; --status will not see this agent", { error });
  }
  try {
    if (notifySystemd("READY=1")) logger.debug("told systemd READY=1");
  } catch (error) {
    logger.warn("cannot notify systemd", { error });
  }
  logger.info("agent started", { version: VERSION, pid: Deno.pid });

  const signal = await stop.promise;
  logger.info("stopping", { signal });
  await agent.stopped();
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([
    agent.close(),
    new Promise((resolve) => timer = setTimeout(resolve, 3000)),
  ]);
  clearTimeout(timer);
  await liveness?.close();
  onSignal.forEach((remove) => remove());
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
