// How the soft engine's dirty-log sweeps are cut up and what enabling logging does
// (issue 11 parts 2-4). Plain values, fixed per VM between calls; read by dirty-log.ts and
// dirty-ring.ts on the VMM thread only.
//
//   sweepChunkPages       a write-protect / clear / ring-reset sweep drops the MMU lock after
//                         this many pages (cond_resched_rwlock_write; lock-break.ts).
//   eagerSplitChunkPages  0: off (arm64's default; blocks are protected whole and split on the
//                         first write fault). Else enabling logging splits every block of the
//                         slot, this many pages per lock hold (KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE;
//                         x86's eager_page_split splits too, under the read lock).
//   initiallySet          KVM_DIRTY_LOG_INITIALLY_SET (with manual protect, bitmap VMs): enabling
//                         logging sets every bit and protects nothing; clears protect.

export interface DirtyLogTuning {
  sweepChunkPages: number;
  eagerSplitChunkPages: number;
  initiallySet: boolean;
}

/**
 * 4096 pages (16 MiB) per hold: a clear of a fully dirty 1 GiB slot of 4 KiB leaves took
 * 18-38 ms here (~70-150 ns a page, bench dirty-log -b 1G), so a hold is ~0.3-0.6 ms of work;
 * longer holds seen on this shared box are the VMM thread waiting for a CPU.
 */
export const DEFAULT_SWEEP_CHUNK_PAGES = 4096;
/** `--eager-split` without a size: 2 MiB, the smallest block arm64 accepts as a chunk size. */
export const DEFAULT_EAGER_SPLIT_CHUNK_BYTES = 2 * 2 ** 20;

export const DEFAULT_DIRTY_TUNING: Readonly<DirtyLogTuning> = Object.freeze({
  sweepChunkPages: DEFAULT_SWEEP_CHUNK_PAGES,
  eagerSplitChunkPages: 0,
  initiallySet: false,
});

export class DirtyTuningError extends Error {
  override name = 'DirtyTuningError';
}

/** An eager split chunk in bytes -> pages: a power of two from 2 MiB to 1 GiB (block sizes). */
export function eagerSplitChunkPages(bytes: number): number {
  if (!Number.isInteger(bytes) || bytes < 2 ** 21 || bytes > 2 ** 30 || (bytes & (bytes - 1)) !== 0) {
    throw new DirtyTuningError(`eager split chunk ${bytes} bytes: must be a power of two from 2 MiB to 1 GiB`);
  }
  return bytes / 4096;
}

export function checkSweepChunk(pages: number): number {
  if (!Number.isInteger(pages) || pages < 32) throw new DirtyTuningError(`sweep chunk of ${pages} pages: must be an integer of at least 32 (one bitmap word)`);
  return pages;
}
