/**
 * One process of the fleet simulator: for a slice of the fleet's instances it
 * plays both the VMM and the guest.
 *
 * - VMM stand-in: per instance a socket-backed serial port (the agent's end)
 *   whose bytes land in a 16-byte QEMU-like ring buffer, read by the host over
 *   a fake QMP socket (`ringbuf-read`, `tests/fakes/qmp.ts`). A stand-in
 *   because 1,000 real QEMUs do not fit in this machine (2 cores, 24 GiB).
 * - Guest: per instance one real `Agent` (agent/agent.ts, with its own
 *   certificate from the config drive the host wrote, its own serial channel,
 *   agent API listener, `/dev/lxd/sock` and connections to the host) over the
 *   hybrid unix transport, with the production periods (rewrite 5 s, probe 3 s).
 * - Guest processes, on request: one `/1.0/events` follower per instance on
 *   its devlxd socket.
 *
 * Control: JSON lines. Reads commands on stdin (`subscribe`, `counters`,
 * `divert`, `stop`); writes `{"type":"ready"}`, `{"type":"state","i":…,"state":…,"t":…}`
 * on every agent transition, `{"type":"subscribed"}`, `{"type":"event","i":…,
 * "t":…}` for each `user.bench` config event a follower received, and
 * `{"type":"counters",…}`. Times `t` are `Date.now()`-based with µs fraction.
 *
 * Usage (by tests/fleet/fleet.ts): deno run -P=test tests/fleet/worker.ts
 *   <dir> <state-dir> <first index> <count>
 * Permissions: the "test" set.
 * @module
 */

import "reflect-metadata";
import type { Buffer } from "node:buffer";
import { Agent } from "../../agent/agent.ts";
import { GuestAgentStatus } from "../../agent/agent_state.ts";
import { readIdentity } from "../../agent/identity.ts";
import { httpRequest } from "../../shared/http/mod.ts";
import {
  connectUnix,
  hybridGuestTransport,
  listenUnix,
  type Transport,
} from "../../shared/vsock/mod.ts";
import { FakeQmpServer, FakeRingBuffer } from "../fakes/qmp.ts";
import { fleetPaths } from "./paths.ts";

const encoder = new TextEncoder();
const now = () => performance.timeOrigin + performance.now();

function send(message: Record<string, unknown>): void {
  Deno.stdout.writeSync(encoder.encode(JSON.stringify(message) + "\n"));
}

/** The VMM end of a socket-backed serial port feeding a ring buffer. */
class SerialToRing {
  #listener: Deno.UnixListener;
  #conns = new Set<Deno.UnixConn>();
  #loop: Promise<void>;

  constructor(path: string, ring: FakeRingBuffer) {
    const listener = Deno.listen({ transport: "unix", path });
    this.#listener = listener;
    this.#loop = (async () => {
      try {
        for await (const conn of listener) {
          this.#conns.add(conn);
          (async () => {
            const buf = new Uint8Array(256);
            const decoder = new TextDecoder();
            try {
              for (let n; (n = await conn.read(buf)) !== null;) {
                ring.write(decoder.decode(buf.subarray(0, n)));
              }
            } catch {
              // closed
            }
            this.#conns.delete(conn);
          })();
        }
      } catch {
        // closed
      }
    })();
  }

  async close(): Promise<void> {
    try {
      this.#listener.close();
    } catch {
      // closed
    }
    for (const c of this.#conns) {
      try {
        c.close();
      } catch {
        // closed
      }
    }
    await this.#loop;
  }
}

interface Sim {
  agent: Agent;
  qmp: FakeQmpServer;
  serial: SerialToRing;
  follower?: { socket: { destroy(): void } };
}

async function main(): Promise<void> {
  const [dir, stateDir, firstText, countText, eventsMode = "pull"] = Deno.args;
  const first = Number(firstText);
  const count = Number(countText);
  const sims: Sim[] = [];
  let connects = 0;
  // While `divert` is on, the agents' dials go to a local listener instead of
  // the host (only used while every agent is idle, when the dials are their
  // liveness probes): the host's idle CPU without the probes.
  let divert = false;
  const dummyPath = `${dir}/dummy-${first}`;
  const dummy = listenUnix(dummyPath);
  (async () => {
    try {
      for await (const socket of dummy) socket.destroy();
    } catch {
      // closed
    }
  })();
  const counting = (inner: Transport): Transport => ({
    listen: (port) => inner.listen(port),
    connect: (cid, port, options) => {
      connects++;
      return divert ? connectUnix(dummyPath, options) : inner.connect(cid, port, options);
    },
  });

  for (let i = first; i < first + count; i++) {
    const p = fleetPaths(dir, stateDir, i);
    const ring = new FakeRingBuffer(16);
    const qmp = new FakeQmpServer(p.qmp, { rings: { vserial: ring } });
    const serial = new SerialToRing(p.serialGuest, ring);
    const identity = await readIdentity(p.configDrive);
    const status = new GuestAgentStatus({ stateFile: p.stateFile, devlxdSocket: p.devlxd });
    status.onTransition((state) => send({ type: "state", i, state, t: now() }));
    const agent = new Agent({
      identity,
      transport: counting(hybridGuestTransport(p.hybrid)),
      status,
      serialPorts: [p.serialGuest],
      agentPort: 8443,
      devlxdSocket: p.devlxd,
      pullEvents: eventsMode !== "push",
    });
    sims.push({ agent, qmp, serial });
  }
  /** One guest process following `/1.0/events` on instance `i`'s devlxd socket. */
  const follow = async (sim: Sim, i: number): Promise<void> => {
    const socket = await connectUnix(fleetPaths(dir, stateDir, i).devlxd, {
      timeout: 10_000,
    });
    let response: Response;
    try {
      response = await httpRequest(socket, new Request("http://lxd/1.0/events"), {
        timeout: 30_000,
      });
    } catch (error) {
      socket.destroy();
      throw error;
    }
    if (response.status !== 200 || response.body === null) {
      socket.destroy();
      throw new Error(`events on instance ${i}: ${response.status}`);
    }
    sim.follower = { socket };
    (async () => {
      const decoder = new TextDecoder();
      try {
        for await (const part of response.body!) {
          if (decoder.decode(part as Uint8Array | Buffer).includes("user.bench")) {
            send({ type: "event", i, t: now() });
          }
        }
      } catch {
        // stream ended
      }
    })();
  };

  // Start in small batches: a VM fleet does not boot in one instant either.
  for (let k = 0; k < sims.length; k += 10) {
    await Promise.all(sims.slice(k, k + 10).map((s) => s.agent.start()));
  }
  send({ type: "ready" });

  const lines = Deno.stdin.readable.pipeThrough(new TextDecoderStream());
  let buffer = "";
  for await (const chunk of lines) {
    buffer += chunk;
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const command = JSON.parse(buffer.slice(0, nl));
      buffer = buffer.slice(nl + 1);
      if (command.type === "subscribe") {
        let failed = 0;
        await Promise.all(sims.map(async (sim, k) => {
          const i = first + k;
          try {
            await follow(sim, i);
          } catch (error) {
            failed++;
            send({ type: "error", error: `events on instance ${i}: ${(error as Error).message}` });
          }
        }));
        send({ type: "subscribed", failed });
      } else if (command.type === "divert") {
        divert = command.on === true;
        send({ type: "diverted" });
      } else if (command.type === "counters") {
        const polls = sims.reduce((sum, s) => sum + s.qmp.commands.length, 0);
        send({ type: "counters", polls, connects });
      } else if (command.type === "stop") {
        for (const sim of sims) sim.follower?.socket.destroy();
        await Promise.all(sims.map(async (s) => {
          await s.agent.stopped();
          await s.agent.close();
          await s.serial.close();
          await s.qmp.close();
        }));
        dummy.close();
        send({ type: "stopped" });
        return;
      }
    }
  }
}

if (import.meta.main) {
  globalThis.addEventListener("unhandledrejection", (event) => {
    event.preventDefault();
    send({ type: "error", error: String(event.reason?.stack ?? event.reason) });
  });
  await main();
  Deno.exit(0);
}
