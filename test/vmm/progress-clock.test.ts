import { describe, expect, it } from 'vitest';
import { newProgressClock, PROGRESS_RING_ENTRIES, ProgressClock, ProgressStamper } from '../../src/vmm/run/progress-clock.ts';

describe('progress clock', () => {
  it('reads each vCPU its own stamps, oldest first, from where it left off', () => {
    const sab = newProgressClock(2);
    const clock = new ProgressClock(sab, 2);
    const s0 = new ProgressStamper(sab, 2, 0);
    const s1 = new ProgressStamper(sab, 2, 1);
    for (let i = 0; i < 5; i++) s0.stamp();
    s1.stamp();
    expect(clock.units(0)).toBe(5);
    expect(clock.units(1)).toBe(1);
    const seen: number[] = [];
    let r = clock.read(0, 0, (ms) => seen.push(ms));
    expect(r).toEqual({ next: 5, lost: 0 });
    expect(seen).toHaveLength(5);
    for (let i = 1; i < 5; i++) expect(seen[i]!).toBeGreaterThanOrEqual(seen[i - 1]!);
    // Stamps are wall-clock ms (timeOrigin + now).
    expect(Math.abs(seen[0]! - Date.now())).toBeLessThan(1000);
    s0.stamp();
    const more: number[] = [];
    r = clock.read(0, r.next, (ms) => more.push(ms));
    expect(r).toEqual({ next: 6, lost: 0 });
    expect(more).toHaveLength(1);
  });

  it('counts the units a slow reader lost to the ring wrapping, and hands over only the stamps still there', () => {
    const sab = newProgressClock(1);
    const clock = new ProgressClock(sab, 1);
    const s = new ProgressStamper(sab, 1, 0);
    for (let i = 0; i < PROGRESS_RING_ENTRIES + 100; i++) s.stamp();
    let n = 0;
    const r = clock.read(0, 0, () => n++);
    expect(r).toEqual({ next: PROGRESS_RING_ENTRIES + 100, lost: 100 });
    expect(n).toBe(PROGRESS_RING_ENTRIES);
  });
});
