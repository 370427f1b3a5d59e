// (memslot, page) <-> guest-physical addresses <-> a dense page index over all memslots. A
// migration names pages as (slot, page) everywhere: the source's sender, the link, the stream
// and the memory hash; only the engine boundary (readGuest / writeGuest) speaks gpa, and the
// destination's per-page round table wants one dense index. One map per migration, built from
// CONFIG's memslots on both sides, so they cannot disagree.
//
// Concurrency: immutable after construction.
import { PAGE_SIZE } from '../vmm/engine.ts';
import type { SlotPages } from './stream/layout.ts';

export interface SlotRegion {
  slot: number;
  gpa: number;
  pages: number;
  /** Dense index of the slot's first page. */
  base: number;
}

/** Where a run of pages lies. */
export interface PageLocation {
  slot: number;
  page: number;
  index: number;
  /** Guest-physical address of the first page. */
  gpa: number;
}

export class SlotMap {
  readonly regions: readonly SlotRegion[];
  readonly totalPages: number;
  private readonly bySlot = new Map<number, SlotRegion>();

  constructor(slots: readonly { slot: number; guestPhysAddr: number; memorySize: number }[]) {
    let base = 0;
    this.regions = slots.map((s) => {
      const r = { slot: s.slot, gpa: s.guestPhysAddr, pages: s.memorySize / PAGE_SIZE, base };
      base += r.pages;
      this.bySlot.set(r.slot, r);
      return r;
    });
    this.totalPages = base;
  }

  /** The stream layout / hash layout of these slots. */
  get layout(): SlotPages[] {
    return this.regions.map((r) => ({ slot: r.slot, pages: r.pages }));
  }

  /** Location of pages [page, +pages) of memslot `slot`, or null unless they lie inside it. */
  locatePages(slot: number, page: number, pages: number): PageLocation | null {
    const r = this.bySlot.get(slot);
    if (!r || !Number.isInteger(page) || page < 0 || pages < 1 || page + pages > r.pages) return null;
    return { slot, page, index: r.base + page, gpa: r.gpa + page * PAGE_SIZE };
  }

  /** Guest-physical address of `page` of memslot `slot`, or null for an unknown slot. */
  gpaOf(slot: number, page: number): number | null {
    const r = this.bySlot.get(slot);
    return r ? r.gpa + page * PAGE_SIZE : null;
  }
}
