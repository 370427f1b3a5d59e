// Which stage-2 mapping size a fault may use (arm64 user_mem_abort's vma_shift and
// fault_supports_stage2_huge_mapping; x86 kvm_mmu_hugepage_adjust). Pure function of the slot and
// the host mapping level; the caller has already ruled out logging slots and device memory.
import { LAST_LEVEL } from '../pgtable/pte.ts';
import type { SlotDesc } from './slot-table.ts';

const BLOCK_2M_PAGES = 512;

/**
 * Largest stage-2 level for gfn: a 2 MiB block (level 2) only when the host maps the page with
 * a 2 MiB page (THP / hugetlb), gpa and hva are congruent modulo 2 MiB (so the block maps one
 * host huge page), and the whole block lies inside the memslot. Otherwise 4 KiB (level 3).
 * The host never maps 1 GiB pages in this model, so level 1 blocks are not produced here.
 */
export function chooseMappingLevel(slot: SlotDesc, gfn: number, hostLevel: number): number {
  if (hostLevel < 1) return LAST_LEVEL;
  const hvaPage = slot.hva / 4096;
  if ((slot.baseGfn - hvaPage) % BLOCK_2M_PAGES !== 0) return LAST_LEVEL;
  const blockStart = gfn - (gfn % BLOCK_2M_PAGES);
  if (blockStart < slot.baseGfn || blockStart + BLOCK_2M_PAGES > slot.baseGfn + slot.npages) return LAST_LEVEL;
  return 2;
}
