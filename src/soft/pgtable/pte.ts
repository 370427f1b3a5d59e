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
// Every other file reads and builds entries only through the functions below; none writes a
// shift or a mask of its own. Names say what the caller has already checked, v86 style: a
// `pte...` function takes any word and checks the type itself; a `leaf...` function takes a word
// the caller knows is a leaf (or, where it says so, 0); a `table...` function one it knows is a
// table entry. They are one-line functions V8 inlines into the hot paths (vCPU walk, lookup,
// fault fast path).
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

/** A word of a freed table page (see PTE_POISON). */
export function pteIsPoison(pte: number): boolean {
  return pte === PTE_POISON;
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

/** A leaf with R, without W, not DEVICE: a RAM page write-protected (by dirty logging, or mapped for read). */
export function pteIsWriteProtectedRam(pte: number): boolean {
  return (pte & (PTE_TYPE_MASK | PTE_R | PTE_W | PTE_DEVICE)) === (PTE_TYPE_LEAF | PTE_R);
}

/** A leaf that permits the access: W for a write, R for a read. */
export function pteGrants(pte: number, write: boolean): boolean {
  const need = write ? PTE_W : PTE_R;
  return (pte & (PTE_TYPE_MASK | need)) === (PTE_TYPE_LEAF | need);
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
  if (!leavesDifferOnlyInPerms(old, nu)) return true;
  return leafChangeRemovesPerms(old, nu);
}

/** Human-readable pte, for error messages and tests. */
export function formatPte(pte: number): string {
  if (pte === 0) return 'invalid';
  if (pte === PTE_LOCKED) return 'LOCKED';
  if (pte === PTE_POISON) return 'POISON';
  if (pteIsTable(pte)) return `table(${tableIndex(pte)})`;
  if (pteIsLeaf(pte)) {
    const p = `${pte & PTE_R ? 'R' : '-'}${pte & PTE_W ? 'W' : '-'}${pte & PTE_DEVICE ? ' dev' : ''}`;
    return `leaf(pfn=${leafPfn(pte)} ${p})`;
  }
  return `garbage(0x${(pte >>> 0).toString(16)})`;
}

// ---- the caller knows the word is a leaf ----

/** Host pfn of a leaf (of the first page for a block). */
export function leafPfn(leaf: number): number {
  return leaf >>> PTE_ADDR_SHIFT;
}

/** W is set (a leaf, or 0: false). */
export function leafWritable(leaf: number): boolean {
  return (leaf & PTE_W) !== 0;
}

/** DEVICE is set (a leaf, or 0: false). */
export function leafIsDevice(leaf: number): boolean {
  return (leaf & PTE_DEVICE) !== 0;
}

/** R and W as two bits, R = 1 and W = 2 (the soft TLB's permission encoding). */
export function leafRW(leaf: number): number {
  return (leaf >>> 2) & 3;
}

/** The same leaf with W set. */
export function leafWithWrite(leaf: number): number {
  return leaf | PTE_W;
}

/** The same leaf with W clear. */
export function leafWithoutWrite(leaf: number): number {
  return leaf & ~PTE_W;
}

/** The same leaf with prot's R/W bits added (relaxPerms). */
export function leafWithPermsAdded(leaf: number, prot: number): number {
  return leaf | (prot & PTE_PERM_MASK);
}

/**
 * Everything but the output address (type, R, W, DEVICE): what the pages of a split block
 * inherit, and what a collapsible table's leaves must share.
 */
export function leafAttrs(leaf: number): number {
  return leaf & ((1 << PTE_ADDR_SHIFT) - 1);
}

/** The prot (PROT_R | PROT_W | PROT_DEVICE) of a leaf or of leafAttrs() of one. */
export function leafProt(leaf: number): number {
  return leaf & PROT_MASK;
}

/**
 * A leaf for pfn with attributes taken from leafAttrs() of an existing leaf. No range check:
 * the caller derived pfn from a leaf's pfn within that leaf's block (a split).
 */
export function leafFromAttrs(pfn: number, attrs: number): number {
  return (pfn << PTE_ADDR_SHIFT) | attrs;
}

/** Two leaves with one output address and one DEVICE attribute: they differ at most in R/W. */
export function leavesDifferOnlyInPerms(a: number, b: number): boolean {
  return ((a ^ b) & ~PTE_PERM_MASK) === 0;
}

/** Replacing leaf `old` by `nu` takes away R or W (a permission shrink needs a TLB flush). */
export function leafChangeRemovesPerms(old: number, nu: number): boolean {
  return (old & ~nu & PTE_PERM_MASK) !== 0;
}

// ---- the caller knows the word is a table entry ----

/** Pool index of the next-level table a table entry points at. */
export function tableIndex(table: number): number {
  return table >>> PTE_ADDR_SHIFT;
}

/**
 * Word offset, in the pool, of the first entry of the next-level table a table entry points at.
 * Int32 shifts only: the pool never has more than 2^22 pages (table-pool.ts MAX_TABLE_PAGES).
 */
export function tableBase(table: number): number {
  return (table >>> PTE_ADDR_SHIFT) << TABLE_SHIFT;
}
