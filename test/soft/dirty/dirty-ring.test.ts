// The soft dirty ring (KVM_CAP_DIRTY_LOG_RING semantics): entries, the DIRTY -> RESET protocol,
// a reset that re-protects exactly the collected pages, the soft limit and DIRTY_RING_FULL exits.
// The no-lost-dirty stress runs with rings in no-lost-dirty.test.ts.
import { afterEach, describe, expect, it } from 'vitest';
import { SoftDirtyRingProducer, SoftDirtyRings, resetSoftDirtyRings, type RingResetMmu } from '../../../src/soft/dirty/dirty-ring.ts';
import { DirtyRingCollector, DIRTY_RING_RSVD_ENTRIES } from '../../../src/vmm/dirty-ring.ts';
import type { SlotDesc } from '../../../src/soft/mmu/slot-table.ts';
import { MmuLock } from '../../../src/soft/locking/mmu-lock.ts';
import type { DirtyGfn } from '../../../src/vmm/engine.ts';
import { SoftEngine } from '../../../src/soft/engine.ts';
import { makeTestVm, type TestVm } from '../vcpu/harness.ts';

const slot = (id: number, baseGfn: number, npages: number, logDirty = true): SlotDesc => ({ slot: id, flags: 1, baseGfn, npages, hva: 0, hostWritable: true, logDirty, dirtyBitmap: null });

/** The stage-2 side of a reset, recording what it is asked to protect. */
function recordingMmu(): RingResetMmu & { protectedRuns: [number, number][]; flushes: number } {
  const m = {
    lock: MmuLock.create('parallel'),
    protectedRuns: [] as [number, number][],
    flushes: 0,
    writeProtect(gfn: number, npages: number) {
      m.protectedRuns.push([gfn, npages]);
    },
    flushRemoteTlbs() {
      m.flushes++;
    },
  };
  return m;
}

describe('soft dirty ring protocol', () => {
  it('a reset re-protects exactly the collected pages; entries pushed after the collection stay for the next harvest', () => {
    const rings = SoftDirtyRings.create(2, 256);
    const p = new SoftDirtyRingProducer(rings, 1);
    const c = new DirtyRingCollector(rings.words, 256, 1, rings.ringBase(1));
    const s0 = slot(0, 1000, 100);
    for (const rel of [5, 6, 7, 9, 7, 40]) p.mark(s0, rel);
    const got: DirtyGfn[] = [];
    expect(c.collect(got)).toBe(6);
    expect(got.map((g) => g.offset)).toEqual([5, 6, 7, 9, 7, 40]);
    expect(got.every((g) => g.vcpu === 1 && g.slot === 0)).toBe(true);
    // Pushed after the collection: DIRTY, not RESET; the reset must leave them alone.
    p.mark(s0, 60);
    p.mark(s0, 61);
    const mmu = recordingMmu();
    const byId = (id: number) => (id === 0 ? s0 : undefined);
    expect(resetSoftDirtyRings(rings, 2, byId, mmu)).toBe(5);
    expect(mmu.protectedRuns).toEqual([[1005, 3], [1009, 1], [1040, 1]]);
    expect(mmu.flushes).toBe(1);
    const next: DirtyGfn[] = [];
    expect(c.collect(next)).toBe(2);
    expect(next.map((g) => g.offset)).toEqual([60, 61]);
    const mmu2 = recordingMmu();
    resetSoftDirtyRings(rings, 2, byId, mmu2);
    expect(mmu2.protectedRuns).toEqual([[1060, 2]]);
    // Nothing collected, nothing protected, no flush.
    const mmu3 = recordingMmu();
    expect(resetSoftDirtyRings(rings, 2, byId, mmu3)).toBe(0);
    expect(mmu3.flushes).toBe(0);
  });

  it('entries of a deleted slot, a slot that stopped logging, or past a slot end are dropped by the reset', () => {
    const rings = SoftDirtyRings.create(1, 256);
    const p = new SoftDirtyRingProducer(rings, 0);
    const c = new DirtyRingCollector(rings.words, 256, 0, rings.ringBase(0));
    p.mark(slot(1, 0, 10), 3); // slot 1: deleted before the reset
    p.mark(slot(2, 100, 10), 4); // slot 2: logging off by then
    p.mark(slot(3, 200, 10), 50); // slot 3: shrank below offset 50
    p.mark(slot(3, 200, 10), 2);
    c.collect([]);
    const mmu = recordingMmu();
    const now = new Map([[2, slot(2, 100, 10, false)], [3, slot(3, 200, 10)]]);
    expect(resetSoftDirtyRings(rings, 1, (id) => now.get(id), mmu)).toBe(1);
    expect(mmu.protectedRuns).toEqual([[202, 1]]);
  });

  it('the soft limit is raised once at entries - 64, clears after a reset, and the ring wraps without losing entries', () => {
    const entries = 256;
    const rings = SoftDirtyRings.create(1, entries);
    const p = new SoftDirtyRingProducer(rings, 0);
    let raised = 0;
    p.onSoftFull = () => raised++;
    const c = new DirtyRingCollector(rings.words, entries, 0, rings.ringBase(0));
    const s = slot(0, 0, 1 << 20);
    const mmu = recordingMmu();
    let pushed = 0;
    for (let round = 0; round < 5; round++) {
      for (let i = 0; i < entries - DIRTY_RING_RSVD_ENTRIES; i++) p.mark(s, pushed++);
      expect(raised).toBe(round + 1);
      expect(p.softFull()).toBe(true);
      // The reserve takes what a vCPU dirties before it notices; past it, an overflow is a bug.
      for (let i = 0; i < DIRTY_RING_RSVD_ENTRIES; i++) p.mark(s, pushed++);
      expect(() => p.mark(s, pushed)).toThrow(/dirty ring of line 0 is full/);
      const got: DirtyGfn[] = [];
      expect(c.collect(got)).toBe(entries);
      expect(got[0]!.offset).toBe(pushed - entries);
      expect(got[entries - 1]!.offset).toBe(pushed - 1);
      resetSoftDirtyRings(rings, 1, () => s, mmu);
      expect(p.softFull()).toBe(false);
    }
  });
});

describe('soft dirty ring on a running VM', () => {
  let t: TestVm | null = null;
  afterEach(async () => {
    await t?.vm.destroy();
    t = null;
  });

  it('DIRTY_RING_FULL exits happen and are counted per vCPU; every written page is harvested; the reset protects them all again', async () => {
    const vcpus = 2;
    t = await makeTestVm({ vcpus, bytesPerVcpu: 1024 * 4096, kind: 'sequential', dirtyRing: 256 });
    t.vm.allowPasses(1);
    await t.vm.waitForPasses(1);
    t.setLogging(true);
    for (let pass = 2; pass <= 4; pass++) {
      t.vm.allowPasses(pass);
      await t.vm.waitForPasses(pass);
      const before = t.vm.stats();
      const got = t.vm.harvestDirtyRings();
      expect(new Set(got.map((g) => g.offset)).size).toBe(t.pages);
      // Everything written since the last harvest was writable; the reset protected it again.
      expect(before.writableLeaves).toBeGreaterThan(0);
      expect(t.vm.stats().writableLeaves).toBe(0);
    }
    const st = t.vm.stats();
    // 1024 pages a pass into a 256-entry ring (soft limit 192): at least 4 exits per vCPU per pass.
    for (let v = 0; v < vcpus; v++) expect(st[`vcpu${v}.exitsDirtyRingFull`]).toBeGreaterThanOrEqual(4 * 3);
    expect(st.exitsDirtyRingFull).toBe(st['vcpu0.exitsDirtyRingFull']! + st['vcpu1.exitsDirtyRingFull']!);
    expect(st.dirtyRingMaxEntriesPerHarvest).toBeLessThanOrEqual(256);
  });

  it('no bitmap calls on a ring VM, and ring sizes are checked like KVM_ENABLE_CAP', async () => {
    t = await makeTestVm({ dirtyRing: 4096, vcpusNow: false });
    t.setLogging(true);
    expect(() => t!.vm.getDirtyLog(0)).toThrow(/dirty rings/);
    const e = new SoftEngine({ hostRamBytes: 2 ** 26 });
    expect(() => e.createSoftVm({ dirtyRingEntries: 100 })).toThrow(/power of two/);
    expect(() => e.createSoftVm({ dirtyRingEntries: 128 })).toThrow(/at least 256/);
    expect(() => e.createSoftVm({ dirtyRingEntries: 131072 })).toThrow(/at most 65536/);
    expect(() => e.createSoftVm({}).harvestDirtyRings()).toThrow(/without dirtyRingEntries/);
  });
});
