// KVM_SET_USER_MEMORY_REGION's side effects in the soft engine (kvm_set_memslot and
// kvm_arch_commit_memory_region): which generation to publish, whom to wait for, what to unmap
// or write-protect, in which order. Also the mmu-notifier's hva -> gfn translation.
//
// Runs on the VMM thread only. Ordering rules (see mmu/slot-table.ts for the SRCU mechanics):
// - create: publish the new generation; nothing can be mapped there yet. A slot created with
//   LOG_DIRTY_PAGES gets its bitmap in that same generation.
// - delete / move: begin a memslot invalidation (faults on the slot retry), publish, wait out
//   readers of the old generation, unmap the old gfn range under the exclusive MMU lock (the
//   unmap flushes TLBs), end the invalidation. A move keeps the bitmap while logging.
// - logging on: allocate the bitmap (not on a VM with a dirty ring: faults push to their vCPU's
//   ring then, dirty/dirty-ring.ts), every bit set with INITIALLY_SET, publish, wait out old
//   readers (no fault can still install a writable or huge mapping from a generation without
//   the bitmap), then write-protect the slot in lock-dropping chunks, eagerly splitting its
//   blocks if asked, and flush (dirty/dirty-log.ts startLogging; nothing with INITIALLY_SET). Logging off: publish without the bitmap, wait out old readers, drop it,
//   then hand the slot to huge-page recovery (huge/recovery.ts): no fault can still be logging
//   it, so the 4 KiB leaves logging left can become blocks again.
// - mmu notifier (host munmap): unmap the gfns the range backs, under the exclusive lock, flush
//   included, before the host frees anything.
import { KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE, type MemoryRegion } from '../vmm/engine.ts';
import { MemslotSet, type Memslot } from '../vmm/memslots.ts';
import { allocDirtyBitmap, setAllDirty } from './dirty/dirty-bitmap.ts';
import { startLogging, type DirtyLogMmu } from './dirty/dirty-log.ts';
import { MemslotInvalidation } from './mmu/memslot-inval.ts';
import { SlotPublisher, type SlotDesc } from './mmu/slot-table.ts';

/** What memslot changes need from the VM's stage-2 side. */
export interface MemslotMmu extends DirtyLogMmu {
  /** False until host memory (and the stage-2 table) exists: nothing can be mapped yet. */
  hasHost(): boolean;
  /** Remove every stage-2 mapping of [gfn, gfn + npages) (exclusive lock, TLB flush). */
  unmapGfns(gfn: number, npages: number): void;
  /** The host VMA at hva allows writes (true when unknown). */
  hostWritable(hva: number): boolean;
  /** Statistics: pages swept by a logging enable. */
  countWriteProtected(pages: number): void;
  /** Logging stopped on the slot (old readers gone): re-form its huge mappings (huge/recovery.ts). */
  loggingStopped?(slot: SlotDesc): void;
}

export class VmMemslots {
  set = MemslotSet.empty();
  readonly publisher: SlotPublisher;
  readonly inval = new MemslotInvalidation();
  private readonly bitmaps = new Map<number, Uint32Array>();

  constructor(
    ctl: Int32Array,
    vcpuCount: () => number,
    private readonly mmu: MemslotMmu,
    /** False on a VM with a dirty ring: logging slots get no bitmap (kvm_use_dirty_bitmap). */
    private readonly useBitmaps = true,
  ) {
    this.publisher = new SlotPublisher(ctl, vcpuCount);
  }

  /** KVM_SET_USER_MEMORY_REGION: validate (MemslotError), then commit with KVM's side effects. */
  apply(region: MemoryRegion): void {
    const res = this.set.apply(region);
    const mmu = this.mmu;
    switch (res.change) {
      case 'none':
        return;
      case 'create':
        this.syncBitmap(res.new!);
        this.set = res.set;
        this.publish();
        return;
      case 'delete':
      case 'move': {
        const old = res.old!;
        this.inval.begin();
        try {
          this.set = res.set;
          if (res.change === 'delete') this.bitmaps.delete(old.id);
          else this.syncBitmap(res.new!);
          this.publish();
          this.publisher.synchronize();
          if (mmu.hasHost()) mmu.unmapGfns(old.baseGfn, old.npages);
        } finally {
          this.inval.end();
        }
        return;
      }
      case 'flags-only': {
        const wasLogging = (res.old!.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0;
        const nu = res.new!;
        const logging = (nu.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0;
        this.syncBitmap(nu);
        this.set = res.set;
        this.publish();
        this.publisher.synchronize();
        if (logging && !wasLogging && mmu.hasHost()) {
          // Without eager split, huge mappings are write-protected whole; a write fault splits
          // them (seed 000).
          mmu.countWriteProtected(startLogging(mmu, this.desc(nu.id)!));
        }
        if (!logging && wasLogging && mmu.hasHost()) mmu.loggingStopped?.(this.desc(nu.id)!);
        return;
      }
    }
  }

  /** The slot as the current generation holds it. */
  desc(id: number): SlotDesc | undefined {
    return this.publisher.current.slots.find((s) => s.slot === id);
  }

  /** mmu notifier: host [start, end) is going away; drop every stage-2 mapping of it first. */
  onHostInvalidate(start: number, end: number): void {
    for (const s of this.set.slots) {
      const lo = Math.max(start, s.userspaceAddr);
      const hi = Math.min(end, s.userspaceAddr + s.npages * PAGE_SIZE);
      if (lo >= hi) continue;
      const first = s.baseGfn + Math.floor((lo - s.userspaceAddr) / PAGE_SIZE);
      const last = s.baseGfn + Math.ceil((hi - s.userspaceAddr) / PAGE_SIZE);
      this.mmu.unmapGfns(first, last - first);
    }
  }

  close(): void {
    this.publisher.close();
  }

  /** Give the slot a dirty bitmap iff it logs (keeping an existing one, as KVM does on a move). */
  private syncBitmap(s: Memslot): void {
    if ((s.flags & KVM_MEM_LOG_DIRTY_PAGES) === 0 || !this.useBitmaps) this.bitmaps.delete(s.id);
    else if (!this.bitmaps.has(s.id)) {
      const bm = allocDirtyBitmap(s.npages);
      // KVM_DIRTY_LOG_INITIALLY_SET: set before the bitmap is published (kvm_prepare_memory_region).
      if (this.mmu.dirtyTuning?.initiallySet) setAllDirty(bm, s.npages);
      this.bitmaps.set(s.id, bm);
    }
  }

  private publish(): void {
    this.publisher.publish(this.set.slots.map((s) => this.toDesc(s)));
  }

  private toDesc(s: Memslot): SlotDesc {
    return {
      slot: s.id,
      flags: s.flags,
      baseGfn: s.baseGfn,
      npages: s.npages,
      hva: s.userspaceAddr,
      hostWritable: this.mmu.hostWritable(s.userspaceAddr),
      logDirty: (s.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0,
      dirtyBitmap: this.bitmaps.get(s.id) ?? null,
    };
  }
}
