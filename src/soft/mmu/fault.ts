// The stage-2 fault handler (arm64 user_mem_abort + x86 fast_page_fault), run by the faulting
// vCPU's own thread (tests may run it on the VMM thread).
//
// Concurrency rules:
// - The memslot generation is read under this thread's SRCU-like reader (slot-table.ts) for the
//   whole fault, so the slot, its hva and its dirty bitmap stay one consistent generation.
// - Two invalidation sequences are sampled BEFORE the pfn is resolved and re-checked under the
//   MMU lock before anything is installed (mmu_invalidate_retry): the host's mmu-notifier
//   sequence (munmap) and this VM's memslot sequence (delete/move, see memslot-inval.ts). A
//   fault that raced either drops its page reference and retries from the slot lookup.
// - Two kinds of fault, and the lock each takes in each mode (locking/mmu-lock.ts):
//     RELAX: a write to a present, write-protected 4 KiB RAM leaf in a host-writable slot. The
//            only change is W added by cmpxchg (tryFastPath, fastWrite). 'global-write': under
//            the write lock. 'global': under the READ lock, so relaxes run in parallel with each
//            other (hence the cmpxchg: two relaxes of one entry, one wins, the loser retries or
//            finds W set) but never with a MAP fault or an exclusive holder. 'parallel': the
//            vCPU's fast path takes no MMU lock at all (fastWriteLockless, x86's
//            fast_page_fault; see the last rule); handle()'s tryFastPath takes the read lock.
//     MAP:   everything else (install, split, collapse, remap; install()). Under
//            mmuLock.faultLock(): the write lock in 'global-write' and 'global' mode (plain
//            stores: nothing else changes entries then; a RELAX holds the read lock, which the
//            write lock excludes), the read lock in 'parallel' mode (cmpxchg / break-before-make
//            inside Stage2PageTable, which returns EAGAIN on a lost race: the fault is simply
//            retried).
// - Dirty logging goes through this thread's DirtySink (dirty/dirty-sink.ts): the memslot's
//   bitmap, or the vCPU's dirty ring (dirty/dirty-ring.ts, where the same argument is made for
//   ring entries). Below, "bit" is the bitmap's word; a ring entry is pushed at the same points.
//   The two vCPU fast paths (fastWriteLockless, fastWriteLocked) write the bitmap sink out
//   inline and call the sink only for a ring: one more call level there cost ~25% per
//   write-protect fault in bench dirty-log (V8's inlining budget, as for translateSlow).
// - Dirty logging, locked paths (every MAP, and RELAX in 'global-write' / 'global' mode): the
//   page's bit is set (Atomics.or) BEFORE a writable PTE for it is stored, and under the MMU
//   lock, read or write side; a harvester clears bits under the exclusive lock and then
//   write-protects, so it runs wholly before or wholly after such a fault and can never clear a
//   bit while the matching writable PTE is still to come.
// - Dirty logging, lockless fast path ('parallel' mode only): the only change it makes is
//   setting W on a 4 KiB leaf by cmpxchg against the write-protected value its walk read; THEN
//   it marks the page dirty (as fast_pf_fix_direct_spte does); only THEN does the guest's write
//   happen. Harvesters and
//   sweeps only ever remove W (any store they make is write-protected), so a racing harvest
//   either write-protects the page after the cmpxchg (the write faults again, or completes
//   before the harvest's TLB flush returns and is in the page the caller then reads), or clears
//   the bitmap word before the mark (the bit is set again for the next harvest). Either way a
//   write through the new W is in this harvest's page contents or the next harvest's bitmap.
//   The memslot comes from an SRCU reader held around it (the vCPU's guest-mode section, or its
//   own), so logging enable/disable (publish, synchronize, then sweep or drop the bitmap) never
//   overlaps a fast path using the old set.
// - The page reference getUserPage takes (ram only, seed 001) is dropped once the mapping is in
//   or abandoned (kvm_release_faultin_page): stage 2 holds no references; munmap reaches it
//   through the mmu notifier instead. Reserved / MMIO pfns are never refcounted and are mapped
//   with the device attribute, at 4 KiB only.
// - Mapping statistics (pgtable/mapping-counters.ts): a W the vCPU fast path grants
//   (fastWriteLockless, fastWriteLocked) is counted only by the S_FAST_RELAX it already adds to
//   this thread's stats line (single writer), which the VM adds to the table's writable count
//   (Stage2PageTable.countWriteGrantsFrom): nothing else is stored or called on that path
//   (counting there in a counter row, through Stage2PageTable.tryGrantWrite, cost ~70 ns per
//   fault in bench dirty-log, almost all of it in the cmpxchg). tryFastPath's relaxPerms counts
//   its change in the table's counters like any operation, so it takes back the one its
//   S_FAST_RELAX adds.

import { KVM_MEM_EXIT_ON_MISSING, KVM_MEM_READONLY } from '../../vmm/engine.ts';
import type { HostMemory } from '../hostmem/host-memory.ts';
import { EAGAIN as GUP_EAGAIN, EFAULT } from '../hostmem/errno.ts';
import { GupResult, type HostAddressSpace } from '../hostmm/host-address-space.ts';
import type { MmuLock } from '../locking/mmu-lock.ts';
import { LAST_LEVEL, PROT_DEVICE, PROT_R, PROT_RW, leafPfn, leafWithWrite, pteIsWriteProtectedRam } from '../pgtable/pte.ts';
import { EAGAIN, OK, newLeafLookup, type Stage2PageTable } from '../pgtable/stage2.ts';
import { bitmapDirtySink, type DirtySink } from '../dirty/dirty-sink.ts';
import { markPageDirty } from '../dirty/dirty-bitmap.ts';
import type { SlotDesc, SlotLookup } from './slot-table.ts';
import { chooseMappingLevel } from './mapping-size.ts';
import { MemslotInvalidation } from './memslot-inval.ts';
import {
  S_DEVICE_MAPS,
  S_DIRTY_MARKS,
  S_FAST_RELAX,
  S_FAULTS,
  S_MAPPED_1G,
  S_MAPPED_2M,
  S_MAPPED_4K,
  S_MMIO_EXITS,
  S_RETRIES,
  S_SPLITS,
  S_WP_FAULTS,
  type VcpuStats,
} from '../vcpu/stats.ts';

/** Where the fault handler reads memslots (srcu_read_lock / unlock). */
export interface SlotSource {
  readLock(): SlotLookup;
  readUnlock(): void;
  /** Current generation, no reader registration: only under the MMU fault lock (slot-table.ts). */
  peek(): SlotLookup;
  /** A generation newer than the reader's has been published (it should retake its reader). */
  stale(): boolean;
}

/** The memslots of a reader the caller already holds (a vCPU's guest-mode section). */
export type HeldSlots = SlotLookup;

/** Test hooks to construct races deterministically. Never set in production. */
export interface FaultHooks {
  /** After the pfn is resolved, before the MMU lock is taken (where KVM races mmu notifiers). */
  afterResolvePfn?: (gfn: number, pfn: number) => void;
  /** Lockless fast path: after W is set by cmpxchg, before the page is marked dirty. */
  betweenRelaxAndMark?: (gfn: number) => void;
}

export const FAULT_OK = 0;
/** No memslot, or a write to a read-only one: an MMIO exit. */
export const FAULT_MMIO = -1;
/** The host could not provide the page: a MEMORY_FAULT exit. */
export const FAULT_EFAULT = -2;
/** The host page is missing where the VMM provides pages (exit-on-missing, userfaultfd): MEMORY_FAULT. */
export const FAULT_MISSING = -3;
const FAULT_RETRY = 1;

/** Give up retrying after this many attempts (a livelock is a bug; report EFAULT). */
const MAX_RETRIES = 1_000_000;

export class FaultHandler {
  private readonly gup = new GupResult();
  private readonly leaf = newLeafLookup();
  private readonly words: Int32Array;
  hooks: FaultHooks = {};
  /** Exit details of the last failed fault (for the VMM's error message). */
  lastError = '';

  constructor(
    private readonly mem: HostMemory,
    private readonly mm: HostAddressSpace,
    private readonly pgt: Stage2PageTable,
    private readonly lock: MmuLock,
    readonly slots: SlotSource,
    private readonly inval: MemslotInvalidation,
    private readonly stats: VcpuStats,
    /** Where this thread marks pages dirty: the memslot bitmap, or its vCPU's dirty ring. */
    private readonly sink: DirtySink = bitmapDirtySink,
  ) {
    this.words = pgt.pool.words;
  }

  /**
   * Resolve a stage-2 fault at gfn. FAULT_OK: retry the access; negative: exit to the VMM.
   * hintPte/hintLevel: what the faulting vCPU's own walk just found (hintPte 0 = nothing mapped,
   * -1 = unknown); it saves the walks the first attempt would repeat. A stale hint costs at most
   * a retry.
   */
  handle(gfn: number, write: boolean, hintPte = -1, hintLevel = 0): number {
    this.stats.add(S_FAULTS, 1);
    for (let attempt = 0; attempt < MAX_RETRIES; attempt++) {
      const lookup = this.slots.readLock();
      let r: number;
      try {
        r = this.once(lookup, gfn, write, attempt === 0 ? hintPte : -1, hintLevel);
      } finally {
        this.slots.readUnlock();
      }
      if (r !== FAULT_RETRY) return r;
      this.stats.add(S_RETRIES, 1);
      // An invalidation is in progress on the VMM thread; let it finish (2 cores, many threads).
      if ((attempt & 63) === 63) Atomics.wait(this.inval.words, 2, 0, 0.05);
    }
    this.lastError = `fault at gfn ${gfn} retried ${MAX_RETRIES} times`;
    return FAULT_EFAULT;
  }

  private once(lookup: SlotLookup, gfn: number, write: boolean, hintPte: number, hintLevel: number): number {
    const slot = lookup.find(gfn);
    if (slot === null || (write && (slot.flags & KVM_MEM_READONLY) !== 0)) {
      // No memslot, or a write to a read-only one: KVM emulates MMIO and exits to userspace.
      this.stats.add(S_MMIO_EXITS, 1);
      this.lastError = slot === null ? `no memslot for gfn ${gfn}` : `write to read-only memslot ${slot.slot} at gfn ${gfn}`;
      return FAULT_MMIO;
    }
    const logging = slot.logDirty;
    if (write && hintPte !== 0) {
      const r = this.tryFastPath(slot, gfn);
      if (r !== FAULT_RETRY) return r;
    }
    return this.slowPath(slot, gfn, write, logging, hintPte, hintLevel);
  }

  /**
   * fast_page_fault / the arm64 permission-fault path: a write to a present, write-protected
   * 4 KiB RAM leaf in a host-writable slot needs no pfn lookup: mark dirty, set W by cmpxchg.
   */
  private tryFastPath(slot: SlotDesc, gfn: number): number {
    const pgt = this.pgt;
    pgt.rcuReadLock();
    const pte = pgt.getLeaf(gfn, this.leaf);
    pgt.rcuReadUnlock();
    if (!pteIsWriteProtectedRam(pte)) return FAULT_RETRY;
    this.stats.add(S_WP_FAULTS, 1);
    // A write-protected block while logging: split in the slow path (seed 000).
    if (this.leaf.level !== LAST_LEVEL || !slot.hostWritable) return FAULT_RETRY;
    const lock = this.lock;
    lock.relaxLock();
    let r: number;
    try {
      if (slot.logDirty) {
        this.sink.mark(slot, gfn - slot.baseGfn);
        this.stats.add(S_DIRTY_MARKS, 1);
      }
      r = pgt.relaxPerms(gfn, PROT_RW, lock.relaxShared);
    } finally {
      lock.relaxUnlock();
    }
    if (r === OK) {
      this.stats.add(S_FAST_RELAX, 1);
      pgt.counts.uncountWriteGrants(1); // relaxPerms counted it; S_FAST_RELAX counts it again
      return FAULT_OK;
    }
    // The leaf changed under us (zapped, split, LOCKED): take the full path.
    return FAULT_RETRY;
  }

  /**
   * The vCPU's fast path for a write to a 4 KiB leaf it just walked and found write-protected
   * (pte at word ptep). The caller stays in its RCU read section, so ptep is still a table word
   * (possibly of a table unlinked meanwhile: then the cmpxchg below changes nothing anyone will
   * walk again, and the vCPU's re-walk faults properly). 'global-write' / 'global' mode: under
   * relaxLock() (write / read side); the memslot is read under it (peek): a logging enable
   * publishes its bitmap before its exclusive write-protect sweep. 'parallel' mode:
   * fastWriteLockless.
   * Returns the host pfn now mapped writable, or -1 to take the full fault path.
   */
  fastWrite(gfn: number, pte: number, ptep: number, held?: HeldSlots): number {
    return this.fastWriteIn(gfn, pte, ptep, held, true);
  }

  /**
   * fastWrite without blocking: lockless in 'parallel' mode; otherwise -2 when relaxLock() cannot
   * be taken right now (the caller then leaves guest mode and calls fastWrite). A vCPU
   * may call this without leaving guest mode: nothing in it waits (the SRCU reader's catch-up
   * waits only for a generation already posted to its port), so a flusher waiting for this
   * vCPU's acknowledgement is delayed by one access at most, like any access in flight.
   */
  tryFastWrite(gfn: number, pte: number, ptep: number, held?: HeldSlots): number {
    return this.fastWriteIn(gfn, pte, ptep, held, false);
  }

  /** fastWrite (wait for relaxLock) and tryFastWrite (-2 rather than wait) in one. */
  private fastWriteIn(gfn: number, pte: number, ptep: number, held: HeldSlots | undefined, wait: boolean): number {
    const lock = this.lock;
    if (lock.faultShared) return this.fastWriteLockless(gfn, pte, ptep, held);
    if (wait) lock.relaxLock();
    else if (!lock.tryRelaxLock()) return -2;
    try {
      return this.fastWriteLocked(gfn, pte, ptep);
    } finally {
      lock.relaxUnlock();
    }
  }

  /**
   * The write-protect fast path with no MMU lock ('parallel' mode; x86 fast_page_fault): the
   * reader-counter cache line an rwlock read-lock bounces between vCPUs cost ~100 ns per fault
   * with 2 vCPUs (bench dirty-log, per-vCPU on-CPU time). Memslots: the caller's reader
   * (`held`, a vCPU in guest mode: taking one per fault cost another ~100 ns), else its own.
   * Order and proof: file header.
   */
  private fastWriteLockless(gfn: number, pte: number, ptep: number, held: HeldSlots | undefined): number {
    const st = this.stats;
    st.add(S_FAULTS, 1);
    st.add(S_WP_FAULTS, 1);
    const slot = (held ?? this.slots.readLock()).find(gfn);
    try {
      if (slot === null || (slot.flags & KVM_MEM_READONLY) !== 0 || !slot.hostWritable) return -1;
      if (Atomics.compareExchange(this.words, ptep, pte, leafWithWrite(pte)) !== pte) return -1;
      this.hooks.betweenRelaxAndMark?.(gfn);
      if (this.pgt.debug) this.widenRaceWindow();
      // The bitmap sink written out (file header); a ring VM's slots have no bitmap.
      const bm = slot.dirtyBitmap;
      if (bm !== null) {
        markPageDirty(bm, gfn - slot.baseGfn);
        st.add(S_DIRTY_MARKS, 1);
      } else if (slot.logDirty) {
        this.sink.mark(slot, gfn - slot.baseGfn);
        st.add(S_DIRTY_MARKS, 1);
      }
    } finally {
      if (held === undefined) this.slots.readUnlock();
    }
    st.add(S_FAST_RELAX, 1);
    return leafPfn(pte);
  }

  private fastWriteLocked(gfn: number, pte: number, ptep: number): number {
    const st = this.stats;
    st.add(S_FAULTS, 1);
    st.add(S_WP_FAULTS, 1);
    const slot = this.slots.peek().find(gfn);
    if (slot === null || (slot.flags & KVM_MEM_READONLY) !== 0 || !slot.hostWritable) return -1;
    const bm = slot.dirtyBitmap;
    if (bm !== null) {
      markPageDirty(bm, gfn - slot.baseGfn);
      st.add(S_DIRTY_MARKS, 1);
    } else if (slot.logDirty) {
      this.sink.mark(slot, gfn - slot.baseGfn);
      st.add(S_DIRTY_MARKS, 1);
    }
    if (Atomics.compareExchange(this.words, ptep, pte, leafWithWrite(pte)) !== pte) return -1;
    st.add(S_FAST_RELAX, 1);
    return leafPfn(pte);
  }

  private raceRng = 0x9e3779b9;

  /**
   * Debug VMs (stress tests): stall here now and then, up to a few microseconds, so harvests on
   * other threads land inside the window between the cmpxchg and the mark far more often than
   * the few nanoseconds it lasts would allow; a wrong order there then fails the stress tests.
   */
  private widenRaceWindow(): void {
    let x = this.raceRng;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.raceRng = x;
    if ((x & 7) !== 0) return;
    const spins = (x >>> 8) & 4095;
    for (let i = 0; i < spins; i++) Atomics.load(this.words, 0);
  }

  private slowPath(slot: SlotDesc, gfn: number, write: boolean, logging: boolean, hintPte: number, hintLevel: number): number {
    const pgt = this.pgt;
    const mm = this.mm;
    const hva = slot.hva + (gfn - slot.baseGfn) * 4096;
    // mmu_invalidate_seq, sampled before the pfn is resolved.
    const hostSeq = mm.notifierSeq();
    const slotSeq = this.inval.seq();

    let oldPte = hintPte;
    let oldLevel = hintLevel;
    if (oldPte < 0) {
      pgt.rcuReadLock();
      oldPte = pgt.getLeaf(gfn, this.leaf);
      pgt.rcuReadUnlock();
      oldLevel = this.leaf.level;
    }

    const readonlySlot = (slot.flags & KVM_MEM_READONLY) !== 0;
    // Read faults also fault in a writable host page (x86's opportunistic map_writable), so a
    // later write to a read-mapped page can take the fast path.
    // Pages the VMM provides itself: an exit-on-missing slot (stage2's KVM_MEM_EXIT_ON_MISSING)
    // or a userfaultfd-registered range (getUserPage's EAGAIN) exits with MEMORY_FAULT.
    if ((slot.flags & KVM_MEM_EXIT_ON_MISSING) !== 0 && mm.lookupPfn(hva) < 0) return FAULT_MISSING;
    const gup = this.gup;
    const pfn = mm.getUserPage(hva, write || (!readonlySlot && slot.hostWritable), gup);
    if (pfn === GUP_EAGAIN) return FAULT_MISSING;
    if (pfn < 0) {
      if (!write && pfn !== EFAULT) {
        // e.g. EPERM on a read-only VMA for an opportunistic write: fall back to a read.
        const p2 = mm.getUserPage(hva, false, gup);
        if (p2 >= 0) return this.install(slot, gfn, p2, false, logging, hostSeq, slotSeq, oldPte, oldLevel);
      }
      this.lastError = `getUserPage(hva 0x${hva.toString(16)}) for gfn ${gfn} failed: errno ${pfn}`;
      return FAULT_EFAULT;
    }
    return this.install(slot, gfn, pfn, write, logging, hostSeq, slotSeq, oldPte, oldLevel);
  }

  private install(slot: SlotDesc, gfn: number, pfn: number, write: boolean, logging: boolean, hostSeq: number, slotSeq: number, oldPte: number, oldLevel: number): number {
    const gup = this.gup;
    const refcounted = gup.refcounted;
    const device = this.mem.isMmioPfn(pfn);
    this.hooks.afterResolvePfn?.(gfn, pfn);

    const readonlySlot = (slot.flags & KVM_MEM_READONLY) !== 0;
    // arm64: while logging, only a write fault maps writable (a read-mapped page must fault again
    // to be marked dirty).
    const writable = !readonlySlot && gup.writable && (write || !logging);
    const level = device || logging ? LAST_LEVEL : chooseMappingLevel(slot, gfn, gup.level);
    const pages = level === LAST_LEVEL ? 1 : level === 2 ? 512 : 262144;
    const mapGfn = gfn - (gfn % pages);
    const mapPfn = pfn - (gfn % pages);
    const prot = (writable ? PROT_RW : PROT_R) | (device ? PROT_DEVICE : 0);

    const lock = this.lock;
    let r: number;
    lock.faultLock();
    try {
      if (this.mm.retryNeeded(hostSeq) || this.inval.retryNeeded(slotSeq)) {
        r = EAGAIN;
      } else {
        if (writable && logging) {
          this.sink.mark(slot, gfn - slot.baseGfn);
          this.stats.add(S_DIRTY_MARKS, 1);
        }
        r = this.pgt.map(mapGfn, level as 1 | 2 | 3, mapPfn, prot, lock.faultShared);
      }
    } finally {
      lock.faultUnlock();
    }
    if (refcounted) this.mem.releasePfn(pfn);
    if (r === EAGAIN) return FAULT_RETRY;
    if (r !== OK) {
      this.lastError = `stage-2 map of gfn ${gfn} failed: ${r}`;
      return FAULT_EFAULT;
    }
    if (this.pgt.lastMapChanged) {
      const st = this.stats;
      st.add(level === LAST_LEVEL ? S_MAPPED_4K : level === 2 ? S_MAPPED_2M : S_MAPPED_1G, 1);
      if (device) st.add(S_DEVICE_MAPS, 1);
      if (oldPte !== 0 && oldLevel < level) st.add(S_SPLITS, 1);
    }
    return FAULT_OK;
  }
}
