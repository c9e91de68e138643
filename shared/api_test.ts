import assert from "node:assert/strict";
import {
  checkCid,
  formatConnectLine,
  parseConnectionInfo,
  parseConnectLine,
  parseStatusLine,
} from "./api.ts";

Deno.test("parseStatusLine() takes the last complete line", () => {
  assert.equal(parseStatusLine("STARTED\nCONNECTED\n"), "CONNECTED");
  assert.equal(parseStatusLine("STARTED\nCONNEC"), "STARTED");
  assert.equal(parseStatusLine("TED\nSTOPPED\n"), "STOPPED");
});

Deno.test("parseStatusLine() returns undefined without a complete known line", () => {
  assert.equal(parseStatusLine(""), undefined);
  assert.equal(parseStatusLine("STARTED"), undefined);
  assert.equal(parseStatusLine("garbage\n"), undefined);
});

Deno.test("parseConnectLine() accepts CONNECT cid:port and rejects the rest", () => {
  assert.deepEqual(parseConnectLine("CONNECT 2:4567"), { cid: 2, port: 4567 });
  assert.throws(() => parseConnectLine("CONNECT 2:"), SyntaxError);
  assert.throws(() => parseConnectLine("hello"), SyntaxError);
  assert.throws(() => parseConnectLine("CONNECT 2:70000"), RangeError);
  assert.throws(() => parseConnectLine("CONNECT 0:80"), RangeError);
  assert.equal(formatConnectLine(2, 80), "CONNECT 2:80\n");
});

Deno.test("parseConnectionInfo() validates each field", () => {
  const certificate = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
  assert.deepEqual(parseConnectionInfo({ cid: 2, port: 1024, certificate }), {
    cid: 2,
    port: 1024,
    certificate,
    devlxd: true,
  });
  assert.throws(() => parseConnectionInfo(null), TypeError);
  assert.throws(() => parseConnectionInfo({ cid: 2, port: 0, certificate }), RangeError);
  assert.throws(() => parseConnectionInfo({ cid: 2, port: 80, certificate: "x" }), TypeError);
  assert.throws(
    () => parseConnectionInfo({ cid: 2, port: 80, certificate, devlxd: "yes" }),
    TypeError,
  );
  assert.throws(() => checkCid(2 ** 32 - 1), RangeError);
});
