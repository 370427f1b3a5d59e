// The page-level write trace of a real program: which 4 KiB pages it wrote (and optionally read)
// in each epoch of its run, recorded by scripts/record-trace and replayed by the `trace`
// workload (workload.ts). Versioned, compact, self-describing.
//
// File = gzip (RFC 1952, node:zlib) of the body below. gzip's CRC-32 and length catch a
// truncated or corrupted file before a single field is read. All integers are unsigned LEB128
// varints (7 bits a byte, low group first, at most 8 bytes = 56 bits); strings are a varint byte
// length and UTF-8.
//
//   magic         4 bytes "S2TR"
//   version       varint, 1
//   flags         varint, bit 0: each epoch also lists the pages read (other bits: 0)
//   pageSize      varint, 4096
//   epochUnit     varint, 1 = instructions (the only unit so far)
//   epochLength   varint, units per epoch (e.g. 100000 instructions); the last epoch may be shorter
//   totalUnits    varint, units the whole recorded run took
//   nativeRunNs   varint, the program's run time without instrumentation (median of several runs),
//                 so replay can default to real time: epochs / nativeRun epochs per second
//   distinctPages varint, pages after renumbering (every page index below is < distinctPages)
//   epochCount    varint
//   program       string, the recorded command line
//   epochs        epochCount times: written pages, then (flag bit 0) read pages, each as
//                 count varint, then count ascending page indices as deltas: the first index
//                 itself, each next one minus the previous minus 1 (so consecutive pages cost 1
//                 byte of 0)
//
// Pages are renumbered densely in address order: every page the program touched in the
// recording (written, or read when reads are recorded) gets its rank among them, so a program
// whose heap, stack and libraries lie terabytes apart replays into a small guest slice, and
// neighbouring pages stay neighbours.

import { gunzipSync, gzipSync } from 'node:zlib';

export const TRACE_MAGIC = 'S2TR';
export const TRACE_VERSION = 1;
export const TRACE_FLAG_READS = 1;
export const EPOCH_UNIT_INSTRUCTIONS = 1;

export interface Trace {
  pageSize: number;
  /** EPOCH_UNIT_INSTRUCTIONS. */
  epochUnit: number;
  epochLength: number;
  totalUnits: number;
  nativeRunNs: number;
  distinctPages: number;
  program: string;
  /** Per epoch, the ascending dense indices of the pages written. */
  writes: Uint32Array[];
  /** Per epoch, the pages read; null when the trace does not record reads. */
  reads: Uint32Array[] | null;
}

/** The file is not a trace this build can read; the message says where and why. */
export class TraceFormatError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TraceFormatError';
  }
}

/** Largest varint this format writes or accepts (8 bytes of 7 bits). */
const MAX_VARINT = 2 ** 56 - 1;

class Writer {
  private buf = new Uint8Array(1 << 16);
  len = 0;
  private room(n: number): void {
    if (this.len + n <= this.buf.length) return;
    const next = new Uint8Array(Math.max(this.buf.length * 2, this.len + n));
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }
  varint(v: number): void {
    if (!Number.isSafeInteger(v) || v < 0 || v > MAX_VARINT) throw new RangeError(`trace writer: ${v} is not an integer in 0..2^56-1`);
    this.room(8);
    // Division, not shifts: values above 2^32 (run times in ns) must survive.
    while (v >= 0x80) {
      this.buf[this.len++] = (v % 0x80) | 0x80;
      v = Math.floor(v / 0x80);
    }
    this.buf[this.len++] = v;
  }
  bytes(b: Uint8Array): void {
    this.room(b.length);
    this.buf.set(b, this.len);
    this.len += b.length;
  }
  result(): Uint8Array {
    return this.buf.subarray(0, this.len);
  }
}

class Reader {
  pos = 0;
  constructor(private readonly buf: Uint8Array) {}
  varint(what: string): number {
    let v = 0;
    let scale = 1;
    for (let i = 0; i < 8; i++) {
      if (this.pos >= this.buf.length) throw new TraceFormatError(`truncated body: ${what} at byte ${this.pos} runs past the end`);
      const b = this.buf[this.pos++]!;
      v += (b & 0x7f) * scale;
      if ((b & 0x80) === 0) return v;
      scale *= 0x80;
    }
    throw new TraceFormatError(`corrupt body: ${what} at byte ${this.pos - 8} is a varint longer than 8 bytes`);
  }
  bytes(n: number, what: string): Uint8Array {
    if (this.pos + n > this.buf.length) throw new TraceFormatError(`truncated body: ${what} (${n} bytes) at byte ${this.pos} runs past the end`);
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
  get remaining(): number {
    return this.buf.length - this.pos;
  }
}

function writePages(w: Writer, pages: Uint32Array, distinct: number, where: string): void {
  w.varint(pages.length);
  let prev = -1;
  for (const p of pages) {
    if (p <= prev || p >= distinct) throw new RangeError(`trace writer: ${where}: page ${p} is not ascending and below distinctPages ${distinct}`);
    w.varint(p - prev - 1);
    prev = p;
  }
}

function readPages(r: Reader, distinct: number, where: string): Uint32Array {
  const n = r.varint(`${where} count`);
  if (n > distinct) throw new TraceFormatError(`corrupt body: ${where} lists ${n} pages, more than distinctPages ${distinct}`);
  const out = new Uint32Array(n);
  let prev = -1;
  for (let i = 0; i < n; i++) {
    const p = prev + 1 + r.varint(`${where} page ${i}`);
    if (p >= distinct) throw new TraceFormatError(`corrupt body: ${where} page ${p} is not below distinctPages ${distinct}`);
    out[i] = p;
    prev = p;
  }
  return out;
}

/** The trace as a file's bytes (gzip-compressed). */
export function encodeTrace(t: Trace): Buffer {
  if (t.reads !== null && t.reads.length !== t.writes.length) throw new RangeError('trace writer: reads and writes must list the same epochs');
  const w = new Writer();
  w.bytes(new TextEncoder().encode(TRACE_MAGIC));
  w.varint(TRACE_VERSION);
  w.varint(t.reads === null ? 0 : TRACE_FLAG_READS);
  w.varint(t.pageSize);
  w.varint(t.epochUnit);
  w.varint(t.epochLength);
  w.varint(t.totalUnits);
  w.varint(t.nativeRunNs);
  w.varint(t.distinctPages);
  w.varint(t.writes.length);
  const program = new TextEncoder().encode(t.program);
  w.varint(program.length);
  w.bytes(program);
  for (let e = 0; e < t.writes.length; e++) {
    writePages(w, t.writes[e]!, t.distinctPages, `epoch ${e} writes`);
    if (t.reads !== null) writePages(w, t.reads[e]!, t.distinctPages, `epoch ${e} reads`);
  }
  return gzipSync(w.result(), { level: 9 });
}

/** A file's bytes as a Trace, or TraceFormatError naming what is wrong. */
export function decodeTrace(file: Uint8Array): Trace {
  let body: Uint8Array;
  try {
    body = gunzipSync(file);
  } catch (e) {
    throw new TraceFormatError(`not a gzip-compressed trace, or truncated or corrupted: ${(e as Error).message}`);
  }
  const r = new Reader(body);
  const magic = new TextDecoder().decode(r.bytes(4, 'magic'));
  if (magic !== TRACE_MAGIC) throw new TraceFormatError(`bad magic ${JSON.stringify(magic)}, expected ${JSON.stringify(TRACE_MAGIC)}`);
  const version = r.varint('version');
  if (version !== TRACE_VERSION) throw new TraceFormatError(`trace version ${version}, this build reads version ${TRACE_VERSION}`);
  const flags = r.varint('flags');
  if ((flags & ~TRACE_FLAG_READS) !== 0) throw new TraceFormatError(`unknown flags 0x${flags.toString(16)}`);
  const pageSize = r.varint('pageSize');
  if (pageSize !== 4096) throw new TraceFormatError(`page size ${pageSize}, this build replays 4096-byte pages`);
  const epochUnit = r.varint('epochUnit');
  if (epochUnit !== EPOCH_UNIT_INSTRUCTIONS) throw new TraceFormatError(`epoch unit ${epochUnit}, this build knows ${EPOCH_UNIT_INSTRUCTIONS} (instructions)`);
  const epochLength = r.varint('epochLength');
  if (epochLength < 1) throw new TraceFormatError('epochLength is 0');
  const totalUnits = r.varint('totalUnits');
  const nativeRunNs = r.varint('nativeRunNs');
  const distinctPages = r.varint('distinctPages');
  if (distinctPages > 2 ** 32 - 1) throw new TraceFormatError(`distinctPages ${distinctPages} is above 2^32-1`);
  const epochCount = r.varint('epochCount');
  if (epochCount < 1) throw new TraceFormatError('the trace has no epochs');
  // Each epoch costs at least one byte: a count the body cannot hold is corruption, caught
  // before allocating for it.
  if (epochCount > r.remaining) throw new TraceFormatError(`corrupt body: ${epochCount} epochs cannot fit in ${r.remaining} bytes`);
  const programLen = r.varint('program length');
  let program: string;
  try {
    program = new TextDecoder('utf-8', { fatal: true }).decode(r.bytes(programLen, 'program'));
  } catch (e) {
    if (e instanceof TraceFormatError) throw e;
    throw new TraceFormatError('corrupt body: the program name is not UTF-8');
  }
  const writes: Uint32Array[] = [];
  const reads: Uint32Array[] | null = flags & TRACE_FLAG_READS ? [] : null;
  for (let e = 0; e < epochCount; e++) {
    writes.push(readPages(r, distinctPages, `epoch ${e} writes`));
    if (reads !== null) reads.push(readPages(r, distinctPages, `epoch ${e} reads`));
  }
  if (r.remaining !== 0) throw new TraceFormatError(`corrupt body: ${r.remaining} bytes after the last epoch`);
  return { pageSize, epochUnit, epochLength, totalUnits, nativeRunNs, distinctPages, program, writes, reads };
}
