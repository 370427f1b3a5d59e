// Stage-2 page-table entry format: one Int32 word per entry, 512 entries per table page,
// 4 levels. A gfn is 36 bits (48-bit gpa, 4 KiB pages); each level resolves 9 bits of it.
//
//   level 0: one entry covers 2^27 pages (512 GiB); only tables live here
//   level 1: 2^18 pages (1 GiB);  a leaf here is a 1 GiB block
//   level 2: 2^9 pages  (2 MiB);  a leaf here is a 2 MiB block
//   level 3: 1 page     (4 KiB);  a leaf here is a page
//
// Bit layout (bit 0 = least significant):
//
//   31                                 5   4     3   2   1 0
//  +------------------------------------+-----+---+---+-----+
//  |  output address (27 bits)          | DEV | W | R | type|
//  +------------------------------------+-----+---+---+-----+
//
//   type  00 invalid  (the whole word is 0: nothing mapped)
//         01 leaf     (page or block; output address = host pfn of the first page)
//         10 table    (output address = index of the next-level table page in the pool)
//         11 special  LOCKED (exactly the value 3): a break-before-make in progress; the
//                     thread that installed it owns the entry until it stores the new value.
//                     POISON (0xDEADBEEF): every word of a freed table page; reading it
//                     means someone walked into a table page after it was freed.
//   R, W  stage-2 read / write permission (leaves only). X is not modelled.
//   DEV   memory attribute: 1 = DEVICE (MMIO / reserved frame: the fault handler takes no page
//         reference for it, seed 001), 0 = NORMAL cacheable RAM.
//
// 27 address bits give host pfns up to 2^27 (512 GiB of host memory) and up to 2^27 table
// pages. Permission changes touch only bits 2-3, so a leaf->leaf permission change is a single
// compare-and-exchange and never changes the output address.
//
// Concurrency: this file is pure functions over values; see stage2.ts for who writes entries.

export const PTRS_PER_TABLE = 512;
export const TABLE_SHIFT = 9;
export const LEVELS = 4;
export const LAST_LEVEL = 3;
/** Blocks exist at levels 1 (1 GiB) and 2 (2 MiB). */
export const MIN_BLOCK_LEVEL = 1;
export const GFN_BITS = 36;
export const MAX_GFN = 2 ** GFN_BITS;

export const PTE_TYPE_MASK = 0b11;
export const PTE_TYPE_INVALID = 0b00;
export const PTE_TYPE_LEAF = 0b01;
export const PTE_TYPE_TABLE = 0b10;
export const PTE_TYPE_SPECIAL = 0b11;

export const PTE_R = 1 << 2;
export const PTE_W = 1 << 3;
export const PTE_DEVICE = 1 << 4;
export const PTE_ADDR_SHIFT = 5;
export const PTE_ADDR_BITS = 27;
export const MAX_PFN = 2 ** PTE_ADDR_BITS - 1;

/** Break-before-make marker: the entry is owned by the thread that wrote it. */
export const PTE_LOCKED = PTE_TYPE_SPECIAL;
/** Every word of a freed table page (as Int32: 0xDEADBEEF | 0). */
export const PTE_POISON = 0xdeadbeef | 0;

/** Protection requested from map()/relaxPerms(): the same bit positions as the PTE. */
export const PROT_R = PTE_R;
export const PROT_W = PTE_W;
export const PROT_RW = PTE_R | PTE_W;
export const PROT_DEVICE = PTE_DEVICE;
/** Bits of a prot argument that map into the PTE. */
export const PROT_MASK = PTE_R | PTE_W | PTE_DEVICE;
/** Bits a leaf->leaf permission change may touch without break-before-make. */
export const PTE_PERM_MASK = PTE_R | PTE_W;

/** Pages covered by one entry at each level: 2^27, 2^18, 2^9, 1. */
export const LEVEL_PAGES: readonly number[] = [2 ** 27, 2 ** 18, 2 ** 9, 1];

export function levelPages(level: number): number {
  return LEVEL_PAGES[level]!;
}

/** Index of gfn's entry in the level's table (gfn may exceed 2^32). */
export function pteIndex(gfn: number, level: number): number {
  return Math.floor(gfn / LEVEL_PAGES[level]!) & (PTRS_PER_TABLE - 1);
}

export function pteIsValid(pte: number): boolean {
  const t = pte & PTE_TYPE_MASK;
  return t === PTE_TYPE_LEAF || t === PTE_TYPE_TABLE;
}

/** A table pointer (never true at the last level: the walker checks the level too). */
export function pteIsTable(pte: number): boolean {
  return (pte & PTE_TYPE_MASK) === PTE_TYPE_TABLE;
}

export function pteIsLeaf(pte: number): boolean {
  return (pte & PTE_TYPE_MASK) === PTE_TYPE_LEAF;
}

export function pteIsLocked(pte: number): boolean {
  return pte === PTE_LOCKED;
}

export function pteReadable(pte: number): boolean {
  return (pte & (PTE_TYPE_MASK | PTE_R)) === (PTE_TYPE_LEAF | PTE_R);
}

export function pteWritable(pte: number): boolean {
  return (pte & (PTE_TYPE_MASK | PTE_W)) === (PTE_TYPE_LEAF | PTE_W);
}

export function pteIsDevice(pte: number): boolean {
  return (pte & (PTE_TYPE_MASK | PTE_DEVICE)) === (PTE_TYPE_LEAF | PTE_DEVICE);
}

/** Host pfn of a leaf (of the first page for a block). */
export function ptePfn(pte: number): number {
  return pte >>> PTE_ADDR_SHIFT;
}

/** Pool index of the next-level table of a table entry. */
export function pteTableIndex(pte: number): number {
  return pte >>> PTE_ADDR_SHIFT;
}

export class PteFormatError extends Error {
  override name = 'PteFormatError';
}

/** A leaf for host pfn with prot (PROT_R | PROT_W | PROT_DEVICE). */
export function mkLeaf(pfn: number, prot: number): number {
  if (!(pfn >= 0 && pfn <= MAX_PFN && Number.isInteger(pfn))) throw new PteFormatError(`pfn ${pfn} does not fit in ${PTE_ADDR_BITS} bits`);
  return (pfn << PTE_ADDR_SHIFT) | (prot & PROT_MASK) | PTE_TYPE_LEAF;
}

/** A table entry pointing at pool page tableIdx (> 0: page 0 is never handed out). */
export function mkTable(tableIdx: number): number {
  if (!(tableIdx > 0 && tableIdx <= MAX_PFN && Number.isInteger(tableIdx))) throw new PteFormatError(`table index ${tableIdx} out of range`);
  return (tableIdx << PTE_ADDR_SHIFT) | PTE_TYPE_TABLE;
}

/** Same leaf with its permission bits replaced. */
export function pteWithPerms(pte: number, perms: number): number {
  return (pte & ~PTE_PERM_MASK) | (perms & PTE_PERM_MASK);
}

/**
 * Whether replacing old by nu (same entry) needs a TLB invalidation before the old translation
 * may be considered gone: any change that removes a valid leaf's permission, output address or
 * attribute, or removes a table (its leaves), does; making an invalid entry valid or adding
 * permissions does not (a vCPU with the stricter, stale translation just faults again).
 */
export function pteChangeNeedsFlush(old: number, nu: number): boolean {
  if (!pteIsValid(old)) return false;
  if (pteIsTable(old)) return nu !== old;
  if (!pteIsLeaf(nu)) return true;
  if (((old ^ nu) & ~PTE_PERM_MASK) !== 0) return true;
  return (old & ~nu & PTE_PERM_MASK) !== 0;
}

/** Human-readable pte, for error messages and tests. */
export function formatPte(pte: number): string {
  if (pte === 0) return 'invalid';
  if (pte === PTE_LOCKED) return 'LOCKED';
  if (pte === PTE_POISON) return 'POISON';
  if (pteIsTable(pte)) return `table(${pteTableIndex(pte)})`;
  if (pteIsLeaf(pte)) {
    const p = `${pte & PTE_R ? 'R' : '-'}${pte & PTE_W ? 'W' : '-'}${pte & PTE_DEVICE ? ' dev' : ''}`;
    return `leaf(pfn=${ptePfn(pte)} ${p})`;
  }
  return `garbage(0x${(pte >>> 0).toString(16)})`;
}
