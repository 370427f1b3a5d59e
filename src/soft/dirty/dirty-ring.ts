// The soft engine's dirty rings (KVM_CAP_DIRTY_LOG_RING): one ring per vCPU, plus one for the
// VMM thread's own fault handler (tests), in one SharedArrayBuffer, entries in the layout and
// flag protocol of vmm/dirty-ring.ts (struct kvm_dirty_gfn).
//
// Buffer layout: CTL_WORDS words of control per line (only RESET_INDEX is used; the rest pads
// the line to 64 bytes so two vCPUs' control words never share a cache line), then each line's
// ring of `entries` * 4 words.
//
// Concurrency rules:
// - Producer: the line's own thread (SoftDirtyRingProducer; a vCPU's fault handler), single
//   writer of its ring's entries while their flags are 0. Its dirty index is private. It fills
//   slot and offset with plain stores, then publishes with Atomics.store(flags, DIRTY). It reuses
//   an entry only after the VMM stored a RESET_INDEX past it (Atomics.load, acquire), which the
//   VMM does only after it read the entry and stored its flags back to 0.
// - Collector and reset: the VMM thread only (vmm/dirty-ring.ts's DirtyRingCollector, then
//   resetSoftDirtyRings here). Reset protects the pages of the entries the collector marked RESET
//   under the MMU lock held exclusively, flushes remote TLBs, and only then moves RESET_INDEX.
// - The reset's protection drops the MMU lock every `sweepChunkPages` pages it protected
//   (lock-break.ts) and flushes once at the end, before RESET_INDEX moves: dirty-log.ts's INV
//   argument, with "bit set" read as "an uncollected entry exists"; an entry is freed only after
//   that flush, so a producer never reuses it while a write through a stale TLB entry is still
//   possible for its page.
// - Why no write is lost (the same argument as the bitmap's, mmu/fault.ts): a fault pushes the
//   page's entry before the guest's write through the PTE it makes writable (the locked paths
//   before storing it, the lockless fast path right after its cmpxchg). An entry the collector
//   did not see yet stays in the ring for the next harvest (ring entries are never cleared
//   without being collected, unlike a bitmap word). An entry it saw is re-protected by the reset
//   after the collection; a write before that protection lands in the page the caller reads
//   after the harvest returns (the reset's TLB flush waits for every vCPU between accesses), a
//   write after it faults and pushes a new entry.
// - Soft limit: after a push leaves `entries - DIRTY_RING_RSVD_ENTRIES` or more unreset
//   entries, the producer calls onSoftFull once; the vCPU then exits with DIRTY_RING_FULL at its
//   next request check (every 32 accesses, interpreter.ts), so at most 32 more pushes use the
//   64-entry reserve. The vCPU does not re-enter while the ring is still soft-full.
import type { SlotDesc } from '../mmu/slot-table.ts';
import { DIRTY_GFN_WORDS, DIRTY_RING_RSVD_ENTRIES, KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET } from '../../vmm/dirty-ring.ts';
import type { DirtySink } from './dirty-sink.ts';
import type { MmuLock } from '../locking/mmu-lock.ts';
import { ExclusiveSweep, newLockBreakStats, type LockBreakStats } from '../locking/lock-break.ts';
import { DEFAULT_DIRTY_TUNING, type DirtyLogTuning } from './dirty-tuning.ts';

const CTL_WORDS = 16;
const RESET_INDEX = 0;

/** The shared buffer of every ring of one VM: where each line's words are. */
export class SoftDirtyRings {
  readonly words: Int32Array;

  constructor(
    readonly sab: SharedArrayBuffer,
    readonly lines: number,
    readonly entries: number,
  ) {
    this.words = new Int32Array(sab);
  }

  static create(lines: number, entries: number): SoftDirtyRings {
    const words = lines * CTL_WORDS + lines * entries * DIRTY_GFN_WORDS;
    return new SoftDirtyRings(new SharedArrayBuffer(words * 4), lines, entries);
  }

  /** Word index of line `line`'s first entry. */
  ringBase(line: number): number {
    return this.lines * CTL_WORDS + line * this.entries * DIRTY_GFN_WORDS;
  }

  resetIndexWord(line: number): number {
    return line * CTL_WORDS + RESET_INDEX;
  }
}

/** The ring overflowed its reserve: a vCPU ran on past its soft limit (a bug, never a guest's doing). */
export class DirtyRingOverflowError extends Error {
  constructor(line: number, entries: number) {
    super(`dirty ring of line ${line} is full (${entries} entries unreset): a vCPU ran past its DIRTY_RING_FULL exit`);
    this.name = 'DirtyRingOverflowError';
  }
}

/** One line's producer side: the DirtySink of that thread's fault handler. */
export class SoftDirtyRingProducer implements DirtySink {
  private readonly words: Int32Array;
  private readonly base: number;
  private readonly resetWord: number;
  private readonly mask: number;
  private readonly softLimit: number;
  /** Entries pushed (int32, wraps; only differences are used). Private to this thread. */
  private dirtyIndex = 0;
  /** The RESET_INDEX last loaded: pushes up to resetSeen + entries need no load. */
  private resetSeen = 0;
  private softFullRaised = false;
  /** Called once when a push reaches the soft limit (the runner schedules the exit). */
  onSoftFull: () => void = () => {};

  constructor(
    rings: SoftDirtyRings,
    readonly line: number,
  ) {
    this.words = rings.words;
    this.base = rings.ringBase(line);
    this.resetWord = rings.resetIndexWord(line);
    this.mask = rings.entries - 1;
    this.softLimit = rings.entries - DIRTY_RING_RSVD_ENTRIES;
  }

  mark(slot: SlotDesc, rel: number): void {
    const words = this.words;
    const d = this.dirtyIndex;
    if (((d - this.resetSeen) | 0) > this.mask) {
      this.resetSeen = Atomics.load(words, this.resetWord);
      if (((d - this.resetSeen) | 0) > this.mask) throw new DirtyRingOverflowError(this.line, this.mask + 1);
    }
    const w = this.base + (d & this.mask) * DIRTY_GFN_WORDS;
    words[w + 1] = slot.slot;
    words[w + 2] = rel;
    words[w + 3] = 0; // offsets fit 32 bits: a slot has fewer than 2^31 pages
    Atomics.store(words, w, KVM_DIRTY_GFN_F_DIRTY);
    this.dirtyIndex = (d + 1) | 0;
    if (((d + 1 - this.resetSeen) | 0) >= this.softLimit && !this.softFullRaised && this.softFull()) {
      this.softFullRaised = true;
      this.onSoftFull();
    }
  }

  /** kvm_dirty_ring_soft_full: the VMM has not reset enough of this ring for the vCPU to run on. */
  softFull(): boolean {
    this.resetSeen = Atomics.load(this.words, this.resetWord);
    const full = ((this.dirtyIndex - this.resetSeen) | 0) >= this.softLimit;
    if (!full) this.softFullRaised = false;
    return full;
  }
}

/** What a ring reset needs from the stage-2 MMU (the VM provides it). */
export interface RingResetMmu {
  readonly lock: MmuLock;
  /** Write-protect every leaf mapping a page of [gfn, gfn + npages); exclusive lock held. */
  writeProtect(gfn: number, npages: number): void;
  flushRemoteTlbs(): void;
  /** sweepChunkPages: the lock is dropped after that many protected pages (default tuning). */
  readonly dirtyTuning?: DirtyLogTuning;
  readonly sweepStats?: LockBreakStats;
}

/**
 * KVM_RESET_DIRTY_RINGS over `lines`: write-protect again exactly the pages of the entries the
 * collector marked RESET (in slots that still exist and log), free those entries, and give the
 * space back to the producers. VMM thread only. Returns the pages protected.
 */
export function resetSoftDirtyRings(rings: SoftDirtyRings, lines: number, slotById: (id: number) => SlotDesc | undefined, mmu: RingResetMmu): number {
  const words = rings.words;
  const mask = rings.entries - 1;
  const bySlot = new Map<number, number[]>();
  const newReset: number[] = [];
  for (let line = 0; line < lines; line++) {
    const base = rings.ringBase(line);
    let r = Atomics.load(words, rings.resetIndexWord(line));
    for (;;) {
      const w = base + (r & mask) * DIRTY_GFN_WORDS;
      if ((Atomics.load(words, w) & KVM_DIRTY_GFN_F_RESET) === 0) break;
      const slot = words[w + 1]! & 0xffff;
      let list = bySlot.get(slot);
      if (list === undefined) bySlot.set(slot, (list = []));
      list.push(words[w + 2]! >>> 0);
      Atomics.store(words, w, 0);
      r = (r + 1) | 0;
    }
    newReset.push(r);
  }
  let protectedPages = 0;
  if (bySlot.size > 0) {
    const sweep = new ExclusiveSweep(mmu.lock, mmu.sweepStats ?? newLockBreakStats());
    const chunk = (mmu.dirtyTuning ?? DEFAULT_DIRTY_TUNING).sweepChunkPages;
    let sinceBreak = 0;
    const wp = (gfn: number, n: number): void => {
      if (sinceBreak >= chunk) {
        sinceBreak = 0;
        sweep.relax();
      }
      mmu.writeProtect(gfn, n);
      sinceBreak += n;
    };
    sweep.take();
    try {
      for (const [id, offsets] of bySlot) {
        // Looked up after take(): memslot changes run on this thread, so a slot cannot change
        // during a break either.
        const slot = slotById(id);
        // kvm_reset_dirty_gfn: an entry of a slot deleted (or no longer logging) since is dropped.
        if (slot === undefined || !slot.logDirty) continue;
        protectedPages += protectRuns(slot, offsets, wp);
      }
    } finally {
      sweep.release();
    }
    mmu.flushRemoteTlbs();
  }
  for (let line = 0; line < lines; line++) Atomics.store(words, rings.resetIndexWord(line), newReset[line]!);
  return protectedPages;
}

/** Write-protect the sorted, de-duplicated offsets of one slot as maximal runs. */
function protectRuns(slot: SlotDesc, offsets: number[], wp: (gfn: number, npages: number) => void): number {
  offsets.sort((a, b) => a - b);
  let pages = 0;
  let start = -1;
  let end = -1;
  for (const off of offsets) {
    if (off >= slot.npages) continue; // a stale entry of a slot that shrank (moved and recreated)
    if (off === end) end++;
    else if (off > end) {
      if (start >= 0) wp(slot.baseGfn + start, end - start);
      pages += start >= 0 ? end - start : 0;
      start = off;
      end = off + 1;
    }
  }
  if (start >= 0) {
    wp(slot.baseGfn + start, end - start);
    pages += end - start;
  }
  return pages;
}
