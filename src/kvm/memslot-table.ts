// The kvm VM's view of its memslots. Every request is validated with the engine-neutral
// MemslotSet (src/vmm/memslots.ts: KVM_SET_USER_MEMORY_REGION's rules) BEFORE the ioctl, so both
// engines reject the same requests with the same MemslotError; the kernel checks again and
// whatever it still refuses surfaces as its own error (ioctl name and errno).
// Used on the VMM thread only.
import type { MemoryRegion, MemslotInfo } from '../vmm/engine.ts';
import { MemslotSet, memslotInfo, type MemslotLimits } from '../vmm/memslots.ts';

export class MemslotTable {
  /** The current generation (immutable; replaced on every accepted change). */
  private set_: MemslotSet;

  get set(): MemslotSet {
    return this.set_;
  }

  constructor(limits: MemslotLimits) {
    this.set_ = MemslotSet.empty(limits);
  }

  get(slot: number): MemslotInfo | undefined {
    const s = this.set_.bySlot(slot);
    return s && memslotInfo(s);
  }

  list(): MemslotInfo[] {
    return this.set_.toInfo();
  }

  /** Check `r`; return the function that records it once the kernel has accepted it. */
  validate(r: MemoryRegion, internal: boolean): () => void {
    const next = this.set_.apply(r, { internal }).set;
    return () => {
      this.set_ = next;
    };
  }
}
