/**
 * The instance registry, the host's source of truth: one SQLite file (through
 * the built-in `node:sqlite`) in the state directory, holding every
 * instance's identity, certificates, config, devices and runtime state.
 *
 * Durability: WAL journal with `synchronous=FULL`, so every committed change
 * is fsynced before the call returns and survives a process crash
 * (`kill -9`) and a power loss. The one exception is `recordSeen()`, called
 * on every authenticated agent request: it updates memory at once and the
 * file at most once per {@linkcode SEEN_PERSIST_INTERVAL_MS} per instance
 * (and on `close()`), so a request storm costs no fsyncs.
 *
 * Lock: the connection runs in `locking_mode=EXCLUSIVE` and takes the write
 * lock with `BEGIN IMMEDIATE` and no busy timeout at open, then holds it until
 * `close()`. A second process (daemon or CLI) on the same state directory
 * fails at once with {@linkcode RegistryError} `LOCKED`. The kernel drops the
 * lock when the holder dies, even by SIGKILL.
 *
 * Every mutation validates its input before touching the file and runs in one
 * transaction: a rejected change leaves the store as it was.
 *
 * Owns the database handle. Needs read and write permission on the file.
 * @module
 */

import { DatabaseSync } from "node:sqlite";
import { type Instance, type InstanceRuntime, own } from "./instance.ts";
import {
  checkConfigKey,
  checkConfigValue,
  checkDeviceConfig,
  checkDeviceName,
  checkPath,
  checkPem,
  type InstanceIdentity,
  validateIdentity,
} from "./instance_validation.ts";
import { RegistryError } from "./registry_error.ts";

/** Schema version written to `PRAGMA user_version`. */
export const SCHEMA_VERSION = 3;

/** How often at most `recordSeen()` writes an instance's `last_seen` to disk. */
export const SEEN_PERSIST_INTERVAL_MS = 60_000;

const MIGRATIONS: readonly string[] = [
  // 0 → 1
  `CREATE TABLE instances (
     name TEXT PRIMARY KEY,
     cid INTEGER NOT NULL UNIQUE,
     status TEXT NOT NULL,
     hybrid TEXT UNIQUE,
     agent_cert TEXT NOT NULL,
     client_cert TEXT NOT NULL,
     client_key TEXT NOT NULL,
     agent_state TEXT NOT NULL DEFAULT 'STOPPED',
     ready INTEGER NOT NULL DEFAULT 0,
     last_seen TEXT,
     last_change TEXT,
     last_error TEXT,
     created_at TEXT NOT NULL
   ) STRICT;
   CREATE TABLE config (
     instance TEXT NOT NULL REFERENCES instances(name) ON DELETE CASCADE,
     key TEXT NOT NULL,
     value TEXT NOT NULL,
     PRIMARY KEY (instance, key)
   ) STRICT;
   CREATE TABLE devices (
     instance TEXT NOT NULL REFERENCES instances(name) ON DELETE CASCADE,
     name TEXT NOT NULL,
     config TEXT NOT NULL,
     PRIMARY KEY (instance, name)
   ) STRICT;
   CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;`,
  // 1 → 2: where each instance's config drive was written (NULL: the default place).
  `ALTER TABLE instances ADD COLUMN config_drive TEXT;`,
  // 2 → 3: events waiting for an offline agent, oldest first (they survive a restart).
  `CREATE TABLE queued_events (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     instance TEXT NOT NULL REFERENCES instances(name) ON DELETE CASCADE,
     event TEXT NOT NULL
   ) STRICT;`,
];

/** Everything needed to register an instance; runtime starts at its defaults. */
export interface NewInstance extends InstanceIdentity {
  agentCert: string;
  clientCert: string;
  clientKey: string;
  /** Absolute path of the config drive written for it (omit for the default place). */
  configDrive?: string;
}

// ---------------------------------------------------------------------------

interface InstanceRow {
  name: string;
  cid: number;
  status: string;
  hybrid: string | null;
  agent_cert: string;
  client_cert: string;
  client_key: string;
  agent_state: string;
  ready: number;
  last_seen: string | null;
  last_change: string | null;
  last_error: string | null;
  config_drive: string | null;
}

export interface RegistryOptions {
  /** Clock for `created_at` and coalescing. @default Date.now */
  now?: () => number;
}

/** The instance store. Open with {@linkcode Registry.open}; one per state directory. */
export class Registry {
  #db: DatabaseSync;
  #path: string;
  #now: () => number;
  #instances = new Map<string, Instance>();
  /** CID → name: the vsock server looks instances up by peer CID on every request. */
  #byCid = new Map<number, string>();
  #seenPersisted = new Map<string, number>();
  #closed = false;

  private constructor(db: DatabaseSync, path: string, options: RegistryOptions) {
    this.#db = db;
    this.#path = path;
    this.#now = options.now ?? Date.now;
    this.#load();
  }

  /**
   * Opens (creating and migrating if needed) the store at `path` and takes
   * its lock. Throws RegistryError `LOCKED` when another connection holds it.
   */
  static open(path: string, options: RegistryOptions = {}): Registry {
    const db = new DatabaseSync(path, { timeout: 0, enableForeignKeyConstraints: true });
    try {
      Deno.chmodSync(path, 0o600);
      db.exec("PRAGMA locking_mode = EXCLUSIVE");
      db.exec("PRAGMA journal_mode = WAL");
      db.exec("PRAGMA synchronous = FULL");
      db.exec("BEGIN IMMEDIATE");
      try {
        const { user_version } = db.prepare("PRAGMA user_version").get() as {
          user_version: number;
        };
        if (user_version > SCHEMA_VERSION) {
          throw new Error(
            `Registry ${path} has schema version ${user_version}; this program knows ${SCHEMA_VERSION}`,
          );
        }
        for (let v = user_version; v < SCHEMA_VERSION; v++) db.exec(MIGRATIONS[v]);
        db.exec(`PRAGMA user_version = ${SCHEMA_VERSION}`);
        db.exec("COMMIT");
      } catch (error) {
        db.exec("ROLLBACK");
        throw error;
      }
    } catch (error) {
      db.close();
      if (error instanceof Error && /locked|busy/i.test(error.message)) {
        throw new RegistryError(
          "LOCKED",
          `The state in ${path} is in use by another lxd-vsock-host process (daemon or CLI); ` +
            "stop it first, or use the CLI while the daemon runs so it goes through the daemon",
          { cause: error },
        );
      }
      throw error;
    }
    return new Registry(db, path, options);
  }

  /** The database file. */
  get path(): string {
    return this.#path;
  }

  #load(): void {
    const rows = this.#db.prepare("SELECT * FROM instances ORDER BY name")
      .all() as unknown as InstanceRow[];
    for (const row of rows) {
      const config: Record<string, string> = {};
      for (
        const c of this.#db.prepare("SELECT key, value FROM config WHERE instance = ? ORDER BY key")
          .all(row.name) as unknown as { key: string; value: string }[]
      ) config[c.key] = c.value;
      const devices: Record<string, Record<string, string>> = {};
      for (
        const d of this.#db.prepare(
          "SELECT name, config FROM devices WHERE instance = ? ORDER BY name",
        )
          .all(row.name) as unknown as { name: string; config: string }[]
      ) devices[d.name] = JSON.parse(d.config);
      const runtime: InstanceRuntime = {
        agentState: row.agent_state as InstanceRuntime["agentState"],
        ready: row.ready === 1,
      };
      if (row.last_seen) runtime.lastSeen = row.last_seen;
      if (row.last_change) runtime.lastChange = row.last_change;
      if (row.last_error) runtime.lastError = row.last_error;
      const instance: Instance = {
        name: row.name,
        cid: row.cid,
        status: JSON.parse(row.status),
        agentCert: row.agent_cert,
        clientCert: row.client_cert,
        clientKey: row.client_key,
        config,
        devices,
        runtime,
      };
      if (row.hybrid !== null) instance.hybrid = row.hybrid;
      if (row.config_drive !== null) instance.configDrive = row.config_drive;
      this.#instances.set(row.name, instance);
      this.#byCid.set(row.cid, row.name);
      if (row.last_seen) this.#seenPersisted.set(row.name, Date.parse(row.last_seen));
    }
  }

  #assertOpen(): void {
    if (this.#closed) throw new Error("Registry is closed");
  }

  #transaction<T>(fn: () => T): T {
    this.#assertOpen();
    this.#db.exec("BEGIN IMMEDIATE");
    try {
      const result = fn();
      this.#db.exec("COMMIT");
      return result;
    } catch (error) {
      this.#db.exec("ROLLBACK");
      throw error;
    }
  }

  /** Every instance, sorted by name (copies). */
  list(): Instance[] {
    this.#assertOpen();
    return [...this.#instances.values()].sort((a, b) => a.name < b.name ? -1 : 1).map((i) =>
      structuredClone(i)
    );
  }

  /** The instance named `name` (a copy), or undefined. */
  get(name: string): Instance | undefined {
    const i = this.view(name);
    return i && structuredClone(i);
  }

  /** Like `get()`, but throws RegistryError `NOT_FOUND`. */
  require(name: string): Instance {
    const i = this.get(name);
    if (!i) throw new RegistryError("NOT_FOUND", `Instance "${name}" not found`);
    return i;
  }

  /** The instance with guest CID `cid`, or undefined. */
  byCid(cid: number): Instance | undefined {
    const i = this.viewByCid(cid);
    return i && structuredClone(i);
  }

  /**
   * The stored instance named `name` itself, not a copy, or undefined: for
   * the per-request path that only reads it (the vsock server's identity
   * re-check and the devlxd answers), where a copy of every field on every
   * request was a tenth of the host's CPU per request. It follows later
   * changes; never modify it.
   */
  view(name: string): Readonly<Instance> | undefined {
    this.#assertOpen();
    return this.#instances.get(name);
  }

  /** Like `view()`, by guest CID. */
  viewByCid(cid: number): Readonly<Instance> | undefined {
    this.#assertOpen();
    const name = this.#byCid.get(cid);
    return name === undefined ? undefined : this.#instances.get(name);
  }

  /** Number of instances. */
  get size(): number {
    return this.#instances.size;
  }

  /**
   * Validates an instance's identity and checks that its name, CID and hybrid
   * path are free, without writing. Lets callers fail before generating keys.
   */
  checkNew(spec: InstanceIdentity): void {
    this.#assertOpen();
    const v = validateIdentity(spec);
    if (this.#instances.has(v.name)) {
      throw new RegistryError("ALREADY_EXISTS", `Instance "${v.name}" already exists`);
    }
    for (const i of this.#instances.values()) {
      if (i.cid === v.cid) {
        throw new RegistryError(
          "ALREADY_EXISTS",
          `CID ${v.cid} is already used by instance "${i.name}"`,
        );
      }
      if (v.hybrid !== undefined && i.hybrid === v.hybrid) {
        throw new RegistryError(
          "ALREADY_EXISTS",
          `Hybrid vsock path ${v.hybrid} is already used by instance "${i.name}"`,
        );
      }
    }
  }

  /** Registers an instance. Validates everything first; returns the stored copy. */
  add(spec: NewInstance): Instance {
    this.checkNew(spec);
    const v = validateIdentity(spec);
    const agentCert = checkPem(spec.agentCert, "agent certificate");
    const clientCert = checkPem(spec.clientCert, "client certificate");
    const clientKey = checkPem(spec.clientKey, "client key");
    const instance: Instance = {
      name: v.name,
      cid: v.cid,
      status: v.status,
      agentCert,
      clientCert,
      clientKey,
      config: v.config,
      devices: v.devices,
      runtime: { agentState: "STOPPED", ready: false },
    };
    if (v.hybrid !== undefined) instance.hybrid = v.hybrid;
    if (spec.configDrive !== undefined) {
      instance.configDrive = checkPath(spec.configDrive, "config drive path");
    }
    this.#transaction(() => {
      this.#db.prepare(
        `INSERT INTO instances (name, cid, status, hybrid, agent_cert, client_cert, client_key, created_at, config_drive)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      ).run(
        instance.name,
        instance.cid,
        JSON.stringify(instance.status),
        instance.hybrid ?? null,
        agentCert,
        clientCert,
        clientKey,
        new Date(this.#now()).toISOString(),
        instance.configDrive ?? null,
      );
      const insertConfig = this.#db.prepare(
        "INSERT INTO config (instance, key, value) VALUES (?, ?, ?)",
      );
      for (const [k, val] of Object.entries(instance.config)) {
        insertConfig.run(instance.name, k, val);
      }
      const insertDevice = this.#db.prepare(
        "INSERT INTO devices (instance, name, config) VALUES (?, ?, ?)",
      );
      for (const [k, d] of Object.entries(instance.devices)) {
        insertDevice.run(instance.name, k, JSON.stringify(d));
      }
    });
    this.#instances.set(instance.name, instance);
    this.#byCid.set(instance.cid, instance.name);
    return structuredClone(instance);
  }

  /** Removes an instance and returns what it was. */
  remove(name: string): Instance {
    const instance = this.require(name);
    this.#transaction(() => {
      this.#db.prepare("DELETE FROM instances WHERE name = ?").run(name);
    });
    this.#instances.delete(name);
    this.#byCid.delete(instance.cid);
    this.#seenPersisted.delete(name);
    return instance;
  }

  /** Keeps `event` (JSON) for `name`'s offline agent; returns its id. */
  queueEvent(name: string, event: string): number {
    this.require(name);
    let id = 0;
    this.#transaction(() => {
      const result = this.#db.prepare("INSERT INTO queued_events (instance, event) VALUES (?, ?)")
        .run(name, event);
      id = Number(result.lastInsertRowid);
    });
    return id;
  }

  /** Forgets queued events (delivered, refused or dropped). */
  dequeueEvents(ids: number[]): void {
    if (ids.length === 0) return;
    this.#assertOpen();
    this.#transaction(() => {
      const remove = this.#db.prepare("DELETE FROM queued_events WHERE id = ?");
      for (const id of ids) remove.run(id);
    });
  }

  /** The events kept for `name`'s agent, oldest first. */
  queuedEvents(name: string): { id: number; event: string }[] {
    this.#assertOpen();
    return this.#db.prepare("SELECT id, event FROM queued_events WHERE instance = ? ORDER BY id")
      .all(name) as unknown as { id: number; event: string }[];
  }

  /** Sets a config key; returns the previous value ("" when unset). */
  setConfig(name: string, key: string, value: string): { old: string; value: string } {
    const instance = this.require(name);
    checkConfigKey(key);
    checkConfigValue(key, value);
    this.#transaction(() => {
      this.#db.prepare(
        "INSERT INTO config (instance, key, value) VALUES (?, ?, ?) ON CONFLICT (instance, key) DO UPDATE SET value = excluded.value",
      ).run(name, key, value);
    });
    this.#instances.get(name)!.config[key] = value;
    return { old: own(instance.config, key) ?? "", value };
  }

  /** Removes a config key; returns its previous value, or undefined if it was unset. */
  unsetConfig(name: string, key: string): string | undefined {
    const instance = this.require(name);
    checkConfigKey(key);
    if (!Object.hasOwn(instance.config, key)) return undefined;
    this.#transaction(() => {
      this.#db.prepare("DELETE FROM config WHERE instance = ? AND key = ?").run(name, key);
    });
    delete this.#instances.get(name)!.config[key];
    return own(instance.config, key);
  }

  /** Adds a device; RegistryError `ALREADY_EXISTS` if the name is taken. */
  addDevice(name: string, device: string, config: Record<string, string>): Record<string, string> {
    const instance = this.require(name);
    checkDeviceName(device);
    const clean = checkDeviceConfig(config);
    if (Object.hasOwn(instance.devices, device)) {
      throw new RegistryError("ALREADY_EXISTS", `Device "${device}" already exists on "${name}"`);
    }
    this.#transaction(() => {
      this.#db.prepare("INSERT INTO devices (instance, name, config) VALUES (?, ?, ?)")
        .run(name, device, JSON.stringify(clean));
    });
    this.#instances.get(name)!.devices[device] = clean;
    return structuredClone(clean);
  }

  /** Removes a device and returns its config; RegistryError `NOT_FOUND` if absent. */
  removeDevice(name: string, device: string): Record<string, string> {
    const instance = this.require(name);
    const config = own(instance.devices, device);
    if (!config) throw new RegistryError("NOT_FOUND", `Device "${device}" not found on "${name}"`);
    this.#transaction(() => {
      this.#db.prepare("DELETE FROM devices WHERE instance = ? AND name = ?").run(name, device);
    });
    delete this.#instances.get(name)!.devices[device];
    return config;
  }

  /** Durably updates runtime fields; returns the new runtime. */
  updateRuntime(name: string, patch: Partial<InstanceRuntime>): InstanceRuntime {
    const current = this.require(name).runtime;
    const next: InstanceRuntime = { ...current, ...patch };
    const states = ["STARTED", "CONNECTED", "STOPPED", "CONNECT sent"];
    if (!states.includes(next.agentState)) {
      throw new TypeError(`Invalid agent state ${next.agentState}`);
    }
    if (typeof next.ready !== "boolean") throw new TypeError("Invalid ready flag");
    this.#transaction(() => {
      this.#db.prepare(
        `UPDATE instances SET agent_state = ?, ready = ?, last_seen = ?, last_change = ?, last_error = ?
         WHERE name = ?`,
      ).run(
        next.agentState,
        next.ready ? 1 : 0,
        next.lastSeen ?? null,
        next.lastChange ?? null,
        next.lastError ?? null,
        name,
      );
    });
    this.#instances.get(name)!.runtime = next;
    if (next.lastSeen) this.#seenPersisted.set(name, Date.parse(next.lastSeen));
    return structuredClone(next);
  }

  /**
   * Records an authenticated agent request at `at`. Memory is updated at once;
   * the file at most every {@linkcode SEEN_PERSIST_INTERVAL_MS} (see module doc).
   */
  recordSeen(name: string, at: Date = new Date(this.#now())): void {
    this.#assertOpen();
    const instance = this.#instances.get(name);
    if (!instance) return;
    instance.runtime.lastSeen = at.toISOString();
    const persisted = this.#seenPersisted.get(name) ?? 0;
    if (at.getTime() - persisted >= SEEN_PERSIST_INTERVAL_MS) this.#persistSeen(name);
  }

  #persistSeen(name: string): void {
    const lastSeen = this.#instances.get(name)?.runtime.lastSeen;
    if (!lastSeen) return;
    this.#transaction(() => {
      this.#db.prepare("UPDATE instances SET last_seen = ? WHERE name = ?").run(lastSeen, name);
    });
    this.#seenPersisted.set(name, Date.parse(lastSeen));
  }

  /** A small key/value setting (e.g. the last port used). */
  getMeta(key: string): string | undefined {
    this.#assertOpen();
    const row = this.#db.prepare("SELECT value FROM meta WHERE key = ?").get(key) as
      | { value: string }
      | undefined;
    return row?.value;
  }

  /** Sets a key/value setting durably. */
  setMeta(key: string, value: string): void {
    this.#transaction(() => {
      this.#db.prepare(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
      ).run(key, value);
    });
  }

  /** Flushes pending `lastSeen` times, then closes the file and drops the lock. Idempotent. */
  close(): void {
    if (this.#closed) return;
    try {
      for (const [name, instance] of this.#instances) {
        const seen = instance.runtime.lastSeen;
        if (seen && Date.parse(seen) !== this.#seenPersisted.get(name)) this.#persistSeen(name);
      }
    } finally {
      this.#closed = true;
      this.#db.close();
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
