// Identity-mapped x86-64 4-level guest page tables (gva == gpa), built in the VMM before the
// guest runs and copied into the engine's internal memslot. Ranges map with 2 MiB pages (PDE
// with PS) or 4 KiB pages (PTEs); a 2 MiB region needed by both kinds is mapped with 4 KiB
// pages throughout so neither range loses its translation.

// Present, writable, user: the guest may run at CPL 3 (see guest-setup.ts).
const PRESENT_RW = 0x7n;
const PS = 0x80n;
const HUGE = 2 * 1024 * 1024;

export interface MappedRange {
  gpa: number;
  bytes: number;
  pageSize: number;
}

export interface PageTables {
  /** gpa of the PML4 (CR3). */
  root: number;
  /** Every table page by its gpa: 512 entries each. */
  pages: Map<number, BigUint64Array>;
}

export function buildIdentityPageTables(tablesGpa: number, ranges: MappedRange[]): PageTables {
  let next = tablesGpa;
  const pages = new Map<number, BigUint64Array>();
  const alloc = (): number => {
    const gpa = next;
    next += 4096;
    pages.set(gpa, new BigUint64Array(512));
    return gpa;
  };
  const root = alloc();
  const child = (table: number, index: number): number => {
    const t = pages.get(table)!;
    const e = t[index]!;
    if (e !== 0n) {
      if (e & PS) throw new Error('page tables: a 2 MiB mapping is in the way');
      return Number(e & ~0xfffn);
    }
    const gpa = alloc();
    t[index] = BigInt(gpa) | PRESENT_RW;
    return gpa;
  };
  const pdOf = (gpa: number): number => {
    const pdpt = child(root, Math.floor(gpa / 2 ** 39) % 512);
    return child(pdpt, Math.floor(gpa / 2 ** 30) % 512);
  };
  // 2 MiB regions any 4 KiB range touches get page tables; the rest may be huge.
  const small = new Set<number>();
  for (const r of ranges) {
    if (r.pageSize !== 4096 || r.bytes === 0) continue;
    for (let g = Math.floor(r.gpa / HUGE) * HUGE; g < r.gpa + r.bytes; g += HUGE) small.add(g);
  }
  for (const r of ranges) {
    if (r.bytes === 0) continue;
    const start = Math.floor(r.gpa / HUGE) * HUGE;
    for (let g = start; g < r.gpa + r.bytes; g += HUGE) {
      const pd = pages.get(pdOf(g))!;
      const pdi = Math.floor(g / HUGE) % 512;
      if (!small.has(g)) {
        pd[pdi] = BigInt(g) | PRESENT_RW | PS;
        continue;
      }
      const pt = pages.get(child(pdOf(g), pdi))!;
      const lo = Math.max(g, Math.floor(r.gpa / 4096) * 4096);
      const hi = Math.min(g + HUGE, r.gpa + r.bytes);
      for (let p = r.pageSize === 4096 ? lo : g; p < (r.pageSize === 4096 ? hi : g + HUGE); p += 4096) {
        pt[(p / 4096) % 512] = BigInt(p) | PRESENT_RW;
      }
    }
  }
  return { root, pages };
}
