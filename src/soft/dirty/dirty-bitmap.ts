// A memslot's live dirty bitmap (kvm_memory_slot.dirty_bitmap), shared by every thread.
//
// Concurrency rules:
// - Allocated by the VMM thread when KVM_MEM_LOG_DIRTY_PAGES is turned on, published to vCPUs
//   inside a memslot generation (mmu/slot-table.ts), dropped when logging is turned off (after
//   the generation without it is synchronized, no fault can still mark into it).
// - Bits are set only by Atomics.or (mark_page_dirty_in_slot), by a fault handler that is about
//   to make the page writable in stage 2: the bit is set BEFORE the writable PTE is stored, so a
//   harvester that clears the bit and then write-protects either sees the bit or removes the
//   writable PTE the guest would use (and the write after that faults and sets it again).
//   The lockless write-protect fast path ('parallel' mode) sets the bit just AFTER its cmpxchg
//   makes the PTE writable and before the guest's write; mmu/fault.ts says why that is enough.
// - Bits are cleared only by the VMM thread holding the MMU lock exclusively, by Atomics.exchange
//   (get without manual protect) or Atomics.and (clear-dirty-log), each followed by
//   write-protecting exactly the cleared pages and a remote TLB flush before the call returns.
// - Layout is KVM's (see vmm/dirty-bitmap.ts): page i = bit (i & 31) of 32-bit word (i >> 5).
import { bitmapWords } from '../../vmm/dirty-bitmap.ts';

export function allocDirtyBitmap(npages: number): Uint32Array {
  return new Uint32Array(new SharedArrayBuffer(bitmapWords(npages) * 4));
}

/**
 * KVM_DIRTY_LOG_INITIALLY_SET: every page of the slot dirty, no bit past its end. Only on a
 * bitmap no other thread can see yet (before its generation is published).
 */
export function setAllDirty(bitmap: Uint32Array, npages: number): void {
  const full = npages >>> 5;
  bitmap.fill(0xffffffff, 0, full);
  if (npages & 31) bitmap[full] = (1 << (npages & 31)) - 1;
}

/** mark_page_dirty_in_slot: page `rel` (gfn - slot.baseGfn) of the slot. */
export function markPageDirty(bitmap: Uint32Array, rel: number): void {
  const bit = 1 << (rel & 31);
  const i = rel >>> 5;
  // Already set is the common case for repeat faults; skip the locked RMW then.
  if ((bitmap[i]! & bit) === 0) Atomics.or(bitmap, i, bit);
}

/**
 * Calls wp(firstRelPage, pages) for each maximal run of set bits in `mask` words, coalescing
 * runs that continue across words, so a fully dirty slot is write-protected with one walk.
 */
export class RunCollector {
  private start = -1;
  private len = 0;

  constructor(private readonly wp: (firstRel: number, pages: number) => void) {}

  /** Add the set bits of `mask`, the word covering pages [wordIndex*32, wordIndex*32+32). */
  addWord(wordIndex: number, mask: number): void {
    if (mask === 0) return;
    const first = wordIndex * 32;
    if (mask === -1 || mask === 0xffffffff) {
      this.addRun(first, 32);
      return;
    }
    let m = mask >>> 0;
    while (m !== 0) {
      const lo = 31 - Math.clz32(m & -m); // lowest set bit
      const shifted = m >>> lo; // bit 0 set
      // trailing ones of `shifted` = index of its lowest zero bit
      const runLen = shifted === 0xffffffff ? 32 - lo : 31 - Math.clz32(~shifted & (shifted + 1));
      this.addRun(first + lo, runLen);
      const next = lo + runLen;
      m = next >= 32 ? 0 : ((m >>> next) << next) >>> 0;
    }
  }

  private addRun(rel: number, n: number): void {
    if (this.start >= 0 && this.start + this.len === rel) {
      this.len += n;
      return;
    }
    this.flush();
    this.start = rel;
    this.len = n;
  }

  /** Emit the pending run. */
  flush(): void {
    if (this.start >= 0) this.wp(this.start, this.len);
    this.start = -1;
    this.len = 0;
  }
}
