// The vCPU's view of the stage-2 MMU: lock-free walks that fill the soft TLB (the hardware
// walker) and the fault handler behind them. One instance per vCPU thread.
//
// Concurrency rules: walk() reads PTEs with plain loads inside the RCU read section that
// enterGuest() opens (table pages reachable from the root stay allocated until the vCPU leaves
// guest mode or acknowledges a flush, see runner.ts). A PTE read here may be stale by one
// concurrent change; that is what the remote TLB flush protocol bounds (vcpu/tlb-flush.ts). A
// LOCKED or absent entry, or one without the needed permission, makes the access fault.
import { LEVEL_PAGES, PTE_DEVICE, PTE_R, PTE_TYPE_LEAF, PTE_TYPE_MASK, PTE_TYPE_TABLE, PTE_W, LAST_LEVEL, PTRS_PER_TABLE } from '../pgtable/pte.ts';
import { newLeafLookup, type Stage2PageTable } from '../pgtable/stage2.ts';
import type { SoftTlb } from '../vcpu/soft-tlb.ts';
import type { VcpuMmu } from '../vcpu/runner.ts';
import type { FaultHandler } from './fault.ts';

export class VcpuStage2 implements VcpuMmu {
  private readonly leaf = newLeafLookup();
  private readonly words: Int32Array;
  private readonly rootBase: number;

  constructor(
    private readonly pgt: Stage2PageTable,
    readonly faults: FaultHandler,
  ) {
    this.words = pgt.pool.words;
    this.rootBase = pgt.root * PTRS_PER_TABLE;
  }

  enterGuest(): void {
    this.pgt.rcuReadLock();
  }

  exitGuest(): void {
    this.pgt.rcuReadUnlock();
  }

  /** The leaf the last walk() found (0 if none). */
  private lastPte = 0;

  /**
   * Stage2PageTable.getLeaf specialised for gfn < 2^31 (guest memory below 8 TiB, checked by the
   * interpreter): shifts instead of divisions. Same PTE format (pgtable/pte.ts), plain loads.
   */
  private getLeaf(gfn: number): number {
    const w = this.words;
    const out = this.leaf;
    let ptep = this.rootBase + ((gfn >>> 27) & 511);
    let pte = w[ptep]!;
    let level = 0;
    if ((pte & PTE_TYPE_MASK) === PTE_TYPE_TABLE) {
      ptep = ((pte >>> 5) << 9) + ((gfn >>> 18) & 511);
      pte = w[ptep]!;
      level = 1;
      if ((pte & PTE_TYPE_MASK) === PTE_TYPE_TABLE) {
        ptep = ((pte >>> 5) << 9) + ((gfn >>> 9) & 511);
        pte = w[ptep]!;
        level = 2;
        if ((pte & PTE_TYPE_MASK) === PTE_TYPE_TABLE) {
          ptep = ((pte >>> 5) << 9) + (gfn & 511);
          pte = w[ptep]!;
          level = 3;
        }
      }
    }
    out.level = level;
    out.ptep = ptep;
    return (pte & PTE_TYPE_MASK) === PTE_TYPE_LEAF ? pte : 0;
  }

  walk(gfn: number, write: boolean, tlb: SoftTlb): number {
    const pte = this.getLeaf(gfn);
    this.lastPte = pte;
    if ((pte & PTE_TYPE_MASK) !== PTE_TYPE_LEAF) return -1;
    if ((pte & (write ? PTE_W : PTE_R)) === 0) return -1;
    const perm = ((pte & PTE_R) !== 0 ? 1 : 0) | ((pte & PTE_W) !== 0 ? 2 : 0);
    const level = this.leaf.level;
    if (level === LAST_LEVEL) {
      const pfn = pte >>> 5;
      tlb.fillSmall(gfn, pfn, perm);
      return pfn;
    }
    const pfn = (pte >>> 5) + (gfn % LEVEL_PAGES[level]!);
    tlb.fillHuge(gfn, pfn, perm);
    return pfn;
  }

  canFastWrite(): boolean {
    return (this.lastPte & (PTE_TYPE_MASK | PTE_R | PTE_W | PTE_DEVICE)) === (PTE_TYPE_LEAF | PTE_R) && this.leaf.level === LAST_LEVEL;
  }

  fastWrite(gfn: number): number {
    return this.faults.fastWrite(gfn, this.lastPte, this.leaf.ptep);
  }

  tryFastWrite(gfn: number): number {
    return this.faults.tryFastWrite(gfn, this.lastPte, this.leaf.ptep);
  }

  fault(gfn: number, write: boolean): number {
    return this.faults.handle(gfn, write, this.lastPte, this.leaf.level);
  }
}
