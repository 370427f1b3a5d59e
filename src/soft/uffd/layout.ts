// Which guest pages the soft userfaultfd model pages on demand, and where each lives: a snapshot
// of the memslots taken when demand paging starts. Plain, structured-clonable data (it travels
// to the vCPU and reader threads in a message); nothing here is shared memory.
//
// "Page i of the VM" (demand-paging.ts LocalPageSource) is the i-th 4 KiB page of the memslots
// in guest-physical order, concatenated. One uffd serves the whole VM (sharedUffd), or guest RAM
// is cut into `uffds` equal runs of pages, one per vCPU slice (demand_paging_test registers each
// vCPU's memory with its own uffd; with memstress's layout the runs are exactly the slices).

const PAGE = 4096;

export interface DemandSlot {
  slot: number;
  baseGfn: number;
  pages: number;
  /** hva of the slot's page 0. */
  hva: number;
  /** VM page index of the slot's page 0. */
  first: number;
}

export interface DemandLayout {
  slots: DemandSlot[];
  totalPages: number;
  uffds: number;
  /** Pages per uffd (the last may have fewer). */
  pagesPerUffd: number;
}

export function makeLayout(slots: { slot: number; guestPhysAddr: number; memorySize: number; userspaceAddr: number }[], uffds: number): DemandLayout {
  const sorted = [...slots].sort((a, b) => a.guestPhysAddr - b.guestPhysAddr);
  const out: DemandSlot[] = [];
  let first = 0;
  for (const s of sorted) {
    const pages = s.memorySize / PAGE;
    out.push({ slot: s.slot, baseGfn: s.guestPhysAddr / PAGE, pages, hva: s.userspaceAddr, first });
    first += pages;
  }
  const n = Math.max(1, Math.min(uffds, first));
  return { slots: out, totalPages: first, uffds: n, pagesPerUffd: Math.max(1, Math.ceil(first / n)) };
}

/** VM page index of gfn, or -1 when no demand-paged slot holds it. */
export function pageOfGfn(l: DemandLayout, gfn: number): number {
  for (const s of l.slots) if (gfn >= s.baseGfn && gfn < s.baseGfn + s.pages) return s.first + (gfn - s.baseGfn);
  return -1;
}

/** VM page index of (slot, page within it), or -1. */
export function pageOfSlot(l: DemandLayout, slot: number, page: number): number {
  for (const s of l.slots) if (s.slot === slot) return Number.isInteger(page) && page >= 0 && page < s.pages ? s.first + page : -1;
  return -1;
}

/** The slot entry holding VM page i (i in range). */
export function slotOfPage(l: DemandLayout, i: number): DemandSlot {
  for (const s of l.slots) if (i >= s.first && i < s.first + s.pages) return s;
  throw new RangeError(`VM page ${i} is outside the ${l.totalPages} demand-paged pages`);
}

export function hvaOfPage(l: DemandLayout, i: number): number {
  const s = slotOfPage(l, i);
  return s.hva + (i - s.first) * PAGE;
}

export function uffdOfPage(l: DemandLayout, i: number): number {
  return Math.min(l.uffds - 1, Math.floor(i / l.pagesPerUffd));
}
