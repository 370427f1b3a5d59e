import { describe, it, expect } from 'vitest';
import { PROT_R, PROT_RW, PROT_W, PTE_LOCKED, mkLeaf, leafPfn, pteWritable } from '../../../src/soft/pgtable/pte.ts';
import { EAGAIN, ENOMEM, OK, Stage2PageTable, newLeafLookup } from '../../../src/soft/pgtable/stage2.ts';
import type { MmOps } from '../../../src/soft/pgtable/table-pool.ts';
import { MMU_LOCK_MODES } from '../../../src/vmm/engine.ts';

const G1 = 2 ** 18;
const M2 = 512;

function mk(extra: Partial<Parameters<typeof Stage2PageTable.create>[0]> = {}) {
  const flushes: [number, number][] = [];
  const removed: [number, number][] = [];
  const pgt = Stage2PageTable.create({
    maxTablePages: 4096,
    debug: true,
    tlbFlush: (g, n) => flushes.push([g, n]),
    onLeafRemoved: (pfn, level) => removed.push([pfn, level]),
    ...extra,
  });
  return { pgt, flushes, removed };
}

describe('Stage2PageTable map / getLeaf', () => {
  it('maps 4K pages, 2M and 1G blocks and finds them at every gfn they cover', () => {
    const { pgt } = mk();
    const out = newLeafLookup();
    expect(pgt.map(5, 3, 1000, PROT_RW, false)).toBe(OK);
    expect(pgt.map(4 * M2, 2, 7 * M2, PROT_R, false)).toBe(OK);
    expect(pgt.map(3 * G1, 1, 2 * G1, PROT_RW, true)).toBe(OK);
    expect(leafPfn(pgt.getLeaf(5, out))).toBe(1000);
    expect(out.level).toBe(3);
    expect(pgt.getLeaf(6, out)).toBe(0);
    expect(pgt.translate(4 * M2 + 17, out)).toBe(7 * M2 + 17);
    expect(out.level).toBe(2);
    expect(pteWritable(pgt.getLeaf(4 * M2 + 17, out))).toBe(false);
    expect(pgt.translate(3 * G1 + 123456, out)).toBe(2 * G1 + 123456);
    expect(out.level).toBe(1);
    expect(pgt.translate(2 ** 35 + 1, out)).toBe(-1);
    // root + L1 + L2 + L3 for gfn 5 (the 2M block shares L1/L2 tables, the 1G the L1).
    expect(pgt.liveTablePages()).toBe(4);
    pgt.destroy();
    expect(pgt.liveTablePages()).toBe(0);
  });

  it('gfns above 2^32 work', () => {
    const { pgt } = mk();
    const out = newLeafLookup();
    const gfn = 2 ** 35 + 2 ** 33 + 12345;
    expect(pgt.map(gfn, 3, 99, PROT_RW, true)).toBe(OK);
    expect(pgt.translate(gfn, out)).toBe(99);
    expect(pgt.translate(gfn - 2 ** 32, out)).toBe(-1);
    pgt.destroy();
  });

  it('rejects misaligned and out-of-range requests', () => {
    const { pgt } = mk();
    expect(() => pgt.map(3, 2, 0, PROT_R, false)).toThrow(/aligned/);
    expect(() => pgt.map(0, 2, 3, PROT_R, false)).toThrow(/aligned/);
    expect(() => pgt.map(2 ** 36, 3, 0, PROT_R, false)).toThrow(/36-bit/);
    expect(() => pgt.map(0, 0 as 1, 0, PROT_R, false)).toThrow(/cannot hold a leaf/);
    pgt.destroy();
  });

  it('re-mapping the same leaf changes nothing; another pfn is replaced by break-before-make', () => {
    const { pgt, flushes, removed } = mk();
    const out = newLeafLookup();
    pgt.map(8, 3, 100, PROT_RW, true);
    expect(pgt.lastMapChanged).toBe(true);
    expect(pgt.map(8, 3, 100, PROT_RW, true)).toBe(OK);
    expect(pgt.lastMapChanged).toBe(false);
    expect(flushes).toEqual([]);
    expect(pgt.map(8, 3, 200, PROT_RW, true)).toBe(OK);
    expect(leafPfn(pgt.getLeaf(8, out))).toBe(200);
    expect(flushes).toEqual([[8, 1]]);
    expect(removed).toEqual([[100, 3]]);
    pgt.destroy();
  });

  it('map returns EAGAIN on a LOCKED entry in a shared walk', () => {
    const { pgt } = mk();
    const out = newLeafLookup();
    pgt.map(0, 3, 1, PROT_R, true);
    pgt.getLeaf(0, out);
    Atomics.store(pgt.pool.words, out.ptep, PTE_LOCKED);
    expect(pgt.map(0, 3, 1, PROT_RW, true)).toBe(EAGAIN);
    expect(pgt.relaxPerms(0, PROT_W, true)).toBe(EAGAIN);
    pgt.getLeaf(0, out);
    expect(out.locked).toBe(true);
    Atomics.store(pgt.pool.words, out.ptep, mkLeaf(1, PROT_R));
    expect(pgt.map(0, 3, 1, PROT_RW, true)).toBe(OK);
    pgt.destroy();
  });

  it('reports ENOMEM when the pool is exhausted and leaks nothing', () => {
    let budget = 2;
    const { pgt: inner } = mk();
    const failing: MmOps = {
      words: inner.pool.words,
      zallocTablePage: () => (budget-- > 0 ? inner.pool.zallocTablePage() : -1),
      freeTablePage: (i) => inner.pool.freeTablePage(i),
      liveTablePages: () => inner.pool.liveTablePages(),
    };
    const pgt = Stage2PageTable.attach(inner.shared, { mmOps: failing });
    const before = pgt.liveTablePages();
    expect(pgt.map(0, 3, 1, PROT_R, true)).toBe(ENOMEM);
    // The tables that were allocated stay linked (they are valid, empty tables).
    expect(pgt.liveTablePages()).toBe(before + 2);
    pgt.detach();
    inner.destroy();
    expect(inner.liveTablePages()).toBe(0);
  });
});

describe('Stage2PageTable permissions', () => {
  it('relaxPerms sets W by cmpxchg without a TLB flush', () => {
    const { pgt, flushes } = mk();
    const out = newLeafLookup();
    pgt.map(10, 3, 55, PROT_R, true);
    expect(pgt.relaxPerms(10, PROT_W, true)).toBe(OK);
    expect(pteWritable(pgt.getLeaf(10, out))).toBe(true);
    expect(pgt.relaxPerms(10, PROT_W, true)).toBe(OK);
    expect(pgt.relaxPerms(11, PROT_W, true)).toBe(EAGAIN);
    expect(flushes).toEqual([]);
    pgt.destroy();
  });

  it('writeProtect clears W on every leaf in range and counts them', () => {
    const { pgt } = mk();
    const out = newLeafLookup();
    for (let g = 0; g < 100; g++) pgt.map(g, 3, 1000 + g, g % 2 ? PROT_RW : PROT_R, false);
    pgt.map(M2, 2, 4 * M2, PROT_RW, false);
    expect(pgt.writeProtect(0, 2 * M2)).toBe(51);
    for (let g = 0; g < 100; g++) expect(pteWritable(pgt.getLeaf(g, out))).toBe(false);
    expect(pteWritable(pgt.getLeaf(M2 + 3, out))).toBe(false);
    expect(pgt.writeProtect(0, 2 * M2, true)).toBe(0);
    // map with fewer permissions on a writable leaf shrinks in place and flushes.
    pgt.map(200, 3, 9, PROT_RW, false);
    const { flushes } = { flushes: [] as number[][] };
    pgt.setCallbacks({ tlbFlush: (g, n) => flushes.push([g, n]) });
    pgt.map(200, 3, 9, PROT_R, false);
    expect(flushes).toEqual([[200, 1]]);
    pgt.destroy();
  });
});

describe('Stage2PageTable split and collapse', () => {
  it('mapping a 4K page inside a 2M block splits the block, keeping the other pages', () => {
    const { pgt, flushes } = mk();
    const out = newLeafLookup();
    pgt.map(M2, 2, 8 * M2, PROT_R, true);
    expect(pgt.map(M2 + 7, 3, 8 * M2 + 7, PROT_RW, true)).toBe(OK);
    expect(flushes).toEqual([[M2, M2]]);
    for (let i = 0; i < M2; i++) {
      const pte = pgt.getLeaf(M2 + i, out);
      expect(out.level).toBe(3);
      expect(leafPfn(pte)).toBe(8 * M2 + i);
      expect(pteWritable(pte)).toBe(i === 7);
    }
    pgt.destroy();
  });

  it('mapping a 4K page inside a 1G block splits twice', () => {
    const { pgt, flushes } = mk();
    const out = newLeafLookup();
    pgt.map(G1, 1, 4 * G1, PROT_RW, true);
    const gfn = G1 + 3 * M2 + 5;
    expect(pgt.map(gfn, 3, 4 * G1 + 3 * M2 + 5, PROT_R, true)).toBe(OK);
    expect(flushes.slice(0, 2)).toEqual([[G1, G1], [G1 + 3 * M2, M2]]);
    expect(pgt.translate(G1 + 100 * M2 + 1, out)).toBe(4 * G1 + 100 * M2 + 1);
    expect(out.level).toBe(2);
    expect(pgt.translate(gfn, out)).toBe(4 * G1 + 3 * M2 + 5);
    expect(out.level).toBe(3);
    expect(pteWritable(pgt.getLeaf(gfn, out))).toBe(false);
    expect(pteWritable(pgt.getLeaf(gfn + 1, out))).toBe(true);
    pgt.destroy();
  });

  it('splitHugePages splits every block in range to 4K leaves', () => {
    const { pgt } = mk();
    const out = newLeafLookup();
    pgt.map(0, 1, 0, PROT_RW, false);
    pgt.map(G1, 2, 5 * M2, PROT_R, false);
    const before = pgt.liveTablePages();
    expect(pgt.splitHugePages(0, 2 * G1, true)).toBe(2);
    expect(pgt.liveTablePages()).toBe(before + 513 + 1);
    for (const g of [0, 1, 511, 512, 777777 % G1, G1 - 1]) {
      expect(pgt.translate(g, out)).toBe(g);
      expect(out.level).toBe(3);
    }
    expect(pgt.translate(G1 + 3, out)).toBe(5 * M2 + 3);
    expect(out.level).toBe(3);
    expect(pgt.splitHugePages(0, 2 * G1, true)).toBe(0);
    pgt.destroy();
    expect(pgt.liveTablePages()).toBe(0);
  });

  it('collapse replaces a table by a block and frees the subtree after a grace period', () => {
    const { pgt, flushes, removed } = mk();
    const out = newLeafLookup();
    for (let i = 0; i < M2; i++) pgt.map(M2 + i, 3, 3 * M2 + i, PROT_R, true);
    const live = pgt.liveTablePages();
    // Another thread is inside a read section: the old table must stay allocated.
    const reader = Stage2PageTable.attach(pgt.shared);
    reader.rcuReadLock();
    expect(pgt.collapse(M2, 2, 3 * M2, PROT_RW, true)).toBe(OK);
    expect(flushes).toEqual([[M2, M2]]);
    expect(pgt.translate(M2 + 9, out)).toBe(3 * M2 + 9);
    expect(out.level).toBe(2);
    expect(pgt.liveTablePages()).toBe(live);
    expect(removed).toEqual([]);
    pgt.reclaim();
    expect(pgt.liveTablePages()).toBe(live);
    reader.rcuReadUnlock();
    pgt.reclaim();
    expect(pgt.liveTablePages()).toBe(live - 1);
    expect(removed.length).toBe(M2);
    expect(removed[5]).toEqual([3 * M2 + 5, 3]);
    reader.detach();
    pgt.destroy();
    expect(pgt.liveTablePages()).toBe(0);
  });

  it('map of a 1G block over a populated range collapses two levels of tables', () => {
    const { pgt, removed } = mk();
    const out = newLeafLookup();
    pgt.map(G1 + 5, 3, 5, PROT_R, false);
    pgt.map(G1 + 3 * M2, 2, 3 * M2, PROT_R, false);
    expect(pgt.liveTablePages()).toBe(4);
    expect(pgt.map(G1, 1, 0, PROT_RW, false)).toBe(OK);
    expect(pgt.liveTablePages()).toBe(2);
    expect(removed.sort((a, b) => a[0]! - b[0]!)).toEqual([[5, 3], [3 * M2, 2]]);
    expect(pgt.translate(G1 + 5, out)).toBe(5);
    expect(out.level).toBe(1);
    pgt.destroy();
  });
});

describe('Stage2PageTable unmap / destroy', () => {
  it('unmap removes leaves, frees empty tables, flushes once and reports leaves', () => {
    const { pgt, flushes, removed } = mk();
    const out = newLeafLookup();
    for (let g = 0; g < 1024; g++) pgt.map(g, 3, g + 7, PROT_RW, false);
    pgt.map(4 * M2, 2, 0, PROT_R, false);
    expect(pgt.liveTablePages()).toBe(5);
    pgt.unmap(0, 512);
    expect(flushes).toEqual([[0, 512]]);
    expect(removed.length).toBe(512);
    expect(pgt.getLeaf(3, out)).toBe(0);
    expect(pgt.translate(600, out)).toBe(607);
    expect(pgt.liveTablePages()).toBe(4);
    // A block that overlaps the range is removed whole.
    pgt.unmap(4 * M2 + 10, 1);
    expect(removed.at(-1)).toEqual([0, 2]);
    expect(pgt.translate(4 * M2, out)).toBe(-1);
    pgt.unmap(0, G1);
    expect(pgt.liveTablePages()).toBe(1);
    pgt.destroy();
    expect(pgt.liveTablePages()).toBe(0);
  });

  it('destroy reports every leaf, drains retired tables and poisons every page', () => {
    const { pgt, removed } = mk();
    pgt.map(0, 3, 1, PROT_R, true);
    pgt.map(G1, 1, G1, PROT_R, true);
    pgt.map(2 * G1, 3, 3, PROT_R, true);
    // A reader holds the collapsed 4K table: it stays retired, not freed, until destroy drains it.
    const reader = Stage2PageTable.attach(pgt.shared);
    reader.rcuReadLock();
    pgt.collapse(2 * G1, 2, 0, PROT_R, true);
    pgt.reclaim();
    expect(pgt.epoch.pending()).toBe(1);
    expect(() => pgt.destroy()).toThrow(/read section/);
    expect(pgt.destroyed).toBe(false);
    reader.rcuReadUnlock();
    reader.detach();
    pgt.destroy();
    expect(pgt.liveTablePages()).toBe(0);
    expect(pgt.epoch.pending()).toBe(0);
    expect(removed.map((r) => r[0]).sort((a, b) => a! - b!)).toEqual([0, 1, 3, G1]);
    const stats = pgt.pool.stats();
    for (let i = 1; i < stats.bump; i++) expect(pgt.pool.isPoisoned(i)).toBe(true);
    expect(() => pgt.map(0, 3, 1, PROT_R, true)).toThrow(/after destroy/);
    expect(() => pgt.destroy()).toThrow(/already destroyed/);
  });

  it('destroy(force) ignores a reader slot left behind by a vanished thread', () => {
    const { pgt } = mk();
    pgt.map(0, 3, 1, PROT_R, true);
    const ghost = Stage2PageTable.attach(pgt.shared);
    ghost.rcuReadLock();
    expect(() => pgt.destroy()).toThrow(/read section/);
    pgt.destroy(true);
    expect(pgt.liveTablePages()).toBe(0);
  });

  it('forEachLeaf visits leaves in gfn order with their level', () => {
    const { pgt } = mk();
    pgt.map(M2, 2, 0, PROT_R, false);
    pgt.map(3, 3, 9, PROT_R, false);
    pgt.map(G1, 1, 0, PROT_R, false);
    const seen: [number, number][] = [];
    pgt.forEachLeaf(0, 2 * G1, (g, l) => seen.push([g, l]));
    expect(seen).toEqual([[3, 3], [M2, 2], [G1, 1]]);
    pgt.destroy();
  });
});

describe('Stage2PageTable stats', () => {
  it('counts breaks, splits, collapses and retired tables', () => {
    const { pgt } = mk();
    pgt.map(0, 2, 0, PROT_R, true);
    pgt.map(3, 3, 3, PROT_RW, true); // split (one break)
    pgt.collapse(0, 2, 0, PROT_RW, true); // collapse (one break, one retired table)
    pgt.splitHugePages(0, M2, true); // split (one break)
    const s = pgt.stats();
    expect(s).toMatchObject({ breaks: 3, blockSplits: 2, collapses: 1, tablesRetired: 1, mapEagain: 0 });
    expect(s.liveTablePages).toBe(pgt.liveTablePages());
    pgt.destroy();
  });
});

describe('writeProtect of a few pages (the per-page lookup path)', () => {
  it('clears W exactly on the leaves overlapping the range and counts them, on random layouts', () => {
    let seed = 12345;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    const out = newLeafLookup();
    for (let round = 0; round < 30; round++) {
      const { pgt } = mk();
      for (let i = 0; i < 60; i++) {
        const level = rnd(10) === 0 ? 2 : 3;
        const gfn = level === 2 ? rnd(8) * M2 : rnd(8 * M2);
        pgt.map(gfn, level, gfn + 4 * M2, rnd(2) ? PROT_RW : PROT_R, false);
      }
      const start = rnd(8 * M2 - 20);
      const n = 1 + rnd(16);
      const before: number[] = [];
      for (let g = 0; g < 8 * M2; g++) before.push(pgt.getLeaf(g, out));
      // Expected: leaves (blocks once) overlapping [start, start+n) that are writable.
      let expected = 0;
      pgt.forEachLeaf(start, n, (_g, _l, pte) => {
        if (pteWritable(pte)) expected++;
      });
      expect(pgt.writeProtect(start, n, rnd(2) === 1)).toBe(expected);
      const touched = new Set<number>();
      pgt.forEachLeaf(start, n, (g, l) => touched.add(g - (g % [0, G1, M2, 1][l]!)));
      for (let g = 0; g < 8 * M2; g++) {
        const pte = pgt.getLeaf(g, out);
        const first = g - (g % [0, G1, M2, 1][out.level]!);
        if (touched.has(first)) expect(pte).toBe(before[g]! & ~PROT_W);
        else expect(pte).toBe(before[g]);
      }
      pgt.destroy();
    }
  });
});

describe('forEachCollapsible and the public walk', () => {
  it('finds fully populated, contiguous, uniform tables and nothing else', () => {
    const { pgt } = mk();
    // 2M at gfn 0: 512 contiguous RW pages -> collapsible.
    for (let i = 0; i < M2; i++) pgt.map(i, 3, 4 * M2 + i, PROT_RW, false);
    // 2M at M2: one page missing.
    for (let i = 1; i < M2; i++) pgt.map(M2 + i, 3, 8 * M2 + i, PROT_RW, false);
    // 2M at 2*M2: one page read-only.
    for (let i = 0; i < M2; i++) pgt.map(2 * M2 + i, 3, 12 * M2 + i, i === 7 ? PROT_R : PROT_RW, false);
    // 2M at 3*M2: contiguous but the first pfn is not 2M-aligned.
    for (let i = 0; i < M2; i++) pgt.map(3 * M2 + i, 3, 16 * M2 + 1 + i, PROT_RW, false);
    // 1G at G1: 512 contiguous 2M blocks -> collapsible at level 1.
    for (let i = 0; i < 512; i++) pgt.map(G1 + i * M2, 2, 2 * G1 + i * M2, PROT_R, false);
    const found: number[][] = [];
    pgt.forEachCollapsible(0, 2 * G1, (gfn, level, pfn, prot) => found.push([gfn, level, pfn, prot]));
    expect(found).toEqual([[0, 2, 4 * M2, PROT_RW], [G1, 1, 2 * G1, PROT_R]]);
    // Collapsing from inside the callback is allowed (re-entrant walks) and works.
    pgt.forEachCollapsible(0, 2 * G1, (gfn, level, pfn, prot) => {
      expect(pgt.collapse(gfn, level as 1 | 2, pfn, prot, true)).toBe(OK);
    });
    const out = newLeafLookup();
    expect(pgt.translate(5, out)).toBe(4 * M2 + 5);
    expect(out.level).toBe(2);
    expect(pgt.translate(G1 + 3 * M2 + 1, out)).toBe(2 * G1 + 3 * M2 + 1);
    expect(out.level).toBe(1);
    pgt.destroy();
    expect(pgt.liveTablePages()).toBe(0);
  });
});

describe('lock assertions', () => {
  it('with a bound MMU lock, each operation checks it is held as required', async () => {
    const { MmuLock } = await import('../../../src/soft/locking/mmu-lock.ts');
    for (const mode of MMU_LOCK_MODES) {
      const lock = MmuLock.create(mode);
      const { pgt } = mk({ lock });
      const sh = lock.faultShared;
      expect(() => pgt.map(0, 3, 1, PROT_R, sh)).toThrow(/not held/);
      expect(() => pgt.relaxPerms(0, PROT_W, lock.relaxShared)).toThrow(/not held/);
      lock.faultLock();
      expect(pgt.map(0, 3, 1, PROT_R, sh)).toBe(OK);
      lock.faultUnlock();
      lock.relaxLock();
      expect(pgt.relaxPerms(0, PROT_W, lock.relaxShared)).toBe(OK);
      if (lock.relaxShared) {
        // A relax fault's read lock is not enough for a map fault in the global modes.
        if (!sh) expect(() => pgt.map(0, 3, 1, PROT_R, sh)).toThrow(/write lock not held/);
      }
      lock.relaxUnlock();
      lock.faultLock();
      if (mode === 'parallel') {
        // Exclusive operations need the write lock, the read lock is not enough.
        expect(() => pgt.unmap(0, 1)).toThrow(/write lock not held/);
        expect(() => pgt.writeProtect(0, 1)).toThrow(/write lock not held/);
        expect(pgt.writeProtect(0, 1, true)).toBe(1);
      }
      lock.faultUnlock();
      expect(() => pgt.destroy()).toThrow(/not held/);
      lock.exclusiveLock();
      pgt.unmap(0, 1);
      pgt.destroy();
      lock.exclusiveUnlock();
    }
  });
});

describe('split with the new leaf applied before publishing', () => {
  it('one break for block -> table + new leaf; a displaced page of the block is reported', () => {
    const { pgt, flushes, removed } = mk();
    const out = newLeafLookup();
    pgt.map(M2, 2, 8 * M2, PROT_R, true);
    // Same pfn, more permission: nothing displaced.
    expect(pgt.map(M2 + 3, 3, 8 * M2 + 3, PROT_RW, true)).toBe(OK);
    expect(pgt.stats().breaks).toBe(1);
    expect(removed).toEqual([]);
    expect(pteWritable(pgt.getLeaf(M2 + 3, out))).toBe(true);
    // Another 2M block, remapping one page to another pfn while splitting.
    pgt.map(2 * M2, 2, 16 * M2, PROT_RW, true);
    expect(pgt.map(2 * M2 + 5, 3, 99, PROT_RW, true)).toBe(OK);
    expect(pgt.stats().breaks).toBe(2);
    expect(flushes).toEqual([[M2, M2], [2 * M2, M2]]);
    expect(removed).toEqual([[16 * M2 + 5, 3]]);
    expect(pgt.translate(2 * M2 + 5, out)).toBe(99);
    expect(pgt.translate(2 * M2 + 6, out)).toBe(16 * M2 + 6);
    pgt.destroy();
  });
});
