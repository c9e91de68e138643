/**
 * Validation of what operators and guests give the registry: instance names,
 * CIDs, config keys and values, devices, status channels, paths and PEM texts.
 * Pure functions, run before any write; the CLI and the HTTP apps use them
 * without opening the SQLite registry. Needs no permissions.
 * @module
 */

import { MAX_CID } from "../shared/api.ts";
import type { StatusChannel } from "./instance.ts";
// Validation: pure functions, run before any write.

const NAME_RE = /^[a-z0-9][a-z0-9-]{0,62}$/;
/** Config keys: dotted words; no `/`, no `..`, no leading or trailing dot. */
const KEY_RE = /^[a-z0-9][a-z0-9_-]*(\.[A-Za-z0-9_-]+)+$/;
const DEVICE_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
const DEVICE_KEY_RE = /^[a-z0-9][a-z0-9_.-]{0,63}$/;
/** Namespaces an operator may set; `security.devlxd*` are checked by name. */
const CONFIG_PREFIXES = ["user.", "cloud-init.", "image.", "environment.", "limits."];
const BOOLEAN_KEYS = ["security.devlxd", "security.devlxd.images"];
/** Largest config value (cloud-init user-data can be large). */
export const MAX_CONFIG_VALUE = 1 << 20;
const MAX_DEVICE_VALUE = 4096;
const MAX_PATH = 4096;

/** Validates an instance name: `[a-z0-9][a-z0-9-]{0,62}`. */
export function checkInstanceName(name: unknown): string {
  if (typeof name !== "string") throw new TypeError("Invalid instance name: not a string");
  if (!NAME_RE.test(name)) {
    throw new TypeError(
      `Invalid instance name ${
        JSON.stringify(name.slice(0, 80))
      }: use 1-63 lowercase letters, digits and "-", starting with a letter or digit`,
    );
  }
  return name;
}

/** Validates a guest CID: 3 … 2^32-2 (0-2 are reserved, 2^32-1 is "any"). */
export function checkInstanceCid(cid: unknown): number {
  if (typeof cid !== "number" || !Number.isInteger(cid)) {
    throw new TypeError(`Invalid CID ${JSON.stringify(cid)}: not an integer`);
  }
  if (cid < 3 || cid > MAX_CID) {
    throw new RangeError(`Invalid CID ${cid}: a guest CID is 3-${MAX_CID} (0-2 are reserved)`);
  }
  return cid;
}

/** Whether `key` is a syntactically valid config key (no `/`, no `..`). */
export function isValidConfigKey(key: string): boolean {
  return key.length <= 256 && KEY_RE.test(key);
}

/** Validates a config key an operator sets: syntax, then a known namespace. */
export function checkConfigKey(key: unknown): string {
  if (typeof key !== "string" || !isValidConfigKey(key)) {
    throw new TypeError(
      `Invalid config key ${JSON.stringify(String(key).slice(0, 80))}: expected dotted words`,
    );
  }
  if (!BOOLEAN_KEYS.includes(key) && !CONFIG_PREFIXES.some((p) => key.startsWith(p))) {
    throw new TypeError(
      `Unknown config key "${key}": use ${CONFIG_PREFIXES.map((p) => p + "*").join(", ")}, ` +
        BOOLEAN_KEYS.join(", "),
    );
  }
  return key;
}

/** Validates a config value for `key`. */
export function checkConfigValue(key: string, value: unknown): string {
  if (typeof value !== "string") throw new TypeError(`Invalid value for ${key}: not a string`);
  if (value.length > MAX_CONFIG_VALUE) {
    throw new RangeError(`Invalid value for ${key}: longer than ${MAX_CONFIG_VALUE} characters`);
  }
  if (BOOLEAN_KEYS.includes(key) && value !== "true" && value !== "false") {
    throw new TypeError(`Invalid value for ${key}: use "true" or "false"`);
  }
  return value;
}

/** Validates a device name. */
export function checkDeviceName(name: unknown): string {
  if (typeof name !== "string" || !DEVICE_RE.test(name)) {
    throw new TypeError(
      `Invalid device name ${JSON.stringify(String(name).slice(0, 80))}: ` +
        `use 1-64 letters, digits, ".", "_" and "-"`,
    );
  }
  return name;
}

/** Validates a device's config: a flat string map with a `type`. */
export function checkDeviceConfig(config: unknown): Record<string, string> {
  if (typeof config !== "object" || config === null || Array.isArray(config)) {
    throw new TypeError("Invalid device config: expected an object of strings");
  }
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(config)) {
    if (!DEVICE_KEY_RE.test(k)) throw new TypeError(`Invalid device key ${JSON.stringify(k)}`);
    if (typeof v !== "string" || v.length > MAX_DEVICE_VALUE) {
      throw new TypeError(`Invalid device value for ${k}: expected a string`);
    }
    out[k] = v;
  }
  if (!out.type) throw new TypeError('Invalid device config: "type" is required');
  return out;
}

/** Validates an absolute path (no NUL byte). */
export function checkPath(path: unknown, what: string): string {
  if (typeof path !== "string" || !path.startsWith("/") || path.length > MAX_PATH) {
    throw new TypeError(`Invalid ${what}: expected an absolute path`);
  }
  if (path.includes("\0")) throw new TypeError(`Invalid ${what}: contains a NUL byte`);
  return path;
}

/** Validates a status channel description. */
export function checkStatusChannel(status: unknown): StatusChannel {
  const s = status as Record<string, unknown> | null;
  if (typeof s !== "object" || s === null) throw new TypeError("Invalid status channel");
  switch (s.kind) {
    case "none":
      return { kind: "none" };
    case "socket":
    case "file":
      return { kind: s.kind, path: checkPath(s.path, `${s.kind} path`) };
    case "qmp": {
      const chardev = s.chardev;
      if (typeof chardev !== "string" || !/^[A-Za-z][A-Za-z0-9_.-]{0,127}$/.test(chardev)) {
        throw new TypeError("Invalid QMP chardev id");
      }
      const size = s.size ?? 16;
      if (typeof size !== "number" || !Number.isInteger(size) || size < 1 || size > 65536) {
        throw new RangeError("Invalid ring buffer size: 1-65536");
      }
      return { kind: "qmp", path: checkPath(s.path, "QMP socket path"), chardev, size };
    }
    default:
      throw new TypeError(`Invalid status channel kind ${JSON.stringify(s.kind)}`);
  }
}

/** Validates a PEM text. */
export function checkPem(pem: unknown, what: string): string {
  if (typeof pem !== "string" || !pem.includes("-----BEGIN ")) {
    throw new TypeError(`Invalid ${what}: expected PEM`);
  }
  return pem;
}

/** The identity of a new instance, checked before its keys are generated. */
export interface InstanceIdentity {
  name: string;
  cid: number;
  status?: StatusChannel;
  hybrid?: string;
  config?: Record<string, string>;
  devices?: Record<string, Record<string, string>>;
}

/** Validates an instance's identity, config and devices; returns them normalised. */
export function validateIdentity(
  spec: InstanceIdentity,
): Required<Omit<InstanceIdentity, "hybrid">> & {
  hybrid?: string;
} {
  const config: Record<string, string> = {};
  for (const [k, v] of Object.entries(spec.config ?? {})) {
    config[checkConfigKey(k)] = checkConfigValue(k, v);
  }
  const devices: Record<string, Record<string, string>> = {};
  for (const [k, v] of Object.entries(spec.devices ?? {})) {
    devices[checkDeviceName(k)] = checkDeviceConfig(v);
  }
  return {
    name: checkInstanceName(spec.name),
    cid: checkInstanceCid(spec.cid),
    status: checkStatusChannel(spec.status ?? { kind: "none" }),
    hybrid: spec.hybrid === undefined ? undefined : checkPath(spec.hybrid, "hybrid vsock path"),
    config,
    devices,
  };
}
