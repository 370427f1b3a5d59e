// Dropping and splitting host page-table entries: the bodies of munmap, zapRange
// (MADV_DONTNEED) and splitHugePmd. Main thread only, always between invalidate_range_start and
// invalidate_range_end (the caller in host-address-space.ts brackets them and runs notifiers).
//
// Concurrency rules (the reader side is in host-address-space.ts):
// - An entry is dropped with Atomics.exchange(0): the thread that takes a non-zero value owns the
//   reference it held and puts it. Racing first-touch installers either take their own entry back
//   (VMA DYING, munmap) or simply re-populate it (zapRange: the VMA stays LIVE, a later fault
//   zero-fills again, and the in-progress invalidation makes any racing stage-2 fault retry).
// - Splitting a huge pmd: the 512 ptes are written while the pmd still maps the block huge (no
//   thread installs ptes under a huge pmd), each pte is given its own reference on the compound
//   head, then the pmd is stored PMD_SMALL. A reader that took a reference through the old huge
//   pmd re-checks the pmd, sees it changed, puts the reference and retries through the ptes.

import type { HostMemory } from '../hostmem/host-memory.ts';
import { HUGE_FRAME_PAGES } from '../hostmem/page-flags.ts';
import { F_PAGES, F_PMD_BASE, F_PTE_BASE, type VmaTable } from './vma-table.ts';

/** pmd value: the block is populated (or being populated) with 4 KiB ptes. */
export const PMD_SMALL = -1;

export interface HostTables {
  mem: HostMemory;
  table: VmaTable;
  pte: Int32Array;
  pmd: Int32Array;
}

/** Drop every entry of VMA e (munmap). */
export function zapVma(t: HostTables, e: number): void {
  zapPages(t, e, 0, t.table.field(e, F_PAGES));
}

/**
 * Drop pages [first, first + count) of VMA e. A huge block only partly inside the range is split
 * first, so the pages outside it stay mapped.
 */
export function zapPages(t: HostTables, e: number, first: number, count: number): void {
  const pteBase = t.table.field(e, F_PTE_BASE);
  const pmdBase = t.table.field(e, F_PMD_BASE);
  const end = first + count;
  if (pmdBase >= 0) {
    for (let b = Math.floor(first / HUGE_FRAME_PAGES); b * HUGE_FRAME_PAGES < end; b++) {
      const v = Atomics.load(t.pmd, pmdBase + b);
      if (v <= 0) continue;
      const blockStart = b * HUGE_FRAME_PAGES;
      if (blockStart >= first && blockStart + HUGE_FRAME_PAGES <= end) {
        const taken = Atomics.exchange(t.pmd, pmdBase + b, 0);
        if (taken > 0) t.mem.putPage(taken - 1);
      } else {
        splitBlock(t, e, b);
      }
    }
  }
  if (pteBase >= 0) {
    const pte = t.pte;
    for (let i = first; i < end; i++) {
      if (Atomics.load(pte, pteBase + i) === 0) continue; // an install after this load takes itself back (munmap) or is simply kept (zapRange)
      const v = Atomics.exchange(pte, pteBase + i, 0);
      if (v > 0) t.mem.putPage(v - 1);
    }
  }
}

/**
 * split_huge_pmd: map block b of VMA e (a THP VMA) with 512 ptes into the same compound frame.
 * Returns false if the block was not mapped huge.
 */
export function splitBlock(t: HostTables, e: number, b: number): boolean {
  const pteBase = t.table.field(e, F_PTE_BASE);
  const slot = t.table.field(e, F_PMD_BASE) + b;
  const v = Atomics.load(t.pmd, slot);
  if (v <= 0) return false;
  if (pteBase < 0) throw new Error('splitBlock: a hugetlb mapping cannot be split');
  const head = v - 1;
  const base = pteBase + b * HUGE_FRAME_PAGES;
  for (let i = 0; i < HUGE_FRAME_PAGES; i++) Atomics.store(t.pte, base + i, head + i + 1);
  // 512 pte references replace the pmd's one.
  for (let i = 1; i < HUGE_FRAME_PAGES; i++) t.mem.getPage(head);
  Atomics.store(t.pmd, slot, PMD_SMALL);
  return true;
}
