import { describe, it, expect } from 'vitest';
import {
  MAX_PFN, PROT_DEVICE, PROT_R, PROT_RW, PROT_W, PTE_LOCKED, PTE_POISON, formatPte, levelPages, mkLeaf, mkTable, pteIndex,
  pteChangeNeedsFlush, pteIsDevice, pteIsLeaf, pteIsLocked, pteIsTable, pteIsValid, leafPfn, pteReadable, tableIndex, pteWithPerms, pteWritable,
  leafAttrs, leafChangeRemovesPerms, leafFromAttrs, leafIsDevice, leafProt, leafRW, leafWithPermsAdded, leafWithWrite, leafWithoutWrite, leafWritable,
  leavesDifferOnlyInPerms, pteGrants, pteIsPoison, pteIsWriteProtectedRam, tableBase,
} from '../../../src/soft/pgtable/pte.ts';
import { TLB_R, TLB_W } from '../../../src/soft/vcpu/soft-tlb.ts';

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
      expect(leafPfn(ro)).toBe(pfn);
      expect(leafPfn(rw)).toBe(pfn);
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
    expect(leafPfn(pteWithPerms(d, PROT_R))).toBe(77);
    expect(pteIsDevice(pteWithPerms(d, PROT_R))).toBe(true);
  });

  it('a table entry points at a pool page', () => {
    const t = mkTable(4242);
    expect(pteIsTable(t) && pteIsValid(t) && !pteIsLeaf(t)).toBe(true);
    expect(tableIndex(t)).toBe(4242);
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

describe('accessors for callers that already know the type', () => {
  it('leaf accessors read and rebuild what mkLeaf put in', () => {
    const ro = mkLeaf(4321, PROT_R);
    const rw = mkLeaf(4321, PROT_RW);
    const dev = mkLeaf(9, PROT_RW | PROT_DEVICE);
    expect([leafWritable(ro), leafWritable(rw), leafWritable(0)]).toEqual([false, true, false]);
    expect([leafIsDevice(dev), leafIsDevice(rw), leafIsDevice(0)]).toEqual([true, false, false]);
    expect([leafWithWrite(ro), leafWithoutWrite(rw), leafWithPermsAdded(ro, PROT_RW | PROT_DEVICE)]).toEqual([rw, ro, rw]);
    expect(leafFromAttrs(4321 + 7, leafAttrs(ro))).toBe(mkLeaf(4328, PROT_R));
    expect(leafProt(leafAttrs(dev))).toBe(PROT_RW | PROT_DEVICE);
    expect(leafRW(ro)).toBe(TLB_R);
    expect(leafRW(rw)).toBe(TLB_R | TLB_W);
    expect(leafRW(mkLeaf(1, PROT_W))).toBe(TLB_W);
    expect(leavesDifferOnlyInPerms(ro, rw) && !leavesDifferOnlyInPerms(ro, mkLeaf(4322, PROT_R)) && !leavesDifferOnlyInPerms(rw, dev)).toBe(true);
    expect([leafChangeRemovesPerms(rw, ro), leafChangeRemovesPerms(ro, rw)]).toEqual([true, false]);
  });

  it('checking accessors reject every other kind of word', () => {
    const ro = mkLeaf(5, PROT_R);
    for (const w of [0, mkTable(3), PTE_LOCKED, PTE_POISON, mkLeaf(5, PROT_RW), mkLeaf(5, PROT_R | PROT_DEVICE)]) {
      expect(pteIsWriteProtectedRam(w)).toBe(false);
    }
    expect(pteIsWriteProtectedRam(ro)).toBe(true);
    expect([pteGrants(ro, false), pteGrants(ro, true), pteGrants(mkTable(12), false), pteGrants(PTE_POISON, true)]).toEqual([true, false, false, false]);
    expect([pteIsPoison(PTE_POISON), pteIsPoison(PTE_LOCKED)]).toEqual([true, false]);
    expect(tableBase(mkTable(4242))).toBe(4242 * 512);
  });
});
