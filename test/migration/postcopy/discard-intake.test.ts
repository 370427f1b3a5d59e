// DiscardIntake: POSTCOPY_DISCARD lists taken a run and a stretch at a time must mark exactly
// the listed pages, take exactly the held ones out of the hash table and guest RAM (now with a
// running pager, else at the switch), refuse bits past the range and engine-internal pages, and
// at the switch also drop never-received pages of partly received 2 MiB blocks.
import { describe, expect, it } from 'vitest';
import { DiscardIntake } from '../../../src/migration/postcopy/discard-intake.ts';
import type { DemandPager } from '../../../src/vmm/demand-paging.ts';
import type { PageHashTable } from '../../../src/migration/hash.ts';

const PAGES = 4096;

function setup(received: (p: number) => boolean, internal: (p: number) => boolean = () => false) {
  const lastRound = new Uint32Array(PAGES);
  const internalPage = new Uint8Array(PAGES);
  for (let p = 0; p < PAGES; p++) {
    if (received(p)) lastRound[p] = 1;
    if (internal(p)) internalPage[p] = 1;
  }
  const zeroed = new Set<number>();
  const table = { setZero: (_slot: number, first: number, n: number) => { for (let p = first; p < first + n; p++) zeroed.add(p); } } as unknown as PageHashTable;
  const dropped: number[] = [];
  const pager = { discard: (_slot: number, pages: Iterable<number>) => { for (const p of pages) dropped.push(p); } } as unknown as DemandPager;
  const intake = new DiscardIntake(lastRound, internalPage, table, (m) => new Error(m));
  return { intake, zeroed, dropped, pager };
}

function bitmapOf(pages: number[], count: number): Uint8Array {
  const b = new Uint8Array(Math.ceil(count / 8));
  for (const p of pages) b[p >> 3]! |= 1 << (p & 7);
  return b;
}

// A seeded list: long runs, single pages, whole 0xff bytes, across stretch boundaries.
function listed(): number[] {
  const out: number[] = [];
  let x = 12345;
  for (let p = 0; p < PAGES; p++) {
    x = (x * 1103515245 + 12345) >>> 0;
    if (p >= 1000 && p < 2600) out.push(p); // a run over several stretches
    else if (x % 7 === 0) out.push(p);
  }
  return out;
}

describe('DiscardIntake', () => {
  it('marks exactly the listed pages and drops exactly the held ones, at once with a running pager', () => {
    const held = (p: number) => p % 3 === 0 || (p >= 1500 && p < 1700);
    const { intake, zeroed, dropped, pager } = setup(held);
    const list = listed();
    intake.take(0, 0, 0, PAGES, bitmapOf(list, PAGES), pager);
    const want = new Set(list);
    for (let p = 0; p < PAGES; p++) expect(intake.discarded[p], `page ${p}`).toBe(want.has(p) ? 1 : 0);
    const wantHeld = list.filter(held);
    expect([...zeroed].sort((a, b) => a - b)).toEqual(wantHeld);
    expect(dropped).toEqual(wantHeld);
    expect(intake.staleCount).toBe(wantHeld.length);
    // Listing them again changes nothing.
    intake.take(0, 0, 0, PAGES, bitmapOf(list, PAGES), pager);
    expect(intake.staleCount).toBe(wantHeld.length);
    expect(dropped.length).toBe(wantHeld.length);
  });

  it('without a pager keeps the held pages for the switch, which also drops the never-received pages of partly received blocks', () => {
    // Block 0 (pages 0-511): fully received; block 1: partly; blocks 2-7: nothing.
    const held = (p: number) => p < 512 || (p >= 512 && p < 600);
    const { intake, dropped, pager } = setup(held);
    intake.take(0, 0, 0, 64, bitmapOf([3, 4, 5, 40], 64), null);
    expect(dropped).toEqual([]);
    intake.dropAtSwitch(pager, 0, 0, PAGES);
    const partial = Array.from({ length: 1024 - 600 }, (_, k) => 600 + k);
    expect(dropped).toEqual([3, 4, 5, 40, ...partial]);
  });

  it('refuses bits past the range and engine-internal pages', () => {
    const { intake, pager } = setup(() => false, (p) => p === 77);
    expect(() => intake.take(0, 0, 0, 10, bitmapOf([9, 10], 16), pager)).toThrow(/sets bit 10 past its 10 pages/);
    expect(() => intake.take(3, 64, 64, 64, bitmapOf([13], 64), pager)).toThrow(/memslot 3 page 77: engine-internal/);
  });
});
