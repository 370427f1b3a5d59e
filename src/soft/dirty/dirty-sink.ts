// Where the stage-2 fault handler records that a page became dirty (mark_page_dirty_in_slot):
// one interface, two implementations, chosen when the VM is created (KVM_CAP_DIRTY_LOG_RING):
//   bitmapDirtySink       the memslot's dirty bitmap (dirty-bitmap.ts), shared by every thread;
//   SoftDirtyRingProducer this vCPU's dirty ring (dirty-ring.ts), private to its thread.
// Each fault handler (one per vCPU thread, and one on the VMM thread) holds one sink for its
// life; a process that only ever uses one kind keeps the call site monomorphic.
//
// Called only for a slot that logs (SlotDesc.logDirty), at the points mmu/fault.ts fixes: before
// a locked fault stores a writable PTE, or right after the lockless fast path's cmpxchg made one
// writable and before the guest's write. The ordering proofs live there and in each sink's file.
import type { SlotDesc } from '../mmu/slot-table.ts';
import { markPageDirty } from './dirty-bitmap.ts';

export interface DirtySink {
  /** Page `rel` (gfn - slot.baseGfn) of `slot`, which logs dirty pages, is about to be written. */
  mark(slot: SlotDesc, rel: number): void;
}

/** The memslot bitmap (the default: KVM without a dirty ring). */
export const bitmapDirtySink: DirtySink = {
  mark(slot: SlotDesc, rel: number): void {
    markPageDirty(slot.dirtyBitmap!, rel);
  },
};
