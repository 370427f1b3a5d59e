// The stage-2 operations as visitors over the generic walker (the stage2_*_walker functions of
// Linux's pgtable.c). Each visitor object is owned by one Stage2PageTable instance (one thread)
// and reused: its per-call arguments are fields set before the walk.
//
// Concurrency rules (see walker.ts and bbm.ts for the mechanisms):
// - In a shared walk (MMU lock held for read, RCU read section entered) every entry change is a
//   compare-and-exchange against the value the walker read (ctx.tryPte) or break-before-make
//   (tryBreakPte/makePte); losing a race returns EAGAIN and changes nothing.
// - In an exclusive walk (MMU lock held for write) entries are stored with Atomics.store; LOCKED
//   can never be met (only lock holders write, and a write-lock holder excludes them all).
// - Changing a leaf's output address or type, or removing a leaf, invalidates TLBs before the
//   old page may be released. Removing permissions (write-protect) leaves the flush to the
//   caller (it batches a whole range). Adding permissions needs no flush: a vCPU with a stale,
//   stricter translation just faults again and finds the entry already relaxed.
// - A visitor counts each change it made (env.counts, mapping-counters.ts) once it made it:
//   after the cmpxchg or the make that succeeded, never for a lost race.

import { Stage2Event, buildSplitTable, freeUnpublished, makePte, tableIsEmpty, tryBreakPte, type LeafRemoved, type Stage2Env } from './bbm.ts';
import {
  LAST_LEVEL,
  LEVEL_PAGES,
  MIN_BLOCK_LEVEL,
  PTRS_PER_TABLE,
  formatPte,
  leafAttrs,
  leafChangeRemovesPerms,
  leafPfn,
  leafProt,
  leafWithoutWrite,
  leavesDifferOnlyInPerms,
  mkTable,
  pteIndex,
  pteIsLeaf,
  pteIsLocked,
  pteIsTable,
  pteWritable,
  tableBase,
  tableIndex,
} from './pte.ts';
import { CorruptTableError, EAGAIN, ENOMEM, OK, WALK_TABLE_POST, WALK_TABLE_PRE, type VisitCtx, type Visitor } from './walker.ts';

const SPLIT_RETRIES = 1000;

function corrupt(ctx: VisitCtx, what: string): never {
  throw new CorruptTableError(`${what}: ${formatPte(ctx.old)} at gfn ${ctx.gfn} level ${ctx.level} (page ${ctx.table}[${ctx.index}])`);
}

/**
 * Install one leaf of `level` (stage2_map_walker). On the way down it allocates missing tables
 * (invalid -> table by a single cmpxchg: nothing was mapped, so nothing to invalidate) and splits
 * a covering block one level at a time by break-before-make. At the target level it collapses a
 * table into the block (break-before-make; the old subtree goes to RCU), installs into an
 * invalid entry, changes only permissions of a leaf with the same output (cmpxchg; a flush when
 * permissions shrink), or replaces a leaf with a different output (break-before-make).
 */
export class MapVisitor implements Visitor {
  level = LAST_LEVEL;
  newPte = 0;
  /** Whether the walk changed anything (false: the same mapping was already there). */
  changed = false;

  constructor(private readonly env: Stage2Env, private readonly leafRemoved: LeafRemoved) {}

  visit(ctx: VisitCtx, kind: number): number {
    const old = ctx.old;
    if (ctx.level < this.level) {
      if (kind === WALK_TABLE_PRE) return OK;
      if (old === 0) {
        const table = this.env.mm.zallocTablePage();
        if (table < 0) return ENOMEM;
        if (!ctx.tryPte(mkTable(table))) {
          this.env.mm.freeTablePage(table);
          return EAGAIN;
        }
        this.changed = true;
        return OK;
      }
      if (pteIsLocked(old)) {
        if (!ctx.shared) corrupt(ctx, 'map met LOCKED in an exclusive walk');
        return EAGAIN;
      }
      if (!pteIsLeaf(old)) corrupt(ctx, 'map met a garbage entry');
      // A block covers the smaller mapping wanted: split it one level (same pfns, same prot);
      // when the new table is the target level, put the new leaf in before publishing, so
      // vCPUs go straight from the block to the final state. Otherwise the walk descends.
      const table = buildSplitTable(this.env.mm, old, ctx.level, false);
      if (table < 0) return ENOMEM;
      let replaced = 0;
      let displaced = 0;
      if (ctx.level + 1 === this.level) {
        const slot = table * PTRS_PER_TABLE + pteIndex(ctx.start, this.level);
        displaced = ctx.words[slot]!;
        if (!leavesDifferOnlyInPerms(displaced, this.newPte)) replaced = displaced;
        ctx.words[slot] = this.newPte;
      }
      if (!tryBreakPte(ctx, this.env)) {
        freeUnpublished(this.env.mm, table, ctx.level + 1);
        return EAGAIN;
      }
      makePte(ctx, mkTable(table));
      this.env.countEvent(Stage2Event.BlockSplit);
      const counts = this.env.counts;
      counts.blockSplit(ctx.level, old, ctx.level + 1, PTRS_PER_TABLE);
      if (displaced !== 0) counts.entryChanged(this.level, displaced, this.newPte);
      // The block's page that the new leaf displaced (another pfn) leaves the table.
      if (replaced !== 0) this.leafRemoved(leafPfn(replaced), this.level, replaced);
      this.changed = true;
      return OK;
    }

    if (ctx.level > this.level) {
      // Unreachable: the target entry below sets skipChildren. Kept as a guard because acting
      // here would write the block's pte into every smaller entry of a table another thread
      // installed meanwhile (the stress test found exactly that before skipChildren was set).
      corrupt(ctx, 'map walked below its target level');
    }
    // ctx.level === this.level. Whatever happens here, never descend: if another thread turns
    // this entry into a table after we looked (a split racing with us), the walker would go on
    // into it and this visitor would treat 4K/2M entries as the target.
    ctx.skipChildren = true;
    const nu = this.newPte;
    if (kind === WALK_TABLE_PRE) {
      // table -> block (collapse).
      const oldTable = tableIndex(old);
      if (!tryBreakPte(ctx, this.env)) return EAGAIN;
      makePte(ctx, nu);
      this.env.countEvent(Stage2Event.Collapse);
      this.env.counts.leafAdded(ctx.level, nu);
      this.env.retireTable(oldTable, ctx.level + 1);
      this.changed = true;
      return OK;
    }
    if (old === nu) return OK;
    if (old === 0) {
      if (!ctx.tryPte(nu)) return EAGAIN;
      this.env.counts.leafAdded(ctx.level, nu);
      this.changed = true;
      return OK;
    }
    if (pteIsLocked(old)) {
      if (!ctx.shared) corrupt(ctx, 'map met LOCKED in an exclusive walk');
      return EAGAIN;
    }
    if (!pteIsLeaf(old)) corrupt(ctx, 'map met a garbage entry');
    if (leavesDifferOnlyInPerms(old, nu)) {
      // Same output and attributes: a permission change, no break needed.
      if (!ctx.tryPte(nu)) return EAGAIN;
      this.env.counts.entryChanged(ctx.level, old, nu);
      if (leafChangeRemovesPerms(old, nu)) this.env.tlbFlush(ctx.gfn, ctx.pages);
      this.changed = true;
      return OK;
    }
    if (!tryBreakPte(ctx, this.env)) return EAGAIN;
    makePte(ctx, nu);
    this.env.counts.entryChanged(ctx.level, old, nu);
    this.leafRemoved(leafPfn(old), ctx.level, old);
    this.changed = true;
    return OK;
  }
}

/** Clear W on every leaf in range (stage2_attr_walker with attr_clr = W); the caller counts `changed`. */
export class WriteProtectVisitor implements Visitor {
  changed = 0;

  visit(ctx: VisitCtx): number {
    for (;;) {
      const old = ctx.old;
      if (!pteWritable(old)) return OK;
      if (ctx.tryPte(leafWithoutWrite(old))) {
        this.changed++;
        return OK;
      }
      // Shared walk lost a race (a relax or a BBM): look again.
      ctx.old = ctx.load();
    }
  }
}

/**
 * Eagerly split every block in range down to 4 KiB leaves (stage2_split_walker with a full
 * cache). The new subtree is built before the break, so vCPUs see either the block or the full
 * table, never a hole (they may see LOCKED briefly and fault).
 */
export class SplitVisitor implements Visitor {
  split = 0;
  lostRaces = 0;
  noMemory = false;

  constructor(private readonly env: Stage2Env) {}

  visit(ctx: VisitCtx): number {
    // A shared walk retries an entry it lost (it may have become a table: the walk descends,
    // or another block: split that), waiting out a LOCKED entry a bounded number of times.
    for (let tries = 0; ; tries++) {
      const old = ctx.old;
      if (pteIsLocked(old) && ctx.shared && tries < SPLIT_RETRIES) {
        ctx.old = ctx.load();
        continue;
      }
      if (ctx.level === LAST_LEVEL || !pteIsLeaf(old)) return OK;
      const table = buildSplitTable(this.env.mm, old, ctx.level, true);
      if (table < 0) {
        this.noMemory = true;
        return ENOMEM;
      }
      if (tryBreakPte(ctx, this.env)) {
        makePte(ctx, mkTable(table));
        this.env.countEvent(Stage2Event.BlockSplit);
        this.env.counts.blockSplit(ctx.level, old, LAST_LEVEL, LEVEL_PAGES[ctx.level]!);
        ctx.skipChildren = true;
        this.split++;
        return OK;
      }
      freeUnpublished(this.env.mm, table, ctx.level + 1);
      this.lostRaces++;
      if (tries >= SPLIT_RETRIES) return EAGAIN;
      ctx.old = ctx.load();
    }
  }
}

/**
 * Remove leaves (a block that overlaps the range is removed whole, as KVM does: the rest
 * faults back in) and, on the way back up, tables left empty. Exclusive walks only. Removed
 * leaves are collected and reported by the caller after one TLB flush for the whole range.
 */
export class UnmapVisitor implements Visitor {
  /** Flat (pfn, level, pte) triples of removed leaves. */
  readonly removed: number[] = [];
  firstGfn = 0;
  endGfn = 0;
  /** Never free the root table. */
  rootTable = 0;

  constructor(private readonly env: Stage2Env) {}

  reset(rootTable: number): void {
    this.removed.length = 0;
    this.firstGfn = Number.MAX_SAFE_INTEGER;
    this.endGfn = 0;
    this.rootTable = rootTable;
  }

  visit(ctx: VisitCtx, kind: number): number {
    const old = ctx.old;
    if (kind === WALK_TABLE_POST) {
      if (pteIsTable(old) && tableIsEmpty(ctx.words, tableIndex(old))) {
        const child = tableIndex(old);
        ctx.tryPte(0);
        this.cover(ctx);
        this.env.retireTable(child, ctx.level + 1);
      }
      return OK;
    }
    if (old === 0) return OK;
    if (pteIsLocked(old)) corrupt(ctx, 'unmap met LOCKED (unmap needs the write lock)');
    if (!pteIsLeaf(old)) corrupt(ctx, 'unmap met a garbage entry');
    ctx.tryPte(0);
    this.env.counts.leafRemoved(ctx.level, old);
    this.cover(ctx);
    this.removed.push(leafPfn(old), ctx.level, old);
    return OK;
  }

  private cover(ctx: VisitCtx): void {
    if (ctx.gfn < this.firstGfn) this.firstGfn = ctx.gfn;
    if (ctx.gfn + ctx.pages > this.endGfn) this.endGfn = ctx.gfn + ctx.pages;
  }
}

/** Call fn for every valid leaf in range (block leaves once, with their first gfn). */
export class LeafIterVisitor implements Visitor {
  fn: (gfn: number, level: number, pte: number) => void = () => {};

  visit(ctx: VisitCtx): number {
    if (pteIsLeaf(ctx.old)) this.fn(ctx.gfn, ctx.level, ctx.old);
    return OK;
  }
}

/** Finds table entries whose child table maps one contiguous, uniform block (see forEachCollapsible). */
export class CollapsibleVisitor implements Visitor {
  fn: (gfn: number, level: number, pfn: number, prot: number) => void = () => {};

  visit(ctx: VisitCtx, kind: number): number {
    if (kind !== WALK_TABLE_POST || ctx.level < MIN_BLOCK_LEVEL || ctx.level >= LAST_LEVEL) return OK;
    const old = ctx.load();
    if (!pteIsTable(old)) return OK;
    const words = ctx.words;
    const base = tableBase(old);
    const first = Atomics.load(words, base);
    if (!pteIsLeaf(first)) return OK;
    const step = LEVEL_PAGES[ctx.level + 1]!;
    const pfn0 = leafPfn(first);
    if (pfn0 % LEVEL_PAGES[ctx.level]! !== 0) return OK;
    const attrs = leafAttrs(first);
    for (let i = 1; i < PTRS_PER_TABLE; i++) {
      // Every entry a leaf (same attrs, type included) with the next pfn.
      const pte = Atomics.load(words, base + i);
      if (leafAttrs(pte) !== attrs || leafPfn(pte) !== pfn0 + i * step) return OK;
    }
    this.fn(ctx.gfn, ctx.level, pfn0, leafProt(attrs));
    return OK;
  }
}
