// Memslots: KVM_SET_USER_MEMORY_REGION's rules and the set of slots they produce. Engine-neutral:
// the soft engine publishes these sets to its vCPU workers; the kvm engine validates with them
// before the ioctl so both engines reject the same requests with the same MemslotError.
//
// A MemslotSet is immutable. Every accepted change builds a new set with generation + 1 and the
// old one stays valid for whoever still holds it. That is the property seed 000 relies on: KVM
// swaps kvm->memslots under RCU, so a fault reads one whole set (old or new, never a mix), and
// dirty logging stays correct across the swap: a vCPU still using the old set marks pages in the
// old slot's bitmap (harmless: logging was being disabled, or the write-protect pass that enables
// it runs only after the new set is published and every reader of the old one is gone). The
// engine must publish a set atomically and wait out readers of the old one (its SRCU equivalent)
// before acting on the change; this file only guarantees that a set never changes under a reader.
//
// Rules, in the order __kvm_set_memory_region checks them (virt/kvm/kvm_main.c):
//   flags only LOG_DIRTY_PAGES | READONLY | EXIT_ON_MISSING (stage2's) -> 'flags'
//   memorySize, guestPhysAddr, userspaceAddr 4 KiB aligned      -> 'alignment'
//   userspaceAddr + memorySize inside user space (access_ok)   -> 'hva'
//   slot id < maxSlots                                          -> 'slot'
//   guestPhysAddr + memorySize does not overflow                -> 'size'
//   npages <= KVM_MEM_MAX_NR_PAGES                              -> 'size'
//   memorySize 0 deletes; deleting a missing slot               -> 'unknown-slot'
//   existing slot: userspaceAddr unchanged                      -> 'hva'
//                  size unchanged                               -> 'size'
//                  READONLY unchanged                           -> 'flags'
//                  new guestPhysAddr = MOVE, new flags = FLAGS_ONLY, neither = no change
//   create or move must not overlap another slot (EEXIST)      -> 'overlap'
//   end within the max guest physical address (arch prepare)   -> 'size'

import { KVM_MEM_EXIT_ON_MISSING, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, MemslotError, PAGE_SIZE, type MemoryRegion, type MemslotInfo } from './engine.ts';

export interface Memslot {
  readonly id: number;
  readonly baseGfn: number;
  readonly npages: number;
  readonly userspaceAddr: number;
  readonly flags: number;
  readonly internal: boolean;
}

/** 'none': the region equals the slot as it is (KVM returns 0 and changes nothing). */
export type MemslotChange = 'create' | 'delete' | 'move' | 'flags-only' | 'none';

export interface MemslotLimits {
  /** KVM_CAP_NR_MEMSLOTS; KVM_USER_MEM_SLOTS is 32764 on x86. */
  maxSlots?: number;
  /** Guest physical address bits: gpa + size must not exceed 2^bits. Default 48. */
  maxGpaBits?: number;
  /** KVM_MEM_MAX_NR_PAGES: (1 << 31) - 1. */
  maxPagesPerSlot?: number;
  /** End of user space for access_ok (x86-64: 2^47). */
  maxUserspaceAddr?: number;
  /** KVM_CAP_READONLY_MEM. Default true. */
  readonlySupported?: boolean;
  /** stage2's KVM_MEM_EXIT_ON_MISSING (engine.ts). Default true; the kvm engine says false. */
  exitOnMissingSupported?: boolean;
}

export const KVM_USER_MEM_SLOTS = 32764;
export const KVM_MEM_MAX_NR_PAGES = 2 ** 31 - 1;

export interface MemslotApplyResult {
  set: MemslotSet;
  change: MemslotChange;
  old?: Memslot;
  new?: Memslot;
}

/** hva of a gfn inside a slot (__gfn_to_hva_memslot). */
export function gfnToHva(slot: Memslot, gfn: number): number {
  return slot.userspaceAddr + (gfn - slot.baseGfn) * PAGE_SIZE;
}

function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

function fail(rule: MemslotError['rule'], region: MemoryRegion, why: string): never {
  throw new MemslotError(
    rule,
    `KVM_SET_USER_MEMORY_REGION slot ${region.slot} (gpa ${hex(region.guestPhysAddr)}, size ${hex(region.memorySize)}, hva ${hex(region.userspaceAddr)}, flags ${hex(region.flags)}): ${why}`,
  );
}

export class MemslotSet {
  readonly generation: number;
  /** Sorted by baseGfn; slots never overlap. */
  readonly slots: readonly Memslot[];
  readonly limits: Readonly<Required<MemslotLimits>>;
  private readonly byId: ReadonlyMap<number, Memslot>;

  private constructor(generation: number, slots: Memslot[], limits: Required<MemslotLimits>) {
    this.generation = generation;
    this.slots = Object.freeze(slots);
    this.limits = limits;
    this.byId = new Map(slots.map((s) => [s.id, s]));
    Object.freeze(this);
  }

  static empty(limits: MemslotLimits = {}): MemslotSet {
    return new MemslotSet(
      0,
      [],
      Object.freeze({
        maxSlots: limits.maxSlots ?? KVM_USER_MEM_SLOTS,
        maxGpaBits: limits.maxGpaBits ?? 48,
        maxPagesPerSlot: limits.maxPagesPerSlot ?? KVM_MEM_MAX_NR_PAGES,
        maxUserspaceAddr: limits.maxUserspaceAddr ?? 2 ** 47,
        readonlySupported: limits.readonlySupported ?? true,
        exitOnMissingSupported: limits.exitOnMissingSupported ?? true,
      }),
    );
  }

  bySlot(id: number): Memslot | undefined {
    return this.byId.get(id);
  }

  /** The slot containing gfn (binary search over baseGfn). */
  findByGfn(gfn: number): Memslot | undefined {
    const slots = this.slots;
    let lo = 0;
    let hi = slots.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const s = slots[mid]!;
      if (gfn < s.baseGfn) hi = mid - 1;
      else if (gfn >= s.baseGfn + s.npages) lo = mid + 1;
      else return s;
    }
    return undefined;
  }

  /** __kvm_set_memory_region: validate, classify, and build the next set. Throws MemslotError. */
  apply(region: MemoryRegion, opts: { internal?: boolean } = {}): MemslotApplyResult {
    const lim = this.limits;
    const { slot: id, flags, guestPhysAddr: gpa, memorySize: size, userspaceAddr: hva } = region;
    const validFlags = KVM_MEM_LOG_DIRTY_PAGES | (lim.readonlySupported ? KVM_MEM_READONLY : 0) | (lim.exitOnMissingSupported ? KVM_MEM_EXIT_ON_MISSING : 0);
    if (!Number.isInteger(flags) || flags < 0 || (flags & ~validFlags) !== 0) {
      fail('flags', region, `flags ${hex(flags)} outside the valid set ${hex(validFlags)}`);
    }
    if (!Number.isSafeInteger(size) || size < 0) fail('size', region, `memorySize ${size} is not a non-negative integer`);
    if (size % PAGE_SIZE !== 0) fail('alignment', region, `memorySize ${hex(size)} is not a multiple of ${PAGE_SIZE}`);
    if (!Number.isSafeInteger(gpa) || gpa < 0) fail('size', region, `guestPhysAddr ${gpa} is not a non-negative integer`);
    if (gpa % PAGE_SIZE !== 0) fail('alignment', region, `guestPhysAddr ${hex(gpa)} is not ${PAGE_SIZE}-aligned`);
    if (!Number.isSafeInteger(hva) || hva < 0) fail('hva', region, `userspaceAddr ${hva} is not a non-negative integer`);
    if (hva % PAGE_SIZE !== 0) fail('alignment', region, `userspaceAddr ${hex(hva)} is not ${PAGE_SIZE}-aligned`);
    if (hva + size > lim.maxUserspaceAddr) fail('hva', region, `userspaceAddr + memorySize ${hex(hva + size)} is beyond user space (${hex(lim.maxUserspaceAddr)})`);
    if (!Number.isInteger(id) || id < 0 || id >= lim.maxSlots) fail('slot', region, `slot id must be in [0, ${lim.maxSlots})`);
    if (!Number.isSafeInteger(gpa + size)) fail('size', region, `guestPhysAddr + memorySize overflows`);
    const npages = size / PAGE_SIZE;
    if (npages > lim.maxPagesPerSlot) fail('size', region, `${npages} pages is more than ${lim.maxPagesPerSlot} per slot`);

    const old = this.byId.get(id);
    if (size === 0) {
      if (!old) fail('unknown-slot', region, `memorySize 0 deletes a slot, but slot ${id} does not exist (a new slot needs a non-zero size)`);
      return { set: this.next(this.slots.filter((s) => s.id !== id)), change: 'delete', old };
    }

    const baseGfn = gpa / PAGE_SIZE;
    let change: MemslotChange;
    if (!old) {
      change = 'create';
    } else {
      if (hva !== old.userspaceAddr) fail('hva', region, `cannot change userspaceAddr of slot ${id} from ${hex(old.userspaceAddr)}; delete and recreate it`);
      if (npages !== old.npages) fail('size', region, `cannot change the size of slot ${id} from ${old.npages} pages to ${npages}; delete and recreate it`);
      if (((flags ^ old.flags) & KVM_MEM_READONLY) !== 0) fail('flags', region, `cannot toggle KVM_MEM_READONLY on existing slot ${id}`);
      if (baseGfn !== old.baseGfn) change = 'move';
      else if (flags !== old.flags) change = 'flags-only';
      else return { set: this, change: 'none', old, new: old };
    }
    if (change === 'create' || change === 'move') {
      const end = baseGfn + npages;
      for (const s of this.slots) {
        if (s.id !== id && s.baseGfn < end && baseGfn < s.baseGfn + s.npages) {
          fail('overlap', region, `gfns [${hex(baseGfn)}, ${hex(end)}) overlap slot ${s.id} at gfns [${hex(s.baseGfn)}, ${hex(s.baseGfn + s.npages)}) (EEXIST)`);
        }
      }
    }
    const maxGpa = 2 ** lim.maxGpaBits;
    if (gpa + size > maxGpa) fail('size', region, `guestPhysAddr + memorySize ${hex(gpa + size)} exceeds the ${lim.maxGpaBits}-bit guest physical address space`);

    const slot: Memslot = Object.freeze({ id, baseGfn, npages, userspaceAddr: hva, flags, internal: opts.internal ?? old?.internal ?? false });
    const rest = old ? this.slots.filter((s) => s.id !== id) : this.slots.slice();
    rest.push(slot);
    rest.sort((a, b) => a.baseGfn - b.baseGfn);
    const result: MemslotApplyResult = { set: this.next(rest), change, new: slot };
    if (old) result.old = old;
    return result;
  }

  private next(slots: Memslot[]): MemslotSet {
    return new MemslotSet(this.generation + 1, slots, this.limits);
  }

  /** engine.ts shape, in guest-physical order. */
  toInfo(): MemslotInfo[] {
    return this.slots.map(memslotInfo);
  }
}

/** One memslot in engine.ts's shape. */
export function memslotInfo(s: Memslot): MemslotInfo {
  return {
    slot: s.id,
    flags: s.flags,
    guestPhysAddr: s.baseGfn * PAGE_SIZE,
    memorySize: s.npages * PAGE_SIZE,
    userspaceAddr: s.userspaceAddr,
    pages: s.npages,
    internal: s.internal,
  };
}
