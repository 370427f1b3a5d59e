// The guest's progress clock (vmm/run/progress-clock.ts) on every engine: a unit is stamped as
// the guest completes it (soft: every 64 page accesses; kvm: every pass report), read while the
// vCPUs run, in order, with wall-clock stamps.
import { afterEach, describe, expect, it } from 'vitest';
import { enginesUnderTest } from './engines.ts';
import { createWorkloadVm } from '../../src/vmm/workload-vm.ts';
import { PAGE_SIZE, type Vm } from '../../src/vmm/engine.ts';
import { UNIT_PAGE_ACCESSES, wallClockMs } from '../../src/vmm/run/progress-clock.ts';

const { engines } = await enginesUnderTest('progress-clock conformance');

let vm: Vm | null = null;
afterEach(async () => {
  await vm?.destroy();
  vm = null;
});

for (const engine of engines) {
  describe(`progress clock on the ${engine.kind} engine`, () => {
    it('stamps each completed unit of each vCPU, in order, between the VMM looking before and after', async () => {
      const pages = 1024;
      const w = await createWorkloadVm(engine, { vcpus: 2, bytesPerVcpu: pages * PAGE_SIZE, backing: 'anonymous', workload: 'sequential' });
      vm = w.vm;
      const clock = vm.progressClock()!;
      expect(clock.vcpus).toBe(2);
      // createWorkloadVm populated memory (one pass).
      const t0 = wallClockMs();
      const before = [clock.units(0), clock.units(1)];
      vm.allowPasses(4);
      await vm.waitForPasses(4);
      const t1 = wallClockMs();
      const perPass = engine.kind === 'soft' ? pages / UNIT_PAGE_ACCESSES : 1;
      for (let v = 0; v < 2; v++) {
        expect(clock.units(v)).toBe(4 * perPass);
        const stamps: number[] = [];
        const r = clock.read(v, before[v]!, (ms) => stamps.push(ms));
        expect(r.lost).toBe(0);
        expect(stamps).toHaveLength(clock.units(v) - before[v]!);
        expect(stamps[0]!).toBeGreaterThanOrEqual(t0 - 1);
        expect(stamps.at(-1)!).toBeLessThanOrEqual(t1 + 1);
        for (let i = 1; i < stamps.length; i++) expect(stamps[i]!).toBeGreaterThanOrEqual(stamps[i - 1]!);
      }
    });
  });
}
