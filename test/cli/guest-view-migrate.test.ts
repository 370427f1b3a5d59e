// migrate --json reports the guest's view of the migration (issue 12 part 3): per vCPU the
// longest gap between completed units of work on the source, across the switchover and on the
// destination (read from the --local receiver's report), p99, the rate before and during.
import { describe, expect, it } from 'vitest';
import { stage2 } from './run-cli.ts';

describe('migrate: the guest-perceived stall', () => {
  it('is in the JSON for every vCPU, and no shorter than the downtime (the guest cannot progress while paused)', async () => {
    const r = await stage2(['migrate', '--local', '--engine', 'soft', '-v', '2', '-b', '32M', '--workload', 'dirty-rate', '--dirty-rate', '100M', '--no-postcopy', '--warmup-ms', '500', '--dest-run-ms', '300', '--json'], { timeoutMs: 120_000 });
    expect(r.code, r.stderr).toBe(0);
    const s = JSON.parse(r.stdout);
    expect(s.status).toBe('completed');
    const g = s.guest;
    expect(g.unit).toBe('64 page accesses');
    expect(g.destinationObserved).toBe(true);
    expect(g.perVcpu).toHaveLength(2);
    const downtimeMs = s.downtimeSeconds * 1000;
    for (const v of g.perVcpu) {
      expect(v.lowerBound).toBe(false);
      // 50 MB/s per vCPU is 200 units/s: a gap of ~5 ms between units at most while running.
      const seen = JSON.stringify({ downtimeMs, stopAndCopy: s.stopAndCopy, v });
      // (On a loaded machine a paced guest falls behind its rate; it never runs far ahead of it.)
      expect(v.unitsPerSecBefore, seen).toBeGreaterThan(50);
      expect(v.unitsPerSecBefore, seen).toBeLessThan(250);
      expect(v.unitsPerSecDuring, seen).toBeGreaterThan(0);
      expect(typeof v.dipPercent).toBe('number');
      // The pause lies inside the gap across the switchover, less the 5 ms the guest may have
      // been between units anyway, and less the trip of STARTED back to the source, which the
      // downtime counts and the guest, already running there, does not.
      expect(v.switchoverStallMs, seen).toBeGreaterThan(downtimeMs - 6 - s.stopAndCopy.waitCompleteSeconds * 1000);
      expect(v.maxStallMs, seen).toBeGreaterThanOrEqual(v.switchoverStallMs);
      expect(v.p99StallMs, seen).toBeLessThanOrEqual(v.maxStallMs);
    }
    expect(g.maxStallMs).toBe(Math.max(...g.perVcpu.map((v: { maxStallMs: number }) => v.maxStallMs)));
    // The receiver's raw window is folded into `guest`, not repeated.
    expect(s.destination.guestProgress).toBeUndefined();
  }, 150_000);
});
