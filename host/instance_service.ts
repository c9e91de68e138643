/**
 * The operations on instances that the admin API, the CLI (without a daemon)
 * and the devlxd API share: each one changes the registry, then tells
 * whoever listens: devlxd `config`/`device` events on the instance's topic
 * of `events`, and lifecycle events on `lifecycle`. Also where the
 * coordinator's agent state is recorded (`applyRuntime`). Registering an instance
 * generates its key pairs and writes its config drive.
 * Needs read/write permission on the state directory.
 * @module
 */

import { join } from "node:path";
import { isGuestVisibleKey } from "../shared/api.ts";
import type { DevlxdEvent } from "../shared/api.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import {
  agentConf,
  canonicalPath,
  checkNewDriveDir,
  isWithin,
  removeConfigDrive,
  writeConfigDrive,
} from "./config_drive.ts";
import type { EventHub, LifecycleEvent } from "./event_hub.ts";
import type { Instance, InstanceRuntime } from "./instance.ts";
import type { InstanceIdentity } from "./instance_validation.ts";
import type { Registry } from "./registry.ts";
import { defaultConfigDrive, type StatePaths } from "./state_dir.ts";

/** A PEM certificate and its private key (the shape `shared/tls` uses). */
export interface KeyPair {
  cert: string;
  key: string;
}

/** Makes a key pair; `shared/tls`'s `generateKeyPair` in production. */
export type KeyPairGenerator = (options: { commonName: string }) => Promise<KeyPair>;

/** What `add()` needs. */
export interface AddInstance extends InstanceIdentity {
  /** Where to write the config drive. @default <state-dir>/instances/<name>/config */
  configDrive?: string;
}

export interface InstanceServiceOptions {
  registry: Registry;
  paths: StatePaths;
  generateKeyPair: KeyPairGenerator;
  /** The host server certificate (PEM) written to `agent.conf`. */
  serverCert: string;
  /** The vsock port the daemon listens on; 0 when it does not run. @default () => 0 */
  port?: () => number;
  /** devlxd events by instance name. */
  events?: EventHub<DevlxdEvent>;
  /** Lifecycle events by instance name. */
  lifecycle?: EventHub<LifecycleEvent>;
  logger?: Logger;
  /** Clock. @default () => new Date() */
  now?: () => Date;
}

/** An instance as shown outside the host: the client key never leaves. */
export type PublicInstance = Omit<Instance, "clientKey">;

/** Strips the host's private key from an instance. */
export function publicInstance(instance: Instance): PublicInstance {
  const { clientKey: _, ...rest } = instance;
  return rest;
}

export class InstanceService {
  readonly registry: Registry;
  readonly paths: StatePaths;
  readonly events?: EventHub<DevlxdEvent>;
  readonly lifecycle?: EventHub<LifecycleEvent>;
  #generate: KeyPairGenerator;
  #serverCert: string;
  #port: () => number;
  #logger: Logger;
  #now: () => Date;
  #adding: Promise<unknown> = Promise.resolve();

  constructor(options: InstanceServiceOptions) {
    this.registry = options.registry;
    this.paths = options.paths;
    this.events = options.events;
    this.lifecycle = options.lifecycle;
    this.#generate = options.generateKeyPair;
    this.#serverCert = options.serverCert;
    this.#port = options.port ?? (() => 0);
    this.#logger = options.logger ?? silentLogger;
    this.#now = options.now ?? (() => new Date());
  }

  #lifecycle(
    instance: string,
    action: LifecycleEvent["action"],
    metadata: LifecycleEvent["metadata"],
  ): void {
    this.lifecycle?.publish(instance, {
      timestamp: this.#now().toISOString(),
      type: "lifecycle",
      instance,
      action,
      metadata,
    });
  }

  list(): Instance[] {
    return this.registry.list();
  }

  /** The instance or RegistryError `NOT_FOUND`. */
  get(name: string): Instance {
    return this.registry.require(name);
  }

  /**
   * Registers an instance: checks it (name, CID, paths, config) before
   * anything else, generates the agent pair and the host's client pair,
   * writes the config drive, then stores it. Adds run one at a time.
   */
  add(spec: AddInstance): Promise<{ instance: Instance; configDrive: string }> {
    const run = this.#adding.then(() => this.#add(spec));
    this.#adding = run.catch(() => {});
    return run;
  }

  async #add(spec: AddInstance): Promise<{ instance: Instance; configDrive: string }> {
    this.registry.checkNew(spec);
    // Common names double as SAN DNS names, which Go clients (LXD) verify
    // against: keep them valid host names (labels of at most 63 characters).
    const agent = await this.#generate({ commonName: `${spec.name}.agent.lxd-vsock` });
    const client = await this.#generate({ commonName: `${spec.name}.host.lxd-vsock` });
    const configDrive = await this.#checkDrive(spec);
    await writeConfigDrive(configDrive, {
      agentCert: agent.cert,
      agentKey: agent.key,
      clientCert: client.cert,
      info: agentConf(this.#serverCert, this.#port()),
    });
    let instance: Instance;
    try {
      instance = this.registry.add({
        ...spec,
        configDrive,
        agentCert: agent.cert,
        clientCert: client.cert,
        clientKey: client.key,
      });
    } catch (error) {
      // The drive was new or empty: nothing but what we just wrote goes.
      await removeConfigDrive(configDrive);
      if (spec.configDrive === undefined) {
        await Deno.remove(join(this.paths.instances, spec.name), { recursive: true }).catch(
          () => {},
        );
      }
      throw error;
    }
    this.#logger.info("instance added", {
      instance: instance.name,
      cid: instance.cid,
      configDrive,
    });
    this.#lifecycle(instance.name, "instance-added", {});
    return { instance, configDrive };
  }

  /**
   * Where a new instance's config drive goes: the default place, or
   * `spec.configDrive` when it is an absolute path outside the state
   * directory, no other instance's drive (nor inside or around one), and a new
   * or empty directory. Throws a TypeError saying which rule failed, before
   * anything is written. Returns the canonical path.
   */
  async #checkDrive(spec: AddInstance): Promise<string> {
    const fallback = defaultConfigDrive(this.paths, spec.name);
    if (spec.configDrive === undefined) return await canonicalPath(fallback);
    if (typeof spec.configDrive !== "string" || !spec.configDrive.startsWith("/")) {
      throw new TypeError("Invalid config drive: expected an absolute path");
    }
    const drive = await canonicalPath(spec.configDrive);
    if (drive === await canonicalPath(fallback)) return drive;
    if (isWithin(drive, await canonicalPath(this.paths.dir))) {
      throw new TypeError(
        `Invalid config drive ${drive}: it is inside the state directory (omit --config-drive for the default place)`,
      );
    }
    for (const other of this.registry.list()) {
      const theirs = await canonicalPath(
        other.configDrive ?? defaultConfigDrive(this.paths, other.name),
      );
      if (isWithin(drive, theirs) || isWithin(theirs, drive)) {
        throw new TypeError(
          `Invalid config drive ${drive}: it is the config drive of instance ${other.name}` +
            (drive === theirs ? "" : ` (or holds it: ${theirs})`),
        );
      }
    }
    await checkNewDriveDir(drive);
    return drive;
  }

  /**
   * Removes an instance, ends its event streams and deletes its config drive
   * (the recorded one, or the default place): `driveKept` says why a drive
   * was left in place.
   */
  async remove(name: string): Promise<Instance & { driveKept?: string }> {
    const instance = this.registry.remove(name);
    this.events?.closeTopic(name);
    const drive = instance.configDrive ?? defaultConfigDrive(this.paths, name);
    const kept = await removeConfigDrive(drive);
    await Deno.remove(join(this.paths.instances, name), { recursive: true }).catch(() => {});
    this.#logger.info("instance removed", { instance: name, configDrive: drive, kept });
    this.#lifecycle(name, "instance-removed", {});
    return kept === undefined ? instance : { ...instance, driveKept: kept };
  }

  #configEvent(name: string, key: string, old: string, value: string): void {
    if (old === value) return;
    if (isGuestVisibleKey(key)) {
      this.events?.publish(name, {
        timestamp: this.#now().toISOString(),
        type: "config",
        metadata: { key, old_value: old, value },
      });
    }
    // Turning devlxd off ends the streams a guest holds open.
    if (key === "security.devlxd" && value === "false") this.events?.closeTopic(name);
    this.#logger.info("config changed", { instance: name, key });
    this.#lifecycle(name, "config-changed", { key, value });
  }

  /** Sets a config key; guest-visible changes reach the instance's event streams. */
  setConfig(name: string, key: string, value: string): void {
    const { old } = this.registry.setConfig(name, key, value);
    this.#configEvent(name, key, old, value);
  }

  /** Unsets a config key (no-op when unset). Returns whether it was set. */
  unsetConfig(name: string, key: string): boolean {
    const old = this.registry.unsetConfig(name, key);
    if (old === undefined) return false;
    this.#configEvent(name, key, old, "");
    return true;
  }

  #deviceEvent(
    name: string,
    device: string,
    action: "added" | "removed",
    config: Record<string, string>,
  ) {
    this.events?.publish(name, {
      timestamp: this.#now().toISOString(),
      type: "device",
      metadata: { name: device, action, config },
    });
    this.#logger.info(`device ${action}`, { instance: name, device });
    this.#lifecycle(name, action === "added" ? "device-added" : "device-removed", { device });
  }

  addDevice(name: string, device: string, config: Record<string, string>): void {
    const stored = this.registry.addDevice(name, device, config);
    this.#deviceEvent(name, device, "added", stored);
  }

  removeDevice(name: string, device: string): void {
    const config = this.registry.removeDevice(name, device);
    this.#deviceEvent(name, device, "removed", config);
  }

  /** Stores the guest's Ready state durably (PATCH /1.0). */
  setReady(name: string, ready: boolean): void {
    const before = this.registry.require(name).runtime.ready;
    if (before === ready) return;
    this.registry.updateRuntime(name, { ready });
    this.#logger.info("ready changed", { instance: name, ready });
    this.#lifecycle(name, "ready", { ready });
  }

  /**
   * Durably applies the agent runtime fields the coordinator decided (agent
   * state, change time, last error, last seen; it is their one writer),
   * publishing a lifecycle event when the agent state changed. Unknown
   * instances are ignored (removed meanwhile).
   */
  applyRuntime(name: string, patch: Partial<InstanceRuntime>): void {
    const before = this.registry.get(name)?.runtime;
    if (!before) return;
    const after = this.registry.updateRuntime(name, patch);
    if (after.agentState !== before.agentState) {
      this.#logger.debug("agent state recorded", { instance: name, state: after.agentState });
      this.#lifecycle(name, "agent-state", {
        agentState: after.agentState,
        error: after.lastError,
      });
    }
  }

  /** Notes an authenticated agent request (cheap; see Registry.recordSeen). */
  recordSeen(name: string): void {
    this.registry.recordSeen(name, this.#now());
  }
}
