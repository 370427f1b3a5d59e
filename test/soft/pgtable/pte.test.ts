import { describe, it, expect } from 'vitest';
import {
  MAX_PFN, PROT_DEVICE, PROT_R, PROT_RW, PTE_LOCKED, PTE_POISON, formatPte, levelPages, mkLeaf, mkTable, pteIndex,
  pteChangeNeedsFlush, pteIsDevice, pteIsLeaf, pteIsLocked, pteIsTable, pteIsValid, ptePfn, pteReadable, pteTableIndex, pteWithPerms, pteWritable,
} from '../../../src/soft/pgtable/pte.ts';

describe('pte format', () => {
  it('zero is invalid', () => {
    expect(pteIsValid(0)).toBe(false);
    expect(pteIsLeaf(0)).toBe(false);
    expect(pteIsTable(0)).toBe(false);
  });

  it('a leaf round-trips pfn and permissions, up to the largest pfn', () => {
    for (const pfn of [0, 1, 12345, 2 ** 26, MAX_PFN]) {
      const ro = mkLeaf(pfn, PROT_R);
      const rw = mkLeaf(pfn, PROT_RW);
      expect(ptePfn(ro)).toBe(pfn);
      expect(ptePfn(rw)).toBe(pfn);
      expect(pteIsLeaf(rw) && pteIsValid(rw) && !pteIsTable(rw)).toBe(true);
      expect(pteReadable(ro) && !pteWritable(ro)).toBe(true);
      expect(pteWritable(rw)).toBe(true);
      expect(pteWithPerms(ro, PROT_RW)).toBe(rw);
      expect(pteWithPerms(rw, PROT_R)).toBe(ro);
    }
    expect(() => mkLeaf(MAX_PFN + 1, PROT_R)).toThrow(/27 bits/);
    expect(() => mkLeaf(-1, PROT_R)).toThrow();
  });

  it('device attribute is kept apart from permissions', () => {
    const d = mkLeaf(77, PROT_RW | PROT_DEVICE);
    expect(pteIsDevice(d)).toBe(true);
    expect(pteIsDevice(mkLeaf(77, PROT_RW))).toBe(false);
    expect(ptePfn(pteWithPerms(d, PROT_R))).toBe(77);
    expect(pteIsDevice(pteWithPerms(d, PROT_R))).toBe(true);
  });

  it('a table entry points at a pool page', () => {
    const t = mkTable(4242);
    expect(pteIsTable(t) && pteIsValid(t) && !pteIsLeaf(t)).toBe(true);
    expect(pteTableIndex(t)).toBe(4242);
    expect(() => mkTable(0)).toThrow();
  });

  it('LOCKED and POISON are neither valid, leaf nor table', () => {
    for (const p of [PTE_LOCKED, PTE_POISON]) {
      expect(pteIsValid(p) || pteIsLeaf(p) || pteIsTable(p)).toBe(false);
    }
    expect(pteIsLocked(PTE_LOCKED)).toBe(true);
    expect(pteIsLocked(PTE_POISON)).toBe(false);
    expect(formatPte(PTE_LOCKED)).toBe('LOCKED');
    expect(formatPte(PTE_POISON)).toBe('POISON');
  });

  it('indexes 9 bits per level over a 36-bit gfn', () => {
    const gfn = 3 * 2 ** 27 + 5 * 2 ** 18 + 7 * 512 + 9 + 2 ** 35;
    expect(pteIndex(gfn, 0)).toBe(259);
    expect(pteIndex(gfn, 1)).toBe(5);
    expect(pteIndex(gfn, 2)).toBe(7);
    expect(pteIndex(gfn, 3)).toBe(9);
    expect([0, 1, 2, 3].map(levelPages)).toEqual([2 ** 27, 2 ** 18, 512, 1]);
  });

  it('knows which changes need a TLB flush', () => {
    const ro = mkLeaf(5, PROT_R);
    const rw = mkLeaf(5, PROT_RW);
    expect(pteChangeNeedsFlush(0, rw)).toBe(false); // invalid -> valid
    expect(pteChangeNeedsFlush(ro, rw)).toBe(false); // relax
    expect(pteChangeNeedsFlush(rw, ro)).toBe(true); // write-protect
    expect(pteChangeNeedsFlush(rw, mkLeaf(6, PROT_RW))).toBe(true); // other pfn
    expect(pteChangeNeedsFlush(rw, mkLeaf(5, PROT_RW | PROT_DEVICE))).toBe(true); // attribute
    expect(pteChangeNeedsFlush(rw, 0)).toBe(true); // unmap
    expect(pteChangeNeedsFlush(rw, PTE_LOCKED)).toBe(true); // break
    expect(pteChangeNeedsFlush(mkTable(3), mkLeaf(0, PROT_RW))).toBe(true); // collapse
    expect(pteChangeNeedsFlush(PTE_LOCKED, rw)).toBe(false); // make
  });
});
