// The vCPU's view of the stage-2 MMU: lock-free walks that fill the soft TLB (the hardware
// walker) and the fault handler behind them. One instance per vCPU thread.
//
// Concurrency rules: walk() reads PTEs with plain loads inside the RCU read section that
// enterGuest() opens (table pages reachable from the root stay allocated until the vCPU leaves
// guest mode or acknowledges a flush, see runner.ts). A PTE read here may be stale by one
// concurrent change; that is what the remote TLB flush protocol bounds (vcpu/tlb-flush.ts). A
// LOCKED or absent entry, or one without the needed permission, makes the access fault.
// enterGuest() also takes the memslot SRCU reader for the section (mmu/slot-table.ts), which the
// write-protect fast path reads its slot from in 'parallel' mode (the other modes read by peek()
// under the MMU lock, which may advance the same lookup; they never use `held`); the runner
// retakes both when a request shows a newer memslot generation (slotsStale), and the slow path
// runs outside the section.
import { LAST_LEVEL, LEVEL_PAGES, PTRS_PER_TABLE, leafPfn, leafRW, pteGrants, pteIsWriteProtectedRam } from '../pgtable/pte.ts';
import { newLeafLookup, type Stage2PageTable } from '../pgtable/stage2.ts';
import { lookupLeaf } from '../pgtable/lookup.ts';
import type { SoftTlb } from '../vcpu/soft-tlb.ts';
import type { VcpuMmu } from '../vcpu/runner.ts';
import type { FaultHandler, HeldSlots } from './fault.ts';

export class VcpuStage2 implements VcpuMmu {
  private readonly leaf = newLeafLookup();
  private readonly words: Int32Array;
  private readonly rootBase: number;

  /** The memslots of this guest-mode section's SRCU reader (null outside guest mode). */
  private held: HeldSlots | null = null;

  constructor(
    private readonly pgt: Stage2PageTable,
    readonly faults: FaultHandler,
  ) {
    this.words = pgt.pool.words;
    this.rootBase = pgt.root * PTRS_PER_TABLE;
  }

  enterGuest(): void {
    this.pgt.rcuReadLock();
    this.held = this.faults.slots.readLock();
  }

  exitGuest(): void {
    this.held = null;
    this.faults.slots.readUnlock();
    this.pgt.rcuReadUnlock();
  }

  slotsStale(): boolean {
    return this.faults.slots.stale();
  }

  /** The leaf the last walk() found (0 if none). */
  private lastPte = 0;

  /** The leaf covering gfn (plain loads; the caller is in guest mode, inside the RCU section). */
  private getLeaf(gfn: number): number {
    return lookupLeaf(this.words, this.rootBase, gfn, this.leaf, false);
  }

  walk(gfn: number, write: boolean, tlb: SoftTlb): number {
    const pte = this.getLeaf(gfn);
    this.lastPte = pte;
    if (!pteGrants(pte, write)) return -1;
    // R = 1, W = 2: the soft TLB's permission bits.
    const perm = leafRW(pte);
    const level = this.leaf.level;
    if (level === LAST_LEVEL) {
      const pfn = leafPfn(pte);
      tlb.fillSmall(gfn, pfn, perm);
      return pfn;
    }
    const pfn = leafPfn(pte) + (gfn % LEVEL_PAGES[level]!);
    tlb.fillHuge(gfn, pfn, perm);
    return pfn;
  }

  canFastWrite(): boolean {
    return pteIsWriteProtectedRam(this.lastPte) && this.leaf.level === LAST_LEVEL;
  }

  fastWrite(gfn: number): number {
    return this.faults.fastWrite(gfn, this.lastPte, this.leaf.ptep, this.held!);
  }

  tryFastWrite(gfn: number): number {
    return this.faults.tryFastWrite(gfn, this.lastPte, this.leaf.ptep, this.held!);
  }

  fault(gfn: number, write: boolean): number {
    return this.faults.handle(gfn, write, this.lastPte, this.leaf.level);
  }
}
