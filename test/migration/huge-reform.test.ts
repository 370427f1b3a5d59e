// A cancelled migration leaves the source with the huge mappings dirty logging split re-formed
// (soft engine, default in-place recovery), and its result says how many came back.
import { describe, it, expect } from 'vitest';
import { SoftEngine } from '../../src/soft/engine.ts';
import { createSourceVm } from '../../src/migration/source-vm.ts';
import { migrateInProcess } from './helpers.ts';
import { HUGE_RECOVERY_STRATEGIES } from '../../src/soft/huge/recovery.ts';

describe('huge pages across a cancelled migration (soft engine)', () => {
  it('cancelled mid-way: every 2 MiB region is a block again and the JSON counts them', async () => {
    const engine = new SoftEngine();
    const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 4 << 20, backing: 'hugetlb', workload: 'sequential' });
    const regions = (2 * (4 << 20)) / (2 << 20);
    const ac = new AbortController();
    let splitWhileLogging = -1;
    const { stats } = await migrateInProcess(vm, engine, {
      workload: spec,
      downtimeLimitMs: 0,
      maxRounds: 50,
      signal: ac.signal,
      onPhase: (p) => {
        if (p === 'iterative')
          setTimeout(() => {
            splitWhileLogging = vm.stats().pages_4k ?? 0;
            ac.abort();
          }, 20);
      },
    });
    try {
      expect(stats.status).toBe('cancelled');
      expect(stats.sourceIntact).toBe(true);
      expect(splitWhileLogging).toBeGreaterThan(0);
      const st = vm.stats();
      expect(st.pages_2m).toBe(regions);
      expect(st.pages_4k).toBe(0);
      expect(stats.hugePagesReformed).toBeGreaterThan(0);
      expect(stats.hugePagesReformed).toBeLessThanOrEqual(regions);
      expect(JSON.parse(JSON.stringify(stats)).hugePagesReformed).toBe(stats.hugePagesReformed);
    } finally {
      await vm.destroy();
    }
  });

  it.each(HUGE_RECOVERY_STRATEGIES)('completed with the source kept (%s): logging stops, its blocks come back, the JSON counts them', async (recover) => {
    const engine = new SoftEngine({ recover });
    const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 4 << 20, backing: 'hugetlb', workload: 'sequential' });
    const regions = (2 * (4 << 20)) / (2 << 20);
    try {
      const { stats } = await migrateInProcess(vm, new SoftEngine(), { workload: spec, downtimeLimitMs: 0, maxRounds: 3, destroyOnComplete: false });
      expect(stats.status).toBe('completed');
      expect(stats.verified).toBe(true);
      // Paused source: sync zaps (blocks come back on the next fault, after resume), async and
      // in-place leave blocks in the table right away (async: zapped, so 0 until faulted).
      if (recover === 'in-place') {
        expect(stats.hugePagesReformed).toBeGreaterThan(0);
        expect(vm.stats().pages_2m).toBe(regions);
      } else expect(stats.hugePagesReformed).toBeGreaterThanOrEqual(0);
      expect(vm.stats().pages_4k).toBe(0);
      expect(vm.memslots().every((m) => (m.flags & 1) === 0)).toBe(true);
    } finally {
      await vm.destroy();
    }
  });
});
