// Finding 2 MiB regions that dirty logging left split into 4 KiB leaves (the scan half of
// recovering huge pages, seed 004; x86 kvm_mmu_zap_collapsible_sptes / Linux 6.13's
// kvm_mmu_recover_huge_pages).
//
// Concurrency: the scan is a shared walk (RCU read section, no MMU lock needed): it only reads
// entries. What it reports can be stale by the time the caller acts, so the caller acts under
// the MMU lock and the table op re-checks (collapse is break-before-make by cmpxchg against the
// table entry; a zap removes whatever is there). Entries inside a 4 KiB table may still gain W
// from the lockless fast path after the scan (never a new pfn: that needs the exclusive lock),
// so a uniform region's prot may under-state W, never over-state it.
import { LAST_LEVEL, PTRS_PER_TABLE, PROT_R, PROT_RW, leafIsDevice, leafPfn, leafWritable, pteIsLeaf, pteIsTable, tableBase } from '../pgtable/pte.ts';
import { OK, WALK_SHARED, WALK_TABLE_POST, type Stage2PageTable, type VisitCtx, type Visitor } from '../pgtable/stage2.ts';

/** One 2 MiB region whose level-2 entry is a table of 4 KiB entries. */
export interface SplitRegion {
  gfn: number;
  /** pfn of the first present leaf (any entry), or -1 when the table holds no leaf. */
  firstPfn: number;
  /**
   * Every entry a 4 KiB RAM leaf, pfns one contiguous run starting 2 MiB-aligned (uniform):
   * the block it can become in place is (pfn0, prot); -1 when not uniform.
   */
  pfn0: number;
  /** PROT_RW when every leaf is writable, else PROT_R (the block never gets more than a leaf had). */
  prot: number;
  /** The level-2 table entry as the scan read it (what a zap under the read lock cmpxchgs against). */
  entry: number;
}

class SplitRegionVisitor implements Visitor {
  out: SplitRegion[] = [];

  visit(ctx: VisitCtx, kind: number): number {
    if (kind !== WALK_TABLE_POST || ctx.level !== LAST_LEVEL - 1) return OK;
    const old = ctx.load();
    if (!pteIsTable(old)) return OK;
    const words = ctx.words;
    const base = tableBase(old);
    let firstPfn = -1;
    let uniform = true;
    let allW = true;
    let pfn0 = -1;
    for (let i = 0; i < PTRS_PER_TABLE; i++) {
      const pte = Atomics.load(words, base + i);
      if (!pteIsLeaf(pte) || leafIsDevice(pte)) {
        uniform = false;
        continue;
      }
      const pfn = leafPfn(pte);
      if (firstPfn < 0) firstPfn = pfn - i;
      if (i === 0) pfn0 = pfn;
      if (pfn !== pfn0 + i) uniform = false;
      if (!leafWritable(pte)) allW = false;
    }
    if (pfn0 < 0 || pfn0 % PTRS_PER_TABLE !== 0) uniform = false;
    this.out.push({ gfn: ctx.gfn, firstPfn, pfn0: uniform ? pfn0 : -1, prot: allW ? PROT_RW : PROT_R, entry: old });
    return OK;
  }
}

/**
 * The split 2 MiB regions among [startGfn, startGfn + npages) (both 512-aligned), in gfn order.
 * firstPfn is normalised to the pfn the region's first page would have (the leaf's pfn minus
 * its index), so a caller can compare it with the host page backing the region's start.
 */
export function scanSplitRegions(pgt: Stage2PageTable, startGfn: number, npages: number): SplitRegion[] {
  const v = new SplitRegionVisitor();
  pgt.walk(startGfn, npages, v, WALK_TABLE_POST | WALK_SHARED);
  return v.out;
}
