// A lock-free pool of small integers (free frames, free 2 MiB chunks) kept as a bitmap in shared
// memory.
//
// Concurrency rules:
// - A set bit means "free, claimable". Any thread may put (Atomics.or) or claim (compareExchange
//   of the whole word, clearing one bit). A bit is claimed by exactly one thread: the CAS that
//   clears it. There is no ABA problem because a claim only ever clears a bit it saw set.
// - count is a hint for "is it worth scanning": put increments it after setting the bit, claim
//   decrements it after clearing one, so it can lag but never stays high without a set bit behind
//   it. A claim that finds nothing after one full pass returns -1.
// - hint is where the next scan starts (any thread stores it; a stale hint only costs a longer scan).

const COUNT = 0;
const HINT = 1;

export interface BitPoolShared {
  bits: SharedArrayBuffer;
  ctl: SharedArrayBuffer;
  size: number;
}

export class AtomicBitPool {
  private readonly bits: Int32Array;
  private readonly ctl: Int32Array;
  readonly size: number;

  private constructor(readonly shared: BitPoolShared) {
    this.bits = new Int32Array(shared.bits);
    this.ctl = new Int32Array(shared.ctl);
    this.size = shared.size;
  }

  static create(size: number): AtomicBitPool {
    return new AtomicBitPool({
      bits: new SharedArrayBuffer(Math.max(4, Math.ceil(size / 32) * 4)),
      ctl: new SharedArrayBuffer(2 * 4),
      size,
    });
  }

  static attach(shared: BitPoolShared): AtomicBitPool {
    return new AtomicBitPool(shared);
  }

  /** Approximate number of set bits. */
  count(): number {
    return Atomics.load(this.ctl, COUNT);
  }

  put(i: number): void {
    const prev = Atomics.or(this.bits, i >>> 5, 1 << (i & 31));
    if ((prev & (1 << (i & 31))) !== 0) throw new Error(`bit ${i} put into the pool twice`);
    Atomics.add(this.ctl, COUNT, 1);
  }

  has(i: number): boolean {
    return (Atomics.load(this.bits, i >>> 5) & (1 << (i & 31))) !== 0;
  }

  /** Remove a specific bit if set; true if this call removed it. */
  take(i: number): boolean {
    const w = i >>> 5;
    const mask = 1 << (i & 31);
    for (;;) {
      const word = Atomics.load(this.bits, w);
      if ((word & mask) === 0) return false;
      if (Atomics.compareExchange(this.bits, w, word, word & ~mask) === word) {
        Atomics.sub(this.ctl, COUNT, 1);
        return true;
      }
    }
  }

  /** Claim any set bit; -1 when none. */
  claim(): number {
    if (Atomics.load(this.ctl, COUNT) <= 0) return -1;
    const words = this.bits.length;
    const start = Atomics.load(this.ctl, HINT) % words;
    for (let n = 0; n < words; n++) {
      const w = (start + n) % words;
      let word = Atomics.load(this.bits, w);
      while (word !== 0) {
        const low = word & -word;
        const seen = Atomics.compareExchange(this.bits, w, word, word & ~low);
        if (seen === word) {
          Atomics.sub(this.ctl, COUNT, 1);
          if (n !== 0) Atomics.store(this.ctl, HINT, w);
          return w * 32 + (31 - Math.clz32(low));
        }
        word = seen;
      }
    }
    return -1;
  }
}
