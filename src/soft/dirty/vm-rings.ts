// A soft VM's dirty rings as the VMM thread holds them (KVM_CAP_DIRTY_LOG_RING): the shared
// rings (one per vCPU line, plus line maxVcpus for the VMM thread's own fault handler), one
// collector per ring, and the entries collected at DIRTY_RING_FULL exits that the next
// harvestDirtyRings returns. VMM thread only; the rings' own rules are in dirty-ring.ts.
import type { DirtyGfn } from '../../vmm/engine.ts';
import { DIRTY_RING_MAX_ENTRIES, DirtyRingCollector, dirtyRingSizeProblem } from '../../vmm/dirty-ring.ts';
import { VmError } from '../../vmm/errors.ts';
import type { SlotDesc } from '../mmu/slot-table.ts';
import { SoftDirtyRingProducer, SoftDirtyRings, resetSoftDirtyRings, type RingResetMmu } from './dirty-ring.ts';

export class VmDirtyRings {
  private readonly rings: SoftDirtyRings;
  private readonly collectors: DirtyRingCollector[] = [];
  /** Entries collected (by ring-full exits) and not yet returned by harvest(). */
  private readonly pending: DirtyGfn[] = [];
  private resets = 0;
  private maxBatch = 0;

  /** `entries` per ring, checked as KVM_ENABLE_CAP checks it (VmError). */
  constructor(
    entries: number,
    private readonly maxVcpus: number,
  ) {
    const problem = dirtyRingSizeProblem(entries, DIRTY_RING_MAX_ENTRIES);
    if (problem !== null) throw new VmError('config', problem);
    this.rings = SoftDirtyRings.create(maxVcpus + 1, entries);
    for (let line = 0; line <= maxVcpus; line++) this.collectors.push(new DirtyRingCollector(this.rings.words, entries, line < maxVcpus ? line : -1, this.rings.ringBase(line)));
  }

  /** What a vCPU worker attaches to (structured-clonable). */
  shared(): { sab: SharedArrayBuffer; lines: number; entries: number } {
    return { sab: this.rings.sab, lines: this.rings.lines, entries: this.rings.entries };
  }

  /** The VMM thread's own producer (its fault handler's DirtySink). */
  vmmProducer(): SoftDirtyRingProducer {
    return new SoftDirtyRingProducer(this.rings, this.maxVcpus);
  }

  /**
   * Collect the published entries of every ring (or only `onlyVcpu`'s: its DIRTY_RING_FULL
   * exit, so each vCPU's exits follow its own dirtying, which the dirty limit relies on) into
   * `pending`, then KVM_RESET_DIRTY_RINGS: the collected pages are write-protected again and
   * their entries freed (mmu null: nothing is mapped yet, nothing to protect). Returns the pages
   * protected.
   */
  drain(slotById: (id: number) => SlotDesc | undefined, mmu: RingResetMmu | null, onlyVcpu?: number): number {
    if (onlyVcpu !== undefined) this.maxBatch = Math.max(this.maxBatch, this.collectors[onlyVcpu]!.collect(this.pending));
    else for (const c of this.collectors) this.maxBatch = Math.max(this.maxBatch, c.collect(this.pending));
    const n = mmu ? resetSoftDirtyRings(this.rings, this.rings.lines, slotById, mmu) : 0;
    this.resets++;
    return n;
  }

  /** Everything collected since the last harvest, this drain's included. */
  takePending(): DirtyGfn[] {
    return this.pending.splice(0);
  }

  addStats(out: Record<string, number>): void {
    out.dirtyRingResets = this.resets;
    out.dirtyRingMaxEntriesPerHarvest = this.maxBatch;
  }
}
