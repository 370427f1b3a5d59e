// Guest-physical addresses <-> (memslot, page) <-> a dense page index over all memslots. The
// pre-copy state machines speak gpa (what the engine reads and writes); the stream format and the
// memory hash speak (slot, page); the destination's per-page round table wants one dense index.
// One map per migration, built from CONFIG's memslots on both sides, so they cannot disagree.
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

  /** Location of the run [gpa, +pages), or null unless it lies inside one memslot. */
  locate(gpa: number, pages = 1): PageLocation | null {
    for (const r of this.regions) {
      if (gpa >= r.gpa && gpa < r.gpa + r.pages * PAGE_SIZE) {
        const page = (gpa - r.gpa) / PAGE_SIZE;
        if (!Number.isInteger(page) || pages < 1 || page + pages > r.pages) return null;
        return { slot: r.slot, page, index: r.base + page };
      }
    }
    return null;
  }

  /** Guest-physical address of `page` of memslot `slot`, or null for an unknown slot. */
  gpaOf(slot: number, page: number): number | null {
    const r = this.bySlot.get(slot);
    return r ? r.gpa + page * PAGE_SIZE : null;
  }
}
