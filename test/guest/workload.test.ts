import { describe, expect, it } from 'vitest';
import { guestWriteValue, initialRngState, pagesWrittenInPass, workload, xorshift64Step } from '../../src/guest/workload.ts';

/** The generator in BigInt, straight from its definition, as the reference. */
function xorshift64Ref(x: bigint): bigint {
  x = BigInt.asUintN(64, x ^ (x << 13n));
  x = BigInt.asUintN(64, x ^ (x >> 7n));
  x = BigInt.asUintN(64, x ^ (x << 17n));
  return x;
}

describe('workload spec', () => {
  it('the 32-bit xorshift64 step equals the 64-bit definition', () => {
    const s = initialRngState(workload('random', 1 << 20, { seed: 7 }), 3);
    let ref = (BigInt(s.hi) << 32n) | BigInt(s.lo);
    for (let i = 0; i < 10_000; i++) {
      const lo = xorshift64Step(s);
      ref = xorshift64Ref(ref);
      expect((BigInt(s.hi) << 32n) | BigInt(s.lo)).toBe(ref);
      expect(lo).toBe(Number(ref & 0xffffffffn));
    }
  });

  it('gives each vCPU a distinct non-zero generator state', () => {
    const spec = workload('random', 1 << 20, { seed: 1 });
    const states = new Set<string>();
    for (let v = 0; v < 64; v++) {
      const s = initialRngState(spec, v);
      expect(s.hi !== 0 || s.lo !== 0).toBe(true);
      states.add(`${s.hi}:${s.lo}`);
    }
    expect(states.size).toBe(64);
  });

  it('describes the pages each kind writes', () => {
    const pages = 64;
    const rng = () => initialRngState(workload('random', pages * 4096), 0);
    expect(pagesWrittenInPass(workload('sequential', pages * 4096), rng(), 5)).toEqual([...Array(pages).keys()]);
    expect(pagesWrittenInPass(workload('idle', pages * 4096), rng(), 1)).toHaveLength(pages);
    expect(pagesWrittenInPass(workload('idle', pages * 4096), rng(), 2)).toHaveLength(0);
    const random = pagesWrittenInPass(workload('random', pages * 4096), rng(), 1);
    expect(random).toHaveLength(pages);
    expect(random.every((p) => p >= 0 && p < pages)).toBe(true);
    expect(new Set(random).size).toBeGreaterThan(pages / 2);
    const none = pagesWrittenInPass(workload('rwmix', pages * 4096, { writePercent: 0 }), rng(), 1);
    const all = pagesWrittenInPass(workload('rwmix', pages * 4096, { writePercent: 100 }), rng(), 1);
    expect(none).toHaveLength(0);
    expect(all).toHaveLength(pages);
  });

  it('encodes the vCPU and pass in the value written', () => {
    expect(guestWriteValue(0, 1)).toEqual({ hi: 1, lo: 1 });
    expect(guestWriteValue(3, 0x1_0000_0005)).toEqual({ hi: 4, lo: 5 });
  });
});
