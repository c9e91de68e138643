/**
 * The host program's version, shown by `--version`, `status` and the admin
 * API. Needs no permissions.
 * @module
 */

/** The version of `lxd-vsock-host`. */
export const VERSION = "0.1.0";
