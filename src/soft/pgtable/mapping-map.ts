// A per-2 MiB summary of the stage-2 table for observers (the dashboard's mapping map): for each
// 2 MiB of guest-physical memory, whether it is mapped by a block (2 MiB or 1 GiB), by a table
// of 4 KiB pages, or not at all. One lookup per 2 MiB, no walker, no allocation per cell.
//
// Concurrency: read-only. The walk runs inside the calling handle's RCU read section (so every
// table page it reaches stays allocated) with plain loads, like getLeaf; it takes no MMU lock
// and never blocks a fault. Entries may change while it reads: each cell is what that entry held
// at some moment during the walk, which is all an observer needs. A LOCKED entry (a break-
// before-make in progress) reads as what it is becoming only on the next call.
import { MAPPING_1G, MAPPING_2M, MAPPING_4K, MAPPING_NONE } from '../../vmm/engine.ts';
import { newLeafLookup, type Stage2PageTable } from './stage2.ts';

const PAGES_PER_2M = 512;

/**
 * out[i] = MAPPING_* of the 2 MiB at gfn startGfn + i * 512 (startGfn a multiple of 512). A
 * table at the 2 MiB level counts as MAPPING_4K whether or not any of its pages is mapped yet.
 */
export function fillMappingMap(pgt: Stage2PageTable, startGfn: number, out: Uint8Array): void {
  const look = newLeafLookup();
  pgt.rcuReadLock();
  try {
    for (let i = 0; i < out.length; i++) {
      const pte = pgt.getLeaf(startGfn + i * PAGES_PER_2M, look);
      // The lookup descends to level 3 only through a table at level 2: 4 KiB pages.
      if (look.level === 3) out[i] = MAPPING_4K;
      else if (pte === 0) out[i] = MAPPING_NONE;
      else out[i] = look.level === 2 ? MAPPING_2M : MAPPING_1G;
    }
  } finally {
    pgt.rcuReadUnlock();
  }
}
