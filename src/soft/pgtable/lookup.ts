// Walker-free fast paths over the stage-2 table: the lookup a fault handler or a vCPU's TLB fill
// does, a map that only fills an invalid entry or adds permissions, and write-protect of a few
// pages. Pure functions over the pool's words and the root page's word offset.
//
// Concurrency rules: the caller is inside an RCU read section (or holds the MMU lock for write),
// so every table page reached stays allocated. Upper-level entries are read with plain loads (a
// 32-bit load cannot tear; a stale table pointer leads into a table that is unlinked but not yet
// freed, where a change is lost exactly as in a walker's race, and the access faults again). The
// entry that is changed is read with Atomics.load and changed with compareExchange when
// `shared` (MMU read lock), or Atomics.store under the write lock, and the change is counted
// (mapping-counters.ts) by this thread. These paths never break an entry: anything needing
// break-before-make or a new table is NOT_HANDLED, for the walker.

import {
  LAST_LEVEL,
  LEVEL_PAGES,
  leafChangeRemovesPerms,
  leafWithoutWrite,
  leafWritable,
  leavesDifferOnlyInPerms,
  pteIndex,
  pteIsLeaf,
  pteIsLocked,
  pteIsPoison,
  pteIsTable,
  tableBase,
} from './pte.ts';
import { EAGAIN, OK, PoisonedTableError } from './walker.ts';
import type { MappingCounters } from './mapping-counters.ts';

/** Out-parameter of a lookup: where it stopped. */
export interface LeafLookup {
  /** Level of the returned leaf, or of the entry where the lookup stopped. */
  level: number;
  /** Word offset of that entry in the pool (for a direct cmpxchg by the caller). */
  ptep: number;
  /** The entry was LOCKED: a break-before-make is in progress; retry. */
  locked: boolean;
}

export function newLeafLookup(): LeafLookup {
  return { level: 0, ptep: 0, locked: false };
}

/** mapInPlace results besides OK (changed) and EAGAIN. */
export const NOT_HANDLED = 1;
export const MAP_SAME = 2;

/** The leaf covering gfn, or 0 (nothing mapped, or LOCKED: see out.locked). No atomics. */
export function lookupLeaf(w: Int32Array, rootBase: number, gfn: number, out: LeafLookup, debug: boolean): number {
  // gfns below 2^31 (8 TiB of guest memory) take integer shifts; larger ones divide.
  if (gfn > 0x7fffffff) return lookupLeafWide(w, rootBase, gfn, out, debug);
  let ptep = rootBase + (gfn >>> 27);
  let pte = w[ptep]!;
  let level = 0;
  if (pteIsTable(pte)) {
    ptep = tableBase(pte) + ((gfn >>> 18) & 511);
    pte = w[ptep]!;
    level = 1;
    if (pteIsTable(pte)) {
      ptep = tableBase(pte) + ((gfn >>> 9) & 511);
      pte = w[ptep]!;
      level = 2;
      if (pteIsTable(pte)) {
        ptep = tableBase(pte) + (gfn & 511);
        pte = w[ptep]!;
        level = 3;
      }
    }
  }
  out.level = level;
  out.ptep = ptep;
  out.locked = pteIsLocked(pte);
  if (pteIsLeaf(pte)) return pte;
  if (pteIsPoison(pte) && debug) throw new PoisonedTableError(`getLeaf(${gfn}) read a freed table page at level ${level}`);
  return 0;
}

function lookupLeafWide(w: Int32Array, rootBase: number, gfn: number, out: LeafLookup, debug: boolean): number {
  let ptep = rootBase + ((gfn / 134217728) & 511);
  let pte = w[ptep]!;
  let level = 0;
  while (pteIsTable(pte) && level < LAST_LEVEL) {
    level++;
    ptep = tableBase(pte) + ((gfn / LEVEL_PAGES[level]!) & 511);
    pte = w[ptep]!;
  }
  out.level = level;
  out.ptep = ptep;
  out.locked = pteIsLocked(pte);
  if (pteIsLeaf(pte)) return pte;
  if (pteIsPoison(pte) && debug) throw new PoisonedTableError(`getLeaf(${gfn}) read a freed table page at level ${level}`);
  return 0;
}

/**
 * Install leaf `nu` at (gfn, level) when every table down to `level` exists and the entry there
 * is invalid (OK), already `nu` (MAP_SAME) or the same leaf with fewer permissions (OK: adding
 * permissions needs no break and no flush). EAGAIN when a shared cmpxchg lost; NOT_HANDLED for
 * everything else (missing table, block to split, table to collapse, LOCKED, another pfn).
 */
export function mapInPlace(w: Int32Array, rootBase: number, gfn: number, level: number, nu: number, shared: boolean, counts: MappingCounters): number {
  let ptep = rootBase + pteIndex(gfn, 0);
  for (let l = 1; l <= level; l++) {
    const pte = w[ptep]!;
    if (!pteIsTable(pte)) return NOT_HANDLED;
    ptep = tableBase(pte) + pteIndex(gfn, l);
  }
  const old = Atomics.load(w, ptep);
  if (old === nu) return MAP_SAME;
  const addsOnly = old === 0 || (pteIsLeaf(old) && leavesDifferOnlyInPerms(old, nu) && !leafChangeRemovesPerms(old, nu));
  if (!addsOnly) return NOT_HANDLED;
  if (shared) {
    if (Atomics.compareExchange(w, ptep, old, nu) !== old) return EAGAIN;
  } else {
    Atomics.store(w, ptep, nu);
  }
  counts.entryChanged(level, old, nu);
  return OK;
}

/** Clear W on the leaves covering [startGfn, startGfn+npages), one lookup per entry; returns leaves changed (the caller counts them). */
export function writeProtectPages(w: Int32Array, rootBase: number, startGfn: number, npages: number, shared: boolean, out: LeafLookup, debug: boolean): number {
  const end = startGfn + npages;
  let changed = 0;
  for (let g = startGfn; g < end; ) {
    let old = lookupLeaf(w, rootBase, g, out, debug);
    while (leafWritable(old)) {
      if (!shared) {
        Atomics.store(w, out.ptep, leafWithoutWrite(old));
        changed++;
        break;
      }
      const seen = Atomics.compareExchange(w, out.ptep, old, leafWithoutWrite(old));
      if (seen === old) {
        changed++;
        break;
      }
      old = pteIsLeaf(seen) ? seen : 0;
    }
    // A block (or an empty / LOCKED upper entry) is done once: go to the entry after it.
    const pages = LEVEL_PAGES[out.level]!;
    g = Math.floor(g / pages) * pages + pages;
  }
  return changed;
}
