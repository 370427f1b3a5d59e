// The shapes around Stage2PageTable (stage2.ts): what crosses to worker threads (Stage2Shared,
// structured-clonable), the callbacks and options a thread gives its instance, and the counters
// stats() reports. No behaviour lives here.
import type { EpochShared } from '../locking/epoch.ts';
import type { MmuLock } from '../locking/mmu-lock.ts';
import type { LeafRemoved } from './bbm.ts';
import type { MappingCountersShared } from './mapping-counters.ts';
import type { MmOps, TablePoolShared } from './table-pool.ts';

export interface Stage2Shared {
  pool: TablePoolShared;
  epoch: EpochShared;
  /** Int32 words: [0] root table page, [1] destroyed flag. */
  ctl: SharedArrayBuffer;
  /** Leaves per size, writable and device leaves, counted where entries change. */
  counts: MappingCountersShared;
  debug: boolean;
}

export interface Stage2Callbacks {
  /** Invalidate TLBs for [gfn, gfn+npages) on every vCPU and wait for it. Default: nothing. */
  tlbFlush?: (gfn: number, npages: number) => void;
  /** A leaf left the table (see header). */
  onLeafRemoved?: LeafRemoved;
  /** RCU reader slot for this thread; default: claim a free one. */
  rcuSlot?: number;
  /**
   * The MMU lock this thread uses: when given, every operation asserts at its top that this
   * thread holds it as the operation requires (tdp_mmu.c's lockdep_assert_held style).
   */
  lock?: MmuLock;
  /** Substitute allocator (tests); must share the pool's words. */
  mmOps?: MmOps;
}

export interface Stage2CreateOptions extends Stage2Callbacks {
  maxTablePages: number;
  /** Threads that may attach (RCU reader slots). Default 64. */
  maxThreads?: number;
  /** Check every walk for freed (POISON) table pages and throw. */
  debug?: boolean;
  /** Never reuse freed table pages (they stay POISON), so late readers are always caught. */
  quarantineFreedTables?: boolean;
}

export interface Stage2Stats {
  /** Break-before-make sequences (entry swapped to LOCKED, TLBs flushed, new value stored). */
  breaks: number;
  /** Blocks replaced by a table (one level in map, down to 4K in splitHugePages). */
  blockSplits: number;
  /** Tables replaced by a block. */
  collapses: number;
  /** Table subtrees handed to RCU. */
  tablesRetired: number;
  /** map()/collapse() calls that returned EAGAIN. */
  mapEagain: number;
  liveTablePages: number;
  retiredPending: number;
}

export class Stage2Error extends Error {
  override name = 'Stage2Error';
}
