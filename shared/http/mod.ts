/**
 * HTTP/1.1 over one already-open connection, and LXD's response envelope.
 *
 * - {@linkcode serveHttp}: serve requests on a connection with a `Request` → `Response` handler.
 * - {@linkcode upgradeWebSocket}: answer a WebSocket handshake; a one-way text channel out.
 * - {@linkcode acceptWebSocket}, {@linkcode connectWebSocket}: full-duplex WebSockets, either end.
 * - {@linkcode httpRequest}: send one request on a connection, stream the response.
 * - {@linkcode mtlsRequest}, {@linkcode dialMtls}, {@linkcode MtlsError}: the mutual-TLS
 *   client both ways over vsock, with {@linkcode ConnectionPool} for keep-alive.
 * - {@linkcode HttpError}: a status and a message, for each app's error mapper.
 * - {@linkcode syncResponse}, {@linkcode errorResponse}, {@linkcode unwrapEnvelope}: LXD's JSON envelope.
 *
 * @module
 */

export * from "./serve_http.ts";
export * from "./http_request.ts";
export * from "./mtls_client.ts";
export * from "./connection_pool.ts";
export * from "./envelope.ts";
export * from "./http_error.ts";
export * from "./websocket.ts";
export * from "./websocket_conn.ts";
export * from "./http_server.ts";
