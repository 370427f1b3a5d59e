// Breaking a long exclusive hold of the MMU lock (cond_resched_rwlock_write, the yield in
// tdp_mmu.c's tdp_mmu_iter_cond_resched and arm64's stage2 split loop): a sweep over a whole
// memslot (write-protecting it when logging starts, eager split, clearing the dirty log, a
// dirty-ring reset) takes the lock for one chunk at a time and lets waiting vCPUs in between.
//
// Runs on the VMM thread only, inside one synchronous memslot or dirty-log call. Concurrency:
// - The caller holds the lock exclusively when it calls relax(); relax() drops it, may wait, and
//   takes it again before returning. Anything the caller learnt under the lock may be stale
//   afterwards: every sweep here works on gfn ranges and re-walks the table for each chunk, so
//   it never carries a table pointer or a PTE value across relax().
// - A TLB flush the chunks made necessary is NOT done at a break (KVM's wrprot_gfn_range and
//   clear_dirty_gfn_range yield with flush=false too); the sweep's caller flushes once at the
//   end, before it returns. Why that is safe is specific to each sweep (dirty/dirty-log.ts,
//   dirty/dirty-ring.ts); the common reason: only the VMM thread sweeps or harvests, and it is
//   busy in this call, so nobody can act on a protected-but-unflushed PTE before the flush.
// - Handing the lock over: releasing alone is not enough. A vCPU asleep on the lock needs tens
//   of microseconds to wake (more when it waits for a CPU), and the lock is not fair: the next
//   chunk would take it first and the sleeper would sleep on (up to the lock's 10 ms bound). So
//   when threads sleep on the lock at the break, relax() waits (Atomics.wait on a private word:
//   the CPU goes to the vCPUs) until the fault-side stall recorder (lock-stall.ts) counted that
//   many more waits, i.e. they got the lock, or HANDOFF_MAX_MS passed.
import type { MmuLock } from './mmu-lock.ts';

/** Longest relax() waits for sleepers to take the lock. */
const HANDOFF_MAX_MS = 1;
/** Each sleep of the VMM thread while it hands the lock over. */
const HANDOFF_NAP_MS = 0.02;

export interface LockBreakStats {
  /** Times the lock was dropped between chunks. */
  breaks: number;
  /** Breaks at which vCPUs were asleep on the lock (a hand-off). */
  handoffs: number;
  /** Longest single exclusive hold of a sweep (seconds). */
  maxHoldSeconds: number;
}

export function newLockBreakStats(): LockBreakStats {
  return { breaks: 0, handoffs: 0, maxHoldSeconds: 0 };
}

const napWord = new Int32Array(new SharedArrayBuffer(4));

/** One sweep's exclusive hold, broken into chunks. */
export class ExclusiveSweep {
  private t0 = 0;

  constructor(
    private readonly lock: MmuLock,
    private readonly stats: LockBreakStats,
  ) {}

  /** Take the lock for the first chunk. */
  take(): void {
    this.lock.exclusiveLock();
    this.t0 = performance.now();
  }

  /** Drop it after the last chunk. */
  release(): void {
    this.noteHold();
    this.lock.exclusiveUnlock();
  }

  /** Between chunks: drop the lock, let sleepers in, take it again. */
  relax(): void {
    const lock = this.lock;
    this.noteHold();
    const sleepers = lock.rw.rawState().waiters;
    const seen = sleepers > 0 ? (lock.stalls?.totalWaits() ?? 0) : 0;
    lock.exclusiveUnlock();
    this.stats.breaks++;
    if (sleepers > 0 && lock.stalls !== null) {
      this.stats.handoffs++;
      const until = performance.now() + HANDOFF_MAX_MS;
      while (lock.stalls.totalWaits() < seen + sleepers && performance.now() < until) Atomics.wait(napWord, 0, 0, HANDOFF_NAP_MS);
    }
    lock.exclusiveLock();
    this.t0 = performance.now();
  }

  private noteHold(): void {
    const s = (performance.now() - this.t0) / 1000;
    if (s > this.stats.maxHoldSeconds) this.stats.maxHoldSeconds = s;
  }
}
