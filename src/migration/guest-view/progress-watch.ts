// Watching the guest's progress clock (vmm/run/progress-clock.ts) through a migration, on either
// side: from `fromMs` on, every gap between a vCPU's consecutive units goes into a histogram
// (gap-histogram.ts); before it, the units of the last LOOK_BACK_MS give the rate the guest ran at
// before the migration. closeAt(ms) ends each vCPU's window at its first unit at or after ms (the
// first sign of life once the migration is over); what comes after is not counted.
//
// The source watches from the migration's start until it returns; the destination from the
// moment it starts the guest until its first unit after the migration's end, and hands its
// window (toJSON) to the source, which joins the two (guest-view.ts). Stamps are wall-clock ms,
// so the two processes' windows compare on one machine.
//
// Concurrency: the VMM's main thread only. It reads the rings with ProgressClock.read, never
// stopping a vCPU; a timer samples every SAMPLE_MS so a ring (16384 units) never wraps unread
// unless the main thread is held up for longer than the guest needs to complete that many units
// (then the units are counted as lost, their gaps unknown: reported).
import { PROGRESS_RING_ENTRIES, wallClockMs, type ProgressClock } from '../../vmm/run/progress-clock.ts';
import { GapHistogram, type GapBuckets } from './gap-histogram.ts';

/** How far before the migration the "before" rate looks. */
export const LOOK_BACK_MS = 1000;
const SAMPLE_MS = 10;

/** What the watch reads (ProgressClock; tests give it synthetic stamps). */
export type ProgressClockReader = Pick<ProgressClock, 'vcpus' | 'units' | 'read'>;

/** One vCPU's window, as the destination reports it and the source keeps it. */
export interface VcpuProgressWindow {
  vcpu: number;
  /** Units in the look-back before fromMs, and the look-back's length (shorter if the guest started later). */
  unitsBefore: number;
  beforeMs: number;
  /** The last unit before fromMs (null if none was seen). */
  lastBeforeMs: number | null;
  /** Units from fromMs on, up to and including the one that closed the window. */
  units: number;
  firstMs: number | null;
  lastMs: number | null;
  /** Gaps whose later unit is in the window (the first one from lastBeforeMs, if any). */
  gaps: { count: number; maxMs: number; buckets: GapBuckets };
  /** Units the ring overwrote before they were read (their gaps unknown). */
  lost: number;
  /** A unit at or after closeAtMs was seen: the window is complete. */
  closed: boolean;
}

export interface ProgressWindow {
  fromMs: number;
  /** When the watch stopped. */
  toMs: number;
  closeAtMs: number | null;
  vcpus: VcpuProgressWindow[];
}

class VcpuWatch {
  next = 0;
  prev: number | null = null;
  oldest: number | null = null;
  unitsBefore = 0;
  lastBeforeMs: number | null = null;
  units = 0;
  firstMs: number | null = null;
  lastMs: number | null = null;
  readonly gaps = new GapHistogram();
  lost = 0;
  closed = false;
}

export class ProgressWatch {
  private readonly w: VcpuWatch[] = [];
  private timer: NodeJS.Timeout | null = null;
  private closeAtMs: number | null = null;
  private toMs: number | null = null;
  private readonly each: ((ms: number) => void)[] = [];

  /** Where the look-back starts: LOOK_BACK_MS before fromMs, or later if the guest ran freely only since. */
  private readonly lookBackMs: number;

  /**
   * Start watching now; `fromMs` (default now) divides "before" from the window; units before
   * `runningSinceMs` (e.g. populating memory) do not count for the rate before.
   */
  constructor(
    private readonly clock: ProgressClockReader,
    readonly fromMs: number = wallClockMs(),
    runningSinceMs = -Infinity,
  ) {
    this.lookBackMs = Math.max(fromMs - LOOK_BACK_MS, runningSinceMs);
    for (let v = 0; v < clock.vcpus; v++) {
      const s = new VcpuWatch();
      // Everything the ring still holds: the look-back comes from history.
      const units = clock.units(v);
      s.next = (units - Math.min(units, PROGRESS_RING_ENTRIES)) >>> 0;
      this.w.push(s);
      this.each.push((ms) => this.stamp(s, ms));
    }
    this.sample();
    this.timer = setInterval(() => this.sample(), SAMPLE_MS);
  }

  private stamp(s: VcpuWatch, ms: number): void {
    if (s.closed) return;
    s.oldest ??= ms;
    if (ms < this.fromMs) {
      if (ms >= this.lookBackMs) s.unitsBefore++;
      s.lastBeforeMs = ms;
    } else {
      if (s.prev !== null) s.gaps.add(ms - s.prev);
      s.units++;
      s.firstMs ??= ms;
      s.lastMs = ms;
      if (this.closeAtMs !== null && ms >= this.closeAtMs) s.closed = true;
    }
    s.prev = ms;
  }

  /** Read what the rings hold now. */
  sample(): void {
    for (let v = 0; v < this.w.length; v++) {
      const s = this.w[v]!;
      if (s.closed) continue;
      const r = this.clock.read(v, s.next, this.each[v]!);
      s.next = r.next;
      s.lost += r.lost;
    }
    // Every window closed: nothing more to read (a destination may run the guest for long).
    if (this.closeAtMs !== null && this.timer && this.w.every((s) => s.closed)) {
      clearInterval(this.timer);
      this.timer = null;
    }
  }

  /** The migration is over: each vCPU's window ends at its first unit at or after now. */
  closeAt(ms: number = wallClockMs()): void {
    this.sample();
    this.closeAtMs = ms;
  }

  /** True once every vCPU that ever made progress has closed its window. */
  private allClosed(): boolean {
    return this.w.every((s) => s.closed || s.prev === null);
  }

  /** Wait (up to maxMs) for every vCPU that makes progress to close its window. */
  async settle(maxMs: number): Promise<void> {
    const until = performance.now() + maxMs;
    for (;;) {
      this.sample();
      if (this.allClosed() || performance.now() >= until) return;
      await new Promise((r) => setTimeout(r, SAMPLE_MS));
    }
  }

  /** Stop sampling; the windows as they stand (`nowMs`: the time to call the end, for tests). */
  stop(nowMs: number = wallClockMs()): ProgressWindow {
    if (this.toMs === null) {
      this.sample();
      if (this.timer) clearInterval(this.timer);
      this.timer = null;
      this.toMs = nowMs;
    }
    const fromMs = this.fromMs;
    return {
      fromMs,
      toMs: this.toMs!,
      closeAtMs: this.closeAtMs,
      vcpus: this.w.map((s, vcpu) => ({
        vcpu,
        unitsBefore: s.unitsBefore,
        beforeMs: s.oldest === null ? 0 : Math.max(0, fromMs - Math.max(this.lookBackMs, s.oldest)),
        lastBeforeMs: s.lastBeforeMs,
        units: s.units,
        firstMs: s.firstMs,
        lastMs: s.lastMs,
        gaps: s.gaps.toJSON(),
        lost: s.lost,
        closed: s.closed,
      })),
    };
  }
}
