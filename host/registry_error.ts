/**
 * The registry's error: a condition callers act on (not found, already exists,
 * locked by another process). Its own module so that the HTTP apps and the CLI
 * can map it without importing the SQLite registry. Needs no permissions.
 * @module
 */

/** A registry condition callers act on. */
export class RegistryError extends Error {
  override name = "RegistryError";
  constructor(
    readonly code: "NOT_FOUND" | "ALREADY_EXISTS" | "LOCKED",
    message: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}
