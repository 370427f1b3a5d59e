// Break-before-make and table-subtree helpers shared by the stage-2 visitors.
//
// Break-before-make (stage2_try_break_pte / stage2_make_pte): to change a valid entry into an
// entry with a different output (leaf->table split, table->leaf collapse, leaf->other pfn), a
// thread first swaps the entry to LOCKED by compare-and-exchange against the value it read. The
// winner owns the entry: every other thread that meets LOCKED backs off (a fault returns EAGAIN
// and is retried; a lock-free TLB fill sees "no mapping" and faults). The owner then invalidates
// TLBs for the old entry's whole range (no vCPU may keep using the old translation once the new
// one can be seen), and publishes the new value with Atomics.store. Only the owner ever
// overwrites LOCKED, so the store needs no compare-and-exchange.
//
// Building a replacement table: the pages of a subtree built for a split are private to the
// building thread until published by the Atomics.store in makePte; they are written with plain
// stores. A subtree that loses the race (tryBreakPte fails) was never visible and is freed at
// once (freeUnpublished). A subtree that was unlinked by a successful break was visible, so it
// is handed to the RCU epoch domain and freed after a grace period (freeRetiredSubtree, on
// whichever thread reclaims); its leaves are reported then, when no thread can change them any
// more, so a racing fault that still installed a leaf into the unlinked table is accounted for.

import type { MmOps } from './table-pool.ts';
import type { MappingCounters } from './mapping-counters.ts';
import {
  LAST_LEVEL,
  LEVEL_PAGES,
  PTE_LOCKED,
  PTRS_PER_TABLE,
  leafAttrs,
  leafFromAttrs,
  leafPfn,
  mkTable,
  pteIsLeaf,
  pteIsLocked,
  pteIsPoison,
  pteIsTable,
  pteIsValid,
  tableIndex,
} from './pte.ts';
import { CorruptTableError, PoisonedTableError, type VisitCtx } from './walker.ts';

/** Slow-path events a Stage2Env counts (index into its shared counters). */
export const Stage2Event = {
  Break: 0,
  BlockSplit: 1,
  Collapse: 2,
  TableRetired: 3,
  MapEagain: 4,
} as const;
export type Stage2Event = (typeof Stage2Event)[keyof typeof Stage2Event];

/** The stage-2 table's services a visitor needs (the kvm_pgtable_mm_ops + kvm_s2_mmu role). */
export interface Stage2Env {
  readonly mm: MmOps;
  /** This thread's mapping counters: a visitor counts every leaf it adds, removes or changes. */
  readonly counts: MappingCounters;
  countEvent(ev: Stage2Event): void;
  /** Invalidate every TLB entry for gfns [gfn, gfn+npages), on every vCPU, before returning. */
  tlbFlush(gfn: number, npages: number): void;
  /** Hand an unlinked table (entries at `level`) to RCU: freed after a grace period. Counts its leaves as gone. */
  retireTable(tableIdx: number, level: number): void;
}

/**
 * Swap ctx's entry to LOCKED (compare-and-exchange against ctx.old in a shared walk) and
 * invalidate TLBs for what it mapped. False when another thread owns or changed the entry.
 */
export function tryBreakPte(ctx: VisitCtx, env: Stage2Env): boolean {
  const old = ctx.old;
  if (pteIsLocked(old)) {
    if (!ctx.shared) throw new CorruptTableError(`LOCKED entry met by an exclusive walk at gfn ${ctx.gfn} level ${ctx.level}`);
    return false;
  }
  if (!ctx.tryPte(PTE_LOCKED)) return false;
  env.countEvent(Stage2Event.Break);
  // ctx.tryPte set ctx.old = LOCKED; the caller still needs the evicted value in `old`.
  if (pteIsValid(old)) {
    try {
      env.tlbFlush(ctx.gfn, ctx.pages);
    } catch (e) {
      // Never leave an entry LOCKED behind (every later fault on it would spin on EAGAIN): the
      // old value is still correct, since nothing was made yet.
      Atomics.store(ctx.words, ctx.ptep, old);
      ctx.old = old;
      throw e;
    }
  }
  return true;
}

/** Publish the new value of an entry this thread broke. */
export function makePte(ctx: VisitCtx, nu: number): void {
  if (!pteIsLocked(Atomics.load(ctx.words, ctx.ptep))) {
    throw new CorruptTableError(`make on an entry that is not LOCKED (gfn ${ctx.gfn} level ${ctx.level})`);
  }
  Atomics.store(ctx.words, ctx.ptep, nu);
  ctx.old = nu;
}

/**
 * A new, unpublished table mapping exactly what `leaf` (a block at `level`) maps: 512 entries
 * at level+1 with consecutive pfns and the same attributes. With toLastLevel, every entry is
 * split again down to 4 KiB pages (a level-1 block takes 1 + 512 pages). Returns the table's
 * pool index, or -1 when the pool is exhausted (nothing is left allocated then).
 */
export function buildSplitTable(mm: MmOps, leaf: number, level: number, toLastLevel: boolean): number {
  if (!pteIsLeaf(leaf) || level >= LAST_LEVEL) {
    throw new CorruptTableError(`buildSplitTable: not a block (level ${level})`);
  }
  const table = mm.zallocTablePage();
  if (table < 0) return -1;
  const words = mm.words;
  const childLevel = level + 1;
  const step = LEVEL_PAGES[childLevel]!;
  const pfn0 = leafPfn(leaf);
  // Type, R, W, DEVICE: every smaller leaf inherits them.
  const attrs = leafAttrs(leaf);
  const base = table * PTRS_PER_TABLE;
  if (toLastLevel && childLevel < LAST_LEVEL) {
    for (let i = 0; i < PTRS_PER_TABLE; i++) {
      const sub = buildSplitTable(mm, leafFromAttrs(pfn0 + i * step, attrs), childLevel, true);
      if (sub < 0) {
        freeUnpublished(mm, table, childLevel);
        return -1;
      }
      words[base + i] = mkTable(sub);
    }
  } else {
    for (let i = 0; i < PTRS_PER_TABLE; i++) words[base + i] = leafFromAttrs(pfn0 + i * step, attrs);
  }
  return table;
}

/** Free a subtree that no other thread ever saw (it lost its race); reports nothing. */
export function freeUnpublished(mm: MmOps, table: number, level: number): void {
  if (level < LAST_LEVEL) {
    const base = table * PTRS_PER_TABLE;
    for (let i = 0; i < PTRS_PER_TABLE; i++) {
      const pte = mm.words[base + i]!;
      if (pteIsTable(pte)) freeUnpublished(mm, tableIndex(pte), level + 1);
    }
  }
  mm.freeTablePage(table);
}

/** Reports one leaf removed from the stage-2 table: host pfn, level, the pte it had. */
export type LeafRemoved = (pfn: number, level: number, pte: number) => void;

/**
 * Free an unlinked subtree after its grace period: report every leaf still in it, then free its
 * pages. Returns the number of table pages freed.
 */
export function freeRetiredSubtree(mm: MmOps, table: number, level: number, onLeaf: LeafRemoved | undefined): number {
  const words = mm.words;
  const base = table * PTRS_PER_TABLE;
  let freed = 0;
  for (let i = 0; i < PTRS_PER_TABLE; i++) {
    const pte = Atomics.load(words, base + i);
    if (pteIsTable(pte) && level < LAST_LEVEL) freed += freeRetiredSubtree(mm, tableIndex(pte), level + 1, onLeaf);
    else if (pteIsLeaf(pte)) onLeaf?.(leafPfn(pte), level, pte);
    else if (pteIsPoison(pte)) throw new PoisonedTableError(`retired table page ${table}[${i}] was already freed (double free)`);
    else if (pteIsLocked(pte)) throw new CorruptTableError(`LOCKED entry in a retired table page ${table}[${i}]: a break-before-make never finished`);
  }
  mm.freeTablePage(table);
  return freed + 1;
}

/** True when every entry of the table page is invalid (0). */
export function tableIsEmpty(words: Int32Array, table: number): boolean {
  const base = table * PTRS_PER_TABLE;
  for (let i = 0; i < PTRS_PER_TABLE; i++) if (Atomics.load(words, base + i) !== 0) return false;
  return true;
}
