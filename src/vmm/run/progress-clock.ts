// The guest's progress clock: every vCPU thread stamps the wall-clock time at which it completes
// each unit of guest work into a ring of its own, and the VMM reads the rings while the vCPUs run.
// It is how a migration measures what the guest perceived (migration/guest-view/): the longest
// gap between two completed units, across the pause and the destination's restart.
//
// A unit is the engine's: soft, 64 guest page accesses (UNIT_PAGE_ACCESSES: a fixed amount of
// work whatever the workload, where a pass is anything from one trace epoch of 20 pages to the
// whole slice); kvm, one pass (its SYNC_PORT pass report: the kvm guest has no clock of its own
// and leaves the guest only there, so its clock is as coarse as a pass).
//
// Time is performance.timeOrigin + performance.now() in ms (wallClockMs), so that stamps from
// different threads and from the source and destination processes on one machine compare.
//
// Layout (one SharedArrayBuffer per VM): per vCPU a 64-byte line of Int32 words, of which word 0
// is the count of units stamped so far (mod 2^32), then per vCPU a ring of RING_ENTRIES Float64
// stamps; unit n's stamp is at ring[n % RING_ENTRIES].
//
// Concurrency rules: a vCPU's count and ring are written by its own vCPU thread only (one
// writer). It stores the stamp with a plain store, THEN the new count with Atomics.store. A
// reader loads the count with Atomics.load (which orders it after the stamps of every unit below
// that count), reads stamps below it, then loads the count again: a stamp of unit n is
// trustworthy only if n >= count_after - RING_ENTRIES (else the writer may have overwritten it
// while it was read). Nobody waits on these words; the reader never blocks the writer.

/** Stamps each vCPU's ring keeps: the VMM must read at least this often (in units). */
export const PROGRESS_RING_ENTRIES = 16384;
const RING_MASK = PROGRESS_RING_ENTRIES - 1;
const LINE_WORDS = 16;

/** Soft engine: guest page accesses per unit of progress. */
export const UNIT_PAGE_ACCESSES = 64;

/** What one unit of progress is on each engine (for reports). */
export function progressUnit(engine: string): string {
  return engine === 'kvm' ? 'pass' : `${UNIT_PAGE_ACCESSES} page accesses`;
}

/** Wall-clock milliseconds, comparable between threads and processes of one machine. */
export function wallClockMs(): number {
  return performance.timeOrigin + performance.now();
}

function lineBytes(vcpus: number): number {
  return vcpus * LINE_WORDS * 4;
}

export function newProgressClock(vcpus: number): SharedArrayBuffer {
  return new SharedArrayBuffer(lineBytes(vcpus) + vcpus * PROGRESS_RING_ENTRIES * 8);
}

/** The vCPU thread's side: stamp() after each completed unit. Its own vCPU's ring only. */
export class ProgressStamper {
  private readonly counts: Int32Array;
  private readonly ring: Float64Array;
  private readonly word: number;
  private readonly origin = performance.timeOrigin;
  private n = 0;

  constructor(sab: SharedArrayBuffer, vcpus: number, vcpu: number) {
    this.counts = new Int32Array(sab, 0, vcpus * LINE_WORDS);
    this.ring = new Float64Array(sab, lineBytes(vcpus) + vcpu * PROGRESS_RING_ENTRIES * 8, PROGRESS_RING_ENTRIES);
    this.word = vcpu * LINE_WORDS;
    this.n = Atomics.load(this.counts, this.word);
  }

  stamp(): void {
    const n = this.n;
    this.ring[n & RING_MASK] = this.origin + performance.now();
    this.n = (n + 1) | 0;
    Atomics.store(this.counts, this.word, this.n);
  }
}

/** The VMM's side: read any vCPU's stamps without stopping it. */
export class ProgressClock {
  private readonly counts: Int32Array;
  private readonly rings: Float64Array;

  constructor(
    readonly sab: SharedArrayBuffer,
    readonly vcpus: number,
  ) {
    this.counts = new Int32Array(sab, 0, vcpus * LINE_WORDS);
    this.rings = new Float64Array(sab, lineBytes(vcpus), vcpus * PROGRESS_RING_ENTRIES);
  }

  /** Units vCPU `vcpu` has completed (mod 2^32). */
  units(vcpu: number): number {
    return Atomics.load(this.counts, vcpu * LINE_WORDS) >>> 0;
  }

  /**
   * Hand `each` the stamps of vCPU `vcpu`'s units from number `from` (mod 2^32) on, oldest
   * first. Returns the count to pass as `from` next time and how many units were lost (overwritten
   * before this read: they are counted, their stamps are gone).
   */
  read(vcpu: number, from: number, each: (ms: number) => void): { next: number; lost: number } {
    const c = this.units(vcpu);
    let ahead = (c - from) >>> 0;
    if (ahead === 0) return { next: c, lost: 0 };
    let lost = 0;
    if (ahead > PROGRESS_RING_ENTRIES) {
      lost = ahead - PROGRESS_RING_ENTRIES;
      ahead = PROGRESS_RING_ENTRIES;
    }
    const start = (c - ahead) >>> 0;
    const base = vcpu * PROGRESS_RING_ENTRIES;
    const stamps = new Float64Array(ahead);
    for (let i = 0; i < ahead; i++) stamps[i] = this.rings[base + (((start + i) >>> 0) & RING_MASK)]!;
    // Stamps the writer may have overwritten meanwhile (it got more than a ring ahead of `start`).
    const after = this.units(vcpu);
    const overwritten = Math.min(ahead, Math.max(0, ((after - start) >>> 0) - PROGRESS_RING_ENTRIES));
    lost += overwritten;
    for (let i = overwritten; i < ahead; i++) each(stamps[i]!);
    return { next: c, lost };
  }
}
