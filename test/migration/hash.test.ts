import { describe, expect, it } from 'vitest';
import { PageHashTable, createMemoryHasher, isZeroPage } from '../../src/migration/hash.ts';

const PAGE = 4096;
const LAYOUT = [
  { slot: 0, pages: 40 },
  { slot: 2, pages: 24 },
];

function memory(seed: number): Map<number, Uint8Array> {
  let s = seed;
  const mem = new Map<number, Uint8Array>();
  for (const { slot, pages } of LAYOUT) {
    const m = new Uint8Array(pages * PAGE);
    for (let p = 0; p < pages; p++) {
      if (p % 5 === 4) continue; // leave some zero pages
      for (let i = 0; i < PAGE; i += 64) m[p * PAGE + i] = (s = (s * 1103515245 + 12345) >>> 0) >>> 24;
      m[p * PAGE] |= 1;
    }
    mem.set(slot, m);
  }
  return mem;
}

const reader = (mem: Map<number, Uint8Array>) => (slot: number, first: number, dst: Uint8Array) =>
  dst.set(mem.get(slot)!.subarray(first * PAGE, first * PAGE + dst.length));

describe('memory hash', () => {
  it('is order independent: pages hashed into a table in any order give the full-scan hash', async () => {
    const h = await createMemoryHasher();
    const mem = memory(1);
    const full = h.hashGuestMemory(reader(mem), LAYOUT, 7);
    expect(full.pages).toBe(64);
    const pages = LAYOUT.flatMap(({ slot, pages: n }) => Array.from({ length: n }, (_, p) => [slot, p] as const));
    for (const order of [pages, [...pages].reverse(), [...pages].sort((a, b) => ((a[1] * 7919) % 13) - ((b[1] * 7919) % 13))]) {
      const table = new PageHashTable(LAYOUT);
      for (const [slot, p] of order) h.hashInto(table, slot, p, 1, mem.get(slot)!.subarray(p * PAGE, (p + 1) * PAGE));
      expect(table.total()).toBe(full.memoryHash);
    }
  });

  it('changes when one byte changes, or when two pages swap contents', async () => {
    const h = await createMemoryHasher();
    const mem = memory(2);
    const base = h.hashGuestMemory(reader(mem), LAYOUT).memoryHash;
    for (const [slot, off] of [[0, 0], [0, 4095], [2, 23 * PAGE + 1000], [0, 4 * PAGE + 17]] as const) {
      const m = mem.get(slot)!;
      m[off] ^= 0x10;
      expect(h.hashGuestMemory(reader(mem), LAYOUT).memoryHash).not.toBe(base);
      m[off] ^= 0x10;
    }
    expect(h.hashGuestMemory(reader(mem), LAYOUT).memoryHash).toBe(base);
    const m0 = mem.get(0)!;
    const a = m0.slice(0, PAGE);
    m0.copyWithin(0, PAGE, 2 * PAGE);
    m0.set(a, PAGE);
    expect(h.hashGuestMemory(reader(mem), LAYOUT).memoryHash).not.toBe(base);
  });

  it('incremental table with re-sent and zeroed pages equals a full scan of the final memory', async () => {
    const h = await createMemoryHasher();
    const mem = memory(3);
    const table = new PageHashTable(LAYOUT);
    expect(table.total()).toBe(h.hashGuestMemory(reader(new Map(LAYOUT.map((s) => [s.slot, new Uint8Array(s.pages * PAGE)]))), LAYOUT).memoryHash);
    expect(table.total()).toBe(0n);
    // Round 1: everything.
    for (const { slot, pages } of LAYOUT) h.hashInto(table, slot, 0, pages, mem.get(slot)!);
    // Round 2: some pages change, some become zero.
    const m2 = mem.get(2)!;
    m2[5 * PAGE + 9] = 77;
    h.hashInto(table, 2, 5, 1, m2.subarray(5 * PAGE, 6 * PAGE));
    mem.get(0)!.fill(0, 10 * PAGE, 13 * PAGE);
    table.setZero(0, 10, 3);
    expect(table.total()).toBe(h.hashGuestMemory(reader(mem), LAYOUT).memoryHash);
    expect(table.get(0, 11)).toBe(0n);
  });

  it('zeroing a run of pages at once removes exactly what zeroing them one by one removes', () => {
    const pages = 3 * (1 << 20) + 17; // past the run's 2^20-page flush
    const a = new PageHashTable([{ slot: 0, pages }]);
    const b = new PageHashTable([{ slot: 0, pages }]);
    let x = 0x12345678n;
    for (let p = 0; p < pages; p += 7) {
      x = BigInt.asUintN(64, x * 6364136223846793005n + 1442695040888963407n);
      a.set(0, p, x);
      b.set(0, p, x);
    }
    a.setZero(0, 3, pages - 5);
    for (let p = 3; p < pages - 2; p++) b.setZero(0, p, 1);
    expect(a.total()).toBe(b.total());
    expect(a.total()).not.toBe(0n);
    expect(a.get(0, 3 + 7 * 1000 - 3)).toBe(0n);
  });

  it('gives zero pages hash 0 and checks table bounds', async () => {
    const h = await createMemoryHasher();
    expect(h.hashPage(3, 9, new Uint8Array(PAGE))).toBe(0n);
    const p = new Uint8Array(PAGE);
    p[2048] = 1;
    expect(isZeroPage(p)).toBe(false);
    expect(h.hashPage(3, 9, p)).not.toBe(0n);
    expect(h.hashPage(3, 9, p)).not.toBe(h.hashPage(3, 10, p));
    expect(h.hashPage(3, 9, p)).not.toBe(h.hashPage(4, 9, p));
    const table = new PageHashTable(LAYOUT);
    expect(() => table.set(1, 0, 1n)).toThrow(/slot 1 is not in the layout/);
    expect(() => table.set(0, 40, 1n)).toThrow(/outside its 40 pages/);
  });
});
