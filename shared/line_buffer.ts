/**
 * `LineBuffer`: the one line splitter of both programs. It turns a byte stream
 * read in arbitrary chunks (a serial port, a unix socket, QMP, an HTTP body)
 * into complete `\n`-terminated lines, decoding UTF-8 across chunk
 * boundaries, and keeps memory bounded: a line longer than `max` is dropped
 * whole (its beginning as soon as it grows too long, its rest up to its
 * newline) and counted in `dropped`, for callers that treat it as an error.
 *
 * Owns nothing but its partial line. Needs no permissions.
 * @module
 */

/** Splits a byte stream into lines, dropping lines longer than `max` whole. */
export class LineBuffer {
  #max: number;
  #partial = "";
  #discarding = false;
  #dropped = 0;
  #decoder = new TextDecoder("utf-8", { fatal: false });

  /** @param max longest line kept, its `\n` included (`Infinity`: no bound) */
  constructor(max: number) {
    this.#max = max;
  }

  /** Lines dropped for being longer than `max` so far (one that is still arriving included). */
  get dropped(): number {
    return this.#dropped;
  }

  /** Feeds bytes; returns the complete lines they finish (without `\n`). */
  push(chunk: Uint8Array): string[] {
    const text = this.#decoder.decode(chunk, { stream: true });
    const lines: string[] = [];
    let start = 0;
    for (let i = text.indexOf("\n"); i !== -1; i = text.indexOf("\n", start)) {
      const line = this.#partial + text.slice(start, i);
      if (this.#discarding) {
        // counted when it grew too long
      } else if (line.length + 1 <= this.#max) lines.push(line);
      else this.#dropped++;
      this.#partial = "";
      this.#discarding = false;
      start = i + 1;
    }
    if (!this.#discarding) {
      this.#partial += text.slice(start);
      if (this.#partial.length + 1 > this.#max) {
        this.#partial = "";
        this.#discarding = true;
        this.#dropped++;
      }
    }
    return lines;
  }

  /** Forgets a partial line (the port was reopened). */
  reset(): void {
    this.#partial = "";
    this.#discarding = false;
    this.#decoder = new TextDecoder("utf-8", { fatal: false });
  }
}
