// Memslot and logging churn while vCPUs run: publishing generations, waiting out readers,
// write-protect sweeps, harvests and unmaps of other slots must neither lose nor corrupt a guest
// write, nor stall the vCPUs.
import { afterEach, describe, expect, it } from 'vitest';
import { KVM_MEM_LOG_DIRTY_PAGES, MMU_LOCK_MODES } from '../../../src/vmm/engine.ts';
import { harvest, makeTestVm, snapshotWords, WorkloadModel, type TestVm } from './harness.ts';

let current: TestVm | null = null;
afterEach(async () => {
  await current?.vm.destroy();
  current = null;
});

describe.each(MMU_LOCK_MODES)('churn while vCPUs run, lock %s', (lock) => {
  it('memory equals the reference workload after logging toggles, harvests and slot create/delete', async () => {
    const vcpus = 3;
    const passes = 150;
    const t = (current = await makeTestVm({ lock, vcpus, bytesPerVcpu: 96 * 4096, kind: 'random', seed: 77, backing: 'anonymous_thp' }));
    const other = t.vm.mapHostMemory(2 ** 21, 'anonymous');
    let ops = 0;
    while (t.vm.progress().some((p) => p.passesCompleted < passes) && ops < 400) {
      // The allowance grows one pass per operation, so the churn always overlaps running vCPUs
      // however fast they are (a free-running guest could finish before the churn starts).
      t.vm.allowPasses(Math.min(passes, ops + 1));
      switch (ops % 5) {
        case 0:
          t.setLogging(true);
          break;
        case 1:
          harvest(t);
          break;
        case 2:
          t.vm.setUserMemoryRegion({ slot: 3, flags: KVM_MEM_LOG_DIRTY_PAGES, guestPhysAddr: 2 ** 36, memorySize: 2 ** 21, userspaceAddr: other.hva });
          break;
        case 3:
          t.vm.setUserMemoryRegion({ slot: 3, flags: 0, guestPhysAddr: 2 ** 36, memorySize: 0, userspaceAddr: other.hva });
          break;
        case 4:
          t.setLogging(false);
          break;
      }
      ops++;
      if (ops % 10 === 0) await new Promise((r) => setTimeout(r, 1));
    }
    t.vm.allowPasses(passes);
    await t.vm.waitForPasses(passes);
    expect(ops).toBeGreaterThan(20);
    const model = new WorkloadModel(t.spec, vcpus);
    for (let i = 0; i < passes; i++) model.step();
    const words = snapshotWords(t);
    for (let p = 0; p < t.pages; p++) if (words[p] !== model.expected(p)) expect.fail(`page ${p}: ${words[p]} != ${model.expected(p)} after ${ops} churn operations`);
    expect(t.vm.stats().memslotGeneration).toBeGreaterThan(ops / 2);
  });
});
