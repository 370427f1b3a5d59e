// Zapping a 2 MiB region's last-level table under the MMU READ lock (async huge-page recovery,
// huge/recovery.ts; Linux's tdp_mmu zaps under mmu_lock held for read the same way: freeze the
// entry by cmpxchg, flush, then clear it). The entry at level 2 that points to a table of 512
// 4 KiB entries becomes invalid; the vCPUs' next faults there map a 2 MiB block.
//
// Concurrency rules (who writes what, in which order, why it is safe):
// - Caller: the MMU lock held for read (or write), and this thread inside its RCU read section,
//   so every table page reached below stays allocated while we look at it.
// - Break: each level-2 entry goes from exactly the table value the caller saw (`entry`) to
//   LOCKED by one compare-and-exchange. A racing fault that collapsed it to a block, split or
//   re-pointed it, or another zap, changed that value first: the cmpxchg fails and the region
//   is left alone (nothing to undo). The winner owns the entry (bbm.ts): a fault or walk meeting
//   LOCKED returns EAGAIN / "no mapping" and is retried, so nothing is installed AT the entry
//   while old translations may still be cached.
// - Flush: one remote TLB flush over the broken entries, after all breaks and before any entry
//   is cleared. It returns only once every vCPU in guest mode acknowledged (vcpu/tlb-flush.ts);
//   a vCPU acknowledges between accesses, so a write-protect fast path that read a leaf of the
//   old table before the break and set W / filled its TLB from it meanwhile has finished, and
//   that TLB entry is gone. A slow-path fault (outside guest mode, skipped by the flusher) that
//   installed a leaf into the old table re-walks from the root when it re-enters guest mode
//   (runner.ts translateSlow) and finds LOCKED or nothing: it never fills a TLB from the old
//   table. So once the flush returns, no vCPU uses or will use a translation from the old table.
// - Make: each entry is stored invalid (0) by its owner (plain Atomics.store over LOCKED), and
//   its old table is retired through RCU (Stage2Env.retireTable): the page is freed only after
//   every thread that might still be walking it left its read section (a vCPU leaves it at the
//   acknowledgement above at the latest), and the leaves that racing threads still put in it
//   after the unlink are settled in the mapping counters then (mapping-counters.ts).
// - Pages: stage 2 holds no page references (mmu/fault.ts), so the zap frees no guest page; the
//   host pfns the table mapped stay the host's. A zap never loses information: every valid leaf
//   can be re-faulted, and dirty logging is off on the slot (recovery drops a logging slot), and
//   a W set in the old table by the fast path was recorded (if logging) before the guest wrote.
// - If the flush throws, every broken entry is put back to the table it held (nothing was made).

import { Stage2Event, type Stage2Env } from './bbm.ts';
import { LAST_LEVEL, PTE_LOCKED, pteIndex, pteIsPoison, pteIsTable, tableBase, tableIndex } from './pte.ts';
import { PoisonedTableError } from './walker.ts';

/** One region to zap: the 2 MiB-aligned gfn and the table entry the caller found there. */
export interface TableZap {
  gfn: number;
  entry: number;
}

/**
 * Zap the last-level tables of `zaps` (see the file header). Returns how many were zapped; the
 * others had changed since the caller looked. `scratch` is reused (ptep, entry pairs).
 */
export function zapLastLevelTables(words: Int32Array, rootBase: number, env: Stage2Env, zaps: readonly TableZap[], scratch: number[], debug: boolean): number {
  scratch.length = 0;
  let lo = Number.MAX_SAFE_INTEGER;
  let hi = 0;
  for (const z of zaps) {
    if (!pteIsTable(z.entry)) continue;
    const ptep = level2Entry(words, rootBase, z.gfn, debug);
    if (ptep < 0) continue;
    if (Atomics.compareExchange(words, ptep, z.entry, PTE_LOCKED) !== z.entry) continue;
    env.countEvent(Stage2Event.Break);
    scratch.push(ptep, z.entry);
    if (z.gfn < lo) lo = z.gfn;
    if (z.gfn + 512 > hi) hi = z.gfn + 512;
  }
  if (scratch.length === 0) return 0;
  try {
    env.tlbFlush(lo, hi - lo);
  } catch (e) {
    for (let i = 0; i < scratch.length; i += 2) Atomics.store(words, scratch[i]!, scratch[i + 1]!);
    throw e;
  }
  for (let i = 0; i < scratch.length; i += 2) {
    Atomics.store(words, scratch[i]!, 0);
    env.retireTable(tableIndex(scratch[i + 1]!), LAST_LEVEL);
  }
  return scratch.length / 2;
}

/** Word offset of the level-2 entry covering gfn, or -1 when a table above it is missing. */
function level2Entry(words: Int32Array, rootBase: number, gfn: number, debug: boolean): number {
  let base = rootBase;
  for (let level = 0; level < LAST_LEVEL - 1; level++) {
    const pte = Atomics.load(words, base + pteIndex(gfn, level));
    if (!pteIsTable(pte)) {
      if (debug && pteIsPoison(pte)) throw new PoisonedTableError(`zap: read a freed table page at level ${level} (gfn ${gfn})`);
      return -1;
    }
    base = tableBase(pte);
  }
  return base + pteIndex(gfn, LAST_LEVEL - 1);
}
