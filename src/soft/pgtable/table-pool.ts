// The pool of stage-2 table pages: one SharedArrayBuffer of Int32 words, 512 words (2 KiB) per
// page, sized at creation, shared by every thread that attaches. Page 0 is never handed out, so
// a table entry whose address field is 0 is always a bug.
//
// Concurrency rules:
// - zalloc() and free() may run on any thread at any time, without a lock. Allocation pops a
//   Treiber free stack whose head is a 64-bit word {tag:32, index:32} updated by
//   Atomics.compareExchange on a BigInt64Array; the tag changes on every pop and push, so a
//   pop that read a stale head (the ABA problem: page popped, reused, pushed back) fails its
//   compare-and-exchange. When the free stack is empty, pages come from a bump pointer
//   (Atomics.add). The link of a free page lives in a side array (next[]), never in the page,
//   so a freed page is POISON in every word.
// - The words of an allocated page belong to whoever allocated it until it is published (a
//   table entry pointing at it is stored with an Atomics operation); after that, entries are
//   changed only under the rules in stage2.ts.
// - free() must be called only when no thread can still read the page: for a page that was ever
//   reachable from the root, that means after an RCU grace period (epoch.ts). It poisons every
//   word first, so a walker that reads a freed page sees PTE_POISON.
// - liveTablePages (Atomics.add on alloc / free) counts allocated pages, like Linux's
//   SecPageTables; it is 0 after the page table is destroyed.
//
// The MmOps interface is the kvm_pgtable_mm_ops equivalent: stage2.ts only allocates and frees
// table pages through it, so tests can substitute an allocator (e.g. one that fails).

import { PTE_POISON, PTRS_PER_TABLE } from './pte.ts';

export interface MmOps {
  /** The words of all table pages; page i is words [i*512, i*512+512). */
  readonly words: Int32Array;
  /** A zeroed table page's index, or -1 when the pool is exhausted (ENOMEM). */
  zallocTablePage(): number;
  /** Return a page that no thread can read any more (poisons it). */
  freeTablePage(idx: number): void;
  /** Allocated pages right now. */
  liveTablePages(): number;
}

/** Structured-clonable state of a pool, for TablePool.attach() in a worker. */
export interface TablePoolShared {
  words: SharedArrayBuffer;
  ctl: SharedArrayBuffer;
  next: SharedArrayBuffer;
  maxTablePages: number;
}

// ctl layout (Int32 view); the BigInt64 free-stack head lives in its own 8-byte slot.
const CTL_BUMP = 0; // next never-used page index
const CTL_LIVE = 1; // allocated pages
const CTL_FREED_TOTAL = 2; // statistics: pages ever freed
const CTL_ALLOC_TOTAL = 3; // statistics: pages ever allocated
const CTL_QUARANTINE = 4; // 1: freed pages are poisoned and never reused (debug / stress tests)
const CTL_WORDS = 16; // 64 bytes; the head (BigInt64 index 8) sits at byte 64
const HEAD_I64 = 8;
const NIL = 0xffffffff;
/** 2^22 pages (8 GiB of tables): keeps page index * 512 inside an int32 for the lookup fast path. */
export const MAX_TABLE_PAGES = 2 ** 22;

export class TablePoolExhaustedError extends Error {
  override name = 'TablePoolExhaustedError';
}

export class TablePool implements MmOps {
  readonly words: Int32Array;
  private readonly ctl: Int32Array;
  private readonly head: BigInt64Array;
  private readonly next: Int32Array;
  readonly maxTablePages: number;

  private constructor(readonly shared: TablePoolShared) {
    this.words = new Int32Array(shared.words);
    this.ctl = new Int32Array(shared.ctl, 0, CTL_WORDS);
    this.head = new BigInt64Array(shared.ctl);
    this.next = new Int32Array(shared.next);
    this.maxTablePages = shared.maxTablePages;
  }

  /**
   * A new pool of maxTablePages pages (page 0 reserved). Memory is committed lazily. With
   * quarantine, freed pages stay poisoned forever, so any late read of one is caught (a reused
   * page would look like a live table).
   */
  static create(maxTablePages: number, opts: { quarantine?: boolean } = {}): TablePool {
    if (!(Number.isInteger(maxTablePages) && maxTablePages >= 2 && maxTablePages <= MAX_TABLE_PAGES)) {
      throw new RangeError(`maxTablePages must be an integer in [2, 2^22], got ${maxTablePages}`);
    }
    const shared: TablePoolShared = {
      words: new SharedArrayBuffer(maxTablePages * PTRS_PER_TABLE * 4),
      ctl: new SharedArrayBuffer((HEAD_I64 + 2) * 8),
      next: new SharedArrayBuffer(maxTablePages * 4),
      maxTablePages,
    };
    const pool = new TablePool(shared);
    Atomics.store(pool.ctl, CTL_BUMP, 1);
    Atomics.store(pool.head, HEAD_I64, BigInt(NIL));
    Atomics.store(pool.ctl, CTL_QUARANTINE, opts.quarantine ? 1 : 0);
    return pool;
  }

  static attach(shared: TablePoolShared): TablePool {
    return new TablePool(shared);
  }

  zallocTablePage(): number {
    let idx = this.popFree();
    if (idx < 0) {
      idx = Atomics.add(this.ctl, CTL_BUMP, 1);
      if (idx >= this.maxTablePages) {
        // Leave the bump pointer saturated; later frees still refill the stack.
        Atomics.sub(this.ctl, CTL_BUMP, 1);
        return -1;
      }
      // A never-used page is already zero (fresh SharedArrayBuffer memory).
    } else {
      this.words.fill(0, idx * PTRS_PER_TABLE, (idx + 1) * PTRS_PER_TABLE);
    }
    Atomics.add(this.ctl, CTL_LIVE, 1);
    Atomics.add(this.ctl, CTL_ALLOC_TOTAL, 1);
    return idx;
  }

  freeTablePage(idx: number): void {
    if (!(idx > 0 && idx < this.maxTablePages)) throw new RangeError(`freeTablePage(${idx}): not a pool page`);
    this.words.fill(PTE_POISON, idx * PTRS_PER_TABLE, (idx + 1) * PTRS_PER_TABLE);
    if (Atomics.load(this.ctl, CTL_QUARANTINE) === 0) this.pushFree(idx);
    Atomics.sub(this.ctl, CTL_LIVE, 1);
    Atomics.add(this.ctl, CTL_FREED_TOTAL, 1);
  }

  liveTablePages(): number {
    return Atomics.load(this.ctl, CTL_LIVE);
  }

  stats(): { live: number; allocated: number; freed: number; bump: number } {
    return {
      live: Atomics.load(this.ctl, CTL_LIVE),
      allocated: Atomics.load(this.ctl, CTL_ALLOC_TOTAL),
      freed: Atomics.load(this.ctl, CTL_FREED_TOTAL),
      bump: Atomics.load(this.ctl, CTL_BUMP),
    };
  }

  /** True when every word of page idx is POISON (it was freed and not reallocated). */
  isPoisoned(idx: number): boolean {
    const base = idx * PTRS_PER_TABLE;
    for (let i = 0; i < PTRS_PER_TABLE; i++) if (this.words[base + i] !== PTE_POISON) return false;
    return true;
  }

  private popFree(): number {
    for (;;) {
      const h = Atomics.load(this.head, HEAD_I64);
      const idx = Number(h & 0xffffffffn);
      if (idx === NIL) return -1;
      const tag = (h >> 32n) & 0xffffffffn;
      const nxt = Atomics.load(this.next, idx) >>> 0;
      const nh = (((tag + 1n) & 0xffffffffn) << 32n) | BigInt(nxt);
      if (Atomics.compareExchange(this.head, HEAD_I64, h, BigInt.asIntN(64, nh)) === h) return idx;
    }
  }

  private pushFree(idx: number): void {
    for (;;) {
      const h = Atomics.load(this.head, HEAD_I64);
      const tag = (h >> 32n) & 0xffffffffn;
      Atomics.store(this.next, idx, Number(h & 0xffffffffn) | 0);
      const nh = (((tag + 1n) & 0xffffffffn) << 32n) | BigInt(idx);
      if (Atomics.compareExchange(this.head, HEAD_I64, h, BigInt.asIntN(64, nh)) === h) return;
    }
  }
}
