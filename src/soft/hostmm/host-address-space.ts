// The VMM's host virtual address space: VMAs and the host page table (hva -> pfn), shared by the
// main thread and every vCPU worker; plus the mmu-notifier sequence KVM uses to catch faults that
// race with an unmap.
//
// Concurrency rules:
// - mmap, munmap, zapRange, splitHugePmd, setUserfault and addInvalidateNotifier run on the
//   main thread only. Everything else runs on any thread, lock-free.
// - Host page table: one pte pool (Int32 per 4 KiB page, value pfn + 1, 0 = none) and one pmd
//   pool (Int32 per 2 MiB block: head pfn + 1 = mapped huge, PMD_SMALL = populated with 4 KiB
//   ptes, 0 = empty), both preallocated SharedArrayBuffers (committed lazily) so that VMAs mapped
//   after a worker attached need no new buffer. Each VMA owns a range of each pool.
// - munmap: seq++ and inProgress++ (invalidate_range_start), the notifiers run synchronously
//   (the soft MMU unmaps stage-2 there), the VMA goes DYING, every entry is taken with
//   Atomics.exchange(0) and its reference put (whoever takes a non-zero value owns that put), the
//   VMA goes DEAD, then inProgress-- and seq++ (invalidate_range_end). A thread whose CAS
//   installed an entry re-checks the VMA state afterwards and, if DYING, takes its entry back
//   itself: the state store happens before munmap's scan, so every installed entry is dropped by
//   exactly one of them.
// - The lock-free reader side (getUserPage, first touch, speculative references) is in gup.ts.
// - zapRange (MADV_DONTNEED) and splitHugePmd use the same invalidate bracket with the VMA kept
//   LIVE; their entry-level rules are in zap.ts.
// - A fault handler reads notifierSeq() BEFORE getUserPage and, under its MMU lock, calls
//   retryNeeded(seq) before installing a stage-2 mapping (mmu_invalidate_retry): a pfn resolved
//   while an unmap was in progress or after one began is never mapped.

import { HostMemory } from '../hostmem/host-memory.ts';
import { EFAULT, EINVAL, ENOMEM, errnoName } from '../hostmem/errno.ts';
import { HUGE_FRAME_BYTES, HUGE_FRAME_PAGES, WINDOW_MASK, WINDOW_SHIFT } from '../hostmem/page-flags.ts';
import {
  F_KIND, F_PMD_BASE, F_UFFD, I32_PER_VMA, K_ANON, K_HUGETLB, K_PFNMAP, K_THP,
  T_GENERATION, T_IN_PROGRESS, T_PMD_USED, T_PTE_USED, T_SEQ, VMA_DEAD, VMA_DYING, VMA_KINDS,
  VmaTable, type VmaInfo, type VmaKind, type VmaTableShared,
} from './vma-table.ts';
import { splitBlock, zapPages, zapVma, type HostTables } from './zap.ts';
import { GupResult, HostPageWalker } from './gup.ts';

export type { VmaInfo, VmaKind } from './vma-table.ts';
export { GupResult } from './gup.ts';

export interface HostAddressSpaceShared {
  vmas: VmaTableShared;
  pte: SharedArrayBuffer;
  pmd: SharedArrayBuffer;
}

export interface HostAddressSpaceOptions {
  /** Host page-table capacity in 4 KiB pages over all VMAs ever mapped (pool space is not reused). */
  maxPages?: number;
  maxVmas?: number;
}

export class HostFaultError extends Error {
  constructor(
    readonly hva: number,
    readonly errno: number,
    message: string,
  ) {
    super(message);
    this.name = 'HostFaultError';
  }
}

/** First hva handed out; hvas are never 0. */
export const HVA_BASE = 0x7f00_0000_0000;
/** x86-64 user address space end (TASK_SIZE_MAX, 47 bits). */
export const HVA_LIMIT = 2 ** 47;
const PAGE = 4096;

export class HostAddressSpace {
  readonly shared: HostAddressSpaceShared;
  readonly mem: HostMemory;
  private readonly table: VmaTable;
  private readonly pte: Int32Array;
  private readonly pmd: Int32Array;
  private readonly notifiers: Array<(hvaStart: number, hvaEnd: number) => void> = [];
  private nextHva = HVA_BASE;
  private readonly scratch = new GupResult();
  private readonly tables: HostTables;
  private readonly walker: HostPageWalker;

  private constructor(shared: HostAddressSpaceShared, mem: HostMemory) {
    this.shared = shared;
    this.mem = mem;
    this.table = new VmaTable(shared.vmas);
    this.pte = new Int32Array(shared.pte);
    this.pmd = new Int32Array(shared.pmd);
    this.tables = { mem, table: this.table, pte: this.pte, pmd: this.pmd };
    this.walker = new HostPageWalker(this.tables);
  }

  static create(mem: HostMemory, opts: HostAddressSpaceOptions = {}): HostAddressSpace {
    const maxPages = Math.ceil((opts.maxPages ?? Math.min(2 ** 28, Math.max(2 ** 22, 4 * mem.totalFrames))) / HUGE_FRAME_PAGES) * HUGE_FRAME_PAGES;
    const shared: HostAddressSpaceShared = {
      vmas: VmaTable.createShared(opts.maxVmas ?? 4096),
      pte: new SharedArrayBuffer(maxPages * 4),
      pmd: new SharedArrayBuffer((maxPages / HUGE_FRAME_PAGES) * 4),
    };
    return new HostAddressSpace(shared, mem);
  }

  static attach(shared: HostAddressSpaceShared, mem: HostMemory): HostAddressSpace {
    return new HostAddressSpace(shared, mem);
  }

  // ---- main thread ----

  /** mmap: a new VMA of `bytes` (rounded up to 4 KiB; 2 MiB for hugetlb). Returns its hva, 2 MiB aligned. */
  mmap(bytes: number, kind: VmaKind, opts: { basePfn?: number; readonly?: boolean } = {}): number {
    const k = VMA_KINDS.indexOf(kind);
    if (k < 0) throw new HostFaultError(0, EFAULT, `mmap: unknown VMA kind '${kind}'`);
    if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new HostFaultError(0, EFAULT, `mmap: size must be a positive integer, got ${bytes}`);
    if (k === K_HUGETLB && bytes % HUGE_FRAME_BYTES !== 0) throw new HostFaultError(0, EFAULT, `mmap: hugetlb size ${bytes} is not a multiple of 2 MiB`);
    const pages = Math.ceil(bytes / PAGE);
    let basePfn = -1;
    if (k === K_PFNMAP) {
      basePfn = opts.basePfn ?? -1;
      if (!Number.isSafeInteger(basePfn) || basePfn < 0 || basePfn + pages > this.mem.totalFrames) {
        throw new HostFaultError(0, EFAULT, `mmap: pfnmap needs basePfn with [basePfn, basePfn + ${pages}) inside the physical map (${this.mem.totalFrames} frames), got ${opts.basePfn}`);
      }
    }
    const start = this.nextHva;
    const end = start + pages * PAGE;
    if (end > HVA_LIMIT) throw new HostFaultError(start, ENOMEM, `mmap: host virtual address space exhausted`);
    const blocks = Math.ceil(pages / HUGE_FRAME_PAGES);
    let pteBase = -1;
    let pmdBase = -1;
    if (k === K_ANON || k === K_THP) pteBase = this.reservePool(T_PTE_USED, pages, this.pte.length, 'pte');
    if (k === K_THP || k === K_HUGETLB) pmdBase = this.reservePool(T_PMD_USED, blocks, this.pmd.length, 'pmd');
    this.table.publish(start, end, k, opts.readonly === true, basePfn, pteBase, pmdBase, pages);
    // A 2 MiB guard gap keeps VMAs apart and every start 2 MiB aligned.
    this.nextHva = start + (blocks + 1) * HUGE_FRAME_BYTES;
    return start;
  }

  private reservePool(word: number, n: number, capacity: number, what: string): number {
    const base = Atomics.load(this.table.ctl, word);
    if (base + n > capacity) throw new HostFaultError(0, ENOMEM, `mmap: host ${what} pool full (${base} + ${n} > ${capacity}); raise maxPages`);
    Atomics.store(this.table.ctl, word, base + n);
    return base;
  }

  /** KVM's mmu_notifier registration: fn(hvaStart, hvaEnd) runs synchronously inside munmap. */
  addInvalidateNotifier(fn: (hvaStart: number, hvaEnd: number) => void): void {
    this.notifiers.push(fn);
  }

  /** munmap of whole VMAs (every VMA the range touches must lie inside it; gaps are fine). */
  munmap(hva: number, bytes: number): void {
    const end = hva + bytes;
    const entries = this.table.intersecting(hva, end);
    for (const e of entries) {
      if (this.table.start(e) < hva || this.table.end(e) > end) {
        throw new HostFaultError(hva, EFAULT, `munmap [0x${hva.toString(16)}, 0x${end.toString(16)}) splits the VMA [0x${this.table.start(e).toString(16)}, 0x${this.table.end(e).toString(16)}); partial unmaps are not supported`);
      }
    }
    if (entries.length === 0) return;
    this.invalidate(hva, end, () => {
      for (const e of entries) {
        this.table.setState(e, VMA_DYING);
        zapVma(this.tables, e);
        this.table.setState(e, VMA_DEAD);
      }
    });
  }

  /**
   * MADV_DONTNEED: drop the pages of [hva, hva + bytes) (4 KiB aligned) so the next touch
   * zero-fills. A THP block only partly inside the range is split first; hugetlb ranges must be
   * 2 MiB aligned. The VMA stays mapped.
   */
  zapRange(hva: number, bytes: number): void {
    if (hva % PAGE !== 0 || bytes % PAGE !== 0 || bytes <= 0) throw new HostFaultError(hva, EFAULT, `zapRange(0x${hva.toString(16)}, ${bytes}): not 4 KiB aligned`);
    const end = hva + bytes;
    const entries = this.table.intersecting(hva, end);
    for (const e of entries) {
      if (this.table.field(e, F_KIND) === K_HUGETLB && (Math.max(hva, this.table.start(e)) % HUGE_FRAME_BYTES !== 0 || Math.min(end, this.table.end(e)) % HUGE_FRAME_BYTES !== 0)) {
        throw new HostFaultError(hva, EFAULT, `zapRange: hugetlb range [0x${hva.toString(16)}, 0x${end.toString(16)}) is not 2 MiB aligned`);
      }
    }
    this.invalidate(hva, end, () => {
      for (const e of entries) {
        if (this.table.field(e, F_KIND) === K_PFNMAP) continue;
        const s = Math.max(hva, this.table.start(e));
        const first = (s - this.table.start(e)) / PAGE;
        zapPages(this.tables, e, first, (Math.min(end, this.table.end(e)) - s) / PAGE);
      }
    });
  }

  /**
   * split_huge_pmd: remap the THP block holding hva with 512 ptes into the same compound frame
   * (the frame stays whole). Afterwards getUserPage reports level 0 there. Returns false if the
   * block was not mapped huge.
   */
  splitHugePmd(hva: number): boolean {
    const e = this.table.find(hva);
    if (e < 0 || this.table.field(e, F_KIND) !== K_THP) return false;
    const block = Math.floor((hva - this.table.start(e)) / HUGE_FRAME_BYTES);
    const start = this.table.start(e) + block * HUGE_FRAME_BYTES;
    if (Atomics.load(this.pmd, this.table.field(e, F_PMD_BASE) + block) <= 0) return false;
    let split = false;
    this.invalidate(start, start + HUGE_FRAME_BYTES, () => {
      split = splitBlock(this.tables, e, block);
    });
    return split;
  }

  /** invalidate_range_start, notifiers, body, invalidate_range_end. */
  private invalidate(start: number, end: number, body: () => void): void {
    const ctl = this.table.ctl;
    Atomics.add(ctl, T_SEQ, 1);
    Atomics.add(ctl, T_IN_PROGRESS, 1);
    try {
      for (const fn of this.notifiers) fn(start, end);
      body();
    } finally {
      Atomics.sub(ctl, T_IN_PROGRESS, 1);
      Atomics.add(ctl, T_SEQ, 1);
    }
  }

  // ---- any thread ----

  /** mmu_invalidate_seq. */
  notifierSeq(): number {
    return Atomics.load(this.table.ctl, T_SEQ);
  }

  /** mmu_invalidate_in_progress. */
  invalidateInProgress(): number {
    return Atomics.load(this.table.ctl, T_IN_PROGRESS);
  }

  /** mmu_invalidate_retry: an unmap is running, or one started since `seq` was read. */
  retryNeeded(seq: number): boolean {
    return Atomics.load(this.table.ctl, T_IN_PROGRESS) !== 0 || Atomics.load(this.table.ctl, T_SEQ) !== seq;
  }

  /** Bumped whenever a VMA is mapped or unmapped. */
  vmaGeneration(): number {
    return Atomics.load(this.table.ctl, T_GENERATION);
  }

  findVma(hva: number): VmaInfo | undefined {
    const e = this.table.find(hva);
    return e < 0 ? undefined : this.table.info(e);
  }

  /**
   * UFFDIO_REGISTER (MISSING) / UFFDIO_UNREGISTER on whole VMAs (main thread): while registered,
   * getUserPage of a page never populated returns EAGAIN instead of allocating, and the page is
   * populated only by uffdCopy (or by the VMM's own write()).
   */
  setUserfault(hva: number, bytes: number, missing: boolean): void {
    const end = hva + bytes;
    const entries = this.table.intersecting(hva, end);
    if (entries.length === 0) throw new HostFaultError(hva, EFAULT, `setUserfault: no VMA in [0x${hva.toString(16)}, 0x${end.toString(16)})`);
    for (const e of entries) {
      const k = this.table.field(e, F_KIND);
      if (k === K_PFNMAP) throw new HostFaultError(hva, EINVAL, 'setUserfault: a pfnmap VMA cannot be registered');
      if (this.table.start(e) < hva || this.table.end(e) > end) throw new HostFaultError(hva, EINVAL, 'setUserfault: the range must cover whole VMAs');
    }
    for (const e of entries) Atomics.store(this.table.i32, e * I32_PER_VMA + F_UFFD, missing ? 1 : 0);
  }

  /**
   * hva_to_pfn / get_user_pages: resolve hva (first touch allocates) and take a page reference on
   * ram for the caller. Returns the pfn, or EFAULT (no VMA), EPERM (write to a read-only VMA),
   * ENOMEM (no frame), EAGAIN (missing page in a userfaultfd-registered VMA). Fills `out`. The
   * caller drops its reference with mem.releasePfn(pfn) once the stage-2 mapping is installed or
   * abandoned (kvm_release_faultin_page). Rules in gup.ts.
   */
  getUserPage(hva: number, write: boolean, out: GupResult): number {
    return this.walker.getUserPage(hva, write, out, true);
  }

  /** The frame behind an already-populated hva, without allocating or taking a reference; -1 if none. */
  lookupPfn(hva: number): number {
    return this.walker.lookupPfn(hva);
  }

  /** lookupPfn(hva + k * 4 KiB) >= 0 for each of `pages` pages, into out[at + k]; returns the count populated. */
  populated(hva: number, pages: number, out: Uint8Array, at = 0): number {
    return this.walker.populated(hva, pages, out, at);
  }

  /**
   * UFFDIO_COPY: atomically populate the missing page at hva with src (4096 bytes; 2 MiB for a
   * hugetlb VMA, hva aligned to it). Any thread. Returns 0, EEXIST if already populated (a racing
   * fault or copy won), EFAULT, EINVAL or ENOMEM. Waking waiters is the userfaultfd model's job.
   */
  uffdCopy(hva: number, src: Uint8Array): number {
    return this.walker.uffdCopy(hva, src);
  }

  /**
   * UFFDIO_CONTINUE (MINOR mode): map the page-cache frame pfn (4 KiB, the caller holds a
   * reference) at the missing hva; the mapping takes its own reference. Any thread. Returns 0,
   * EEXIST if already mapped, EFAULT or EINVAL. Waking waiters is the userfaultfd model's job.
   */
  uffdContinue(hva: number, pfn: number): number {
    return this.walker.uffdContinue(hva, pfn);
  }

  /** The VMM reading guest RAM through its own mapping: untouched pages read as zeros, nothing is allocated. */
  read(hva: number, dst: Uint8Array): void {
    let done = 0;
    while (done < dst.length) {
      const at = hva + done;
      const inPage = at % PAGE;
      const n = Math.min(PAGE - inPage, dst.length - done);
      const pfn = this.walker.lookupPfn(at);
      if (pfn < 0 && !this.walker.hasVma(at)) throw new HostFaultError(at, EFAULT, `read: no VMA at hva 0x${at.toString(16)}`);
      if (pfn < 0) {
        dst.fill(0, done, done + n);
      } else {
        const off = (pfn & WINDOW_MASK) * PAGE + inPage;
        dst.set(this.mem.windowBytes[pfn >>> WINDOW_SHIFT]!.subarray(off, off + n), done);
      }
      done += n;
    }
  }

  /** The VMM writing guest RAM through its own mapping: first touch allocates. */
  write(hva: number, src: Uint8Array): void {
    let done = 0;
    const out = this.scratch;
    while (done < src.length) {
      const at = hva + done;
      const inPage = at % PAGE;
      const n = Math.min(PAGE - inPage, src.length - done);
      const pfn = this.walker.getUserPage(at, true, out, false); // the VMM's own writes ignore userfault registration
      if (pfn < 0) throw new HostFaultError(at, pfn, `write: ${errnoName(pfn)} at hva 0x${at.toString(16)}`);
      const off = (pfn & WINDOW_MASK) * PAGE + inPage;
      this.mem.windowBytes[pfn >>> WINDOW_SHIFT]!.set(src.subarray(done, done + n), off);
      if (out.refcounted) this.mem.releasePfn(pfn);
      done += n;
    }
  }
}
