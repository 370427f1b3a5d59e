// Re-forming huge mappings once dirty logging stops (seed 004; issue 11 part 1). Logging split
// every written 2 MiB block into 512 4 KiB leaves; without this they stay split for the life of
// the VM (a failed or cancelled migration leaves the guest slower for good).
//
// Three strategies (HugeRecoveryStrategy):
//   'sync'     zap every split region of the slot under ONE exclusive hold of the MMU lock, in the
//              memslot ioctl itself; vCPUs re-fault 2 MiB blocks. The baseline that froze a 4 TB
//              guest for 13 s: every vCPU fault waits for the whole sweep.
//   'async'    the same zap from a background task with a per-memslot work list (the review in
//              seed 004), `batchRegions` regions per batch, yielding the VMM thread
//              (setImmediate) between batches. In 'parallel' lock mode under the READ lock
//              (pgtable/zap-table.ts: each 2 MiB entry cmpxchg'd from the table the scan saw to
//              LOCKED, one TLB flush, then invalid, the table retired through RCU; x86's tdp_mmu
//              zaps under mmu_lock held for read the same way): vCPU faults take the read lock
//              too, so they never wait for it. In 'global' / 'global-write' mode faults take the
//              write lock, so a read hold would stall them just the same: there it zaps under
//              the write lock, breaking the lock every batch so vCPU faults get in.
//   'in-place' (default) the work-list task again, but a region whose 512 leaves map one
//              contiguous, 2 MiB-aligned host huge page becomes a block directly
//              (Stage2PageTable.collapse: break-before-make by cmpxchg) under the READ lock:
//              faults run beside it and nothing is unmapped (Linux 6.13). Regions that cannot
//              (missing or foreign leaves) fall back to a zap in a short exclusive hold.
//
// Concurrency rules (all of this runs on the VMM thread; vCPUs fault concurrently):
// - A region is eligible when the current memslot generation allows a 2 MiB mapping there
//   (mapping-size.ts: inside the slot, gpa/hva congruent) and the host maps its start with a
//   2 MiB page (THP / hugetlb); in place additionally only when that host page's pfn is the
//   leaves' pfn0 (no stale frame can be mapped: the leaves are what the table already maps,
//   and they must be what the host maps now).
// - mmu_invalidate_retry: the host's notifier sequence and the VM's memslot invalidation
//   sequence are sampled before the host is asked and re-checked under the MMU lock; a batch
//   that raced an invalidation changes nothing and is retried.
// - Memslot deleted / moved / logging again: memslot changes run on this same thread, never in
//   the middle of a batch. Each batch first looks the slot up in the current generation and
//   drops the work item when the slot is gone, moved, resized, remapped or logging. A delete or
//   move has by then already unmapped the old range under the exclusive lock.
// - Teardown: cancel() (SoftVm.destroy, first thing) clears the work list and the pending
//   setImmediate; no batch can be running then (same thread, batches are synchronous).
// - Lock breaking: a batch holds the lock for at most `batchRegions` regions; between batches
//   the lock is free and the VMM thread yields to its event loop. Releasing is not enough on
//   its own: a vCPU asleep on the lock needs ~10-50 us to wake (more when it has to wait for a
//   CPU), and the next batch would take the lock again first (the lock is not fair; the sleeper
//   then sleeps again, up to the lock's 10 ms bound). So when threads slept on the lock as a
//   batch released it, the next batch waits (yielding the VMM thread) until that many more
//   fault-lock waits have been recorded (lock-stall.ts records a wait once the lock is taken:
//   they got in), or LOCK_BREAK_MS passed (spin_needbreak / cond_resched_rwlock_write).
import { KVM_MEM_LOG_DIRTY_PAGES } from '../../vmm/engine.ts';
import type { HostAddressSpace } from '../hostmm/host-address-space.ts';
import { GupResult } from '../hostmm/host-address-space.ts';
import type { HostMemory } from '../hostmem/host-memory.ts';
import type { MmuLock } from '../locking/mmu-lock.ts';
import { chooseMappingLevel } from '../mmu/mapping-size.ts';
import type { MemslotInvalidation } from '../mmu/memslot-inval.ts';
import type { SlotDesc } from '../mmu/slot-table.ts';
import { EAGAIN, OK, type Stage2PageTable } from '../pgtable/stage2.ts';
import { scanSplitRegions, type SplitRegion } from './collapse-scan.ts';
import { linuxThreadId, readThreadSched, type ThreadSched } from '../../util/thread-sched.ts';

export const HUGE_RECOVERY_STRATEGIES = ['sync', 'async', 'in-place'] as const;
export type HugeRecoveryStrategy = (typeof HUGE_RECOVERY_STRATEGIES)[number];

const REGION_PAGES = 512;
/** Default lock break: regions per batch (each up to a 2 MiB zap or collapse with its TLB flush). */
export const DEFAULT_RECOVERY_BATCH = 8;
/** async: a batch's exclusive hold ends after the region that passes this (ms). */
const HOLD_BUDGET_MS = 0.2;
/** Longest the task defers its next batch for threads waiting on the MMU lock. */
const LOCK_BREAK_MS = 2;
/** A batch that keeps losing races (EAGAIN) is retried this often before its regions are skipped. */
const MAX_BATCH_RETRIES = 64;

export class HugeRecoveryError extends Error {
  override name = 'HugeRecoveryError';
}

/** What recovery needs from the VM (SoftVm provides it). */
export interface RecoveryHost {
  readonly lock: MmuLock;
  readonly pgt: Stage2PageTable;
  readonly mm: HostAddressSpace;
  readonly mem: HostMemory;
  readonly inval: MemslotInvalidation;
  /** The slot as the current memslot generation holds it. */
  currentSlot(id: number): SlotDesc | undefined;
  /** kvm_flush_remote_tlbs: async / in-place zaps flush after dropping the lock (see header). */
  flushRemoteTlbs?(): void;
}

export interface HugeRecoveryStats {
  /** Regions made a block in place (in-place). */
  collapsedInPlace: number;
  /** Regions zapped so vCPUs re-fault a block (sync, async, in-place's fallback). */
  zapped: number;
  /** Lock holds (batches) taken. */
  batches: number;
  /** Longest single lock hold, seconds. */
  maxHoldSeconds: number;
  /** Work items dropped because their memslot was deleted, moved or logs again. */
  droppedItems: number;
  /** Batches that raced an invalidation or a fault and were retried. */
  retries: number;
  /** async under the read lock: regions a fault changed between the scan and the zap (left alone). */
  zapLostRaces: number;
  /**
   * Holds longer than 1 ms, and (with `schedDiagnostics`) what the VMM thread did meanwhile:
   * seconds on a CPU and seconds runnable but waiting for one (preempted), summed over them.
   */
  longHolds: number;
  longHoldSeconds: number;
  longHoldOnCpuSeconds: number;
  longHoldRunQueueSeconds: number;
}

interface WorkItem {
  slot: number;
  baseGfn: number;
  npages: number;
  hva: number;
  /** Next region to look at (gfn, 512-aligned). */
  cursor: number;
  retries: number;
}

export class HugePageRecovery {
  strategy: HugeRecoveryStrategy = 'in-place';
  batchRegions = DEFAULT_RECOVERY_BATCH;
  readonly stats: HugeRecoveryStats = { collapsedInPlace: 0, zapped: 0, batches: 0, maxHoldSeconds: 0, droppedItems: 0, retries: 0, zapLostRaces: 0, longHolds: 0, longHoldSeconds: 0, longHoldOnCpuSeconds: 0, longHoldRunQueueSeconds: 0 };
  /**
   * Benchmarks: read this thread's scheduler accounting around every hold (a few us each, off
   * the lock) so a long hold can be told apart as preemption (run queue) or work (on CPU).
   */
  schedDiagnostics = false;
  private schedBefore: ThreadSched | null = null;
  private tid = 0;
  /** Per-memslot work list (slot id -> what is left); insertion order is processing order. */
  private readonly work = new Map<number, WorkItem>();
  private pending: ReturnType<typeof setImmediate> | null = null;
  private cancelled = false;
  private idleWaiters: (() => void)[] = [];
  private readonly gup = new GupResult();
  /** Until then (performance.now()), the next batch waits for the lock's sleepers to get in... */
  private breakUntil = 0;
  /** ...that is, until the recorded fault-lock waits reach this many. */
  private breakWaits = 0;
  /** Test hook: called before each batch of the background task (races with memslot changes). */
  beforeBatch: ((slot: number, cursor: number) => void) | undefined;

  constructor(private readonly host: RecoveryHost) {}

  /** Work left in the list (regions not yet looked at). */
  get pendingRegions(): number {
    let n = 0;
    for (const w of this.work.values()) n += Math.max(0, (w.baseGfn + w.npages - w.cursor) / REGION_PAGES);
    return Math.ceil(n);
  }

  get busy(): boolean {
    return this.work.size > 0;
  }

  /**
   * Logging just stopped on `slot` (after the generation without its bitmap is published and
   * old readers are gone): re-form its huge mappings with the current strategy. 'sync' returns
   * when done; the others queue the slot (replacing an older item for it) and return at once.
   */
  loggingStopped(slot: SlotDesc): void {
    if (this.cancelled) return;
    const first = alignUp(slot.baseGfn, REGION_PAGES);
    const item: WorkItem = { slot: slot.slot, baseGfn: slot.baseGfn, npages: slot.npages, hva: slot.hva, cursor: first, retries: 0 };
    if (this.strategy === 'sync') {
      this.work.delete(slot.slot);
      this.runSync(item);
      return;
    }
    this.work.set(slot.slot, item);
    this.schedule();
  }

  /** Resolves once the work list is empty (or recovery was cancelled). */
  idle(): Promise<void> {
    if (this.work.size === 0 || this.cancelled) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  /** VM teardown: drop every work item and the pending task. Idempotent. */
  cancel(): void {
    this.cancelled = true;
    if (this.pending !== null) clearImmediate(this.pending);
    this.pending = null;
    this.work.clear();
    this.wakeIdle();
  }

  // ---- the background task ----

  private schedule(): void {
    if (this.pending !== null || this.cancelled || this.work.size === 0) return;
    this.pending = setImmediate(() => {
      this.pending = null;
      if (performance.now() < this.breakUntil && (this.host.lock.stalls?.totalWaits() ?? Infinity) < this.breakWaits) {
        this.schedule();
        return;
      }
      this.step();
      if (this.work.size === 0) this.wakeIdle();
      else this.schedule();
    });
  }

  private wakeIdle(): void {
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const r of w) r();
  }

  /** One batch of the first work item. */
  private step(): void {
    const item = this.work.values().next().value as WorkItem | undefined;
    if (item === undefined || this.cancelled) return;
    this.beforeBatch?.(item.slot, item.cursor);
    if (this.cancelled || this.work.get(item.slot) !== item) return;
    const slot = this.validSlot(item);
    if (slot === null) {
      this.work.delete(item.slot);
      this.stats.droppedItems++;
      return;
    }
    const end = slotEndRegion(item);
    const hi = Math.min(end, item.cursor + this.batchRegions * REGION_PAGES);
    if (item.cursor >= hi) {
      this.work.delete(item.slot);
      return;
    }
    const reached =
      this.strategy !== 'async'
        ? this.inPlaceBatch(slot, item.cursor, hi)
          ? hi
          : -1
        : this.host.lock.faultShared
          ? this.zapBatchShared(slot, item.cursor, hi)
          : this.zapBatch(slot, item.cursor, hi);
    if (reached >= 0 || ++item.retries > MAX_BATCH_RETRIES) {
      item.cursor = reached >= 0 ? reached : hi;
      item.retries = 0;
      if (item.cursor >= end) this.work.delete(item.slot);
    } else {
      this.stats.retries++;
    }
  }

  /** The slot as the current generation holds it, if the item still describes it; else null. */
  private validSlot(item: WorkItem): SlotDesc | null {
    const s = this.host.currentSlot(item.slot);
    if (s === undefined) return null;
    if (s.baseGfn !== item.baseGfn || s.npages !== item.npages || s.hva !== item.hva) return null;
    if ((s.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0 || s.dirtyBitmap !== null) return null;
    return s;
  }

  // ---- the strategies ----

  private runSync(item: WorkItem): void {
    const h = this.host;
    const slot = h.currentSlot(item.slot);
    if (slot === undefined) return;
    const end = slotEndRegion(item);
    if (item.cursor >= end) return;
    this.beforeHold();
    const t0 = performance.now();
    h.lock.exclusiveLock();
    try {
      // Exclusive: nothing changes the table or the host mappings meanwhile (the notifier unmaps
      // under this same lock), so scanning under it is exact.
      const regions = scanSplitRegions(h.pgt, item.cursor, end - item.cursor);
      this.zapRuns(regions.filter((r) => this.eligible(slot, r, false)));
    } finally {
      h.lock.exclusiveUnlock();
      this.countHold(t0);
    }
  }

  /**
   * The split regions of [lo, hi) eligible for a zap, with the host's and the memslots'
   * invalidation sequences sampled before the eligibility check (the hold re-checks them), or
   * null when there is nothing to zap.
   */
  private zapCandidates(slot: SlotDesc, lo: number, hi: number): { zap: SplitRegion[]; hostSeq: number; slotSeq: number } | null {
    const h = this.host;
    const regions = scanSplitRegions(h.pgt, lo, hi - lo);
    if (regions.length === 0) return null;
    const hostSeq = h.mm.notifierSeq();
    const slotSeq = h.inval.seq();
    const zap = regions.filter((r) => this.eligible(slot, r, false));
    return zap.length === 0 ? null : { zap, hostSeq, slotSeq };
  }

  /**
   * async: zap the eligible split regions of [lo, hi) in one short exclusive hold, which ends
   * early once it passed HOLD_BUDGET_MS (need_resched: the next batch resumes there). The TLB
   * flush follows the unlock (see the file header). Returns the gfn reached, or -1 to retry.
   */
  private zapBatch(slot: SlotDesc, lo: number, hi: number): number {
    const h = this.host;
    const c = this.zapCandidates(slot, lo, hi);
    if (c === null) return hi;
    const { zap, hostSeq, slotSeq } = c;
    this.beforeHold();
    const t0 = performance.now();
    let flush = false;
    h.lock.exclusiveLock();
    try {
      if (h.mm.retryNeeded(hostSeq) || h.inval.retryNeeded(slotSeq)) return -1;
      if (h.flushRemoteTlbs === undefined) {
        this.zapRuns(zap);
        return hi;
      }
      const deadline = performance.now() + HOLD_BUDGET_MS;
      for (let i = 0; i < zap.length; i++) {
        const r = zap[i]!;
        flush = h.pgt.unmapFlushDeferred(r.gfn, REGION_PAGES) || flush;
        this.stats.zapped++;
        if (i + 1 < zap.length && performance.now() > deadline) return r.gfn + REGION_PAGES;
      }
      return hi;
    } finally {
      h.lock.exclusiveUnlock();
      this.countHold(t0);
      if (flush) h.flushRemoteTlbs!();
    }
  }

  /**
   * async in 'parallel' lock mode: zap the eligible split regions of [lo, hi) under the READ
   * lock (Stage2PageTable.zapTablesShared; its file states why racing faults, the lockless
   * write-protect fast path and RCU walkers are safe). Faults take the read lock too, so none
   * waits for this hold; a region a fault changed since the scan (collapsed it, typically) is
   * left alone. The TLB flush is inside the hold, between break and make (it waits only for
   * vCPUs in guest mode, which never wait on this lock). Returns the gfn reached, or -1 to retry.
   */
  private zapBatchShared(slot: SlotDesc, lo: number, hi: number): number {
    const h = this.host;
    const c = this.zapCandidates(slot, lo, hi);
    if (c === null) return hi;
    const { zap, hostSeq, slotSeq } = c;
    this.beforeHold();
    const t0 = performance.now();
    h.lock.rw.readLock();
    try {
      // A notifier or memslot invalidation since the eligibility check: look again (a zap is
      // always safe, but eligibility, the host's 2 MiB page, may have changed).
      if (h.mm.retryNeeded(hostSeq) || h.inval.retryNeeded(slotSeq)) return -1;
      const n = h.pgt.zapTablesShared(zap);
      this.stats.zapped += n;
      this.stats.zapLostRaces += zap.length - n;
      return hi;
    } finally {
      h.lock.rw.readUnlock();
      this.countHold(t0);
      h.pgt.reclaim();
    }
  }

  /** in-place: collapse the uniform eligible regions under the read lock; zap the rest. */
  private inPlaceBatch(slot: SlotDesc, lo: number, hi: number): boolean {
    const h = this.host;
    const regions = scanSplitRegions(h.pgt, lo, hi - lo);
    if (regions.length === 0) return true;
    const hostSeq = h.mm.notifierSeq();
    const slotSeq = h.inval.seq();
    const collapse: SplitRegion[] = [];
    const zap: SplitRegion[] = [];
    for (const r of regions) {
      if (r.pfn0 >= 0 && this.eligible(slot, r, true)) collapse.push(r);
      else if (this.eligible(slot, r, false)) zap.push(r);
    }
    let ok = true;
    if (collapse.length > 0) {
      this.beforeHold();
      const t0 = performance.now();
      h.lock.rw.readLock();
      try {
        if (h.mm.retryNeeded(hostSeq) || h.inval.retryNeeded(slotSeq)) {
          ok = false;
        } else {
          for (const r of collapse) {
            const rc = h.pgt.collapse(r.gfn, 2, r.pfn0, r.prot, true);
            if (rc === OK) {
              if (h.pgt.lastMapChanged) this.stats.collapsedInPlace++;
            } else if (rc === EAGAIN) {
              ok = false; // a fault or the fast path changed it meanwhile: look again
            } else {
              throw new HugeRecoveryError(`collapse of gfn ${r.gfn} failed: ${rc}`);
            }
          }
        }
      } finally {
        h.lock.rw.readUnlock();
        this.countHold(t0);
      }
      // Deferred frees of the collapsed tables (the exclusive unlock path does this for zaps).
      h.pgt.reclaim();
    }
    if (zap.length > 0 && ok) {
      this.beforeHold();
      const t0 = performance.now();
      let flush = false;
      h.lock.exclusiveLock();
      try {
        if (h.mm.retryNeeded(hostSeq) || h.inval.retryNeeded(slotSeq)) ok = false;
        else flush = this.zapRuns(zap, h.flushRemoteTlbs !== undefined);
      } finally {
        h.lock.exclusiveUnlock();
        this.countHold(t0);
        if (flush) h.flushRemoteTlbs!();
      }
    }
    return ok;
  }

  /**
   * May region r be mapped by one 2 MiB block now? The memslot allows it and the host maps the
   * region's start with a 2 MiB page; `exact`: and that page is the leaves' pfn0.
   */
  private eligible(slot: SlotDesc, r: SplitRegion, exact: boolean): boolean {
    if (r.firstPfn < 0) return false;
    const h = this.host;
    if (chooseMappingLevel(slot, r.gfn, 1) !== 2) return false;
    const hva = slot.hva + (r.gfn - slot.baseGfn) * 4096;
    // Only a populated host page is asked about (getUserPage would allocate a missing one).
    if (h.mm.lookupPfn(hva) < 0) return false;
    const gup = this.gup;
    const pfn = h.mm.getUserPage(hva, false, gup);
    if (pfn < 0) return false;
    if (gup.refcounted) h.mem.releasePfn(pfn);
    if (gup.level !== 1) return false;
    return exact ? pfn === r.pfn0 : true;
  }

  /**
   * Unmap the regions (exclusive lock held), one unmap per contiguous run. Without `defer`, each
   * unmap flushes TLBs under the lock; with it, none does and the return value says whether the
   * caller must flush once after dropping the lock (before anything else on this thread runs).
   */
  private zapRuns(regions: SplitRegion[], defer = false): boolean {
    const pgt = this.host.pgt;
    let flush = false;
    let i = 0;
    while (i < regions.length) {
      let j = i + 1;
      while (j < regions.length && regions[j]!.gfn === regions[j - 1]!.gfn + REGION_PAGES) j++;
      if (defer) flush = pgt.unmapFlushDeferred(regions[i]!.gfn, (j - i) * REGION_PAGES) || flush;
      else pgt.unmap(regions[i]!.gfn, (j - i) * REGION_PAGES);
      this.stats.zapped += j - i;
      i = j;
    }
    return flush;
  }

  /** Called before a hold's lock is taken (diagnostics only). */
  private beforeHold(): void {
    if (!this.schedDiagnostics) return;
    if (this.tid === 0) this.tid = linuxThreadId();
    this.schedBefore = readThreadSched(this.tid);
  }

  private countHold(t0: number): void {
    this.stats.batches++;
    const t1 = performance.now();
    if (t1 - t0 > 1) {
      const st = this.stats;
      st.longHolds++;
      st.longHoldSeconds += (t1 - t0) / 1000;
      const a = this.schedBefore;
      const b = a ? readThreadSched(this.tid) : null;
      if (a && b) {
        st.longHoldOnCpuSeconds += (b.onCpuNs - a.onCpuNs) / 1e9;
        st.longHoldRunQueueSeconds += (b.runQueueNs - a.runQueueNs) / 1e9;
      }
    }
    const sleepers = this.host.lock.rw.rawState().waiters;
    this.breakUntil = sleepers > 0 ? t1 + LOCK_BREAK_MS : 0;
    this.breakWaits = sleepers > 0 ? (this.host.lock.stalls?.totalWaits() ?? 0) + sleepers : 0;
    const s = (t1 - t0) / 1000;
    if (s > this.stats.maxHoldSeconds) this.stats.maxHoldSeconds = s;
  }
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** The end of the last whole region inside the item's slot. */
function slotEndRegion(item: WorkItem): number {
  return Math.floor((item.baseGfn + item.npages) / REGION_PAGES) * REGION_PAGES;
}
