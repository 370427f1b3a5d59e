// populated() is lookupPfn() >= 0 for a range at once: it must agree with lookupPfn page by page
// over every VMA kind and every block state (empty, huge, split, partly zapped, mixed ptes), and
// across VMA boundaries and holes.
import { describe, it, expect } from 'vitest';
import { HostMemory } from '../../../src/soft/hostmem/index.ts';
import { HostAddressSpace, GupResult } from '../../../src/soft/hostmm/index.ts';

const MiB = 1 << 20;
const PAGE = 4096;

function expectAgrees(as: HostAddressSpace, hva: number, pages: number) {
  const out = new Uint8Array(pages + 3).fill(7);
  const n = as.populated(hva, pages, out, 2);
  const want = Array.from({ length: pages }, (_, k) => (as.lookupPfn(hva + k * PAGE) >= 0 ? 1 : 0));
  expect(Array.from(out.subarray(2, 2 + pages))).toEqual(want);
  expect(n).toBe(want.reduce((a: number, b) => a + b, 0));
  expect([out[0], out[1], out[pages + 2]]).toEqual([7, 7, 7]); // nothing written outside [at, at + pages)
}

describe('HostAddressSpace.populated', () => {
  it('agrees with lookupPfn over anonymous, THP and hugetlb VMAs in every block state', () => {
    const mem = HostMemory.create({ ramBytes: 64 * MiB });
    const as = HostAddressSpace.create(mem);
    const out = new GupResult();
    const anon = as.mmap(2 * MiB + 16 * PAGE, 'anonymous');
    const thp = as.mmap(6 * MiB + 8 * PAGE, 'anonymous_thp');
    const tlb = as.mmap(4 * MiB, 'hugetlb');
    const touch = (hva: number) => {
      const pfn = as.getUserPage(hva, true, out);
      expect(pfn).toBeGreaterThanOrEqual(0);
      mem.releasePfn(pfn);
    };
    // anonymous: a full first block, then a sparse tail.
    for (let p = 0; p < 512; p++) touch(anon + p * PAGE);
    for (let p = 512; p < 528; p += 3) touch(anon + p * PAGE);
    // THP: block 0 huge, block 1 huge then split and partly zapped, block 2 empty, tail 4 KiB.
    touch(thp);
    touch(thp + 2 * MiB);
    expect(as.splitHugePmd(thp + 2 * MiB)).toBe(true);
    as.zapRange(thp + 2 * MiB + 10 * PAGE, 5 * PAGE);
    touch(thp + 6 * MiB + 2 * PAGE);
    // hugetlb: one block mapped, one not.
    touch(tlb + 2 * MiB);
    expectAgrees(as, anon, 528);
    expectAgrees(as, thp, 6 * 256 + 8);
    expectAgrees(as, tlb, 1024);
    // Unaligned starts and short ranges.
    expectAgrees(as, anon + 500 * PAGE, 20);
    expectAgrees(as, thp + 2 * MiB + 7 * PAGE, 600);
    expectAgrees(as, thp + 5 * PAGE, 3);
    // Ranges that run off the end of a VMA, into the next one or a hole.
    expectAgrees(as, anon + 520 * PAGE, 16);
    expectAgrees(as, tlb + 4 * MiB - 2 * PAGE, 8);
  });
});
