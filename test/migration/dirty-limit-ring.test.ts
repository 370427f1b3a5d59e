// dirtyRingForLimit: the ring a dirty-limit migration logs to, sized so that the sleep a vCPU
// over its limit takes at each ring-full exit ((entries - 64) pages at the limit) stays within
// the stall target where a KVM-sized ring (256..4096 entries, a power of two) allows.
import { describe, expect, it } from 'vitest';
import { DIRTY_LIMIT_STALL_TARGET_MS, dirtyRingForLimit } from '../../src/migration/dirty-limit.ts';

const MiB = 2 ** 20;
const stallMs = (entries: number, limit: number) => (((entries - 64) * 4096) / limit) * 1000;

describe('dirtyRingForLimit', () => {
  it('keeps the per-exit sleep within the target, else takes the smallest ring', () => {
    for (const limit of [MiB / 4, MiB, 2 * MiB, 8 * MiB, 32 * MiB, 64 * MiB, 160 * MiB, 1024 * MiB]) {
      const n = dirtyRingForLimit(limit);
      expect(n & (n - 1), `${limit}: power of two`).toBe(0);
      expect(n).toBeGreaterThanOrEqual(256);
      expect(n).toBeLessThanOrEqual(4096);
      if (n > 256) expect(stallMs(n, limit)).toBeLessThanOrEqual(DIRTY_LIMIT_STALL_TARGET_MS);
      // The next size up would break the target (or the cap).
      if (n < 4096) expect(stallMs(n * 2, limit)).toBeGreaterThan(DIRTY_LIMIT_STALL_TARGET_MS);
    }
    expect(dirtyRingForLimit(MiB)).toBe(256);
    expect(dirtyRingForLimit(8 * MiB)).toBe(256);
    expect(dirtyRingForLimit(64 * MiB)).toBe(1024);
    expect(dirtyRingForLimit(1024 * MiB)).toBe(4096);
  });
});
