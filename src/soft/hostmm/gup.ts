// The lock-free reader side of the host page table: get_user_pages (first touch included),
// lookups without references, and UFFDIO_COPY. Every thread owns its own HostPageWalker (one per
// HostAddressSpace instance) with a private cache of the last VMA it used.
//
// Concurrency rules (the writer side is in host-address-space.ts and zap.ts):
// - First touch installs with Atomics.compareExchange(0 -> pfn + 1): exactly one thread wins;
//   a loser frees the frame it allocated and uses the winner's. In a THP VMA the pmd decides
//   first: CAS 0 -> huge head, or CAS 0 -> PMD_SMALL before any 4 KiB pte is installed, so a
//   block is never mapped both ways.
// - An installed entry holds one page reference (the mapping's). A thread that finds a populated
//   entry takes its caller's reference with tryGetPageRef (get_page_unless_zero) and then
//   re-checks the entry still holds that pfn: munmap may have dropped it and the frame been
//   reused in between (GUP-fast's speculative reference).
// - VMA lookups: a cached VMA is used only while its entry's state is still LIVE (Atomics.load
//   per call); fields of a LIVE entry never change (vma-table.ts).
// - userfaultfd: a VMA registered MISSING makes a first touch return EAGAIN instead of
//   allocating; uffdCopy fills a private frame, then installs it with the same CAS as a first
//   touch (EEXIST if anyone populated the page first), so a racing fault or copy can never see a
//   half-written page. uffdContinue (MINOR mode: the soft/uffd/ model registers the VMA the same
//   way and keeps the shared-memory file's page cache itself) installs a frame the caller holds,
//   taking the pte's own reference first, with the same CAS and the same re-check.

import type { HostMemory } from '../hostmem/host-memory.ts';
import { EAGAIN, EEXIST, EFAULT, EINVAL, ENOMEM, EPERM } from '../hostmem/errno.ts';
import { HUGE_FRAME_BYTES, HUGE_FRAME_PAGES, WINDOW_MASK, WINDOW_SHIFT } from '../hostmem/page-flags.ts';
import {
  F_BASE_PFN, F_KIND, F_PAGES, F_PMD_BASE, F_PTE_BASE, F_READONLY, F_UFFD, I32_PER_VMA, K_ANON, K_HUGETLB, K_PFNMAP, K_THP,
  VMA_KINDS, VMA_LIVE, type VmaKind, type VmaTable,
} from './vma-table.ts';
import { PMD_SMALL, type HostTables } from './zap.ts';
import { allZero, noneZero } from '../../util/bulk-scan.ts';

const PAGE = 4096;

/** What getUserPage resolved, besides the pfn. One reusable object per caller. */
export class GupResult {
  /** Host mapping level: 0 = 4 KiB, 1 = 2 MiB (host_pfn_mapping_level). */
  level: 0 | 1 = 0;
  kind: VmaKind = 'anonymous';
  /** The VMA allows writes (KVM's map_writable). */
  writable = false;
  /** The returned pfn carries a reference the caller must drop (HostMemory.releasePfn does). */
  refcounted = false;
}

export class HostPageWalker {
  private readonly mem: HostMemory;
  private readonly table: VmaTable;
  private readonly pte: Int32Array;
  private readonly pmd: Int32Array;
  // This thread's last VMA, valid while its entry is LIVE.
  private cEntry = -1;
  private cStart = 0;
  private cEnd = 0;
  private cKind = 0;
  private cReadonly = false;
  private cBasePfn = 0;
  private cPteBase = 0;
  private cPmdBase = 0;
  private cPages = 0;

  constructor(t: HostTables) {
    this.mem = t.mem;
    this.table = t.table;
    this.pte = t.pte;
    this.pmd = t.pmd;
  }

  /** Some LIVE VMA covers hva (uses and refreshes this thread's VMA cache). */
  hasVma(hva: number): boolean {
    return this.lookup(hva);
  }

  /** Load the VMA of hva into this thread's cache; false if none. */
  private lookup(hva: number): boolean {
    if (this.cEntry >= 0 && hva >= this.cStart && hva < this.cEnd && this.table.state(this.cEntry) === VMA_LIVE) return true;
    const e = this.table.find(hva);
    if (e < 0) return false;
    const t = this.table;
    this.cEntry = e;
    this.cStart = t.start(e);
    this.cEnd = t.end(e);
    this.cKind = t.field(e, F_KIND);
    this.cReadonly = t.field(e, F_READONLY) !== 0;
    this.cBasePfn = t.field(e, F_BASE_PFN);
    this.cPteBase = t.field(e, F_PTE_BASE);
    this.cPmdBase = t.field(e, F_PMD_BASE);
    this.cPages = t.field(e, F_PAGES);
    return true;
  }

  /**
   * hva_to_pfn / get_user_pages: resolve hva (first touch allocates) and take a page reference on
   * ram for the caller. Returns the pfn, or EFAULT (no VMA), EPERM (write to a read-only VMA),
   * ENOMEM (no frame). Fills `out`. The caller drops its reference with mem.releasePfn(pfn) once
   * the stage-2 mapping is installed or abandoned (kvm_release_faultin_page).
   */
  getUserPage(hva: number, write: boolean, out: GupResult, honorUffd: boolean): number {
    if (!this.lookup(hva)) return EFAULT;
    if (write && this.cReadonly) return EPERM;
    const kind = this.cKind;
    const idx = Math.floor((hva - this.cStart) / PAGE);
    out.kind = VMA_KINDS[kind]!;
    out.writable = !this.cReadonly;
    out.level = 0;
    if (kind === K_PFNMAP) {
      // remap_pfn_range maps 4 KiB only; a pfn is refcounted only if it is ordinary RAM (seed 001).
      const pfn = this.cBasePfn + idx;
      out.refcounted = false;
      if (this.mem.isMmioPfn(pfn)) return pfn;
      if (this.mem.tryGetPageRef(pfn) < 0) return EFAULT;
      out.refcounted = true;
      return pfn;
    }
    out.refcounted = true;
    if (kind === K_ANON) return this.faultPte(this.cEntry, this.cPteBase + idx, honorUffd);
    const block = Math.floor(idx / HUGE_FRAME_PAGES);
    const entry = this.cEntry;
    const slot = this.cPmdBase + block;
    const pmd = this.pmd;
    for (;;) {
      const v = Atomics.load(pmd, slot);
      if (v > 0) {
        const pfn = v - 1 + (idx & (HUGE_FRAME_PAGES - 1));
        const ref = this.mem.tryGetPageRef(pfn);
        if (ref >= 0) {
          if (Atomics.load(pmd, slot) === v) {
            out.level = 1;
            return pfn;
          }
          this.mem.putPageRef(ref);
        }
        if (this.table.state(entry) !== VMA_LIVE) return EFAULT;
        continue;
      }
      if (v === PMD_SMALL) return this.faultPte(entry, this.cPteBase + idx, honorUffd);
      // v === 0: first touch of this 2 MiB block.
      const eligible = (block + 1) * HUGE_FRAME_PAGES <= this.cPages; // whole block inside the VMA
      if (kind === K_THP && !eligible) return this.faultPte(entry, this.cPteBase + idx, honorUffd);
      if (honorUffd && this.userfaultMissing(entry)) return EAGAIN;
      const head = this.mem.allocHugeFrame();
      if (head < 0) {
        if (kind === K_HUGETLB) return ENOMEM;
        Atomics.compareExchange(pmd, slot, 0, PMD_SMALL); // THP falls back to 4 KiB pages
        continue;
      }
      if (Atomics.compareExchange(pmd, slot, 0, head + 1) !== 0) {
        this.mem.freeHugeFrame(head);
        continue;
      }
      if (this.table.state(entry) !== VMA_LIVE) {
        if (Atomics.compareExchange(pmd, slot, head + 1, 0) === head + 1) this.mem.putPage(head);
        return EFAULT;
      }
    }
  }

  private faultPte(entry: number, slot: number, honorUffd: boolean): number {
    const pte = this.pte;
    for (;;) {
      const v = Atomics.load(pte, slot);
      if (v > 0) {
        const ref = this.mem.tryGetPageRef(v - 1);
        if (ref >= 0) {
          if (Atomics.load(pte, slot) === v) return v - 1;
          this.mem.putPageRef(ref);
        }
        if (this.table.state(entry) !== VMA_LIVE) return EFAULT;
        continue;
      }
      if (honorUffd && this.userfaultMissing(entry)) return EAGAIN;
      const pfn = this.mem.allocFrame();
      if (pfn < 0) return pfn;
      if (Atomics.compareExchange(pte, slot, 0, pfn + 1) !== 0) {
        this.mem.freeFrame(pfn); // lost the race: use the winner's frame
        continue;
      }
      if (this.table.state(entry) !== VMA_LIVE) {
        if (Atomics.compareExchange(pte, slot, pfn + 1, 0) === pfn + 1) this.mem.putPage(pfn);
        return EFAULT;
      }
    }
  }

  private userfaultMissing(entry: number): boolean {
    return Atomics.load(this.table.i32, entry * I32_PER_VMA + F_UFFD) !== 0;
  }

  /**
   * UFFDIO_COPY: atomically populate the missing page at hva with src (4096 bytes; 2 MiB for a
   * hugetlb VMA, hva aligned to it). Any thread. Returns 0, EEXIST if already populated (a racing
   * fault or copy won), EFAULT, EINVAL or ENOMEM. Waking waiters is the userfaultfd model's job.
   */
  uffdCopy(hva: number, src: Uint8Array): number {
    if (!this.lookup(hva)) return EFAULT;
    const kind = this.cKind;
    if (kind === K_PFNMAP) return EINVAL;
    const entry = this.cEntry;
    const idx = Math.floor((hva - this.cStart) / PAGE);
    const huge = kind === K_HUGETLB;
    if (huge ? src.length !== HUGE_FRAME_BYTES || idx % HUGE_FRAME_PAGES !== 0 : src.length !== PAGE || hva % PAGE !== 0) return EINVAL;
    const pmdSlot = this.cPmdBase + Math.floor(idx / HUGE_FRAME_PAGES);
    if (kind === K_THP) {
      // UFFDIO_COPY maps 4 KiB pages: claim the block for ptes unless it is already huge.
      const v = Atomics.compareExchange(this.pmd, pmdSlot, 0, PMD_SMALL);
      if (v > 0) return EEXIST;
    }
    const pfn = huge ? this.mem.allocHugeFrame() : this.mem.allocFrame();
    if (pfn < 0) return pfn;
    this.mem.windowBytes[pfn >>> WINDOW_SHIFT]!.set(src, (pfn & WINDOW_MASK) * PAGE);
    const arr = huge ? this.pmd : this.pte;
    const slot = huge ? pmdSlot : this.cPteBase + idx;
    if (Atomics.compareExchange(arr, slot, 0, pfn + 1) !== 0) {
      if (huge) this.mem.freeHugeFrame(pfn);
      else this.mem.freeFrame(pfn);
      return EEXIST;
    }
    if (this.table.state(entry) !== VMA_LIVE) {
      if (Atomics.compareExchange(arr, slot, pfn + 1, 0) === pfn + 1) this.mem.putPage(pfn);
      return EFAULT;
    }
    return 0;
  }

  /**
   * UFFDIO_CONTINUE: map the page-cache frame `pfn` (a 4 KiB frame the caller holds a reference
   * on, e.g. a shared-memory file's page) at the missing hva. The pte takes its own reference,
   * with the same CAS as a first touch. Returns 0, EEXIST (the page is already mapped), EFAULT or
   * EINVAL (pfnmap or hugetlb VMA, unaligned hva).
   */
  uffdContinue(hva: number, pfn: number): number {
    if (!this.lookup(hva)) return EFAULT;
    const kind = this.cKind;
    if (kind === K_PFNMAP || kind === K_HUGETLB || hva % PAGE !== 0) return EINVAL;
    const entry = this.cEntry;
    const idx = Math.floor((hva - this.cStart) / PAGE);
    if (kind === K_THP && Atomics.compareExchange(this.pmd, this.cPmdBase + Math.floor(idx / HUGE_FRAME_PAGES), 0, PMD_SMALL) > 0) return EEXIST;
    this.mem.getPage(pfn);
    const slot = this.cPteBase + idx;
    if (Atomics.compareExchange(this.pte, slot, 0, pfn + 1) !== 0) {
      this.mem.putPage(pfn);
      return EEXIST;
    }
    if (this.table.state(entry) !== VMA_LIVE) {
      if (Atomics.compareExchange(this.pte, slot, pfn + 1, 0) === pfn + 1) this.mem.putPage(pfn);
      return EFAULT;
    }
    return 0;
  }

  /** The frame behind an already-populated hva, without allocating or taking a reference; -1 if none. */
  lookupPfn(hva: number): number {
    if (!this.lookup(hva)) return -1;
    const idx = Math.floor((hva - this.cStart) / PAGE);
    const kind = this.cKind;
    if (kind === K_PFNMAP) return this.cBasePfn + idx;
    if (kind !== K_ANON) {
      const v = Atomics.load(this.pmd, this.cPmdBase + Math.floor(idx / HUGE_FRAME_PAGES));
      if (v > 0) return v - 1 + (idx & (HUGE_FRAME_PAGES - 1));
      if (v !== PMD_SMALL && kind === K_HUGETLB) return -1;
    }
    const p = Atomics.load(this.pte, this.cPteBase + idx);
    return p > 0 ? p - 1 : -1;
  }

  /**
   * lookupPfn(hva + k * 4 KiB) >= 0 for k in [0, pages), into out[at + k] (1 = populated),
   * VMA by VMA; returns how many are populated. A page outside every VMA reads 0. Same snapshot
   * semantics as lookupPfn, page by page (a racing install or zap may or may not be seen), at a
   * few ns a page instead of a full lookup each.
   */
  populated(hva: number, pages: number, out: Uint8Array, at = 0): number {
    let n = 0;
    const end = hva + pages * PAGE;
    for (let a = hva; a < end; ) {
      if (!this.lookup(a)) {
        out[at + (a - hva) / PAGE] = 0;
        a += PAGE;
        continue;
      }
      const stop = Math.min(end, this.cEnd);
      const kind = this.cKind;
      let idx = (a - this.cStart) / PAGE;
      let o = at + (a - hva) / PAGE;
      while (a < stop) {
        // One pmd load a 2 MiB block: mapped huge, every page is populated; a hugetlb block not
        // split into ptes and not mapped huge has none; otherwise the ptes decide (a THP VMA's
        // tail shorter than a block has ptes under an empty pmd).
        const blockEnd = Math.min(stop, a + (HUGE_FRAME_PAGES - (idx & (HUGE_FRAME_PAGES - 1))) * PAGE);
        const k = (blockEnd - a) / PAGE;
        const m = kind === K_PFNMAP || kind === K_ANON ? 0 : Atomics.load(this.pmd, this.cPmdBase + Math.floor(idx / HUGE_FRAME_PAGES));
        if (kind === K_PFNMAP || m > 0) {
          out.fill(1, o, o + k);
          n += k;
        } else if (kind === K_HUGETLB && m !== PMD_SMALL) {
          out.fill(0, o, o + k);
        } else {
          // The block's ptes at once where they are all set or all clear (native loops: this
          // scan runs cold, on the post-copy downtime path); a page at a time otherwise, with
          // plain loads (a snapshot needs no ordering; aligned Int32 reads never tear).
          const ptes = this.pte.subarray(this.cPteBase + idx, this.cPteBase + idx + k);
          if (noneZero(ptes)) {
            out.fill(1, o, o + k);
            n += k;
          } else if (allZero(ptes)) {
            out.fill(0, o, o + k);
          } else {
            for (let j = 0; j < k; j++) {
              const v = ptes[j]! > 0 ? 1 : 0;
              out[o + j] = v;
              n += v;
            }
          }
        }
        a = blockEnd;
        idx += k;
        o += k;
      }
    }
    return n;
  }

}
