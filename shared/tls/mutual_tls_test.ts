import assert from "node:assert/strict";
import * as tls from "node:tls";
import { once } from "node:events";
import type { Duplex } from "node:stream";
import { setImmediate } from "node:timers";
import { acceptTls, CertificateError, connectTls } from "./mutual_tls.ts";
import { generateKeyPair } from "./key_pair.ts";
import { certificateFingerprint } from "./certificate.ts";
import { closed, fdSocketPair, unixSocketPair, whenClosed } from "./_testing.ts";

const server = await generateKeyPair({ commonName: "host" });
const client = await generateKeyPair({ commonName: "agent" });
const stranger = await generateKeyPair({ commonName: "stranger" });
const DAY = 86_400_000;
const expired = await generateKeyPair({
  notBefore: new Date(Date.now() - 10 * DAY),
  notAfter: new Date(Date.now() - DAY),
});
const notYetValid = await generateKeyPair({
  notBefore: new Date(Date.now() + DAY),
  notAfter: new Date(Date.now() + 10 * DAY),
});

/** The first record a TLS 1.2-only client sends: its ClientHello. */
async function tls12ClientHello(): Promise<Uint8Array> {
  await using pair = await unixSocketPair();
  const old = tls.connect({
    socket: pair.client,
    rejectUnauthorized: false,
    maxVersion: "TLSv1.2",
  });
  old.on("error", () => {});
  const [hello] = await once(pair.server, "data");
  old.destroy();
  return new Uint8Array(hello);
}

const notTls = {
  garbage: new TextEncoder().encode("GET /1.0 HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01garbage"),
  "a TLS 1.2 ClientHello": await tls12ClientHello(),
};

/** Resolves once `socket` reads its end (an FdSocket stays half open) or closes. */
function whenEnded(socket: Duplex): Promise<void> {
  socket.on("error", () => {});
  socket.resume();
  return new Promise((resolve) => {
    socket.once("end", resolve);
    socket.once("close", resolve);
  });
}

function isCertificateError(code: string) {
  return (error: unknown) => {
    assert.ok(error instanceof CertificateError, String(error));
    assert.equal(error.code, code);
    assert.equal(error.name, "CertificateError");
    return true;
  };
}

/** The client's view of a refused handshake: connectTls rejects, or resolves and then closes. */
async function clientRefused(attempt: Promise<tls.TLSSocket>): Promise<void> {
  let socket: tls.TLSSocket;
  try {
    socket = await attempt;
  } catch {
    return;
  }
  socket.resume();
  await whenClosed(socket);
}

Deno.test("acceptTls()/connectTls() complete a pinned mutual TLS 1.3 handshake and carry data", async () => {
  await using pair = await unixSocketPair();
  const [accepted, connected] = await Promise.all([
    acceptTls(pair.server, { ...server, pinned: client.cert }),
    connectTls(pair.client, { ...client, pinned: server.cert }),
  ]);
  assert.equal(accepted.peer.fingerprint, certificateFingerprint(client.cert));
  assert.equal(accepted.socket.getProtocol(), "TLSv1.3");
  assert.equal(connected.getProtocol(), "TLSv1.3");
  connected.write("ping");
  assert.equal(String((await once(accepted.socket, "data"))[0]), "ping");
  accepted.socket.end("pong");
  assert.equal(String((await once(connected, "data"))[0]), "pong");
  await Promise.all([closed(accepted.socket), closed(connected)]);
});

Deno.test("acceptTls() without pinned accepts any valid client certificate and reports it", async () => {
  await using pair = await unixSocketPair();
  const [accepted, connected] = await Promise.all([
    acceptTls(pair.server, server),
    connectTls(pair.client, { ...stranger, pinned: server.cert }),
  ]);
  assert.equal(accepted.peer.fingerprint, certificateFingerprint(stranger.cert));
  assert.deepEqual(accepted.peer.der, new Uint8Array(accepted.socket.getPeerCertificate(true).raw));
  await Promise.all([closed(accepted.socket), closed(connected)]);
});

Deno.test("acceptTls() accepts any of several pinned certificates", async () => {
  await using pair = await unixSocketPair();
  const [accepted, connected] = await Promise.all([
    acceptTls(pair.server, { ...server, pinned: [stranger.cert, client.cert] }),
    connectTls(pair.client, { ...client, pinned: server.cert }),
  ]);
  assert.equal(accepted.peer.fingerprint, certificateFingerprint(client.cert));
  await Promise.all([closed(accepted.socket), closed(connected)]);
});

Deno.test("acceptTls() refuses a client certificate that is not pinned", async () => {
  await using pair = await unixSocketPair();
  const clientSide = clientRefused(connectTls(pair.client, { ...stranger, pinned: server.cert }));
  await assert.rejects(
    acceptTls(pair.server, { ...server, pinned: client.cert }),
    isCertificateError("NOT_PINNED"),
  );
  await clientSide;
  assert.equal(pair.server.destroyed, true);
});

Deno.test("acceptTls() refuses an expired client certificate, pinned or not", async () => {
  for (const pinned of [undefined, expired.cert]) {
    await using pair = await unixSocketPair();
    const clientSide = clientRefused(connectTls(pair.client, { ...expired, pinned: server.cert }));
    await assert.rejects(
      acceptTls(pair.server, { ...server, pinned }),
      isCertificateError("EXPIRED"),
    );
    await clientSide;
  }
});

Deno.test("acceptTls() refuses a client certificate that is not yet valid", async () => {
  await using pair = await unixSocketPair();
  const clientSide = clientRefused(
    connectTls(pair.client, { ...notYetValid, pinned: server.cert }),
  );
  await assert.rejects(acceptTls(pair.server, server), isCertificateError("NOT_YET_VALID"));
  await clientSide;
});

Deno.test("acceptTls() refuses a client that presents no certificate", async () => {
  await using pair = await unixSocketPair();
  const bare = tls.connect({ socket: pair.client, rejectUnauthorized: false });
  const clientSide = whenClosed(bare);
  bare.resume();
  await assert.rejects(acceptTls(pair.server, server), isCertificateError("NO_CERTIFICATE"));
  await clientSide;
});

Deno.test("acceptTls() refuses a TLS 1.2 client", async () => {
  await using pair = await unixSocketPair();
  const old = tls.connect({
    socket: pair.client,
    ...client,
    rejectUnauthorized: false,
    maxVersion: "TLSv1.2",
  });
  let secured = false;
  old.on("secureConnect", () => secured = true);
  const clientSide = whenClosed(old);
  await assert.rejects(acceptTls(pair.server, server), /TLS handshake failed/);
  await clientSide;
  assert.equal(secured, false);
});

Deno.test("acceptTls() closes a connection that sends garbage instead of a ClientHello", async () => {
  await using pair = await unixSocketPair();
  const clientSide = whenClosed(pair.client);
  pair.client.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  pair.client.resume();
  await assert.rejects(acceptTls(pair.server, server), /TLS handshake failed/);
  await clientSide;
  assert.equal(pair.server.destroyed, true);
});

Deno.test("acceptTls() gives up after handshakeTimeout when the client stays silent", async () => {
  await using pair = await unixSocketPair();
  const clientSide = whenClosed(pair.client);
  pair.client.resume();
  await assert.rejects(
    acceptTls(pair.server, { ...server, handshakeTimeout: 50 }),
    /timed out after 50 ms/,
  );
  await clientSide;
});

Deno.test("acceptTls() rejects with the abort reason and closes the connection", async () => {
  await using pair = await unixSocketPair();
  const controller = new AbortController();
  const clientSide = whenClosed(pair.client);
  pair.client.resume();
  const accepting = acceptTls(pair.server, { ...server, signal: controller.signal });
  controller.abort(new Error("shutting down"));
  await assert.rejects(accepting, /shutting down/);
  await clientSide;
});

Deno.test("connectTls() refuses a server certificate that is not the pinned one", async () => {
  await using pair = await unixSocketPair();
  const serverSide = acceptTls(pair.server, server).then(
    (accepted) => whenClosed(accepted.socket),
    () => {},
  );
  await assert.rejects(
    connectTls(pair.client, { ...client, pinned: stranger.cert }),
    isCertificateError("NOT_PINNED"),
  );
  await serverSide;
  assert.equal(pair.client.destroyed, true);
});

Deno.test("connectTls() refuses a pinned server certificate that has expired", async () => {
  await using pair = await unixSocketPair();
  const serverSide = acceptTls(pair.server, expired).then(
    (accepted) => whenClosed(accepted.socket),
    () => {},
  );
  await assert.rejects(
    connectTls(pair.client, { ...client, pinned: expired.cert }),
    isCertificateError("EXPIRED"),
  );
  await serverSide;
});

Deno.test("connectTls() rejects a pinned value that is not PEM and closes the socket", async () => {
  await using pair = await unixSocketPair();
  const serverSide = whenClosed(pair.server);
  await assert.rejects(connectTls(pair.client, { ...client, pinned: "nope" }), SyntaxError);
  await serverSide;
});

// On an FdSocket (what the daemon and the agent accept), Deno 2.9.6's node:tls
// used to throw an uncaught TypeError from TLSSocket._start when the first
// bytes were already there: any local peer could end the process.
for (const [what, bytes] of Object.entries(notTls)) {
  Deno.test(`acceptTls() on an FdSocket refuses ${what} already buffered, and the process goes on`, async () => {
    await using pair = await fdSocketPair();
    const clientSide = whenEnded(pair.client);
    pair.client.write(bytes);
    await once(pair.server, "readable");
    assert.ok(pair.server.readableLength > 0, "the bytes are buffered before acceptTls()");
    await assert.rejects(acceptTls(pair.server, server), /TLS handshake failed/);
    await clientSide;
    assert.equal(pair.server.destroyed, true);
  });

  Deno.test(`acceptTls() on an FdSocket refuses ${what} that arrives after the TLS socket started`, async () => {
    await using pair = await fdSocketPair();
    const clientSide = whenEnded(pair.client);
    const accepting = acceptTls(pair.server, server);
    // A macrotask: the TLS socket has started (a nextTick) before the bytes are sent.
    setImmediate(() => pair.client.write(bytes));
    await assert.rejects(accepting, /TLS handshake failed/);
    await clientSide;
    assert.equal(pair.server.destroyed, true);
  });
}

Deno.test("acceptTls() on an FdSocket completes a handshake whose ClientHello was buffered before the call", async () => {
  await using pair = await fdSocketPair();
  const connecting = connectTls(pair.client, { ...client, pinned: server.cert });
  await once(pair.server, "readable");
  assert.ok(pair.server.readableLength > 0, "the ClientHello is buffered before acceptTls()");
  const [accepted, connected] = await Promise.all([
    acceptTls(pair.server, { ...server, pinned: client.cert }),
    connecting,
  ]);
  connected.write("ping");
  assert.equal(String((await once(accepted.socket, "data"))[0]), "ping");
  await Promise.all([closed(accepted.socket), closed(connected)]);
});

Deno.test("acceptTls() on a net.Socket refuses a TLS 1.2 ClientHello already buffered", async () => {
  await using pair = await unixSocketPair();
  const clientSide = whenClosed(pair.client);
  pair.client.resume();
  pair.client.write(notTls["a TLS 1.2 ClientHello"]);
  await once(pair.server, "readable");
  assert.ok(pair.server.readableLength > 0, "the bytes are buffered before acceptTls()");
  await assert.rejects(acceptTls(pair.server, server), /TLS handshake failed/);
  await clientSide;
  assert.equal(pair.server.destroyed, true);
});
