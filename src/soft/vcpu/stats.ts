// Per-vCPU counters in shared memory (KVM's per-vCPU binary stats).
//
// One Float64Array over a SharedArrayBuffer, STATS_STRIDE slots per vCPU (plus one line for the
// VMM thread, index `vcpus`). Each line is written only by its own thread with plain stores;
// the VMM sums all lines when asked (values may be a few increments behind while vCPUs run,
// exact once they are stopped).

export const S_TLB_MISSES = 0;
export const S_FAULTS = 1; // user_mem_abort calls
export const S_WP_FAULTS = 2; // write faults on a present, write-protected leaf
export const S_FAST_RELAX = 3; // resolved by relaxing permissions in place (fast path)
export const S_SPLITS = 4; // huge mappings split by a fault (block -> table)
export const S_RETRIES = 5; // faults retried (invalidation race, memslot change, EAGAIN)
export const S_MAPPED_4K = 6; // leaves installed, by size
export const S_MAPPED_2M = 7;
export const S_MAPPED_1G = 8;
export const S_MMIO_EXITS = 9;
export const S_TLB_FLUSHES = 10; // TLB invalidations done by this vCPU (acknowledged requests)
export const S_REMOTE_FLUSHES = 11; // kvm_flush_remote_tlbs calls made by this thread
export const S_DIRTY_MARKS = 12; // mark_page_dirty calls
export const S_DEVICE_MAPS = 13; // leaves installed with the device attribute
export const S_NOTIFIER_INVALIDATIONS = 14; // mmu-notifier invalidations handled (VMM line)
export const S_WRITE_PROTECTED = 15; // pages write-protected by dirty logging (VMM line)
export const S_GUEST_PAGES_WRITTEN = 16; // pages the dirty-rate guest wrote (its own count, reported as it paces)
export const S_GUEST_TIMER_HALTS = 17; // times the dirty-rate guest halted until its timer (ahead of its rate)
export const STATS_STRIDE = 32;

export const STAT_NAMES: readonly string[] = [
  'tlbMisses',
  'faults',
  'writeProtectFaults',
  'fastPathRelaxes',
  'hugePageSplits',
  'faultRetries',
  'mapped4k',
  'mapped2m',
  'mapped1g',
  'mmioExits',
  'tlbFlushesAcked',
  'remoteTlbFlushes',
  'dirtyMarks',
  'deviceMappings',
  'notifierInvalidations',
  'pagesWriteProtected',
  'guestPagesWritten',
  'guestTimerHalts',
];

export class VcpuStats {
  private readonly a: Float64Array;
  private readonly off: number;

  constructor(sab: SharedArrayBuffer, line: number) {
    this.a = new Float64Array(sab);
    this.off = line * STATS_STRIDE;
  }

  add(stat: number, n: number): void {
    this.a[this.off + stat] = this.a[this.off + stat]! + n;
  }

  static newBuffer(lines: number): SharedArrayBuffer {
    return new SharedArrayBuffer(lines * STATS_STRIDE * 8);
  }

  /** One stat summed over every line. */
  static total(sab: SharedArrayBuffer, lines: number, stat: number): number {
    const a = new Float64Array(sab);
    let t = 0;
    for (let l = 0; l < lines; l++) t += a[l * STATS_STRIDE + stat]!;
    return t;
  }

  /** Sum of every line, by name. */
  static sum(sab: SharedArrayBuffer, lines: number): Record<string, number> {
    const a = new Float64Array(sab);
    const out: Record<string, number> = {};
    for (let s = 0; s < STATS_STRIDE; s++) {
      let t = 0;
      for (let l = 0; l < lines; l++) t += a[l * STATS_STRIDE + s]!;
      out[STAT_NAMES[s]!] = t;
    }
    return out;
  }
}
