// What the `trace` workload (workload.ts) needs of its trace files: a reference that travels in
// the WorkloadSpec (to vCPU worker threads by structured clone, to a migration destination in
// the CONFIG record), and a per-thread cache of the loaded traces in the form the interpreter's
// loop reads (one flat page array and per-epoch offsets).
//
// The spec carries the file's path and SHA-256 digest, not its contents: a trace is up to a few
// MB, every thread loads it once, and a destination that has no such file, or a different one,
// must refuse to run a guest that would write other pages than the source's (TraceFileError).
//
// Which epoch a pass replays: vCPU v replays traces[v % traces.length] starting at epoch
// v * shift, one epoch per pass, wrapping around: pass k (1-based) is epoch
// (v * shift + k - 1) mod epochCount. A page index i of that epoch lands on page i mod
// pagesPerVcpu of the vCPU's slice.

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { decodeTrace, TraceFormatError, type Trace } from './trace-format.ts';

export interface TraceRef {
  /** Absolute path of the trace file (the destination of a migration looks at the same path). */
  path: string;
  /** sha256 of the file's bytes, hex. */
  digest: string;
}

/** A trace file is missing, unreadable, not a trace, or not the one the spec names. */
export class TraceFileError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TraceFileError';
  }
}

export interface LoadedTrace {
  trace: Trace;
  /** Every epoch's written pages, one after the other. */
  flat: Uint32Array;
  /** Epoch e's pages are flat[offsets[e], offsets[e + 1]). */
  offsets: Uint32Array;
  /** Epochs per second when replayed in the program's own (native) time. */
  recordedEpochsPerSecond: number;
}

/** Per thread: every thread loads each trace once. */
const cache = new Map<string, LoadedTrace>();

function sha256(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

function readTraceFile(path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new TraceFileError(`trace ${path}: ${code === 'ENOENT' ? 'no such file' : (e as Error).message}`);
  }
}

function decode(path: string, bytes: Uint8Array): Trace {
  try {
    return decodeTrace(bytes);
  } catch (e) {
    if (e instanceof TraceFormatError) throw new TraceFileError(`trace ${path}: ${e.message}`);
    throw e;
  }
}

function index(trace: Trace): LoadedTrace {
  const offsets = new Uint32Array(trace.writes.length + 1);
  let n = 0;
  trace.writes.forEach((w, e) => {
    offsets[e] = n;
    n += w.length;
  });
  offsets[trace.writes.length] = n;
  const flat = new Uint32Array(n);
  trace.writes.forEach((w, e) => flat.set(w, offsets[e]));
  const seconds = trace.nativeRunNs / 1e9;
  return { trace, flat, offsets, recordedEpochsPerSecond: seconds > 0 ? trace.writes.length / seconds : 0 };
}

/** Open a trace named on the command line: its reference (absolute path, digest), checked to decode. */
export function traceRef(path: string): TraceRef {
  const abs = resolve(path);
  const bytes = readTraceFile(abs);
  const digest = sha256(bytes);
  const key = `${abs}\0${digest}`;
  if (!cache.has(key)) cache.set(key, index(decode(abs, bytes)));
  return { path: abs, digest };
}

/** The trace a reference names, from this thread's cache or the file (whose digest must match). */
export function loadTrace(ref: TraceRef): LoadedTrace {
  const key = `${ref.path}\0${ref.digest}`;
  const hit = cache.get(key);
  if (hit !== undefined) return hit;
  const bytes = readTraceFile(ref.path);
  const digest = sha256(bytes);
  if (digest !== ref.digest) throw new TraceFileError(`trace ${ref.path}: its sha256 is ${digest}, the workload replays ${ref.digest} (a different file)`);
  const t = index(decode(ref.path, bytes));
  cache.set(key, t);
  return t;
}

/** The epoch vCPU `vcpu` replays in pass `pass` (1-based). */
export function traceEpoch(epochCount: number, shift: number, vcpu: number, pass: number): number {
  return (((vcpu * shift) % epochCount) + ((pass - 1) % epochCount)) % epochCount;
}
