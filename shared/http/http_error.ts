/**
 * `HttpError`: an HTTP status with a message. The wire codec throws it for a
 * protocol violation (the status a server answers it with); the apps throw it
 * from their routes, and each app's one error mapper (`app.onError`) renders
 * it its way (the LXD envelope, or devlxd's plain text). Needs no permissions.
 * @module
 */

/** An HTTP status with a message. */
export class HttpError extends Error {
  override name = "HttpError";
  constructor(readonly status: number, message: string, options?: ErrorOptions) {
    super(message, options);
  }
}
