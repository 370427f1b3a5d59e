// Mapping statistics counted where entries change (pgtable/mapping-counters.ts) against a full
// walk of the table: after every operation on one thread, and after vCPU threads fault, split and
// relax while the VMM thread harvests, unmaps and maps beside them, in every lock mode. (The
// multi-threaded stress test, test/soft/stress, checks the same after racing collapses.)
import { afterEach, describe, expect, it } from 'vitest';
import { KVM_MEM_LOG_DIRTY_PAGES, MMU_LOCK_MODES } from '../../../src/vmm/engine.ts';
import { PROT_DEVICE, PROT_R, PROT_RW, PROT_W, mkLeaf, pteIsWriteProtectedRam } from '../../../src/soft/pgtable/pte.ts';
import { countMappingsByWalk, type MappingCounts } from '../../../src/soft/pgtable/mapping-counters.ts';
import { Stage2PageTable, newLeafLookup } from '../../../src/soft/pgtable/stage2.ts';
import { FAULT_OK } from '../../../src/soft/mmu/fault.ts';
import { harvest, makeTestVm, type TestVm } from '../vcpu/harness.ts';

const G1 = 2 ** 18;
const M2 = 512;

function walked(pgt: Stage2PageTable): MappingCounts {
  return countMappingsByWalk((fn) => pgt.forEachLeaf(0, 2 ** 36, fn));
}

function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

describe('mapping counters, one thread', () => {
  it.each([false, true])('equal a walk after every map, collapse, relax, write-protect, split, unmap and fast-path relax (shared %s)', (shared) => {
    const pgt = Stage2PageTable.create({ maxTablePages: 1 << 14, debug: true });
    const rand = rng(shared ? 7 : 8);
    const pick = (n: number) => Math.floor(rand() * n);
    // Two 1 GiB areas; pfns in [G1, 3 * G1) so blocks of either size line up.
    const gfnIn = () => pick(2) * G1 + pick(G1);
    const out = newLeafLookup();
    const ops: Record<string, number> = {};
    for (let i = 0; i < 700; i++) {
      const p = rand();
      const prot = [PROT_R, PROT_RW, PROT_RW | PROT_DEVICE][pick(3)]!;
      let op: string;
      if (p < 0.4) {
        const g = gfnIn();
        pgt.map(g, 3, G1 + pick(2 * G1), prot, shared);
        op = 'map4k';
      } else if (p < 0.5) {
        const g = gfnIn() & ~(M2 - 1);
        pgt.map(g, 2, G1 + pick((2 * G1) / M2) * M2, prot, shared);
        op = 'map2m';
      } else if (p < 0.51) {
        pgt.collapse(pick(2) * G1, 1, G1 * (1 + pick(2)), prot, shared);
        op = 'collapse1g';
      } else if (p < 0.52) {
        // Keeps the table small enough to walk after every op (a split 1 GiB block is 2^18 leaves).
        pgt.unmap(pick(2) * G1, G1);
        op = 'unmapArea';
      } else if (p < 0.62) {
        pgt.relaxPerms(gfnIn(), PROT_W, shared);
        op = 'relax';
      } else if (p < 0.7) {
        pgt.writeProtect(gfnIn(), 1 + pick(64), shared);
        op = 'writeProtect';
      } else if (p < 0.73) {
        pgt.writeProtect(0, 2 * G1, shared);
        op = 'writeProtectAll';
      } else if (p < 0.8) {
        const g = gfnIn() & ~(M2 - 1);
        pgt.splitHugePages(g, 4 * M2, shared);
        op = 'split';
      } else if (p < 0.9) {
        pgt.unmap(gfnIn(), 1 + pick(3 * M2));
        op = 'unmap';
      } else {
        // The vCPU fast path: a cmpxchg on the entry its walk found.
        const g = gfnIn();
        pgt.rcuReadLock();
        const pte = pgt.getLeaf(g, out);
        if (pteIsWriteProtectedRam(pte) && out.level === 3) pgt.tryGrantWrite(out.ptep, pte);
        pgt.rcuReadUnlock();
        op = 'tryGrantWrite';
      }
      ops[op] = (ops[op] ?? 0) + 1;
      pgt.reclaim();
      expect(pgt.epoch.pending()).toBe(0);
      const c = pgt.mappingCounts();
      const w = walked(pgt);
      if (JSON.stringify(c) !== JSON.stringify(w)) expect.fail(`after op ${i} (${op}): counted ${JSON.stringify(c)}, walked ${JSON.stringify(w)}`);
    }
    expect(Object.keys(ops).length).toBe(10);
    expect(ops['collapse1g']).toBeGreaterThan(0);
    expect(walked(pgt).leaves4k + walked(pgt).leaves2m).toBeGreaterThan(0);
    pgt.destroy();
    expect(pgt.mappingCounts()).toEqual({ leaves4k: 0, leaves2m: 0, leaves1g: 0, writableLeaves: 0, deviceLeaves: 0 });
  });

  it('an entry changed inside an unlinked subtree before its grace period is settled when the subtree is freed', () => {
    const pgt = Stage2PageTable.create({ maxTablePages: 256, debug: true });
    const racer = Stage2PageTable.attach(pgt.shared); // another thread's handle, still walking the old table
    const out = newLeafLookup();
    for (let i = 0; i < 4; i++) pgt.map(i, 3, 1000 + i, PROT_R, true);
    racer.rcuReadLock();
    const old = racer.getLeaf(2, out); // the racer's walk, before the collapse
    pgt.collapse(0, 2, 0, PROT_R, true); // unlinks the 4K table (freed after the racer leaves)
    expect(racer.tryGrantWrite(out.ptep, old)).toBe(true); // lands in the unlinked table
    pgt.reclaim();
    expect(pgt.epoch.pending()).toBe(1);
    // Meanwhile the counters differ from a walk by exactly that one racing change...
    expect(pgt.mappingCounts()).toEqual({ ...walked(pgt), writableLeaves: 1 });
    racer.rcuReadUnlock();
    pgt.reclaim();
    expect(pgt.epoch.pending()).toBe(0);
    // ...and equal it once the subtree is freed.
    expect(pgt.mappingCounts()).toEqual(walked(pgt));
    expect(pgt.mappingCounts()).toEqual({ leaves4k: 0, leaves2m: 1, leaves1g: 0, writableLeaves: 0, deviceLeaves: 0 });
    expect(mkLeaf(0, PROT_R)).toBe(pgt.getLeaf(0, out));
  });
});

let current: TestVm | null = null;
afterEach(async () => {
  await current?.vm.destroy();
  current = null;
});

describe.each(MMU_LOCK_MODES)('mapping counters with vCPU threads, lock %s', (lock) => {
  it('equal a walk after vCPUs fault, split and relax on THP while the VMM harvests, maps and unmaps', async () => {
    const vcpus = 3;
    const t = (current = await makeTestVm({ lock, vcpus, bytesPerVcpu: 2 ** 21, kind: 'random', seed: 99, backing: 'anonymous_thp' }));
    const other = t.vm.mapHostMemory(2 ** 22, 'anonymous_thp');
    const otherGfn = 2 ** 24;
    const fh = t.vm.mainThreadFaultHandler();
    t.vm.allowPasses(Infinity);
    await t.vm.waitForPasses(1);
    let logging = false;
    for (let round = 0; round < 40; round++) {
      switch (round % 4) {
        case 0:
          logging = round % 8 === 0;
          t.setLogging(logging);
          break;
        case 1:
          if (logging) harvest(t);
          break;
        case 2: {
          // A second slot the VMM faults in (huge blocks when not logging), then deletes: unmaps.
          const flags = round % 8 === 2 ? KVM_MEM_LOG_DIRTY_PAGES : 0;
          t.vm.setUserMemoryRegion({ slot: 3, flags, guestPhysAddr: otherGfn * 4096, memorySize: 2 ** 22, userspaceAddr: other.hva });
          for (let k = 0; k < 64; k++) expect(fh.handle(otherGfn + ((k * 37 + round) % 1024), k % 3 !== 0)).toBe(FAULT_OK);
          break;
        }
        case 3:
          t.vm.setUserMemoryRegion({ slot: 3, flags: 0, guestPhysAddr: otherGfn * 4096, memorySize: 0, userspaceAddr: other.hva });
          break;
      }
      await new Promise((r) => setTimeout(r, 2));
    }
    t.setLogging(true); // leave blocks write-protected and split ones behind
    await new Promise((r) => setTimeout(r, 20));
    await t.vm.pause();
    t.vm.stage2.reclaim();
    expect(t.vm.stage2.epoch.pending()).toBe(0);
    const st = t.vm.stats();
    const w = walked(t.vm.stage2);
    expect({ leaves4k: st.pages_4k, leaves2m: st.pages_2m, leaves1g: st.pages_1g, writableLeaves: st.writableLeaves, deviceLeaves: st.deviceLeaves }).toEqual(w);
    expect(st.hugePageSplits).toBeGreaterThan(0);
    expect(w.leaves4k).toBeGreaterThan(0);
    t.vm.resume();
  });
});
