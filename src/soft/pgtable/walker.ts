// The one generic stage-2 walker (kvm_pgtable_walk): visits the entries covering [start, end)
// in address order and calls a visitor for each, before descending into a table (TABLE_PRE),
// after coming back (TABLE_POST), or on a non-table entry at any level (LEAF: a leaf, an
// invalid entry, or a LOCKED marker). map, unmap, write-protect, relax, split, collapse and
// leaf iteration are small visitors over it (stage2.ts, visitors.ts).
//
// Concurrency rules:
// - The walker itself writes nothing. It reads each entry once (Atomics.load) into ctx.old,
//   calls the visitor, and reloads the entry afterwards, so it descends into whatever table the
//   visitor installed and never into one the visitor replaced.
// - With SHARED (parallel faults under the read lock) other threads may change any entry at any
//   time: a visitor must change an entry only by compare-and-exchange against ctx.old (tryPte)
//   and return EAGAIN when it loses; it may meet LOCKED (someone's break-before-make). The
//   caller must be inside an RCU read section for the whole walk, which keeps every table page
//   the walk can reach allocated (epoch.ts); with `debug` set, reading a POISON word (a freed
//   page) throws PoisonedTableError instead of being silently misread.
// - Without SHARED the caller holds the MMU lock for write: no other thread changes entries,
//   only lock-free readers look at them, so visitors may Atomics.store.
// - A VisitCtx per level is allocated once per Walker and reused: no allocation per visit. A
//   Walker is single-threaded and not re-entrant (a visitor must not start a walk on the same
//   Walker); each thread's Stage2PageTable owns its walkers.

import { LAST_LEVEL, LEVEL_PAGES, PTRS_PER_TABLE, formatPte, pteIndex, pteIsPoison, pteIsTable, tableIndex } from './pte.ts';

export const WALK_LEAF = 1;
export const WALK_TABLE_PRE = 2;
export const WALK_TABLE_POST = 4;
/** Parallel walk: entries change under us; visitors must cmpxchg. */
export const WALK_SHARED = 8;
/** Stop at the first EAGAIN (a fault handler retries the fault); otherwise EAGAIN is skipped. */
export const WALK_HANDLE_FAULT = 16;

/** Visitor / walk results (negated errno, as the kernel). */
export const OK = 0;
export const E2BIG = -7;
export const EAGAIN = -11;
export const ENOMEM = -12;
export const EINVAL = -22;

export class PoisonedTableError extends Error {
  override name = 'PoisonedTableError';
}

export class CorruptTableError extends Error {
  override name = 'CorruptTableError';
}

/** What a visitor sees; one per level per Walker, reused. */
export class VisitCtx {
  /** Level of the entry (0..3). */
  level = 0;
  /** First gfn covered by the entry (aligned to the entry's size). */
  gfn = 0;
  /** Pages the entry covers (LEVEL_PAGES[level]). */
  pages = 0;
  /** Pool page index of the table holding the entry, and the entry's index in it. */
  table = 0;
  index = 0;
  /** Word offset of the entry in the pool (the "ptep"). */
  ptep = 0;
  /** The entry's value when the walker read it. */
  old = 0;
  /** The walk's range and flags. */
  start = 0;
  end = 0;
  flags = 0;
  /** Set by a visitor that installed a table it does not want walked (e.g. an eager split). */
  skipChildren = false;

  constructor(readonly words: Int32Array) {}

  get shared(): boolean {
    return (this.flags & WALK_SHARED) !== 0;
  }

  /**
   * Replace the entry: a compare-and-exchange against ctx.old in a shared walk (false when
   * another thread changed it first), an Atomics.store otherwise. Updates ctx.old on success.
   */
  tryPte(nu: number): boolean {
    if ((this.flags & WALK_SHARED) !== 0) {
      if (Atomics.compareExchange(this.words, this.ptep, this.old, nu) !== this.old) return false;
    } else {
      Atomics.store(this.words, this.ptep, nu);
    }
    this.old = nu;
    return true;
  }

  /** The entry's current value. */
  load(): number {
    return Atomics.load(this.words, this.ptep);
  }
}

export interface Visitor {
  /** kind is WALK_LEAF, WALK_TABLE_PRE or WALK_TABLE_POST. Return OK, EAGAIN or an error. */
  visit(ctx: VisitCtx, kind: number): number;
}

export class Walker {
  private readonly ctxs: VisitCtx[];
  private visitor: Visitor | undefined;
  private flags = 0;
  private addr = 0;
  private end = 0;
  private start = 0;
  private busy = false;

  constructor(readonly words: Int32Array, public debug = false) {
    this.ctxs = [0, 1, 2, 3].map(() => new VisitCtx(words));
  }

  /**
   * Walk the table at pool page `table`, whose entries are at `level`, over gfns
   * [startGfn, startGfn + npages). For the whole stage-2 table, table = root and level = 0; for
   * an unlinked subtree, the subtree's page and its level with gfns inside the range it maps.
   */
  walk(table: number, level: number, startGfn: number, npages: number, visitor: Visitor, flags: number): number {
    if (this.busy) throw new Error('Walker.walk is not re-entrant: use another Walker');
    if (!(npages > 0)) return OK;
    this.busy = true;
    this.visitor = visitor;
    this.flags = flags;
    this.start = startGfn;
    this.addr = startGfn;
    this.end = startGfn + npages;
    try {
      const r = this.walkTable(table, level);
      return r;
    } finally {
      this.busy = false;
      this.visitor = undefined;
    }
  }

  private keepGoing(r: number): boolean {
    if (r === EAGAIN) return (this.flags & WALK_HANDLE_FAULT) === 0;
    return r === OK;
  }

  private walkTable(table: number, level: number): number {
    const base = table * PTRS_PER_TABLE;
    for (let idx = pteIndex(this.addr, level); idx < PTRS_PER_TABLE && this.addr < this.end; idx++) {
      const r = this.visitEntry(table, base + idx, idx, level);
      if (r !== OK) return r;
    }
    return OK;
  }

  private visitEntry(table: number, ptep: number, idx: number, level: number): number {
    const ctx = this.ctxs[level]!;
    const pages = LEVEL_PAGES[level]!;
    const words = this.words;
    ctx.level = level;
    ctx.pages = pages;
    ctx.gfn = Math.floor(this.addr / pages) * pages;
    ctx.table = table;
    ctx.index = idx;
    ctx.ptep = ptep;
    ctx.start = this.start;
    ctx.end = this.end;
    ctx.flags = this.flags;
    ctx.skipChildren = false;
    ctx.old = Atomics.load(words, ptep);
    if (pteIsPoison(ctx.old) && this.debug) this.poisoned(ctx);
    let isTable = this.isTableAt(ctx.old, level, ctx);
    let r = OK;
    let reload = false;
    const visitor = this.visitor!;
    if (isTable && (this.flags & WALK_TABLE_PRE) !== 0) {
      r = visitor.visit(ctx, WALK_TABLE_PRE);
      reload = true;
    } else if (!isTable && (this.flags & WALK_LEAF) !== 0) {
      r = visitor.visit(ctx, WALK_LEAF);
      reload = true;
    }
    if (reload) {
      ctx.old = Atomics.load(words, ptep);
      if (pteIsPoison(ctx.old) && this.debug) this.poisoned(ctx);
      isTable = this.isTableAt(ctx.old, level, ctx);
    }
    if (!this.keepGoing(r)) return r;
    if (!isTable || ctx.skipChildren) {
      this.addr = ctx.gfn + pages;
      return OK;
    }
    r = this.walkTable(tableIndex(ctx.old), level + 1);
    if (!this.keepGoing(r)) return r;
    if ((this.flags & WALK_TABLE_POST) !== 0) {
      // Children used ctxs[level + 1..]; this level's ctx still describes our entry.
      r = visitor.visit(ctx, WALK_TABLE_POST);
    }
    return this.keepGoing(r) ? OK : r;
  }

  private isTableAt(pte: number, level: number, ctx: VisitCtx): boolean {
    if (!pteIsTable(pte)) return false;
    if (level === LAST_LEVEL) throw new CorruptTableError(`table entry ${formatPte(pte)} at the last level (gfn ${ctx.gfn}, page ${ctx.table}[${ctx.index}])`);
    return true;
  }

  private poisoned(ctx: VisitCtx): never {
    throw new PoisonedTableError(`walk read a freed table page: page ${ctx.table}[${ctx.index}] at level ${ctx.level}, gfn ${ctx.gfn}`);
  }
}
