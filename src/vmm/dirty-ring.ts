// The dirty ring's format and its collector, one for both engines (KVM_CAP_DIRTY_LOG_RING,
// Documentation/virt/kvm/api.rst; struct kvm_dirty_gfn in uapi/linux/kvm.h). The kvm engine's
// rings are the kernel's, mmapped from each vCPU fd; the soft engine's are SharedArrayBuffers in
// exactly this layout (soft/dirty/dirty-ring.ts), so one collector serves both.
//
// An entry is 16 bytes, four 32-bit words: flags, slot (as_id << 16 | slot id), offset low,
// offset high (the page index within the slot). The flag protocol:
//   producer (the vCPU, in its fault handler): fill slot and offset, then publish with
//     flags = DIRTY (a release store);
//   collector (the VMM thread): read flags with an acquire load; on DIRTY read slot and offset
//     and store flags = RESET; stop at the first entry that is not DIRTY (entries are published
//     in order);
//   reset (KVM_RESET_DIRTY_RINGS; the engine): from its reset index, every RESET entry is
//     write-protected again, its flags go back to 0 and the reset index moves past it, which
//     gives the slot back to the producer.
// A vCPU whose ring holds `entries - DIRTY_RING_RSVD_ENTRIES` unreset entries exits with
// DIRTY_RING_FULL before it runs on; the reserve absorbs what it dirties before it notices.
//
// Concurrency: the collector is one per ring and private to the VMM thread; Atomics.load /
// Atomics.store on the flags word give the acquire / release the protocol asks for (seq_cst is
// stronger).
import type { DirtyGfn } from './engine.ts';

export const DIRTY_GFN_BYTES = 16;
export const DIRTY_GFN_WORDS = 4;
export const KVM_DIRTY_GFN_F_DIRTY = 1;
export const KVM_DIRTY_GFN_F_RESET = 2;
/** Entries kept free past the soft limit (KVM_DIRTY_RING_RSVD_ENTRIES). */
export const DIRTY_RING_RSVD_ENTRIES = 64;
/** KVM's bounds on a ring: at least one page of entries, at most 64 Ki entries. */
export const DIRTY_RING_MIN_ENTRIES = 4096 / DIRTY_GFN_BYTES;
export const DIRTY_RING_MAX_ENTRIES = 65536;

/** Why `entries` cannot be a ring of an engine that offers at most `max`, or null if it can. */
export function dirtyRingSizeProblem(entries: number, max: number): string | null {
  if (!Number.isInteger(entries) || entries <= 0 || (entries & (entries - 1)) !== 0) return `dirtyRingEntries ${entries}: must be a power of two`;
  if (entries < DIRTY_RING_MIN_ENTRIES) return `dirtyRingEntries ${entries}: must be at least ${DIRTY_RING_MIN_ENTRIES} (one page of entries)`;
  if (entries > max) return `dirtyRingEntries ${entries}: this engine offers at most ${max} (KVM_CAP_DIRTY_LOG_RING)`;
  return null;
}

/** Collects one ring's published entries (the VMM side of the flag protocol). */
export class DirtyRingCollector {
  private fetchIndex = 0;

  /**
   * words: the whole ring (entries * 4 words) starting at word `base` of `words`; the kvm
   * engine's ring is its own mapping (base 0), the soft engine's rings share one buffer.
   */
  constructor(
    private readonly words: Int32Array,
    private readonly entries: number,
    /** The vCPU this ring belongs to (-1: none), named in every entry collected. */
    private readonly vcpu: number,
    private readonly base = 0,
  ) {}

  /** Collect every published entry into `out`, marking each for reset. Returns how many. */
  collect(out: DirtyGfn[]): number {
    const words = this.words;
    let n = 0;
    for (;;) {
      const w = this.base + (this.fetchIndex % this.entries) * DIRTY_GFN_WORDS;
      const flags = Atomics.load(words, w);
      if ((flags & KVM_DIRTY_GFN_F_DIRTY) === 0) break;
      const slot = words[w + 1]! >>> 0;
      const offset = (words[w + 2]! >>> 0) + (words[w + 3]! >>> 0) * 2 ** 32;
      out.push({ slot: slot & 0xffff, offset, vcpu: this.vcpu });
      Atomics.store(words, w, KVM_DIRTY_GFN_F_RESET);
      this.fetchIndex++;
      n++;
    }
    return n;
  }
}
