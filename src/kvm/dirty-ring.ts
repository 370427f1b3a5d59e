// Harvesting a vCPU's dirty ring (struct kvm_dirty_gfn[], mmapped from the vCPU fd at
// KVM_DIRTY_LOG_PAGE_OFFSET), with the flag protocol of Documentation/virt/kvm/api.rst
// (KVM_CAP_DIRTY_LOG_RING) and tools/testing/selftests/kvm/dirty_log_test.c:
//   the kernel fills entries in order and publishes each by setting KVM_DIRTY_GFN_F_DIRTY
//   (with release semantics under _ACQ_REL); userspace reads the flags with acquire semantics,
//   collects slot/offset, sets KVM_DIRTY_GFN_F_RESET, and after collecting calls
//   KVM_RESET_DIRTY_RINGS so the kernel write-protects those pages again and reuses the slots.
//
// Concurrency: the kernel writes entries (for the vCPU, while it runs); only the VMM thread
// reads them and writes flags. Atomics.load / Atomics.store give the acquire/release ordering on
// the flags word (seq_cst is stronger). `fetchIndex` is private to the VMM thread.
import type { DirtyGfn } from '../vmm/engine.ts';
import { DIRTY_GFN_BYTES, KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET } from './abi.ts';

export class DirtyRing {
  private readonly words: Int32Array;
  private readonly entries: number;
  private fetchIndex = 0;

  constructor(mapping: SharedArrayBuffer) {
    this.words = new Int32Array(mapping);
    this.entries = mapping.byteLength / DIRTY_GFN_BYTES;
  }

  /** Collect every published entry into `out`, marking each for reset. Returns how many. */
  collect(out: DirtyGfn[]): number {
    let n = 0;
    for (;;) {
      const w = (this.fetchIndex % this.entries) * 4; // 4 int32 words per entry
      const flags = Atomics.load(this.words, w);
      if ((flags & KVM_DIRTY_GFN_F_DIRTY) === 0) break;
      const slot = this.words[w + 1]! >>> 0;
      const offset = (this.words[w + 2]! >>> 0) + (this.words[w + 3]! >>> 0) * 2 ** 32;
      out.push({ slot: slot & 0xffff, offset });
      Atomics.store(this.words, w, KVM_DIRTY_GFN_F_RESET);
      this.fetchIndex++;
      n++;
    }
    return n;
  }
}
