// A vCPU's soft TLB: cached stage-2 translations, gfn -> host pfn + permissions.
//
// Owned by one vCPU thread; never shared. Entries are only filled from a page-table walk done in
// guest mode and only emptied by invalidateAll (on a remote flush request, see tlb-flush.ts), so
// an entry can be older than the PTE it came from for at most one access after a flush request.
//
// Layout: two direct-mapped arrays of (tag, value) Int32 pairs.
//   small: 4 KiB leaves, indexed by gfn, tag = gfn
//   huge:  2 MiB blocks (1 GiB blocks are cached per 2 MiB part), indexed by gfn >>> 9,
//          tag = gfn >>> 9, value = pfn of the 2 MiB part's first page
// value = (pfn << 2) | W << 1 | R, tag -1 = empty. gfns are below 2^31 (gpa < 8 TiB: checked when
// a vCPU attaches its memslots).

export const TLB_R = 1;
export const TLB_W = 2;

const SMALL_ENTRIES = 4096;
const HUGE_ENTRIES = 1024;

export class SoftTlb {
  readonly small = new Int32Array(SMALL_ENTRIES * 2).fill(-1);
  readonly huge = new Int32Array(HUGE_ENTRIES * 2).fill(-1);
  /** Number of invalidateAll calls (a stat). */
  flushes = 0;

  /** Host pfn for a write to gfn, or -1 on a miss (absent or read-only). */
  lookupWrite(gfn: number): number {
    const i = (gfn & (SMALL_ENTRIES - 1)) << 1;
    const small = this.small;
    if (small[i] === gfn) {
      const v = small[i + 1]!;
      if ((v & TLB_W) !== 0) return v >>> 2;
    }
    const block = gfn >>> 9;
    const j = (block & (HUGE_ENTRIES - 1)) << 1;
    const huge = this.huge;
    if (huge[j] === block) {
      const v = huge[j + 1]!;
      if ((v & TLB_W) !== 0) return (v >>> 2) + (gfn & 511);
    }
    return -1;
  }

  /** Host pfn for a read of gfn, or -1 on a miss. */
  lookupRead(gfn: number): number {
    const i = (gfn & (SMALL_ENTRIES - 1)) << 1;
    const small = this.small;
    if (small[i] === gfn) {
      const v = small[i + 1]!;
      if ((v & TLB_R) !== 0) return v >>> 2;
    }
    const block = gfn >>> 9;
    const j = (block & (HUGE_ENTRIES - 1)) << 1;
    const huge = this.huge;
    if (huge[j] === block) {
      const v = huge[j + 1]!;
      if ((v & TLB_R) !== 0) return (v >>> 2) + (gfn & 511);
    }
    return -1;
  }

  fillSmall(gfn: number, pfn: number, perm: number): void {
    const i = (gfn & (SMALL_ENTRIES - 1)) << 1;
    this.small[i] = gfn;
    this.small[i + 1] = (pfn << 2) | perm;
  }

  /** Cache the 2 MiB part of a block mapping that contains gfn; pfn is gfn's own host pfn. */
  fillHuge(gfn: number, pfn: number, perm: number): void {
    const block = gfn >>> 9;
    const j = (block & (HUGE_ENTRIES - 1)) << 1;
    this.huge[j] = block;
    this.huge[j + 1] = ((pfn - (gfn & 511)) << 2) | perm;
  }

  invalidateAll(): void {
    this.small.fill(-1);
    this.huge.fill(-1);
    this.flushes++;
  }
}
