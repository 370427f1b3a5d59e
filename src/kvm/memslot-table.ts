// The kvm VM's view of its memslots, checked against KVM_SET_USER_MEMORY_REGION's rules
// (virt/kvm/kvm_main.c: __kvm_set_memory_region, check_memory_region_flags) BEFORE the ioctl,
// so a bad request throws a MemslotError naming the rule instead of a bare EINVAL. The kernel
// still checks too; whatever it refuses surfaces as its own error (ioctl name and errno).
// Used on the VMM thread only.
import { KVM_MEM_READONLY, MemslotError, PAGE_SIZE, type MemoryRegion, type MemslotInfo } from '../vmm/engine.ts';

const MAX_PAGES = 2 ** 31 - 1; // KVM_MEM_MAX_NR_PAGES on 64-bit
const hex = (n: number) => `0x${n.toString(16)}`;

export class MemslotTable {
  private readonly slots = new Map<number, MemslotInfo>();

  constructor(private readonly maxSlots: number) {}

  get(slot: number): MemslotInfo | undefined {
    return this.slots.get(slot);
  }

  list(): MemslotInfo[] {
    return [...this.slots.values()].sort((a, b) => a.guestPhysAddr - b.guestPhysAddr);
  }

  /**
   * Check `r` against the current set; return the function that records it once the kernel
   * has accepted it.
   */
  validate(r: MemoryRegion, internal: boolean, supportedFlags: number): () => void {
    const { slot, flags, guestPhysAddr: gpa, memorySize: size, userspaceAddr: hva } = r;
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.maxSlots) throw new MemslotError('slot', `slot ${slot} is outside 0..${this.maxSlots - 1}`);
    if ((flags & ~supportedFlags) !== 0) throw new MemslotError('flags', `slot ${slot}: unsupported flags ${hex(flags & ~supportedFlags)}`);
    for (const [what, v] of [['guestPhysAddr', gpa], ['memorySize', size], ['userspaceAddr', hva]] as const) {
      if (!Number.isInteger(v) || v < 0 || v % PAGE_SIZE !== 0) throw new MemslotError('alignment', `slot ${slot}: ${what} ${hex(v)} is not a multiple of ${PAGE_SIZE}`);
    }
    const old = this.slots.get(slot);
    if (size === 0) {
      if (!old) throw new MemslotError('unknown-slot', `slot ${slot}: cannot delete a slot that does not exist`);
      return () => this.slots.delete(slot);
    }
    if (size / PAGE_SIZE > MAX_PAGES || gpa + size > 2 ** 52) throw new MemslotError('size', `slot ${slot}: [${hex(gpa)}, +${hex(size)}) is too large`);
    if (old) {
      if (old.memorySize !== size) throw new MemslotError('size', `slot ${slot}: cannot resize ${hex(old.memorySize)} to ${hex(size)} (delete and recreate it)`);
      if (old.userspaceAddr !== hva) throw new MemslotError('hva', `slot ${slot}: cannot change userspaceAddr of an existing slot`);
      if ((old.flags ^ flags) & KVM_MEM_READONLY) throw new MemslotError('flags', `slot ${slot}: cannot toggle KVM_MEM_READONLY on an existing slot`);
    }
    if (!old || old.guestPhysAddr !== gpa) {
      for (const s of this.slots.values()) {
        if (s.slot === slot) continue;
        if (gpa < s.guestPhysAddr + s.memorySize && s.guestPhysAddr < gpa + size) {
          throw new MemslotError('overlap', `slot ${slot}: [${hex(gpa)}, ${hex(gpa + size)}) overlaps slot ${s.slot} [${hex(s.guestPhysAddr)}, ${hex(s.guestPhysAddr + s.memorySize)})`);
        }
      }
    }
    return () => this.slots.set(slot, { slot, flags, guestPhysAddr: gpa, memorySize: size, userspaceAddr: hva, pages: size / PAGE_SIZE, internal });
  }
}
