/**
 * Memory floor probe for the bench: imports the modules named on the command
 * line, prints "ready", and idles until stdin closes, so the parent can read
 * this process's RSS (what the runtime and those modules cost before any work).
 * Usage: deno run -P=agent tests/bench/_rss_probe.ts [module …]
 * @module
 */

for (const specifier of Deno.args) await import(new URL(specifier, import.meta.url).href);
console.log("ready");
for await (const _ of Deno.stdin.readable) { /* idle until the parent closes stdin */ }
