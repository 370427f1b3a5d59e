// Dirty-limit (QEMU 8.1's set-vcpu-dirty-limit) on every engine with a dirty ring: a vCPU held to
// a limit dirties no faster than it, a vCPU without one runs on unslowed, and lifting the limit
// ends the sleeps.
import { afterEach, describe, expect, it } from 'vitest';
import { enginesUnderTest } from './engines.ts';
import { createWorkloadVm } from '../../src/vmm/workload-vm.ts';
import { KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE, type Vm } from '../../src/vmm/engine.ts';

const { engines } = await enginesUnderTest('dirty-limit conformance');
const MiB = 2 ** 20;

let vm: Vm | null = null;
afterEach(async () => {
  await vm?.destroy();
  vm = null;
});

/** Pages each vCPU wrote over `ms` (passes x slice pages), from the engine-neutral progress. */
async function pagesPerSecond(v: Vm, pagesPerPass: number, ms: number): Promise<number[]> {
  const p0 = v.progress().map((p) => p.passesCompleted);
  const t0 = performance.now();
  await new Promise((r) => setTimeout(r, ms));
  const seconds = (performance.now() - t0) / 1000;
  return v.progress().map((p, i) => ((p.passesCompleted - p0[i]!) * pagesPerPass) / seconds);
}

for (const engine of engines) {
  describe(`dirty-limit on the ${engine.kind} engine`, () => {
    it('only the vCPU over its limit sleeps, and it stays under the limit', async (ctx) => {
      if (engine.capabilities().dirtyRingMaxEntries < 256) return ctx.skip();
      const pages = 256; // 1 MiB slices, a 256-entry ring: an exit every 192 pages
      const w = await createWorkloadVm(engine, { vcpus: 2, bytesPerVcpu: pages * PAGE_SIZE, backing: 'anonymous', workload: 'sequential', dirtyRingEntries: 256 });
      vm = w.vm;
      vm.allowPasses(1);
      await vm.waitForPasses(1);
      vm.setUserMemoryRegion({ ...w.testRegion, flags: KVM_MEM_LOG_DIRTY_PAGES });
      const limit = 2 * MiB; // 512 pages/s
      vm.setVcpuDirtyLimit(limit, 0);
      vm.allowPasses(Infinity);
      const [limited, free] = await pagesPerSecond(vm, pages, 1500);
      const st = vm.stats();
      expect(limited! * PAGE_SIZE).toBeLessThan(limit * 1.25); // one ring's worth of slack over 1.5 s
      expect(free!).toBeGreaterThan(3 * (limit / PAGE_SIZE));
      expect(st['vcpu0.dirtyLimitSleepMs']).toBeGreaterThan(500);
      expect(st['vcpu1.dirtyLimitSleepMs']).toBe(0);
      // Lifted: vCPU 0 runs as fast as vCPU 1 again.
      vm.setVcpuDirtyLimit(0);
      // A sleep the lift cut short is counted when it ends (at once: the lift kicks; but give a
      // loaded machine time to run the thread); after that, no more sleeping.
      await new Promise((r) => setTimeout(r, 300));
      const slept = vm.stats()['vcpu0.dirtyLimitSleepMs']!;
      const [after] = await pagesPerSecond(vm, pages, 500);
      expect(after!).toBeGreaterThan(3 * (limit / PAGE_SIZE));
      expect(vm.stats()['vcpu0.dirtyLimitSleepMs']! - slept).toBe(0);
      await vm.pause();
    });

    it('is refused without a dirty ring, and for a vCPU that does not exist', async () => {
      const w = await createWorkloadVm(engine, { vcpus: 1, bytesPerVcpu: 64 * PAGE_SIZE, backing: 'anonymous', workload: 'sequential' });
      vm = w.vm;
      expect(() => vm!.setVcpuDirtyLimit(MiB)).toThrow(/dirty ring/);
    });
  });
}
