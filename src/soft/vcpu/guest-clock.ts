// The pacing guests' clock (guest/workload.ts: dirty-rate counts pages written, trace counts
// epochs replayed): when a pacing guest is ahead of its rate it halts until its timer, as a real
// dirtier sleeps (a guest HLT woken by its timer interrupt).
// Thread-confined: one per vCPU thread, used by runner.ts.
//
// Schedule: unit k (a page written, an epoch begun) is due at t0 + k / rate. A guest that fell more than CATCH_UP_MS behind
// (paused by a migration's switchover, starved of a CPU) starts a new schedule from now instead
// of bursting to catch up, so its rate over any window stays near the target.

/** Halting for less than this is not worth an exit. */
const MIN_HALT_MS = 0.2;
/** Lag forgiven rather than made up for. */
const CATCH_UP_MS = 50;

export class GuestClock {
  private readonly pagesPerMs: number;
  private t0 = -1;
  private base = 0;

  /** unitsPerSecond: the vCPU's rate in pages (dirty-rate) or epochs (trace); 0: unpaced, never halts. */
  constructor(unitsPerSecond: number) {
    this.pagesPerMs = unitsPerSecond / 1000;
  }

  /** The guest has done `written` units in all: the time to halt until, or 0 to go on. */
  haltUntil(written: number): number {
    if (this.pagesPerMs === 0) return 0;
    const now = performance.now();
    if (this.t0 < 0) {
      this.t0 = now;
      this.base = written;
      return 0;
    }
    const due = this.t0 + (written - this.base) / this.pagesPerMs;
    if (now > due + CATCH_UP_MS) {
      this.t0 = now;
      this.base = written;
      return 0;
    }
    return due - now >= MIN_HALT_MS ? due : 0;
  }
}
