// The destination's side of POSTCOPY_DISCARD (QEMU's postcopy_ram_discard_range): which pages
// the source says are stale here (dirtied after they were sent) or were never sent. A page this
// side holds leaves the hash table at once (what stays is what POSTCOPY_RUN's hash vouches for)
// and must be dropped from guest RAM, so that the pager fetches it: by the pager at once when it
// already runs (destination.ts starts it at the first list once every channel had its final
// SYNC), else listed until it starts at POSTCOPY_RUN. At the switch, pages never received that a
// write into their transparent-huge-page block populated anyway are dropped too.
//
// The lists can name every page of guest RAM and arrive on the downtime path, before any of this
// code is warm: a list is taken a run of set bits at a time, a run a stretch of 512 pages at a
// time, and a stretch this side never received (the common case) is marked with native fills
// (util/bulk-scan.ts), not page by page.
//
// Concurrency: the VMM's main thread only (the receive loop's record handler).
import type { DemandPager } from '../../vmm/demand-paging.ts';
import type { PageHashTable } from '../hash.ts';
import { allZero, noneZero } from '../../util/bulk-scan.ts';

/** Pages per 2 MiB block: transparent huge pages populate a whole block at once. */
const HUGE_BLOCK_PAGES = 512;
/** Pages a stretch: tested at once for "none of these was received". */
const STRETCH = 512;

export class DiscardIntake {
  /** By dense page index: listed by some POSTCOPY_DISCARD. */
  readonly discarded: Uint8Array;
  /** Some list came: pages arriving after it are checked against `discarded`. */
  any = false;
  /** Pages this side held that the lists declared stale (missing again). */
  staleCount = 0;
  /** Per slot: stale held pages still to drop once the pager starts. */
  private readonly toDrop = new Map<number, number[]>();

  constructor(
    /** By dense page index: the round a page last arrived in (0: never). */
    private readonly lastRound: Uint32Array,
    /** By dense page index: engine-internal memory (sent before the switch, never paged on demand). */
    private readonly internalPage: Uint8Array,
    private readonly table: PageHashTable,
    /** A protocol error to throw (the caller's wording). */
    private readonly protocol: (msg: string) => Error,
  ) {
    this.discarded = new Uint8Array(lastRound.length);
  }

  /**
   * One POSTCOPY_DISCARD: `bitmap` (LSB first) over `count` pages of `slotId` from `firstPage`,
   * dense index `index`. `pager`: the running pager, which drops held pages now; null: later.
   */
  take(slotId: number, firstPage: number, index: number, count: number, bitmap: Uint8Array, pager: DemandPager | null): void {
    this.any = true;
    const bits = bitmap.length * 8;
    const set = (i: number) => (bitmap[i >> 3]! & (1 << (i & 7))) !== 0;
    for (let i = 0; i < bits; ) {
      if ((i & 7) === 0 && bitmap[i >> 3] === 0) {
        i += 8;
        continue;
      }
      if (!set(i)) {
        i++;
        continue;
      }
      // The run of set bits from i: whole 0xff bytes at a time where aligned.
      let e = i + 1;
      while (e < bits) {
        if ((e & 7) === 0 && bitmap[e >> 3] === 0xff) e += 8;
        else if (set(e)) e++;
        else break;
      }
      if (e > count) throw this.protocol(`POSTCOPY_DISCARD of memslot ${slotId} sets bit ${Math.max(i, count)} past its ${count} pages`);
      this.run(slotId, firstPage, index, i, e, pager);
      i = e;
    }
  }

  /** Pages [i, e) of the list that starts at (slotId, firstPage), dense index `index`. */
  private run(slotId: number, firstPage: number, index: number, i: number, e: number, pager: DemandPager | null): void {
    const { lastRound, discarded } = this;
    const internal = this.internalPage.subarray(index + i, index + e);
    if (!allZero(internal)) throw this.protocol(`POSTCOPY_DISCARD of memslot ${slotId} page ${firstPage + i + internal.indexOf(1)}: engine-internal memory is sent before the switch, never paged on demand`);
    let later = this.toDrop.get(slotId);
    if (!later) this.toDrop.set(slotId, (later = []));
    for (let k0 = i; k0 < e; k0 += STRETCH) {
      const k1 = Math.min(e, k0 + STRETCH);
      if (allZero(lastRound.subarray(index + k0, index + k1))) {
        discarded.fill(1, index + k0, index + k1); // never received here: nothing held to drop
        continue;
      }
      for (let k = k0; k < k1; ) {
        const at = index + k;
        if (discarded[at] || lastRound[at] === 0) {
          discarded[at] = 1;
          k++;
          continue;
        }
        // A run of held pages leaves the hash table in one step, and guest RAM now or later.
        let j = k;
        while (j < k1 && !discarded[index + j] && lastRound[index + j]! > 0) {
          discarded[index + j] = 1;
          if (!pager) later.push(firstPage + j);
          j++;
        }
        this.table.setZero(slotId, firstPage + k, j - k);
        this.staleCount += j - k;
        if (pager) pager.discard(slotId, pageRange(firstPage + k, j - k));
        k = j;
      }
    }
  }

  /**
   * At the switch, with the pager running: drop the stale held pages still listed, and pages
   * never received that are populated anyway. Nothing preallocates guest RAM when post-copy is
   * negotiated, but a write into transparent-huge-page memory populates its whole 2 MiB block
   * (QEMU turns THP off for post-copy for this reason); only blocks with some pages received and
   * some not can hold such pages.
   */
  dropAtSwitch(pager: DemandPager, slot: number, index: number, pages: number): void {
    const { lastRound } = this;
    const drop = this.toDrop.get(slot) ?? [];
    this.toDrop.delete(slot);
    for (let b = 0; b < pages; b += HUGE_BLOCK_PAGES) {
      const e = Math.min(pages, b + HUGE_BLOCK_PAGES);
      const block = lastRound.subarray(index + b, index + e);
      if (allZero(block) || noneZero(block)) continue;
      for (let p = b; p < e; p++) if (lastRound[index + p] === 0) drop.push(p);
    }
    if (drop.length) pager.discard(slot, Uint32Array.from(drop).sort());
  }
}

/** count page numbers from first. */
function* pageRange(first: number, count: number): Generator<number> {
  for (let p = first; p < first + count; p++) yield p;
}
