// The stage-2 page table (kvm_pgtable for a guest): a 4-level radix tree of Int32 PTEs in a
// SharedArrayBuffer (pte.ts, table-pool.ts), changed by visitors over one walker (walker.ts,
// visitors.ts), with break-before-make (bbm.ts) and RCU-deferred freeing (locking/epoch.ts).
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

import { EpochDomain } from '../locking/epoch.ts';
import { Stage2Error, type Stage2Callbacks, type Stage2CreateOptions, type Stage2Shared, type Stage2Stats } from './stage2-types.ts';
import type { MmuLock } from '../locking/mmu-lock.ts';
import { Stage2Event, freeRetiredSubtree, type LeafRemoved, type Stage2Env } from './bbm.ts';
import { LAST_LEVEL, LEVEL_PAGES, MAX_GFN, MIN_BLOCK_LEVEL, PTRS_PER_TABLE, leafPfn, leafWithPermsAdded, mkLeaf } from './pte.ts';
import { MAP_SAME, NOT_HANDLED, lookupLeaf, mapInPlace, newLeafLookup, writeProtectPages, type LeafLookup } from './lookup.ts';
import { TablePool, type MmOps } from './table-pool.ts';
import { CollapsibleVisitor, LeafIterVisitor, MapVisitor, SplitVisitor, UnmapVisitor, WriteProtectVisitor } from './visitors.ts';
import { EAGAIN, ENOMEM, OK, WALK_HANDLE_FAULT, WALK_LEAF, WALK_SHARED, WALK_TABLE_POST, WALK_TABLE_PRE, Walker, type Visitor } from './walker.ts';

export { newLeafLookup, type LeafLookup } from './lookup.ts';
export { Stage2Error, type Stage2Callbacks, type Stage2CreateOptions, type Stage2Shared, type Stage2Stats } from './stage2-types.ts';
export { EAGAIN, ENOMEM, OK, WALK_HANDLE_FAULT, WALK_LEAF, WALK_SHARED, WALK_TABLE_POST, WALK_TABLE_PRE, type VisitCtx, type Visitor } from './walker.ts';

/** kvm_pgtable_walk(pgt, addr, size, walker) in this project's units (see Stage2PageTable.walk). */
export function walk(pgt: Stage2PageTable, startGfn: number, npages: number, visitor: Visitor, flags: number): number {
  return pgt.walk(startGfn, npages, visitor, flags);
}

const CTL_ROOT = 0;
/** Up to this many pages, writeProtect looks pages up one by one instead of walking. */
const WRPROT_FAST_PAGES = 16;
const CTL_DESTROYED = 1;
// Event counters (Atomics.add, slow paths only), see Stage2Stats.
const CTL_STATS = 4;
const CTL_WORDS = 16;

export class Stage2PageTable implements Stage2Env {
  readonly shared: Stage2Shared;
  readonly pool: TablePool;
  readonly mm: MmOps;
  readonly epoch: EpochDomain;
  readonly rcuSlot: number;
  readonly root: number;
  readonly debug: boolean;
  private readonly words: Int32Array;
  private readonly ctl: Int32Array;
  private readonly rootBase: number;
  private lock: MmuLock | undefined;
  private flushCb: (gfn: number, npages: number) => void;
  private leafCb: LeafRemoved | undefined;
  private readonly walker: Walker;
  private readonly mapVisitor: MapVisitor;
  private readonly wrprotVisitor = new WriteProtectVisitor();
  private readonly splitVisitor: SplitVisitor;
  private readonly unmapVisitor: UnmapVisitor;
  private retiredSinceReclaim = false;
  /** Whether the last map()/collapse() changed the table (false: the mapping was already there). */
  lastMapChanged = false;

  private constructor(shared: Stage2Shared, cb: Stage2Callbacks) {
    this.shared = shared;
    this.pool = TablePool.attach(shared.pool);
    this.mm = cb.mmOps ?? this.pool;
    this.words = this.pool.words;
    this.ctl = new Int32Array(shared.ctl);
    this.debug = shared.debug;
    this.epoch = EpochDomain.attach(shared.epoch, (id, level) => {
      freeRetiredSubtree(this.mm, id, level, this.leafCb);
    });
    this.rcuSlot = cb.rcuSlot ?? this.epoch.claimSlot();
    this.root = Atomics.load(this.ctl, CTL_ROOT);
    this.rootBase = this.root * PTRS_PER_TABLE;
    this.flushCb = cb.tlbFlush ?? (() => {});
    this.leafCb = cb.onLeafRemoved;
    this.lock = cb.lock;
    this.walker = new Walker(this.words, this.debug);
    const removed: LeafRemoved = (pfn, level, pte) => this.leafCb?.(pfn, level, pte);
    this.mapVisitor = new MapVisitor(this, removed);
    this.splitVisitor = new SplitVisitor(this);
    this.unmapVisitor = new UnmapVisitor(this);
  }

  /** A new, empty table (main thread). The creating thread gets RCU slot 0 unless told otherwise. */
  static create(opts: Stage2CreateOptions): Stage2PageTable {
    const maxThreads = opts.maxThreads ?? 64;
    const pool = TablePool.create(opts.maxTablePages, { quarantine: opts.quarantineFreedTables ?? false });
    const epoch = EpochDomain.create({ maxSlots: maxThreads, capacity: opts.maxTablePages }, () => {
      throw new Stage2Error('epoch domain used before the table was attached');
    });
    const mm = opts.mmOps ?? pool;
    const root = mm.zallocTablePage();
    if (root < 0) throw new Stage2Error('no table page for the root');
    const ctl = new SharedArrayBuffer(CTL_WORDS * 4);
    Atomics.store(new Int32Array(ctl), CTL_ROOT, root);
    const shared: Stage2Shared = { pool: pool.shared, epoch: epoch.shared, ctl, debug: opts.debug ?? false };
    return new Stage2PageTable(shared, opts);
  }

  /** This thread's handle on a table created elsewhere. */
  static attach(shared: Stage2Shared, cb: Stage2Callbacks = {}): Stage2PageTable {
    return new Stage2PageTable(shared, cb);
  }

  /** Replace the callbacks (e.g. once the engine's TLB machinery exists). */
  /** Bind (or unbind) the MMU lock whose holding every operation asserts. */
  bindLock(lock: MmuLock | undefined): void {
    this.lock = lock;
  }

  /** shared: the MMU lock held at least for read (a shared op); otherwise the write lock. */
  private assertLocked(shared: boolean): void {
    const lock = this.lock;
    if (lock === undefined) return;
    if (shared) lock.assertFaultHeld();
    else lock.assertExclusiveHeld();
  }

  setCallbacks(cb: Pick<Stage2Callbacks, 'tlbFlush' | 'onLeafRemoved'>): void {
    if (cb.tlbFlush) this.flushCb = cb.tlbFlush;
    if (cb.onLeafRemoved) this.leafCb = cb.onLeafRemoved;
  }

  /** Give this thread's RCU slot back (a worker that stops). */
  detach(): void {
    this.epoch.releaseSlot(this.rcuSlot);
  }

  // ---- Stage2Env (used by the visitors) ----

  tlbFlush(gfn: number, npages: number): void {
    this.flushCb(gfn, npages);
  }

  countEvent(ev: Stage2Event): void {
    Atomics.add(this.ctl, CTL_STATS + ev, 1);
  }

  retireTable(tableIdx: number, level: number): void {
    Atomics.add(this.ctl, CTL_STATS + Stage2Event.TableRetired, 1);
    this.epoch.deferFree(tableIdx, level);
    this.retiredSinceReclaim = true;
  }

  // ---- RCU ----

  rcuReadLock(): void {
    this.epoch.readLock(this.rcuSlot);
  }

  rcuReadUnlock(): void {
    this.epoch.readUnlock(this.rcuSlot);
  }

  /** Free retired tables whose grace period is over; returns how many subtrees were freed. */
  reclaim(): number {
    this.retiredSinceReclaim = false;
    return this.epoch.reclaim();
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
      r = mapInPlace(this.words, this.rootBase, gfn, level, nu, shared);
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
      if (shared) return Atomics.compareExchange(this.words, out.ptep, old, nu) === old ? OK : EAGAIN;
      Atomics.store(this.words, out.ptep, nu);
      return OK;
    } finally {
      if (shared) this.epoch.readUnlock(this.rcuSlot);
    }
  }
  private readonly relaxOut = newLeafLookup();

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
    return v.changed;
  }

  /** writeProtect for a few pages (clear-dirty-log runs): a lookup per page, no walker. */
  private writeProtectFew(startGfn: number, npages: number, shared: boolean): number {
    if (this.destroyed) throw new Stage2Error('stage-2 table used after destroy()');
    if (shared) this.epoch.readLock(this.rcuSlot);
    try {
      return writeProtectPages(this.words, this.rootBase, startGfn, npages, shared, this.relaxOut, this.debug);
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

  /** Counters of slow-path events since creation (all threads). */
  stats(): Stage2Stats {
    const c = (ev: Stage2Event): number => Atomics.load(this.ctl, CTL_STATS + ev);
    return {
      breaks: c(Stage2Event.Break),
      blockSplits: c(Stage2Event.BlockSplit),
      collapses: c(Stage2Event.Collapse),
      tablesRetired: c(Stage2Event.TableRetired),
      mapEagain: c(Stage2Event.MapEagain),
      liveTablePages: this.mm.liveTablePages(),
      retiredPending: this.epoch.pending(),
    };
  }

  /** Table pages allocated right now (like SecPageTables); 0 after destroy(). */
  liveTablePages(): number {
    return this.mm.liveTablePages();
  }

  /**
   * Free every table page (reporting every leaf), including ones waiting for a grace period.
   * MMU lock held for WRITE; no thread may be in an RCU read section or use the table again.
   * `force` skips the reader check, for a caller that knows the threads still marked as readers
   * are gone (workers terminated inside a read section).
   */
  destroy(force = false): void {
    this.assertLocked(false);
    const active = this.epoch.activeReaders();
    if (active !== 0 && !force) throw new Stage2Error(`destroy: ${active} thread(s) still inside an RCU read section`);
    if (Atomics.exchange(this.ctl, CTL_DESTROYED, 1) !== 0) throw new Stage2Error('destroy: already destroyed');
    this.epoch.drainAll();
    freeRetiredSubtree(this.mm, this.root, 0, this.leafCb);
    this.epoch.drainAll();
  }

  get destroyed(): boolean {
    return Atomics.load(this.ctl, CTL_DESTROYED) !== 0;
  }

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
