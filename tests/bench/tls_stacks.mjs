// tests/bench/tls_stacks.mjs: server CPU per mutual-TLS 1.3 connection in the `node:tls` of
// whichever runtime runs it, so Deno and Node can be set side by side on one machine:
//
//   node_modules/deno/deno run -A tests/bench/tls_stacks.mjs [N]
//   node tests/bench/tls_stacks.mjs [N]
//
// Makes two self-signed P-256 pairs with the `openssl` command, serves on TCP loopback with
// requestCert, and has a child process (same runtime) open N (default 2000) connections one
// after the other, each presenting its certificate and exchanging one line: first with full
// handshakes, then offering the last session for TLS 1.3 resumption. Prints the server's CPU
// (user + system) per connection, the wall time per connection, and how many were resumed.
// Not part of `make bench`: a reference for BENCHMARKS.md.
import tls from "node:tls";
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";

const isDeno = typeof globalThis.Deno !== "undefined";
const runtimeArgs = isDeno ? ["run", "-A"] : [];

function pair(dir, name) {
  execFileSync("openssl", [
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
    "-days",
    "1",
    "-subj",
    `/CN=${name}`,
    "-keyout",
    join(dir, `${name}.key`),
    "-out",
    join(dir, `${name}.crt`),
  ], { stdio: "ignore" });
  return {
    key: readFileSync(join(dir, `${name}.key`)),
    cert: readFileSync(join(dir, `${name}.crt`)),
  };
}

async function client(dir, port, n, resume) {
  const server = readFileSync(join(dir, "server.crt"));
  const me = {
    key: readFileSync(join(dir, "client.key")),
    cert: readFileSync(join(dir, "client.crt")),
  };
  let session;
  for (let i = 0; i < n; i++) {
    await new Promise((resolve, reject) => {
      const c = tls.connect({
        host: "127.0.0.1",
        port,
        ...me,
        ca: [server],
        checkServerIdentity: () => undefined,
        minVersion: "TLSv1.3",
        session: resume ? session : undefined,
      });
      c.on("session", (s) => session = s);
      c.on("secureConnect", () => c.write("GET\n"));
      c.on("data", () => c.end());
      c.on("close", resolve);
      c.on("error", reject);
    });
  }
}

function serve(dir, n, resume) {
  const me = pair(dir, "server");
  const clientCert = readFileSync(join(dir, "client.crt"));
  let count = 0, reused = 0;
  return new Promise((resolve, reject) => {
    const srv = tls.createServer({
      ...me,
      requestCert: true,
      rejectUnauthorized: true,
      ca: [clientCert],
      minVersion: "TLSv1.3",
    }, (s) => {
      if (!s.getPeerCertificate()?.subject) s.destroy(new Error("no client certificate"));
      count++;
      if (s.isSessionReused()) reused++;
      s.on("data", () => s.end("OK\n"));
      s.on("error", () => {});
    });
    srv.listen(0, "127.0.0.1", () => {
      const cpu0 = process.cpuUsage();
      const t0 = performance.now();
      const child = spawn(process.execPath, [
        ...runtimeArgs,
        process.argv[1],
        "--client",
        dir,
        String(srv.address().port),
        String(n),
        resume ? "resume" : "full",
      ], { stdio: "inherit" });
      child.on("exit", (code) => {
        const cpu = process.cpuUsage(cpu0);
        const wall = performance.now() - t0;
        srv.close();
        if (code !== 0) return reject(new Error(`the client exited ${code}`));
        resolve({
          count,
          reused,
          cpuUs: (cpu.user + cpu.system) / count,
          wallUs: wall * 1000 / count,
        });
      });
    });
  });
}

if (process.argv[2] === "--client") {
  const [, , , dir, port, n, mode] = process.argv;
  await client(dir, Number(port), Number(n), mode === "resume");
  process.exit(0);
} else {
  const n = Number(process.argv[2] ?? 2000);
  const dir = mkdtempSync(join(tmpdir(), "tls-stacks-"));
  try {
    pair(dir, "client");
    const name = isDeno ? `Deno ${globalThis.Deno.version.deno}` : `Node ${process.version}`;
    for (const resume of [false, true]) {
      const r = await serve(dir, n, resume);
      console.log(
        `${name} node:tls, ${
          resume ? "resumption offered" : "full handshakes"
        }: ${r.count} connections, ` +
          `${r.reused} resumed; server CPU ${r.cpuUs.toFixed(0)} µs/connection, wall ${
            r.wallUs.toFixed(0)
          } µs/connection`,
      );
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
