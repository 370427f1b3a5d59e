// Mapping statistics of the stage-2 table (leaves per size, writable and device leaves), counted
// where entries change rather than by walking the table: stats() sums a few words.
//
// Concurrency rules:
// - One row of counters per RCU reader slot (epoch.ts), i.e. per attached Stage2PageTable, i.e.
//   per thread: ROW_WORDS words, its counters in the middle (ROW_PAD), so that no cache line
//   holds two threads' counters whatever the buffer's alignment (16 bytes is all malloc
//   promises), nor a counter and another buffer's words. Only the thread that owns the slot
//   writes its row, with plain loads and stores (single writer: no lost update, and no counter
//   line bounces between vCPUs on the write-protect fast path). A slot released by detach() and
//   claimed again (compare-and-exchange) passes its row to the new owner, values and all.
// - A reader (mappingCounts) sums every row with Atomics.load. The sum equals a walk of the table
//   from the root when no change is in flight, every writer's last change happens-before the
//   read (it released the MMU lock, left guest mode, or was joined since), and no retired
//   subtree awaits its grace period with changes made to it after it was unlinked (below). While
//   entries change, the sum may lag the table by the changes in flight. A row may go negative
//   (a thread removes leaves another installed); only the sum means anything.
// - Every change of an entry is counted by the thread that made it, as a delta from the old
//   value to the new: leafAdded / leafRemoved / leafReplaced for leaves, blockSplit for a block
//   replaced by a table of its pages, writeGranted / writeRevoked for W alone. One exception:
//   the vCPU's write-protect fast path (mmu/fault.ts) counts the W it grants only in its own
//   per-vCPU stats line, which the reader adds (Stage2Handle.countWriteGrantsFrom): that path
//   stores nothing else. A row may take back a grant such a caller counts too
//   (uncountWriteGrants).
// - Unlinked subtrees (collapse, unmap of an empty table) leave the table before they are freed,
//   after an RCU grace period. The unlinking thread subtracts what it finds in the subtree
//   (scanSubtree) and records exactly that in the subtree's retired-snapshot slot (indexed by its
//   root table page, written before the page is handed to the epoch domain, read after the grace
//   period: ordered by the domain's atomics). In a shared walk a racing thread that already held
//   a pointer into the subtree may still change it and counts its change as usual; so the thread
//   that frees the subtree subtracts the difference between what the subtree then holds and the
//   snapshot (settleRetired). Every change is thus counted once, and once a subtree is freed the
//   counters again equal a walk from the root.

import { LAST_LEVEL, PTRS_PER_TABLE, leafIsDevice, leafWritable, pteIsLeaf, pteIsTable, tableIndex } from './pte.ts';

/** The mapping statistics stats() reports. */
export interface MappingCounts {
  leaves4k: number;
  leaves2m: number;
  leaves1g: number;
  writableLeaves: number;
  deviceLeaves: number;
}

// Row layout: leaves at level 1, 2, 3 (index level - 1), then writable and device leaves.
const C_WRITABLE = 3;
const C_DEVICE = 4;
/** Words per row: 128 bytes, the counters at ROW_PAD (64 bytes in), the rest padding (see header). */
const ROW_WORDS = 32;
const ROW_PAD = 16;
/** Words per table page in the retired-snapshot array (the five counters). */
const SNAP_WORDS = 5;

/** The shared words (structured-clonable, part of Stage2Shared). */
export interface MappingCountersShared {
  /** Int32 rows, ROW_WORDS per RCU slot. */
  rows: SharedArrayBuffer;
  /** Int32, SNAP_WORDS per table page: what was subtracted when that page's subtree was unlinked. */
  retired: SharedArrayBuffer;
}

export function newMappingCountersShared(slots: number, maxTablePages: number): MappingCountersShared {
  return {
    rows: new SharedArrayBuffer((slots * ROW_WORDS + ROW_PAD) * 4),
    retired: new SharedArrayBuffer((maxTablePages + 1) * SNAP_WORDS * 4),
  };
}

/** A subtree's leaf counts, in row order (scanSubtree's result). */
export type SubtreeCounts = [number, number, number, number, number];

export function emptySubtreeCounts(): SubtreeCounts {
  return [0, 0, 0, 0, 0];
}

/** Add one leaf at `level` to `c` (scanSubtree, settleRetired). */
export function countLeaf(c: SubtreeCounts, level: number, leaf: number): void {
  c[level - 1]!++;
  if (leafWritable(leaf)) c[C_WRITABLE]!++;
  if (leafIsDevice(leaf)) c[C_DEVICE]!++;
}

/**
 * Add every leaf of the subtree rooted at table page `table` (entries at `level`) to `c`.
 * Atomics.load per entry: other threads may change it meanwhile (see header).
 */
export function scanSubtree(words: Int32Array, table: number, level: number, c: SubtreeCounts): void {
  const base = table * PTRS_PER_TABLE;
  for (let i = 0; i < PTRS_PER_TABLE; i++) {
    const pte = Atomics.load(words, base + i);
    if (pteIsLeaf(pte)) countLeaf(c, level, pte);
    else if (pteIsTable(pte) && level < LAST_LEVEL) scanSubtree(words, tableIndex(pte), level + 1, c);
  }
}

/** This thread's handle: its own row, plus the shared snapshot slots. */
export class MappingCounters {
  private readonly words: Int32Array;
  private readonly writableAt: number;
  private readonly retired: Int32Array;
  /** First word of this thread's row. */
  private readonly base: number;

  constructor(
    readonly shared: MappingCountersShared,
    slot: number,
  ) {
    this.words = new Int32Array(shared.rows);
    this.retired = new Int32Array(shared.retired);
    this.base = slot * ROW_WORDS + ROW_PAD;
    this.writableAt = this.base + C_WRITABLE;
    if (this.base + ROW_WORDS > this.words.length) throw new RangeError(`mapping counters: no row for RCU slot ${slot}`);
  }

  leafAdded(level: number, leaf: number): void {
    const w = this.words;
    const b = this.base;
    w[b + level - 1]!++;
    if (leafWritable(leaf)) w[b + C_WRITABLE]!++;
    if (leafIsDevice(leaf)) w[b + C_DEVICE]!++;
  }

  leafRemoved(level: number, leaf: number): void {
    const w = this.words;
    const b = this.base;
    w[b + level - 1]!--;
    if (leafWritable(leaf)) w[b + C_WRITABLE]!--;
    if (leafIsDevice(leaf)) w[b + C_DEVICE]!--;
  }

  /** An entry at `level` went from old to nu, each a leaf or anything else (counted as no leaf). */
  entryChanged(level: number, old: number, nu: number): void {
    if (pteIsLeaf(old)) this.leafRemoved(level, old);
    if (pteIsLeaf(nu)) this.leafAdded(level, nu);
  }

  /** A block at `level` became `count` leaves at childLevel with the block's attributes. */
  blockSplit(level: number, block: number, childLevel: number, count: number): void {
    this.leafRemoved(level, block);
    const w = this.words;
    const b = this.base;
    w[b + childLevel - 1]! += count;
    if (leafWritable(block)) w[b + C_WRITABLE]! += count;
    if (leafIsDevice(block)) w[b + C_DEVICE]! += count;
  }

  /** W was set on one leaf (relax). */
  writeGranted(): void {
    this.words[this.writableAt]!++;
  }

  /**
   * Take back n W grants this row counted that a caller also counts in a counter of its own,
   * one the reader adds (Stage2PageTable.countWriteGrantsFrom; mmu/fault.ts's tryFastPath).
   */
  uncountWriteGrants(n: number): void {
    this.words[this.base + C_WRITABLE]! -= n;
  }

  /** W was cleared on n leaves (write-protect). */
  writeRevoked(n: number): void {
    this.words[this.base + C_WRITABLE]! -= n;
  }

  /** The subtree at table page `table` (entries at `level`) was unlinked: subtract it, keep the snapshot. */
  subtreeUnlinked(words: Int32Array, table: number, level: number): void {
    const c = emptySubtreeCounts();
    scanSubtree(words, table, level, c);
    const s = table * SNAP_WORDS;
    for (let k = 0; k < SNAP_WORDS; k++) {
      this.words[this.base + k]! -= c[k]!;
      this.retired[s + k] = c[k]!;
    }
  }

  /** The unlinked subtree at `table` is being freed holding `final`: subtract what changed since it was unlinked. */
  settleRetired(table: number, final: SubtreeCounts): void {
    const s = table * SNAP_WORDS;
    for (let k = 0; k < SNAP_WORDS; k++) this.words[this.base + k]! -= final[k]! - this.retired[s + k]!;
  }

  /** Sum of every thread's row (see header for when it is exact). */
  sum(): MappingCounts {
    const w = this.words;
    const t = [0, 0, 0, 0, 0];
    for (let b = ROW_PAD; b + ROW_WORDS <= w.length; b += ROW_WORDS) for (let k = 0; k < SNAP_WORDS; k++) t[k]! += Atomics.load(w, b + k);
    return { leaves1g: t[0]!, leaves2m: t[1]!, leaves4k: t[2]!, writableLeaves: t[C_WRITABLE]!, deviceLeaves: t[C_DEVICE]! };
  }
}

/** The same counts by walking: fn is called for every leaf (Stage2PageTable.forEachLeaf). For tests and checks. */
export function countMappingsByWalk(forEachLeaf: (fn: (gfn: number, level: number, pte: number) => void) => void): MappingCounts {
  const c = emptySubtreeCounts();
  forEachLeaf((_gfn, level, pte) => countLeaf(c, level, pte));
  return { leaves1g: c[0], leaves2m: c[1], leaves4k: c[2], writableLeaves: c[C_WRITABLE], deviceLeaves: c[C_DEVICE] };
}
