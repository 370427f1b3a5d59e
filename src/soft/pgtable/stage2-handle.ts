// A thread's handle on a stage-2 table (the part of Stage2PageTable that is not an operation on
// entries): the shared state and what each attached thread keeps of it (its RCU reader slot, its
// row of mapping counters, its callbacks), the services visitors use (Stage2Env: TLB flush,
// event counters, retiring unlinked tables), RCU, statistics and destroy. The operations on
// entries are in stage2.ts, which extends this class.
//
// Concurrency rules: those of stage2.ts's header. In short: shared words are changed only with
// Atomics (ctl, event counters) or by their single owner (a thread's counter row, see
// mapping-counters.ts); unlinked subtrees are freed only through the epoch domain, by whichever
// thread reclaims after the grace period, which also reports their leaves and settles their
// counts; destroy() needs the MMU write lock and no thread in an RCU read section.

import { EpochDomain } from '../locking/epoch.ts';
import type { MmuLock } from '../locking/mmu-lock.ts';
import { Stage2Event, freeRetiredSubtree, type LeafRemoved, type Stage2Env } from './bbm.ts';
import { MappingCounters, countLeaf, emptySubtreeCounts, newMappingCountersShared, type MappingCounts } from './mapping-counters.ts';
import { PTRS_PER_TABLE } from './pte.ts';
import { Stage2Error, type Stage2Callbacks, type Stage2CreateOptions, type Stage2Shared, type Stage2Stats } from './stage2-types.ts';
import { TablePool, type MmOps } from './table-pool.ts';

const CTL_ROOT = 0;
const CTL_DESTROYED = 1;
// Event counters (Atomics.add, slow paths only), see Stage2Stats.
const CTL_STATS = 4;
const CTL_WORDS = 16;

/** The shared state of a new, empty table (Stage2PageTable.create). */
export function createStage2Shared(opts: Stage2CreateOptions): Stage2Shared {
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
  const counts = newMappingCountersShared(maxThreads, opts.maxTablePages);
  return { pool: pool.shared, epoch: epoch.shared, ctl, counts, debug: opts.debug ?? false };
}

export abstract class Stage2Handle implements Stage2Env {
  readonly shared: Stage2Shared;
  readonly pool: TablePool;
  readonly mm: MmOps;
  readonly epoch: EpochDomain;
  readonly rcuSlot: number;
  /** This thread's row of the mapping statistics. */
  readonly counts: MappingCounters;
  readonly root: number;
  readonly debug: boolean;
  protected readonly words: Int32Array;
  protected readonly ctl: Int32Array;
  protected readonly rootBase: number;
  protected lock: MmuLock | undefined;
  protected flushCb: (gfn: number, npages: number) => void;
  protected leafCb: LeafRemoved | undefined;
  protected retiredSinceReclaim = false;
  /** W grants counted outside the rows (countWriteGrantsFrom); read by mappingCounts only. */
  private writeGrantsElsewhere: (() => number) | undefined;

  protected constructor(shared: Stage2Shared, cb: Stage2Callbacks) {
    this.shared = shared;
    this.pool = TablePool.attach(shared.pool);
    this.mm = cb.mmOps ?? this.pool;
    this.words = this.pool.words;
    this.ctl = new Int32Array(shared.ctl);
    this.debug = shared.debug;
    this.epoch = EpochDomain.attach(shared.epoch, (id, level) => this.freeRetired(id, level));
    this.rcuSlot = cb.rcuSlot ?? this.epoch.claimSlot();
    this.counts = new MappingCounters(shared.counts, this.rcuSlot);
    this.root = Atomics.load(this.ctl, CTL_ROOT);
    this.rootBase = this.root * PTRS_PER_TABLE;
    this.flushCb = cb.tlbFlush ?? (() => {});
    this.leafCb = cb.onLeafRemoved;
    this.lock = cb.lock;
  }

  /** Bind (or unbind) the MMU lock whose holding every operation asserts. */
  bindLock(lock: MmuLock | undefined): void {
    this.lock = lock;
  }

  /** shared: the MMU lock held at least for read (a shared op); otherwise the write lock. */
  protected assertLocked(shared: boolean): void {
    const lock = this.lock;
    if (lock === undefined) return;
    if (shared) lock.assertFaultHeld();
    else lock.assertExclusiveHeld();
  }

  /** Replace the callbacks (e.g. once the engine's TLB machinery exists). */
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
    this.counts.subtreeUnlinked(this.words, tableIdx, level);
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

  /** The epoch domain's callback: free a retired subtree, report its leaves, settle its counts. */
  private freeRetired(table: number, level: number): void {
    const final = emptySubtreeCounts();
    const leafCb = this.leafCb;
    freeRetiredSubtree(this.mm, table, level, (pfn, lvl, pte) => {
      countLeaf(final, lvl, pte);
      leafCb?.(pfn, lvl, pte);
    });
    this.counts.settleRetired(table, final);
  }

  /** Free retired tables whose grace period is over; returns how many subtrees were freed. */
  reclaim(): number {
    this.retiredSinceReclaim = false;
    return this.epoch.reclaim();
  }

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

  /**
   * Leaves per size, writable and device leaves, from the counters (no walk; exact when nothing
   * is changing, see mapping-counters.ts). All 0 after destroy().
   */
  mappingCounts(): MappingCounts {
    if (this.destroyed) return { leaves4k: 0, leaves2m: 0, leaves1g: 0, writableLeaves: 0, deviceLeaves: 0 };
    const m = this.counts.sum();
    if (this.writeGrantsElsewhere !== undefined) m.writableLeaves += this.writeGrantsElsewhere();
    return m;
  }

  /**
   * Have mappingCounts add `grants()` to the writable leaves: W grants that their makers count
   * only in a counter of their own (the vCPU write-protect fast path's per-vCPU S_FAST_RELAX,
   * see mmu/fault.ts), set W by cmpxchg on a table entry and never counted in a row. Exact under
   * the same conditions as the rows (mapping-counters.ts). This handle only.
   */
  countWriteGrantsFrom(grants: (() => number) | undefined): void {
    this.writeGrantsElsewhere = grants;
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
}
