// KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG and the write-protect sweep that starts logging
// (kvm_get_dirty_log_protect, kvm_clear_dirty_log_protect, kvm_mmu_slot_apply_flags).
//
// Runs on the VMM thread. Concurrency rules:
// - Every bit cleared here is cleared with the MMU lock held exclusively (no locked fault can be
//   between marking a page dirty and installing its writable PTE, see dirty-bitmap.ts), and the
//   cleared pages are write-protected under the same lock hold. The remote TLB flush follows,
//   before the call returns: afterwards the next guest write to any of those pages faults and
//   sets its bit again. Nothing else needs ordering: vCPUs mark bits with Atomics.or at any time.
// - The lockless write-protect fast path ('parallel' mode, mmu/fault.ts) runs during all of
//   this: it sets W by cmpxchg and marks the bit after, and everything here only removes W, so
//   a write it lets through is in the pages this harvest reports or sets a bit for the next.
// - The bitmap handed back is a private copy (KVM copies to the user buffer).
import type { MmuLock } from '../locking/mmu-lock.ts';
import type { SlotDesc } from '../mmu/slot-table.ts';
import { bitmapWords } from '../../vmm/dirty-bitmap.ts';
import { RunCollector } from './dirty-bitmap.ts';

/** What the dirty log needs from the stage-2 MMU (the VM's Stage2Mmu provides it). */
export interface DirtyLogMmu {
  readonly lock: MmuLock;
  /** Write-protect every leaf mapping a page of [gfn, gfn + npages); exclusive lock held. */
  writeProtect(gfn: number, npages: number): void;
  /** kvm_flush_remote_tlbs (no lock needed). */
  flushRemoteTlbs(): void;
}

export class DirtyLogError extends Error {
  constructor(
    readonly errno: 'ENOENT' | 'EINVAL' | 'ENXIO',
    message: string,
  ) {
    super(message);
    this.name = 'DirtyLogError';
  }
}

function liveBitmap(slot: SlotDesc): Uint32Array {
  if (slot.dirtyBitmap === null) throw new DirtyLogError('ENOENT', `memslot ${slot.slot} does not log dirty pages`);
  return slot.dirtyBitmap;
}

/**
 * Logging was just turned on for `slot` (its bitmap is published and synchronized): write-protect
 * every mapping of the slot, huge ones as they are (a write fault splits them lazily).
 * Returns the pages swept.
 */
export function writeProtectSlot(mmu: DirtyLogMmu, slot: SlotDesc): number {
  mmu.lock.exclusiveLock();
  try {
    mmu.writeProtect(slot.baseGfn, slot.npages);
  } finally {
    mmu.lock.exclusiveUnlock();
  }
  mmu.flushRemoteTlbs();
  return slot.npages;
}

/**
 * KVM_GET_DIRTY_LOG. With manual protect: a snapshot of the bitmap, nothing cleared. Without:
 * each non-zero word is taken with an atomic exchange and exactly those pages are write-protected,
 * under one exclusive hold of the MMU lock, then TLBs are flushed.
 */
export function getDirtyLog(mmu: DirtyLogMmu, slot: SlotDesc, manualProtect: boolean): { bitmap: Uint32Array; protectedPages: number } {
  const live = liveBitmap(slot);
  const out = new Uint32Array(bitmapWords(slot.npages));
  if (manualProtect) {
    out.set(live);
    return { bitmap: out, protectedPages: 0 };
  }
  let pages = 0;
  const runs = new RunCollector((rel, n) => {
    mmu.writeProtect(slot.baseGfn + rel, n);
    pages += n;
  });
  mmu.lock.exclusiveLock();
  try {
    for (let i = 0; i < live.length; i++) {
      if (live[i] === 0) continue;
      const mask = Atomics.exchange(live, i, 0);
      out[i] = mask;
      runs.addWord(i, mask | 0);
    }
    runs.flush();
  } finally {
    mmu.lock.exclusiveUnlock();
  }
  if (pages > 0) mmu.flushRemoteTlbs();
  return { bitmap: out, protectedPages: pages };
}

/**
 * KVM_CLEAR_DIRTY_LOG: for every bit set in `bitmap` (bit 0 = firstPage) that is also set in the
 * live bitmap, clear it and write-protect that page. firstPage must be a multiple of 64 and
 * numPages a multiple of 64 unless the range ends at the slot's end (KVM's rules).
 */
export function clearDirtyLog(mmu: DirtyLogMmu, slot: SlotDesc, firstPage: number, numPages: number, bitmap: Uint32Array): number {
  const live = liveBitmap(slot);
  if (!Number.isInteger(firstPage) || !Number.isInteger(numPages) || firstPage < 0 || numPages < 0) {
    throw new DirtyLogError('EINVAL', `clear dirty log: bad range first=${firstPage} num=${numPages}`);
  }
  if (firstPage % 64 !== 0) throw new DirtyLogError('EINVAL', `clear dirty log: first page ${firstPage} is not a multiple of 64`);
  if (firstPage + numPages > slot.npages) {
    throw new DirtyLogError('EINVAL', `clear dirty log: [${firstPage}, ${firstPage + numPages}) exceeds memslot ${slot.slot} (${slot.npages} pages)`);
  }
  if (numPages % 64 !== 0 && firstPage + numPages !== slot.npages) {
    throw new DirtyLogError('EINVAL', `clear dirty log: ${numPages} pages is not a multiple of 64 and does not end at the slot's end`);
  }
  if (bitmap.length * 32 < numPages) {
    throw new DirtyLogError('EINVAL', `clear dirty log: bitmap of ${bitmap.length} words is too short for ${numPages} pages`);
  }
  if (numPages === 0) return 0;
  let pages = 0;
  const runs = new RunCollector((rel, n) => {
    mmu.writeProtect(slot.baseGfn + rel, n);
    pages += n;
  });
  const firstWord = firstPage >>> 5;
  const words = Math.ceil(numPages / 32);
  mmu.lock.exclusiveLock();
  try {
    for (let w = 0; w < words; w++) {
      let mask = bitmap[w]! | 0;
      if (mask === 0) continue;
      const remaining = numPages - w * 32;
      if (remaining < 32) mask &= (1 << remaining) - 1;
      // Only pages whose bit was really set get write-protected (fetch_andnot, like KVM).
      const old = Atomics.and(live, firstWord + w, ~mask);
      mask &= old;
      runs.addWord(firstWord + w, mask);
    }
    runs.flush();
  } finally {
    mmu.lock.exclusiveUnlock();
  }
  if (pages > 0) mmu.flushRemoteTlbs();
  return pages;
}
