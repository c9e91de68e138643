/**
 * The status monitor against a real QEMU (TCG) guest from tests/vm/qemu_guest.ts:
 * the guest writes state lines to a `-chardev ringbuf` virtserialport, the host
 * side reads them with QMP `ringbuf-read`. Skipped, with the reason printed,
 * where QEMU or the VM files of tests/vm/setup are missing.
 * @module
 */

import assert from "node:assert/strict";
import type { ConnectionInfo } from "../shared/api.ts";
import type { Instance, InstanceRuntime } from "../host/instance.ts";
import { Coordinator, type CoordinatorStore } from "../host/monitor/coordinator.ts";
import { readRingBuffer, type RingBufferRead } from "../host/monitor/qmp_client.ts";
import { createStatusWatcher, type StatusObservation } from "../host/monitor/status_watcher.ts";
import { qemuMissing, startSerialGuest } from "./vm/qemu_guest.ts";
import { requires } from "../shared/_requires.ts";

const noQemu = qemuMissing();

/** Resolves with the first value `poll()` returns that is not undefined, within `ms`. */
async function pollUntil<T>(
  ms: number,
  what: string,
  poll: () => Promise<T | undefined>,
): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await poll();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`${what}: nothing within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** `until()` resolves when `predicate()` holds, checked on every `notify()`, within `ms`. */
function notifier() {
  let check: (() => void) | undefined;
  return {
    notify: () => check?.(),
    until(predicate: () => boolean, ms: number, what: string): Promise<void> {
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          check = undefined;
          reject(new Error(`${what}: not within ${ms} ms`));
        }, ms);
        check = () => {
          if (!predicate()) return;
          clearTimeout(timer);
          check = undefined;
          resolve();
        };
        check();
      });
    },
  };
}

Deno.test(requires(noQemu, {
  name: "readRingBuffer() returns the last complete line of a real guest's ring (newest 16 bytes)",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "coord-ringbuf-" });
    try {
      await using guest = await startSerialGuest({
        dir,
        chardevId: "status",
        lines: ["STARTED\nCONNECTED\n"],
        socketPort: true,
      });
      const read: RingBufferRead = await pollUntil(
        60_000,
        "waiting for the guest's lines",
        async () => {
          const r = await readRingBuffer(guest.qmpPath, "status");
          return r.text === "" ? undefined : r;
        },
      );
      // One 18-byte write into a 16-byte ring: the oldest 2 bytes are gone.
      assert.deepEqual(read, { text: "ARTED\nCONNECTED\n", state: "CONNECTED" });
      assert.deepEqual(await readRingBuffer(guest.qmpPath, "status"), {
        text: "",
        state: undefined,
      });

      // The socket-backed port of the same guest echoes what the host writes:
      // the socket backend's writeLine() and line reader round-trip through QEMU.
      const seen: StatusObservation[] = [];
      const wait = notifier();
      await using watcher = createStatusWatcher({ kind: "socket", path: guest.socketPath! }, {
        onState: (o) => {
          seen.push(o);
          wait.notify();
        },
      }).start();
      await pollUntil(
        10_000,
        "socket port open",
        () => Promise.resolve(watcher.canWrite || undefined),
      );
      assert.equal(await watcher.writeLine("STARTED\n"), true);
      await wait.until(
        () => seen.some((o) => o.state === "STARTED" && o.source === "line"),
        30_000,
        "echoed STARTED on the socket port",
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
}));

Deno.test(requires(noQemu, {
  name: "Coordinator announces when a real guest writes STARTED and marks STOPPED when QEMU dies",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "coord-ringbuf-" });
    try {
      const guest = await startSerialGuest({ dir, lines: ["STARTED\n"] });
      try {
        const instance: Instance = {
          name: "vm1",
          cid: 42,
          status: { kind: "qmp", path: guest.qmpPath, chardev: "vserial", size: 16 },
          agentCert: "",
          clientCert: "",
          clientKey: "",
          config: {},
          devices: {},
          runtime: { agentState: "STOPPED", ready: false },
        };
        const changed = notifier();
        const store: CoordinatorStore = {
          list: () => [instance],
          get: (name) => name === "vm1" ? instance : undefined,
          setRuntime: (_name, patch: Partial<InstanceRuntime>) => {
            instance.runtime = { ...instance.runtime, ...patch };
            changed.notify();
          },
        };
        const announced: ConnectionInfo[] = [];
        const coordinator: Coordinator = new Coordinator({
          store,
          hostPort: () => 40404,
          serverCert: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
          intervals: { waiting: 100, stopped: 200, connected: 1000 },
          agentApi: {
            announce: (_i, info) => {
              announced.push(info);
              coordinator.agentSeen("vm1"); // the agent's validation request
              return Promise.resolve();
            },
            pushEvent: () => Promise.resolve(),
            probe: () => Promise.resolve({ pid: 1, metadata: {} }),
          },
        });
        await using _c = coordinator;
        coordinator.start();
        await changed.until(
          () => instance.runtime.agentState === "CONNECTED",
          60_000,
          "CONNECTED after the guest wrote STARTED",
        );
        assert.equal(announced.length, 1);
        assert.equal(announced[0].port, 40404);
        assert.equal(coordinator.snapshot().find((s) => s.name === "vm1")!.observed, "STARTED");
        assert.equal(coordinator.snapshot().find((s) => s.name === "vm1")!.channelUp, true);

        const stopped = changed.until(
          () => instance.runtime.agentState === "STOPPED",
          15_000,
          "STOPPED after QEMU died",
        );
        await guest.close();
        await stopped;
        assert.equal(coordinator.snapshot().find((s) => s.name === "vm1")!.channelUp, false);
      } finally {
        await guest.close();
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
}));
