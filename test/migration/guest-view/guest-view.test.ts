// The guest's view of a migration from synthetic progress-clock stamps: gaps, the stall across the
// switchover, p99, the rate before and during, and the dip.
import { afterEach, describe, expect, it } from 'vitest';
import { GapHistogram } from '../../../src/migration/guest-view/gap-histogram.ts';
import { ProgressWatch, type ProgressClockReader } from '../../../src/migration/guest-view/progress-watch.ts';
import { guestView } from '../../../src/migration/guest-view/guest-view.ts';

/** A progress clock whose stamps the test writes. */
class FakeClock implements ProgressClockReader {
  readonly stamps: number[][];
  constructor(readonly vcpus: number) {
    this.stamps = Array.from({ length: vcpus }, () => []);
  }
  units(v: number): number {
    return this.stamps[v]!.length;
  }
  read(v: number, from: number, each: (ms: number) => void): { next: number; lost: number } {
    const s = this.stamps[v]!;
    for (let i = from; i < s.length; i++) each(s[i]!);
    return { next: s.length, lost: 0 };
  }
  /** Stamps every `stepMs` from `fromMs` to `toMs` inclusive. */
  run(v: number, fromMs: number, toMs: number, stepMs: number): void {
    for (let t = fromMs; t <= toMs + 1e-9; t += stepMs) this.stamps[v]!.push(t);
  }
}

const watches: ProgressWatch[] = [];
afterEach(() => {
  for (const w of watches.splice(0)) w.stop();
});
function watch(clock: FakeClock, fromMs: number): ProgressWatch {
  const w = new ProgressWatch(clock, fromMs);
  watches.push(w);
  return w;
}

describe('gap histogram', () => {
  it('keeps the largest gap exactly and any quantile within 1%', () => {
    const h = new GapHistogram();
    for (let g = 1; g <= 100; g++) h.add(g);
    expect(h.maxMs).toBe(100);
    expect(h.quantileMs(0.99)!).toBeGreaterThanOrEqual(99);
    expect(h.quantileMs(0.99)!).toBeLessThanOrEqual(99 * 1.01);
    expect(h.quantileMs(0.5)!).toBeGreaterThanOrEqual(50);
    expect(h.quantileMs(0.5)!).toBeLessThanOrEqual(50 * 1.01);
    expect(new GapHistogram().quantileMs(0.99)).toBeNull();
    const copy = GapHistogram.fromJSON(JSON.parse(JSON.stringify(h)));
    expect(copy.count).toBe(100);
    expect(copy.quantileMs(0.99)).toBe(h.quantileMs(0.99));
  });
});

describe('guest view of a migration', () => {
  const T = 1_000_000; // migration start, ms

  it('joins source and destination: the switchover gap is the max stall; p99, rates and dip', () => {
    const src = new FakeClock(1);
    src.run(0, T - 1000, T, 1);
    const s = watch(src, T);
    src.run(0, T + 1, T + 500, 1); // 1000 units/s, paused after T + 500
    s.closeAt(T + 600);
    const srcWindow = s.stop(T + 600);
    const dst = new FakeClock(1);
    const d = watch(dst, T + 560);
    dst.run(0, T + 580, T + 640, 2); // restarted 80 ms after the last unit on the source
    d.closeAt(T + 650); // the migration ended at T + 650: the window closes at the unit at 650
    dst.run(0, T + 642, T + 700, 2);
    const dstWindow = d.stop(T + 800);
    const v = guestView('64 page accesses', srcWindow, dstWindow, 'destination');
    const c = v.perVcpu[0]!;
    expect(c.switchoverStallMs).toBeCloseTo(80, 6);
    expect(c.maxStallMs).toBeCloseTo(80, 6);
    // 500 gaps of 1 ms on the source (the first from the last unit before T), 80, 35 of 2 ms: p99 is 2 ms.
    expect(c.p99StallMs!).toBeGreaterThanOrEqual(2);
    expect(c.p99StallMs!).toBeLessThanOrEqual(2 * 1.01);
    expect(c.unitsPerSecBefore).toBe(1000);
    // 501 units on the source (T .. T + 500), 36 on the destination (T + 580 .. T + 650), over 650 ms.
    expect(c.unitsDuring).toBe(537);
    expect(c.unitsPerSecDuring).toBe(Math.round((537 / 650) * 1000));
    expect(c.dipPercent).toBeCloseTo(100 * (1 - 826 / 1000), 0);
    expect(c.lowerBound).toBe(false);
    expect(v.maxStallMs).toBe(c.maxStallMs);
    expect(v.destinationObserved).toBe(true);
  });

  it('without the destination, the stall runs to when the source stopped looking, flagged a lower bound', () => {
    const src = new FakeClock(2);
    src.run(0, T - 500, T + 100, 5);
    // vCPU 1 is halted: no progress at all.
    const s = watch(src, T);
    s.closeAt(T + 300);
    const w = s.stop(T + 300);
    const v = guestView('64 page accesses', w, null, 'destination');
    expect(v.perVcpu[0]!.maxStallMs).toBe(200);
    expect(v.perVcpu[0]!.lowerBound).toBe(true);
    expect(v.perVcpu[0]!.unitsPerSecBefore).toBe(200);
    expect(v.perVcpu[1]!.maxStallMs).toBeNull();
    expect(v.perVcpu[1]!.dipPercent).toBeNull();
    expect(v.maxStallMs).toBe(200);
    expect(v.destinationObserved).toBe(false);
  });

  it('a failed migration: the guest went on on the source; the pause shows as a gap, the window ends at its first unit after', () => {
    const src = new FakeClock(1);
    src.run(0, T - 1000, T + 200, 10);
    const s = watch(src, T);
    s.closeAt(T + 250);
    src.run(0, T + 260, T + 400, 10); // paused 60 ms, resumed after the failure at T + 250
    const v = guestView('64 page accesses', s.stop(T + 500), null, 'source');
    const c = v.perVcpu[0]!;
    expect(c.maxStallMs).toBeCloseTo(60, 6);
    expect(c.switchoverStallMs).toBeNull();
    expect(c.unitsDuring).toBe(22); // T .. T + 200 and the unit at T + 260 that closed the window
    expect(c.lowerBound).toBe(false);
  });
});
