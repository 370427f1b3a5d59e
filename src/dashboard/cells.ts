// Guest memory as the dashboard draws it: every memslot cut into 2 MiB cells, slots one after
// another in slot order. The heatmap and the mapping map share this layout, so cell i of one is
// cell i of the other.
//
// Concurrency: plain values, built once on the VMM's main thread.
import type { MemslotInfo } from '../vmm/engine.ts';

export const CELL_BYTES = 2 ** 21;
/** 4 KiB pages per cell, and 32-bit dirty-bitmap words per cell. */
export const PAGES_PER_CELL = CELL_BYTES / 4096;
export const WORDS_PER_CELL = PAGES_PER_CELL / 32;

export interface SlotCells {
  slot: number;
  guestPhysAddr: number;
  memorySize: number;
  /** Index of the slot's first cell in the whole map. */
  firstCell: number;
  cells: number;
}

export interface CellLayout {
  slots: SlotCells[];
  cells: number;
}

export function layoutCells(memslots: readonly MemslotInfo[]): CellLayout {
  const slots: SlotCells[] = [];
  let cells = 0;
  for (const s of [...memslots].sort((a, b) => a.slot - b.slot)) {
    const n = Math.ceil(s.memorySize / CELL_BYTES);
    slots.push({ slot: s.slot, guestPhysAddr: s.guestPhysAddr, memorySize: s.memorySize, firstCell: cells, cells: n });
    cells += n;
  }
  return { slots, cells };
}
