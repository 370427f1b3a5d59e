// Re-forming huge mappings when dirty logging stops (huge/recovery.ts, seed 004): every
// strategy brings every eligible 2 MiB region back to a block that maps the host's huge page,
// vCPU writes through it land in the right frames; memslot deletes / moves in the middle of a
// background recovery neither crash nor map stale frames; teardown during recovery is clean.
import { afterEach, describe, expect, it } from 'vitest';
import { MMU_LOCK_MODES } from '../../../src/vmm/engine.ts';
import { HUGE_RECOVERY_STRATEGIES } from '../../../src/soft/huge/recovery.ts';
import { FAULT_OK } from '../../../src/soft/mmu/fault.ts';
import { newLeafLookup } from '../../../src/soft/pgtable/stage2.ts';
import { GupResult } from '../../../src/soft/hostmm/host-address-space.ts';
import { makeTestVm, snapshotWords, WorkloadModel, type TestVm } from '../vcpu/harness.ts';

let current: TestVm | null = null;
afterEach(async () => {
  await current?.vm.destroy();
  current = null;
});

const REGION = 512;

/** Every 2 MiB region of gfns [gfn, gfn + pages) is a level-2 leaf mapping the host's huge page at hva. */
function expectBlocksMapHost(t: TestVm, gfn: number, pages: number, hva: number): void {
  const pgt = t.vm.stage2;
  const out = newLeafLookup();
  const gup = new GupResult();
  for (let r = 0; r < pages; r += REGION) {
    pgt.rcuReadLock();
    const pfn = pgt.translate(gfn + r + 5, out);
    pgt.rcuReadUnlock();
    expect(out.level).toBe(2);
    const hostPfn = t.vm.hostAddressSpace.getUserPage(hva + (r + 5) * 4096, false, gup);
    if (gup.refcounted) t.vm.hostMemory.releasePfn(hostPfn);
    expect(pfn).toBe(hostPfn);
  }
}

function leavesIn(t: TestVm, gfn: number, pages: number): number {
  let n = 0;
  t.vm.stage2.forEachLeaf(gfn, pages, () => n++);
  return n;
}

describe.each(HUGE_RECOVERY_STRATEGIES)('recovery %s', (strategy) => {
  it.each(MMU_LOCK_MODES)('every split region is a block again and reads the same data (lock %s)', async (lock) => {
    const t = (current = await makeTestVm({ lock, backing: 'anonymous_thp', vcpus: 2, bytesPerVcpu: 4 * 2 ** 21 }));
    t.vm.setHugeRecovery(strategy, 1);
    const model = new WorkloadModel(t.spec, 2);
    t.vm.allowPasses(1);
    await t.vm.waitForPasses(1);
    model.step();
    const regions = t.pages / REGION;
    expect(t.vm.stats().pages_2m).toBe(regions);
    t.setLogging(true);
    t.vm.allowPasses(2);
    await t.vm.waitForPasses(2);
    model.step();
    expect(t.vm.stats().pages_2m).toBe(0);
    const before = snapshotWords(t);
    t.setLogging(false);
    await t.vm.hugeRecovery.idle();
    let st = t.vm.stats();
    if (strategy === 'in-place') {
      // Nothing unmapped: every region became its block directly.
      expect(st.hugeRecoveredInPlace).toBe(regions);
      expect(st.pages_2m).toBe(regions);
      expect(st.pages_4k).toBe(0);
      expectBlocksMapHost(t, t.region.guestPhysAddr / 4096, t.pages, t.region.userspaceAddr);
    } else {
      expect(st.hugeRecoveryZapped).toBe(regions);
      expect(st.pages_4k).toBe(0);
    }
    expect(snapshotWords(t)).toEqual(before);
    // vCPUs keep running: their writes go through the recovered mappings into the right frames.
    t.vm.allowPasses(3);
    await t.vm.waitForPasses(3);
    model.step();
    st = t.vm.stats();
    expect(st.pages_2m).toBe(regions);
    expect(st.pages_4k).toBe(0);
    expectBlocksMapHost(t, t.region.guestPhysAddr / 4096, t.pages, t.region.userspaceAddr);
    const words = snapshotWords(t);
    for (let p = 0; p < t.pages; p++) expect(words[p]).toBe(model.expected(p));
  });
});

describe.each(MMU_LOCK_MODES)('recovery while vCPUs keep writing (lock %s)', (lock) => {
  it.each(HUGE_RECOVERY_STRATEGIES)('%s: blocks again, no write lost', async (strategy) => {
    const t = (current = await makeTestVm({ lock, backing: 'hugetlb', vcpus: 2, bytesPerVcpu: 8 * 2 ** 21, kind: 'random', seed: 7 }));
    t.vm.setHugeRecovery(strategy, 2);
    const model = new WorkloadModel(t.spec, 2);
    t.vm.allowPasses(1);
    await t.vm.waitForPasses(1);
    model.step();
    t.setLogging(true);
    t.vm.allowPasses(3);
    await t.vm.waitForPasses(3);
    model.step();
    model.step();
    // Logging stops while the vCPUs run six more passes.
    t.vm.allowPasses(9);
    t.setLogging(false);
    await t.vm.hugeRecovery.idle();
    await t.vm.waitForPasses(9);
    for (let i = 0; i < 6; i++) model.step();
    const words = snapshotWords(t);
    for (let p = 0; p < t.pages; p++) expect(words[p]).toBe(model.expected(p));
    // Regions the random guest did not touch after a zap stay unmapped; everything mapped is huge.
    expect(t.vm.stats().pages_4k).toBe(0);
    if (strategy === 'in-place') expect(t.vm.stats().pages_2m).toBe(t.pages / REGION);
  });
});

/** A VM without vCPUs whose one slot (4 regions, hugetlb) was populated huge, then logged and split by the VMM thread's fault handler. */
async function splitVm(strategy: 'async' | 'in-place'): Promise<TestVm> {
  const t = (current = await makeTestVm({ backing: 'hugetlb', vcpus: 1, bytesPerVcpu: 4 * 2 ** 21, vcpusNow: false }));
  t.vm.setHugeRecovery(strategy, 1);
  const fh = t.vm.mainThreadFaultHandler();
  const base = t.region.guestPhysAddr / 4096;
  for (let r = 0; r < t.pages; r += REGION) expect(fh.handle(base + r, true)).toBe(FAULT_OK);
  expect(t.vm.stats().pages_2m).toBe(4);
  t.setLogging(true);
  for (let p = 0; p < t.pages; p++) expect(fh.handle(base + p, true)).toBe(FAULT_OK);
  expect(t.vm.stats().pages_4k).toBe(t.pages);
  return t;
}

describe.each(['async', 'in-place'] as const)('background recovery (%s) racing memslot changes', (strategy) => {
  it.each([0, 2])('a memslot deleted before batch %i: the work item is dropped, nothing stays mapped', async (atBatch) => {
    const t = await splitVm(strategy);
    const base = t.region.guestPhysAddr / 4096;
    let batches = 0;
    t.vm.hugeRecovery.beforeBatch = () => {
      if (batches++ === atBatch) t.vm.setUserMemoryRegion({ ...t.region, memorySize: 0 });
    };
    t.setLogging(false);
    await t.vm.hugeRecovery.idle();
    expect(t.vm.hugeRecovery.stats.droppedItems).toBe(1);
    expect(leavesIn(t, base, t.pages)).toBe(0);
    expect(t.vm.stats().pages_2m + t.vm.stats().pages_4k).toBe(0);
  });

  it.each([0, 2])('a memslot moved before batch %i: no stale frame at the old gfns, the new gfns map the host pages', async (atBatch) => {
    const t = await splitVm(strategy);
    const oldBase = t.region.guestPhysAddr / 4096;
    const moved = { ...t.region, flags: 0, guestPhysAddr: t.region.guestPhysAddr + 2 ** 32 };
    let batches = 0;
    t.vm.hugeRecovery.beforeBatch = () => {
      if (batches++ === atBatch) t.vm.setUserMemoryRegion(moved);
    };
    t.setLogging(false);
    await t.vm.hugeRecovery.idle();
    expect(t.vm.hugeRecovery.stats.droppedItems).toBe(1);
    expect(leavesIn(t, oldBase, t.pages)).toBe(0);
    const newBase = moved.guestPhysAddr / 4096;
    const fh = t.vm.mainThreadFaultHandler();
    for (let r = 0; r < t.pages; r += REGION) expect(fh.handle(newBase + r + 5, false)).toBe(FAULT_OK);
    expectBlocksMapHost(t, newBase, t.pages, moved.userspaceAddr);
  });

  it('logging turned on again before the worker runs: the item is dropped, the slot stays split and logged', async () => {
    const t = await splitVm(strategy);
    t.setLogging(false);
    t.setLogging(true);
    await t.vm.hugeRecovery.idle();
    expect(t.vm.stats().pages_2m).toBe(0);
    expect(t.vm.stats().pages_4k).toBe(t.pages);
  });

  it('teardown during recovery is clean: no batch runs after destroy', async () => {
    const t = await splitVm(strategy);
    let batches = 0;
    t.vm.hugeRecovery.beforeBatch = () => batches++;
    t.setLogging(false);
    await new Promise((r) => setImmediate(r));
    const rec = t.vm.hugeRecovery;
    expect(rec.busy).toBe(true);
    await t.vm.destroy();
    current = null;
    const seen = batches;
    await new Promise((r) => setTimeout(r, 20));
    expect(batches).toBe(seen);
    expect(rec.busy).toBe(false);
    await rec.idle();
  });
});

describe('teardown with running vCPUs', () => {
  it('destroy while an in-place recovery is running with vCPUs writing', async () => {
    const t = (current = await makeTestVm({ backing: 'anonymous_thp', vcpus: 2, bytesPerVcpu: 8 * 2 ** 21 }));
    t.vm.setHugeRecovery('in-place', 1);
    t.vm.allowPasses(1);
    await t.vm.waitForPasses(1);
    t.setLogging(true);
    t.vm.allowPasses(2);
    await t.vm.waitForPasses(2);
    t.vm.allowPasses(1_000_000);
    t.setLogging(false);
    await new Promise((r) => setImmediate(r));
    await new Promise((r) => setImmediate(r));
    await t.vm.destroy();
    current = null;
  });
});
