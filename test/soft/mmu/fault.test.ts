// The stage-2 fault handler: mapping sizes (huge pages vs dirty logging), reserved/MMIO frames,
// faults racing memslot changes and mmu-notifier invalidations, and the lockless fast path
// racing a harvest.
import { afterEach, describe, expect, it } from 'vitest';
import { KVM_MEM_LOG_DIRTY_PAGES, MMU_LOCK_MODES } from '../../../src/vmm/engine.ts';
import { MmuLock } from '../../../src/soft/locking/mmu-lock.ts';
import { FAULT_EFAULT, FAULT_MMIO, FAULT_OK } from '../../../src/soft/mmu/fault.ts';
import { newLeafLookup } from '../../../src/soft/pgtable/stage2.ts';
import { leafFromAttrs, leafAttrs, leafIsDevice, leafPfn, leafWritable } from '../../../src/soft/pgtable/pte.ts';
import { DEFAULT_MMIO_START_PFN, DEFAULT_RESERVED_START_PFN } from '../../../src/soft/hostmem/layout.ts';
import { bitmapPages, harvest, makeTestVm, snapshotWords, type TestVm } from '../vcpu/harness.ts';
import { markPageDirty } from '../../../src/soft/dirty/dirty-bitmap.ts';
import type { SlotDesc } from '../../../src/soft/mmu/slot-table.ts';

let current: TestVm | null = null;
afterEach(async () => {
  await current?.vm.destroy();
  current = null;
});

function leafAt(t: TestVm, gfn: number): { pte: number; level: number; ptep: number } {
  const out = newLeafLookup();
  const pgt = t.vm.stage2;
  pgt.rcuReadLock();
  const pte = pgt.getLeaf(gfn, out);
  pgt.rcuReadUnlock();
  return { pte, level: out.level, ptep: out.ptep };
}

describe.each(MMU_LOCK_MODES)('huge mappings and dirty logging (lock %s)', (lock) => {
  it.each(['anonymous_thp', 'hugetlb'] as const)('%s: 2 MiB blocks when not logging, split on write faults while logging', async (backing) => {
    const t = (current = await makeTestVm({ lock, backing, vcpus: 2, bytesPerVcpu: 2 * 2 ** 21 }));
    t.vm.allowPasses(1);
    await t.vm.waitForPasses(1);
    let st = t.vm.stats();
    expect(st.pages_2m).toBe(4);
    expect(st.pages_4k).toBe(0);
    t.setLogging(true);
    // Logging write-protects the blocks as they are: no eager split.
    st = t.vm.stats();
    expect(st.pages_2m).toBe(4);
    expect(st.writableLeaves).toBe(0);
    t.vm.allowPasses(2);
    await t.vm.waitForPasses(2);
    st = t.vm.stats();
    expect(st.hugePageSplits).toBe(4);
    expect(st.pages_2m).toBe(0);
    expect(st.pages_4k).toBe(t.pages);
    expect(st.writableLeaves).toBe(t.pages);
    // One slow fault per block (the split), every other page by the fast path.
    expect(st.fastPathRelaxes).toBe(t.pages - 4);
    const bm = t.vm.getDirtyLog(0);
    expect(bm.every((w) => w === 0xffffffff)).toBe(true);
    expect(snapshotWords(t).every((w, p) => w === (Math.floor(p / (t.pages / 2)) + 1) * 2 ** 32 + 2)).toBe(true);
  });

  it('installs no huge mapping while the slot logs; once it stops, new faults map huge and the split region is re-formed', async () => {
    const t = (current = await makeTestVm({ lock, backing: 'anonymous_thp', bytesPerVcpu: 4 * 2 ** 21, vcpusNow: false }));
    t.setLogging(true);
    const fh = t.vm.mainThreadFaultHandler();
    const base = t.spec.gpaBase / 4096;
    for (let i = 0; i < 512; i++) expect(fh.handle(base + i, (i & 1) === 0)).toBe(FAULT_OK);
    let st = t.vm.stats();
    expect(st.pages_2m).toBe(0);
    expect(st.pages_4k).toBe(512);
    // Read faults while logging map read-only (the write must fault to be logged).
    expect(leafWritable(leafAt(t, base + 1).pte)).toBe(false);
    expect(leafWritable(leafAt(t, base).pte)).toBe(true);
    t.setLogging(false);
    expect(fh.handle(base + 512 + 7, false)).toBe(FAULT_OK);
    st = t.vm.stats();
    expect(leafAt(t, base + 512 + 7).level).toBe(2);
    // Logging off also re-forms the region logging split (huge/recovery.ts, default in place):
    // one block, read-only since some of its leaves were.
    await t.vm.hugeRecovery.idle();
    st = t.vm.stats();
    expect(st.pages_2m).toBe(2);
    expect(st.pages_4k).toBe(0);
    expect(leafAt(t, base + 1).level).toBe(2);
    expect(leafWritable(leafAt(t, base + 1).pte)).toBe(false);
    expect(fh.handle(base + 1, true)).toBe(FAULT_OK);
    expect(leafWritable(leafAt(t, base + 1).pte)).toBe(true);
    expect(leafAt(t, base + 1).level).toBe(2);
  });

  it('maps 4 KiB only for plain anonymous memory or a memslot not 2 MiB-congruent with its hva', async () => {
    const t = (current = await makeTestVm({ lock, backing: 'anonymous', bytesPerVcpu: 2 * 2 ** 21 }));
    t.vm.allowPasses(1);
    await t.vm.waitForPasses(1);
    expect(t.vm.stats().pages_2m).toBe(0);
    const h = t.vm.mapHostMemory(4 * 2 ** 21, 'anonymous_thp');
    // gpa 4 KiB past a 2 MiB boundary, hva 2 MiB aligned: no block can map one host huge page.
    const gpa = 2 ** 34 + 4096;
    t.vm.setUserMemoryRegion({ slot: 1, flags: 0, guestPhysAddr: gpa, memorySize: 2 * 2 ** 21, userspaceAddr: h.hva });
    const fh = t.vm.mainThreadFaultHandler();
    for (let i = 0; i < 1024; i += 97) expect(fh.handle(gpa / 4096 + i, true)).toBe(FAULT_OK);
    expect(t.vm.stats().pages_2m).toBe(0);
  });
});

describe('reserved and MMIO frames (a pfnmap memslot, seed 001)', () => {
  it.each([
    ['mmio', DEFAULT_MMIO_START_PFN],
    ['reserved', DEFAULT_RESERVED_START_PFN],
  ] as const)('%s frames are mapped 4 KiB with the device attribute and never refcounted', async (_kind, basePfn) => {
    const t = (current = await makeTestVm({ vcpusNow: false }));
    const mm = t.vm.hostAddressSpace;
    const mem = t.vm.hostMemory;
    const hva = mm.mmap(512 * 4096, 'pfnmap', { basePfn });
    const gpa = 2 ** 35;
    t.vm.setUserMemoryRegion({ slot: 2, flags: 0, guestPhysAddr: gpa, memorySize: 512 * 4096, userspaceAddr: hva });
    const fh = t.vm.mainThreadFaultHandler();
    for (let i = 0; i < 512; i++) {
      // HostMemory.getPage/putPage throw on non-RAM frames, so a refcount attempt fails the fault.
      expect(fh.handle(gpa / 4096 + i, (i & 1) === 1)).toBe(FAULT_OK);
      expect(mem.classifyPfn(basePfn + i)).not.toBe('ram');
    }
    const st = t.vm.stats();
    expect(st.deviceLeaves).toBe(512);
    expect(st.deviceMappings).toBe(512);
    expect(st.pages_2m).toBe(0);
    const leaf = leafAt(t, gpa / 4096 + 3);
    expect(leaf.level).toBe(3);
    expect(leafIsDevice(leaf.pte)).toBe(true);
    expect(leafPfn(leaf.pte)).toBe(basePfn + 3);
    for (let i = 0; i < 512; i++) expect(mem.refcount(basePfn + i)).toBe(0);
  });

  it('RAM pages keep no extra reference after a fault (the fault drops the one it took)', async () => {
    const t = (current = await makeTestVm({ vcpusNow: false }));
    const fh = t.vm.mainThreadFaultHandler();
    const gfn = t.spec.gpaBase / 4096 + 5;
    expect(fh.handle(gfn, true)).toBe(FAULT_OK);
    const pfn = leafPfn(leafAt(t, gfn).pte);
    expect(t.vm.hostMemory.classifyPfn(pfn)).toBe('ram');
    expect(t.vm.hostMemory.refcount(pfn)).toBe(1); // the host page table's own reference
    expect(leafIsDevice(leafAt(t, gfn).pte)).toBe(false);
  });
});

describe.each(MMU_LOCK_MODES)('faults racing invalidations (lock %s)', (lock) => {
  it('a fault racing a memslot delete retries and then exits as MMIO, mapping nothing', async () => {
    const t = (current = await makeTestVm({ lock, vcpusNow: false }));
    const fh = t.vm.mainThreadFaultHandler();
    let fired = 0;
    fh.hooks.afterResolvePfn = () => {
      if (fired++ === 0) t.vm.setUserMemoryRegion({ ...t.region, memorySize: 0 });
    };
    const before = t.vm.stats().faultRetries;
    expect(fh.handle(t.spec.gpaBase / 4096, true)).toBe(FAULT_MMIO);
    expect(t.vm.stats().faultRetries - before).toBe(1);
    expect(t.vm.stats().pages_4k).toBe(0);
  });

  it('a fault racing a memslot move retries; the old gfn is gone, the new one maps', async () => {
    const t = (current = await makeTestVm({ lock, vcpusNow: false }));
    const fh = t.vm.mainThreadFaultHandler();
    const newGpa = 2 ** 36;
    fh.hooks.afterResolvePfn = () => {
      fh.hooks = {};
      t.vm.setUserMemoryRegion({ ...t.region, guestPhysAddr: newGpa, flags: KVM_MEM_LOG_DIRTY_PAGES });
    };
    expect(fh.handle(t.spec.gpaBase / 4096 + 1, true)).toBe(FAULT_MMIO);
    expect(fh.handle(newGpa / 4096 + 1, true)).toBe(FAULT_OK);
    expect(t.vm.stats().pages_4k).toBe(1);
    expect(t.vm.getDirtyLog(0)[0]).toBe(2);
  });

  it('a fault racing an mmu-notifier invalidation (munmap) retries and never maps the stale pfn', async () => {
    const t = (current = await makeTestVm({ lock, vcpusNow: false }));
    const fh = t.vm.mainThreadFaultHandler();
    const gfn = t.spec.gpaBase / 4096 + 9;
    expect(fh.handle(gfn - 1, true)).toBe(FAULT_OK); // a neighbour, mapped before the unmap
    fh.hooks.afterResolvePfn = () => {
      fh.hooks = {};
      t.vm.hostAddressSpace.munmap(t.region.userspaceAddr, t.region.memorySize);
    };
    const before = t.vm.stats();
    expect(fh.handle(gfn, true)).toBe(FAULT_EFAULT);
    const after = t.vm.stats();
    expect(after.faultRetries - before.faultRetries).toBe(1);
    expect(after.notifierInvalidations - before.notifierInvalidations).toBe(1);
    expect(after.pages_4k).toBe(0); // the neighbour was unmapped by the notifier, the racer never mapped
  });
});

// The 'parallel' mode write-protect fast path takes no MMU lock (x86 fast_page_fault): a
// harvest can run between its cmpxchg (W set) and its mark. These two tests put one exactly
// there (the fault runs on this thread, the hook harvests) and check nothing can be lost.
describe('lockless write-protect fast path (lock parallel): a harvest between cmpxchg and mark', () => {
  function wpLeaf(t: TestVm, gfn: number): { pte: number; ptep: number } {
    const leaf = leafAt(t, gfn);
    expect(leafWritable(leaf.pte)).toBe(false);
    return leaf;
  }

  async function loggingVmWithWpPage(): Promise<{ t: TestVm; gfn: number; page: number }> {
    const t = (current = await makeTestVm({ lock: 'parallel', vcpusNow: false }));
    t.setLogging(true);
    const page = 5;
    const gfn = t.spec.gpaBase / 4096 + page;
    expect(t.vm.mainThreadFaultHandler().handle(gfn, true)).toBe(FAULT_OK);
    expect(bitmapPages(harvest(t), t.pages)).toEqual(new Set([page])); // clears and write-protects it
    return { t, gfn, page };
  }

  it('bit clear when the harvest runs: it reports nothing, the mark after it lands in the next harvest', async () => {
    const { t, gfn, page } = await loggingVmWithWpPage();
    const fh = t.vm.mainThreadFaultHandler();
    const { pte, ptep } = wpLeaf(t, gfn);
    let during: Set<number> | null = null;
    fh.hooks.betweenRelaxAndMark = () => (during = bitmapPages(harvest(t), t.pages));
    expect(fh.tryFastWrite(gfn, pte, ptep)).toBe(leafPfn(pte));
    expect(during).toEqual(new Set());
    expect(leafWritable(leafAt(t, gfn).pte)).toBe(true); // nothing to protect: the page stays writable...
    expect(bitmapPages(harvest(t), t.pages)).toEqual(new Set([page])); // ...and is in the next harvest
  });

  it('bit already set: the harvest reports the page and removes the new W; the mark sets the bit again', async () => {
    const { t, gfn, page } = await loggingVmWithWpPage();
    const fh = t.vm.mainThreadFaultHandler();
    // Dirty but write-protected (e.g. marked by a fault whose cmpxchg a harvest then undid).
    const slot = (t.vm as unknown as { slots: { desc(id: number): SlotDesc } }).slots.desc(0)!;
    markPageDirty(slot.dirtyBitmap!, page);
    const { pte, ptep } = wpLeaf(t, gfn);
    let during: Set<number> | null = null;
    fh.hooks.betweenRelaxAndMark = () => (during = bitmapPages(harvest(t), t.pages));
    expect(fh.tryFastWrite(gfn, pte, ptep)).toBe(leafPfn(pte));
    expect(during).toEqual(new Set([page]));
    expect(leafWritable(leafAt(t, gfn).pte)).toBe(false); // the harvest write-protected it after the cmpxchg
    expect(bitmapPages(harvest(t), t.pages)).toEqual(new Set([page])); // the late mark is not lost
  });

  it('a stale walk (the leaf changed since) fails the cmpxchg and marks nothing', async () => {
    const { t, gfn } = await loggingVmWithWpPage();
    const fh = t.vm.mainThreadFaultHandler();
    const { pte, ptep } = wpLeaf(t, gfn);
    expect(fh.tryFastWrite(gfn, leafFromAttrs(leafPfn(pte) + 1, leafAttrs(pte)), ptep)).toBe(-1); // another pfn than the table holds
    expect(bitmapPages(harvest(t), t.pages)).toEqual(new Set());
  });
});

// Seed 003: before the series, a fault that only relaxes permissions (write-unprotect while
// logging) took the MMU lock for read; 'global-write' takes the write lock for it too.
describe.each([
  ['global-write', false],
  ['global', true],
] as const)('write-protect fault while another thread holds the MMU read lock (lock %s)', (lock, relaxesInParallel) => {
  it(relaxesInParallel ? 'the relax goes ahead beside the reader; a map fault would wait' : 'the relax waits (tryFastWrite gives -2)', async () => {
    const t = (current = await makeTestVm({ lock, vcpusNow: false }));
    t.setLogging(true);
    const page = 7;
    const gfn = t.spec.gpaBase / 4096 + page;
    const fh = t.vm.mainThreadFaultHandler();
    expect(fh.handle(gfn, true)).toBe(FAULT_OK);
    expect(bitmapPages(harvest(t), t.pages)).toEqual(new Set([page])); // write-protects it
    const { pte, ptep } = leafAt(t, gfn);
    expect(leafWritable(pte)).toBe(false);
    const other = MmuLock.attach(t.vm.lock.shared); // another thread's handle on the lock
    other.rw.readLock();
    try {
      expect(t.vm.lock.tryRelaxLock() ? (t.vm.lock.relaxUnlock(), true) : false).toBe(relaxesInParallel);
      expect(fh.tryFastWrite(gfn, pte, ptep)).toBe(relaxesInParallel ? leafPfn(pte) : -2);
    } finally {
      other.rw.readUnlock();
    }
    expect(leafWritable(leafAt(t, gfn).pte)).toBe(relaxesInParallel);
    expect(bitmapPages(harvest(t), t.pages)).toEqual(relaxesInParallel ? new Set([page]) : new Set());
  });
});
