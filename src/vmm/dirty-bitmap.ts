// Dirty bitmaps in KVM's layout (see engine.ts): page i is bit (i & 31) of word (i >> 5).
// Plain, unshared arrays: the engines copy their live logs into these.

export function bitmapWords(pages: number): number {
  // KVM sizes bitmaps in longs (64 bits); keep the same rounding so layouts match byte for byte.
  return Math.ceil(pages / 64) * 2;
}

export function newBitmap(pages: number): Uint32Array {
  return new Uint32Array(bitmapWords(pages));
}

export function testBit(bitmap: Uint32Array, page: number): boolean {
  return (bitmap[page >>> 5]! & (1 << (page & 31))) !== 0;
}

export function setBit(bitmap: Uint32Array, page: number): void {
  bitmap[page >>> 5]! |= 1 << (page & 31);
}

function popcount32(x: number): number {
  x = x - ((x >>> 1) & 0x55555555);
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (((x + (x >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

export function countBits(bitmap: Uint32Array): number {
  let n = 0;
  for (let i = 0; i < bitmap.length; i++) if (bitmap[i] !== 0) n += popcount32(bitmap[i]!);
  return n;
}

/** Call fn(page) for every set bit, in increasing page order. */
export function forEachSetBit(bitmap: Uint32Array, fn: (page: number) => void): void {
  for (let w = 0; w < bitmap.length; w++) {
    let word = bitmap[w]!;
    while (word !== 0) {
      const bit = 31 - Math.clz32(word & -word);
      fn(w * 32 + bit);
      word &= word - 1;
    }
  }
}
