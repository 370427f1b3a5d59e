// The stage-2 page table (kvm_pgtable for a guest): a 4-level radix tree of Int32 PTEs in a
// SharedArrayBuffer (pte.ts, table-pool.ts), changed by visitors over one walker (walker.ts,
// visitors.ts), with break-before-make (bbm.ts) and RCU-deferred freeing (locking/epoch.ts).
// This file: the operations on entries; the per-thread handle they run on (shared state, RCU,
// statistics, destroy) is stage2-handle.ts.
//
// Threads: the main thread create()s it; every worker attach()es the structured-clonable
// `shared` and gets its own instance (its own walkers, visitors, RCU reader slot, callbacks).
//
// Concurrency rules (the caller's locks: locking/mmu-lock.ts):
// - map / relaxPerms / collapse / splitHugePages with shared=true: MMU lock held for READ. The
//   op enters its own RCU read section, changes entries only by cmpxchg / break-before-make, and
//   returns EAGAIN when it lost a race (a fault handler retries the fault).
// - The same ops with shared=false, and unmap / destroy always: MMU lock held for WRITE.
// - writeProtect: the MMU lock held for WRITE (so that the count it returns and the caller's TLB
//   flush cover every writable leaf: no fault can re-grant W in between); with shared=true it is
//   also safe under the READ lock (cmpxchg), a concurrent fault may then re-grant W to a page it
//   is writing, which is a new write the caller's next harvest sees.
// - tryGrantWrite (a write-protect fast path's cmpxchg, W added to a 4 KiB leaf, counted in this
//   thread's row): under the caller's RCU read section and the MMU lock's read or write side;
//   it races only with changes that a cmpxchg detects. The vCPU fast path (mmu/fault.ts) does
//   the same cmpxchg itself, lock-free in 'parallel' mode, and counts it in its own stats line
//   (countWriteGrantsFrom).
// - getLeaf: no MMU lock needed, but the caller must be inside an RCU read section
//   (rcuReadLock) or hold the MMU lock for WRITE. It reads entries with plain loads: a 32-bit
//   load cannot tear, and a stale value only makes the caller fault and retry under the lock.
//   forEachLeaf enters its own RCU section.
// - Unlinked tables are freed only through the epoch domain (deferFree), after every thread that
//   might have been walking them has left its read section. reclaim() runs at the end of each op
//   that retired a table, on exclusive unlock (MmuLock.onExclusiveUnlock), and in destroy().
// - TLB invalidation: the tlbFlush callback is called between break and make (and after a
//   permission shrink in map); it must return only when no vCPU can use the old translation.
//   writeProtect's caller flushes the range itself; relaxPerms needs no flush.
// - Given the thread's MmuLock (option `lock` / bindLock), every operation asserts at its top
//   that the lock is held as required (LockError otherwise).
// - onLeafRemoved(pfn, level, pte) reports leaves that left the table (unmap, a remapped leaf,
//   the leaves of a collapsed subtree, destroy) so the caller can put page references. Leaves of
//   an RCU-freed subtree are reported by the thread that reclaims it: set the callback on every
//   instance.
// - Mapping statistics (mappingCounts) are counted where entries change, in this thread's row of
//   mapping-counters.ts, which states when their sum equals a walk.

import { Stage2Error, type Stage2Callbacks, type Stage2CreateOptions, type Stage2Shared } from './stage2-types.ts';
import { Stage2Event, type LeafRemoved } from './bbm.ts';
import { LAST_LEVEL, LEVEL_PAGES, MAX_GFN, MIN_BLOCK_LEVEL, leafPfn, leafWithPermsAdded, leafWithWrite, mkLeaf } from './pte.ts';
import { MAP_SAME, NOT_HANDLED, lookupLeaf, mapInPlace, newLeafLookup, writeProtectPages, type LeafLookup } from './lookup.ts';
import { Stage2Handle, createStage2Shared } from './stage2-handle.ts';
import { CollapsibleVisitor, LeafIterVisitor, MapVisitor, SplitVisitor, UnmapVisitor, WriteProtectVisitor } from './visitors.ts';
import { zapLastLevelTables, type TableZap } from './zap-table.ts';
import { EAGAIN, ENOMEM, OK, WALK_HANDLE_FAULT, WALK_LEAF, WALK_SHARED, WALK_TABLE_POST, WALK_TABLE_PRE, Walker, type Visitor } from './walker.ts';

export { newLeafLookup, type LeafLookup } from './lookup.ts';
export type { TableZap } from './zap-table.ts';
export type { MappingCounts } from './mapping-counters.ts';
export { Stage2Error, type Stage2Callbacks, type Stage2CreateOptions, type Stage2Shared, type Stage2Stats } from './stage2-types.ts';
export { EAGAIN, ENOMEM, OK, WALK_HANDLE_FAULT, WALK_LEAF, WALK_SHARED, WALK_TABLE_POST, WALK_TABLE_PRE, type VisitCtx, type Visitor } from './walker.ts';

/** kvm_pgtable_walk(pgt, addr, size, walker) in this project's units (see Stage2PageTable.walk). */
export function walk(pgt: Stage2PageTable, startGfn: number, npages: number, visitor: Visitor, flags: number): number {
  return pgt.walk(startGfn, npages, visitor, flags);
}

/** Up to this many pages, writeProtect looks pages up one by one instead of walking. */
const WRPROT_FAST_PAGES = 16;

export class Stage2PageTable extends Stage2Handle {
  private readonly walker: Walker;
  private readonly mapVisitor: MapVisitor;
  private readonly wrprotVisitor = new WriteProtectVisitor();
  private readonly splitVisitor: SplitVisitor;
  private readonly unmapVisitor: UnmapVisitor;
  /** Whether the last map()/collapse() changed the table (false: the mapping was already there). */
  lastMapChanged = false;

  private constructor(shared: Stage2Shared, cb: Stage2Callbacks) {
    super(shared, cb);
    this.walker = new Walker(this.words, this.debug);
    const removed: LeafRemoved = (pfn, level, pte) => this.leafCb?.(pfn, level, pte);
    this.mapVisitor = new MapVisitor(this, removed);
    this.splitVisitor = new SplitVisitor(this);
    this.unmapVisitor = new UnmapVisitor(this);
  }

  /** A new, empty table (main thread). The creating thread gets RCU slot 0 unless told otherwise. */
  static create(opts: Stage2CreateOptions): Stage2PageTable {
    return new Stage2PageTable(createStage2Shared(opts), opts);
  }

  /** This thread's handle on a table created elsewhere. */
  static attach(shared: Stage2Shared, cb: Stage2Callbacks = {}): Stage2PageTable {
    return new Stage2PageTable(shared, cb);
  }


  // ---- lookups ----

  /**
   * The leaf covering gfn, or 0 (nothing mapped, or LOCKED: see out.locked). No allocation, no
   * atomics. Caller: inside rcuReadLock(), or holding the MMU lock for write.
   */
  getLeaf(gfn: number, out: LeafLookup): number {
    return lookupLeaf(this.words, this.rootBase, gfn, out, this.debug);
  }

  /** Host pfn backing gfn (the block's pfn plus gfn's offset in it), or -1 when unmapped. */
  translate(gfn: number, out: LeafLookup): number {
    const pte = this.getLeaf(gfn, out);
    if (pte === 0) return -1;
    return leafPfn(pte) + (gfn % LEVEL_PAGES[out.level]!);
  }

  // ---- changes ----

  /**
   * Map 2^(9*(3-level)) pages at gfn (aligned) to host pfn (aligned likewise) with prot
   * (PROT_R | PROT_W | PROT_DEVICE). Returns OK, EAGAIN (lost a race / met LOCKED: retry the
   * fault) or ENOMEM. lastMapChanged tells whether anything changed. See the file header for
   * locking; shared=true needs the MMU read lock, shared=false the write lock.
   */
  map(gfn: number, level: 1 | 2 | 3, pfn: number, prot: number, shared: boolean): number {
    this.assertLocked(shared);
    this.checkRange(gfn, level);
    const pages = LEVEL_PAGES[level]!;
    if (pfn % pages !== 0) throw new Stage2Error(`map: pfn ${pfn} is not aligned to a level-${level} block`);
    const nu = mkLeaf(pfn, prot);
    const fast = this.mapFast(gfn, level, nu, shared);
    if (fast !== NOT_HANDLED) return fast;
    const v = this.mapVisitor;
    v.level = level;
    v.newPte = nu;
    v.changed = false;
    const r = this.runWalk(gfn, pages, v, WALK_LEAF | WALK_TABLE_PRE | WALK_HANDLE_FAULT, shared);
    this.lastMapChanged = v.changed;
    if (r === EAGAIN) this.countEvent(Stage2Event.MapEagain);
    return r;
  }

  /** map() without the walker when lookup.ts's mapInPlace can do it; NOT_HANDLED otherwise. */
  private mapFast(gfn: number, level: number, nu: number, shared: boolean): number {
    if (shared) this.epoch.readLock(this.rcuSlot);
    let r: number;
    try {
      r = mapInPlace(this.words, this.rootBase, gfn, level, nu, shared, this.counts);
    } finally {
      if (shared) this.epoch.readUnlock(this.rcuSlot);
    }
    if (r === MAP_SAME) {
      this.lastMapChanged = false;
      return OK;
    }
    if (r === OK) this.lastMapChanged = true;
    else if (r === EAGAIN) this.countEvent(Stage2Event.MapEagain);
    return r;
  }

  /**
   * table -> block: replace whatever maps (gfn, level) by one block leaf (break-before-make;
   * the old subtree is freed after a grace period and its leaves reported then). Same as map()
   * at a block level; named for the caller's intent.
   */
  collapse(gfn: number, level: 1 | 2, pfn: number, prot: number, shared: boolean): number {
    if (level < MIN_BLOCK_LEVEL || level >= LAST_LEVEL) throw new Stage2Error(`collapse: level ${level} is not a block level`);
    return this.map(gfn, level, pfn, prot, shared);
  }

  /**
   * Add permissions (prot's R/W bits) to the leaf covering gfn by one cmpxchg: the write fault
   * on a write-protected page while logging. OK (also when already permitted) or EAGAIN (no
   * leaf, LOCKED, or lost a race). No TLB flush needed.
   */
  relaxPerms(gfn: number, prot: number, shared: boolean): number {
    this.assertLocked(shared);
    if (shared) this.epoch.readLock(this.rcuSlot);
    try {
      const out = this.relaxOut;
      const old = this.getLeaf(gfn, out);
      if (old === 0) return EAGAIN;
      const nu = leafWithPermsAdded(old, prot);
      if (nu === old) return OK;
      if (shared) {
        if (Atomics.compareExchange(this.words, out.ptep, old, nu) !== old) return EAGAIN;
      } else {
        Atomics.store(this.words, out.ptep, nu);
      }
      this.counts.entryChanged(out.level, old, nu);
      return OK;
    } finally {
      if (shared) this.epoch.readUnlock(this.rcuSlot);
    }
  }
  private readonly relaxOut = newLeafLookup();

  /**
   * Set W on `protectedLeaf`, a 4 KiB leaf without W (the caller checked: pteIsWriteProtectedRam)
   * that the caller's own walk found at word ptep, by one cmpxchg, counted in this thread's row
   * (mmu/fault.ts's vCPU fast path does this itself, see countWriteGrantsFrom). False when the
   * entry changed since.
   */
  tryGrantWrite(ptep: number, protectedLeaf: number): boolean {
    const pte = protectedLeaf;
    if (Atomics.compareExchange(this.words, ptep, pte, leafWithWrite(pte)) !== pte) return false;
    this.counts.writeGranted();
    return true;
  }

  /**
   * Clear W on every leaf in [startGfn, startGfn+npages); returns how many leaves changed. The
   * caller flushes TLBs for the range when the count is non-zero. Locking: see file header.
   */
  writeProtect(startGfn: number, npages: number, shared = false): number {
    this.assertLocked(shared);
    if (npages <= WRPROT_FAST_PAGES) return this.writeProtectFew(startGfn, npages, shared);
    const v = this.wrprotVisitor;
    v.changed = 0;
    this.runWalk(startGfn, npages, v, WALK_LEAF, shared);
    this.counts.writeRevoked(v.changed);
    return v.changed;
  }

  /** writeProtect for a few pages (clear-dirty-log runs): a lookup per page, no walker. */
  private writeProtectFew(startGfn: number, npages: number, shared: boolean): number {
    if (this.destroyed) throw new Stage2Error('stage-2 table used after destroy()');
    if (shared) this.epoch.readLock(this.rcuSlot);
    try {
      const changed = writeProtectPages(this.words, this.rootBase, startGfn, npages, shared, this.relaxOut, this.debug);
      this.counts.writeRevoked(changed);
      return changed;
    } finally {
      if (shared) this.epoch.readUnlock(this.rcuSlot);
    }
  }

  /**
   * Split every block in range into 4 KiB leaves (eager split when logging starts). Returns the
   * number of blocks split, or ENOMEM (<0) when the pool ran out (blocks split so far stay
   * split). In a shared walk, a block another thread changed meanwhile is skipped.
   */
  splitHugePages(startGfn: number, npages: number, shared: boolean): number {
    this.assertLocked(shared);
    const v = this.splitVisitor;
    v.split = 0;
    v.lostRaces = 0;
    v.noMemory = false;
    this.runWalk(startGfn, npages, v, WALK_LEAF, shared);
    return v.noMemory ? ENOMEM : v.split;
  }

  /**
   * Remove every leaf in range (a block overlapping the range goes whole) and free tables left
   * empty (after a grace period). MMU lock held for WRITE. One TLB flush covers everything
   * removed; then onLeafRemoved reports each removed leaf.
   */
  unmap(startGfn: number, npages: number): void {
    this.assertLocked(false);
    const v = this.unmapVisitor;
    v.reset(this.root);
    this.runWalk(startGfn, npages, v, WALK_LEAF | WALK_TABLE_POST, false);
    if (v.endGfn > v.firstGfn) this.flushCb(v.firstGfn, v.endGfn - v.firstGfn);
    this.reportRemoved();
  }

  /**
   * unmap WITHOUT the TLB flush: returns true when something was removed, and then the caller
   * MUST flush remote TLBs before anything can rely on the range being unmapped (it may first
   * drop the MMU lock: huge/recovery.ts says when that is safe). Not with onLeafRemoved set (it
   * reports leaves only after their flush).
   */
  unmapFlushDeferred(startGfn: number, npages: number): boolean {
    this.assertLocked(false);
    if (this.leafCb) throw new Stage2Error('unmapFlushDeferred: onLeafRemoved reports leaves after their flush; use unmap');
    const v = this.unmapVisitor;
    v.reset(this.root);
    this.runWalk(startGfn, npages, v, WALK_LEAF | WALK_TABLE_POST, false);
    v.removed.length = 0;
    return v.endGfn > v.firstGfn;
  }

  /**
   * Make each 2 MiB entry of `zaps` that still holds the table entry the caller found there
   * invalid, by cmpxchg + one TLB flush + store (zap-table.ts), and retire its 4 KiB table
   * through RCU. Under the MMU READ lock (or write): faults in 'parallel' mode run beside it.
   * Returns how many were zapped (the rest changed meanwhile). The leaves of the retired tables
   * are reported (onLeafRemoved) when the tables are freed, as for collapse.
   */
  zapTablesShared(zaps: readonly TableZap[]): number {
    this.assertLocked(true);
    if (this.destroyed) throw new Stage2Error('stage-2 table used after destroy()');
    this.epoch.readLock(this.rcuSlot);
    let n: number;
    try {
      n = zapLastLevelTables(this.words, this.rootBase, this, zaps, this.zapScratch, this.debug);
    } finally {
      this.epoch.readUnlock(this.rcuSlot);
    }
    if (this.retiredSinceReclaim && !this.epoch.inReadSection(this.rcuSlot)) this.reclaim();
    return n;
  }
  private readonly zapScratch: number[] = [];

  private reportRemoved(): void {
    const v = this.unmapVisitor;
    const rem = v.removed;
    if (this.leafCb) for (let i = 0; i < rem.length; i += 3) this.leafCb(rem[i]!, rem[i + 1]!, rem[i + 2]!);
    rem.length = 0;
  }

  /**
   * Call fn(gfn, level, pte) for every leaf in range, in gfn order (RCU-protected; any lock or
   * none). fn may call other methods of this table.
   */
  forEachLeaf(startGfn: number, npages: number, fn: (gfn: number, level: number, pte: number) => void): void {
    const v = new LeafIterVisitor();
    v.fn = fn;
    this.walk(startGfn, npages, v, WALK_LEAF | WALK_SHARED);
  }

  /**
   * Table entries (level 1 or 2) whose subtree maps one naturally aligned, physically contiguous
   * range with one set of attributes: every entry of the child table is a leaf, pfn i = pfn0 + i
   * * size, same R/W/DEVICE bits. Such a table can be collapsed into one block (collapse(gfn,
   * level, pfn0, prot)) without resolving any pfn again. fn(gfn, level, pfn0, prot) runs inside
   * the walk (RCU-protected); collapse after the walk, under the MMU lock, and expect EAGAIN if
   * the table changed meanwhile.
   */
  forEachCollapsible(startGfn: number, npages: number, fn: (gfn: number, level: number, pfn: number, prot: number) => void): void {
    const v = new CollapsibleVisitor();
    v.fn = fn;
    this.walk(startGfn, npages, v, WALK_TABLE_POST | WALK_SHARED);
  }

  /**
   * The generic walker over this table (kvm_pgtable_walk): visitor.visit(ctx, kind) for the
   * entries covering [startGfn, startGfn+npages) as `flags` (WALK_LEAF / TABLE_PRE / TABLE_POST
   * / SHARED / HANDLE_FAULT) ask. With WALK_SHARED the walk runs in this thread's RCU read
   * section and a visitor must change entries only by ctx.tryPte (cmpxchg) under the MMU read
   * lock; without it the caller must hold the MMU lock for write. Re-entrant: each nested walk
   * gets its own Walker.
   */
  walk(startGfn: number, npages: number, visitor: Visitor, flags: number): number {
    if (this.destroyed) throw new Stage2Error('stage-2 table used after destroy()');
    const shared = (flags & WALK_SHARED) !== 0;
    const walker = this.spareWalkers.pop() ?? new Walker(this.words, this.debug);
    if (shared) this.epoch.readLock(this.rcuSlot);
    try {
      return walker.walk(this.root, 0, startGfn, npages, visitor, flags);
    } finally {
      if (shared) this.epoch.readUnlock(this.rcuSlot);
      this.spareWalkers.push(walker);
      if (this.retiredSinceReclaim && !this.epoch.inReadSection(this.rcuSlot)) this.reclaim();
    }
  }
  private readonly spareWalkers: Walker[] = [];

  // ---- internals ----

  private checkRange(gfn: number, level: number): void {
    if (!(level >= MIN_BLOCK_LEVEL && level <= LAST_LEVEL)) throw new Stage2Error(`level ${level} cannot hold a leaf`);
    const pages = LEVEL_PAGES[level]!;
    if (!(Number.isInteger(gfn) && gfn >= 0 && gfn + pages <= MAX_GFN)) throw new Stage2Error(`gfn ${gfn} outside the 36-bit guest physical space`);
    if (gfn % pages !== 0) throw new Stage2Error(`gfn ${gfn} is not aligned to a level-${level} entry (${pages} pages)`);
  }

  private runWalk(startGfn: number, npages: number, v: MapVisitor | WriteProtectVisitor | SplitVisitor | UnmapVisitor, flags: number, shared: boolean): number {
    if (this.destroyed) throw new Stage2Error('stage-2 table used after destroy()');
    if (shared) {
      flags |= WALK_SHARED;
      this.epoch.readLock(this.rcuSlot);
    }
    let r: number;
    try {
      r = this.walker.walk(this.root, 0, startGfn, npages, v, flags);
    } finally {
      if (shared) this.epoch.readUnlock(this.rcuSlot);
    }
    if (this.retiredSinceReclaim && !this.epoch.inReadSection(this.rcuSlot)) this.reclaim();
    return r;
  }
}
