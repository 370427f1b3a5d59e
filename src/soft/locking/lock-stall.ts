// How long faulting threads waited for the MMU lock (part 5 of issue 11: the vCPU stall a
// write-protect sweep, a collapse zap or a flush behind the lock causes).
//
// Recorded ONLY on the contended path: MmuLock.faultLock / relaxLock first try the lock; only
// when the try fails does the thread read the clock, block, read the clock again and record
// the wait here. The lockless write-protect fast path ('parallel' mode) never comes here, and an
// uncontended fault pays nothing but the try (one RMW, as the plain lock would).
//
// Shared layout (one SharedArrayBuffer, created with the MmuLock, attached by every thread):
//   Int32 header: [0] rows claimed so far, [1] generation (bumped by reset()).
//   Float64 rows after the header, ROW_WORDS each:
//     [0] generation the row's contents belong to, [1] waits, [2] sum ns, [3] max ns,
//     [4..4+BUCKETS) log-scale histogram (4 buckets per power of two of nanoseconds).
// Concurrency rules: a thread claims its own row (Atomics.add on the header) at its first
// contended wait and is that row's only writer (plain stores). A reset only bumps the
// generation; a writer that sees its row's generation is old zeroes the row before it records,
// and readers skip rows of an older generation. So reset never races a writer's stores, and a
// reader (the VMM, any time) sees each row at most a few records behind, exact once the vCPUs
// have stopped. Rows beyond MAX_ROWS are not recorded (counted in `dropped`, header word 2).

export const STALL_BUCKETS = 128;
const ROW_WORDS = 4 + STALL_BUCKETS;
const MAX_ROWS = 256;
const HEADER_BYTES = 16;

export interface StallSummary {
  /** Contended lock acquisitions (waits) recorded. */
  waits: number;
  sumSeconds: number;
  maxSeconds: number;
  /** 99th percentile of the recorded waits (bucket upper bound: within ~19%). */
  p99Seconds: number;
  /** Per recording thread (one row per vCPU that ever waited), in claim order. */
  perThread: { waits: number; sumSeconds: number; maxSeconds: number }[];
}

function bucketOf(ns: number): number {
  if (ns < 1) return 0;
  const b = Math.floor(4 * Math.log2(ns)) + 1;
  return b >= STALL_BUCKETS ? STALL_BUCKETS - 1 : b;
}

/** Upper bound (ns) of a bucket: bucket b holds [2^((b-1)/4), 2^(b/4)). */
function bucketUpperNs(b: number): number {
  return b === 0 ? 1 : 2 ** (b / 4);
}

export class LockStallRecorder {
  private readonly hdr: Int32Array;
  private readonly rows: Float64Array;
  private row = -1;

  constructor(readonly sab: SharedArrayBuffer) {
    this.hdr = new Int32Array(sab, 0, 4);
    this.rows = new Float64Array(sab, HEADER_BYTES);
  }

  static newBuffer(): SharedArrayBuffer {
    return new SharedArrayBuffer(HEADER_BYTES + MAX_ROWS * ROW_WORDS * 8);
  }

  /** Record one wait of `ns` nanoseconds by this thread (contended path only). */
  record(ns: number): void {
    let row = this.row;
    if (row < 0) {
      row = Atomics.add(this.hdr, 0, 1);
      if (row >= MAX_ROWS) {
        Atomics.add(this.hdr, 2, 1);
        return;
      }
      this.row = row;
    }
    const a = this.rows;
    const o = row * ROW_WORDS;
    const gen = Atomics.load(this.hdr, 1);
    if (a[o] !== gen) {
      a.fill(0, o, o + ROW_WORDS);
      a[o] = gen;
    }
    a[o + 1] = a[o + 1]! + 1;
    a[o + 2] = a[o + 2]! + ns;
    if (ns > a[o + 3]!) a[o + 3] = ns;
    const b = o + 4 + bucketOf(ns);
    a[b] = a[b]! + 1;
  }

  /** Forget everything recorded so far (the VMM, e.g. before a benchmark phase). */
  reset(): void {
    Atomics.add(this.hdr, 1, 1);
  }

  /** Waits recorded since the last reset, all threads (cheap: one load per claimed row). */
  totalWaits(): number {
    const claimed = Math.min(Atomics.load(this.hdr, 0), MAX_ROWS);
    const gen = Atomics.load(this.hdr, 1);
    let n = 0;
    for (let r = 0; r < claimed; r++) if (this.rows[r * ROW_WORDS] === gen) n += this.rows[r * ROW_WORDS + 1]!;
    return n;
  }

  summary(): StallSummary {
    const claimed = Math.min(Atomics.load(this.hdr, 0), MAX_ROWS);
    const gen = Atomics.load(this.hdr, 1);
    const a = this.rows;
    const hist = new Float64Array(STALL_BUCKETS);
    const perThread: StallSummary['perThread'] = [];
    let waits = 0;
    let sum = 0;
    let max = 0;
    for (let r = 0; r < claimed; r++) {
      const o = r * ROW_WORDS;
      if (a[o] !== gen) {
        perThread.push({ waits: 0, sumSeconds: 0, maxSeconds: 0 });
        continue;
      }
      const w = a[o + 1]!;
      waits += w;
      sum += a[o + 2]!;
      max = Math.max(max, a[o + 3]!);
      perThread.push({ waits: w, sumSeconds: a[o + 2]! / 1e9, maxSeconds: a[o + 3]! / 1e9 });
      for (let b = 0; b < STALL_BUCKETS; b++) hist[b] = hist[b]! + a[o + 4 + b]!;
    }
    let p99 = 0;
    if (waits > 0) {
      const target = Math.ceil(waits * 0.99);
      let seen = 0;
      for (let b = 0; b < STALL_BUCKETS; b++) {
        seen += hist[b]!;
        if (seen >= target) {
          p99 = Math.min(bucketUpperNs(b), max);
          break;
        }
      }
    }
    return { waits, sumSeconds: sum / 1e9, maxSeconds: max / 1e9, p99Seconds: p99 / 1e9, perThread };
  }
}
