import { describe, expect, it } from 'vitest';
import { bitmapWords, countBits, forEachSetBit, newBitmap, setBit, testBit } from '../../src/vmm/dirty-bitmap.ts';

describe('dirty bitmap layout', () => {
  it("matches KVM's unsigned long bitmap byte for byte", () => {
    const b = newBitmap(100);
    expect(b.length).toBe(bitmapWords(100));
    expect(b.byteLength % 8).toBe(0);
    setBit(b, 0);
    setBit(b, 9);
    setBit(b, 70);
    const bytes = new Uint8Array(b.buffer);
    expect(bytes[0]).toBe(1);
    expect(bytes[1]).toBe(2);
    expect(bytes[8]).toBe(1 << 6);
    expect(testBit(b, 70)).toBe(true);
    expect(testBit(b, 71)).toBe(false);
  });

  it('counts and enumerates set bits in order', () => {
    const b = newBitmap(4096);
    const pages = [0, 31, 32, 63, 64, 1000, 4095];
    for (const p of pages) setBit(b, p);
    expect(countBits(b)).toBe(pages.length);
    const seen: number[] = [];
    forEachSetBit(b, (p) => seen.push(p));
    expect(seen).toEqual(pages);
  });
});
