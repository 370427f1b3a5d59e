// The reference model the conformance and differential tests hold engines to: which pages each
// pass writes and what memory holds afterwards, straight from src/guest/workload.ts.
import { PAGE_SIZE } from '../../src/vmm/engine.ts';
import { newBitmap, setBit } from '../../src/vmm/dirty-bitmap.ts';
import { initialRngState, pagesPerVcpu, pagesWrittenInPass, type WorkloadSpec } from '../../src/guest/workload.ts';

/** Replays the workload pass by pass for every vCPU. */
export class WorkloadModel {
  private readonly rngs: { hi: number; lo: number }[];
  private pass = 0;
  /** Last value written to each page of the test memory (page index from gpaBase), 0n if never. */
  readonly memory: BigUint64Array;

  constructor(
    readonly spec: WorkloadSpec,
    readonly vcpus: number,
  ) {
    this.rngs = Array.from({ length: vcpus }, (_, v) => initialRngState(spec, v));
    this.memory = new BigUint64Array(vcpus * pagesPerVcpu(spec));
  }

  /** Run the next pass; return the bitmap (over the whole test memory) of pages it wrote. */
  step(): Uint32Array {
    this.pass++;
    const per = pagesPerVcpu(this.spec);
    const bitmap = newBitmap(this.vcpus * per);
    for (let v = 0; v < this.vcpus; v++) {
      const value = (BigInt(v + 1) << 32n) | BigInt(this.pass);
      for (const p of pagesWrittenInPass(this.spec, this.rngs[v]!, this.pass, v)) {
        this.memory[v * per + p] = value;
        setBit(bitmap, v * per + p);
      }
    }
    return bitmap;
  }

  run(passes: number): void {
    while (this.pass < passes) this.step();
  }
}

/** The first word of every page of `bytes` at gpa, as read through readGuest. */
export function firstWords(read: (gpa: number, dst: Uint8Array) => void, gpa: number, pages: number): { words: BigUint64Array; restNonZero: number[] } {
  const buf = new Uint8Array(pages * PAGE_SIZE);
  read(gpa, buf);
  const view = new DataView(buf.buffer);
  const words = new BigUint64Array(pages);
  const restNonZero: number[] = [];
  for (let p = 0; p < pages; p++) {
    words[p] = view.getBigUint64(p * PAGE_SIZE, true);
    for (let o = 8; o < PAGE_SIZE; o += 8) {
      if (view.getBigUint64(p * PAGE_SIZE + o, true) !== 0n) {
        restNonZero.push(p);
        break;
      }
    }
  }
  return { words, restNonZero };
}

/** Pages where two first-word arrays differ (at most `limit` listed), for readable failures. */
export function diffPages(a: BigUint64Array, b: BigUint64Array, limit = 8): string[] {
  const out: string[] = [];
  for (let i = 0; i < Math.max(a.length, b.length) && out.length < limit; i++) {
    if (a[i] !== b[i]) out.push(`page ${i}: 0x${(a[i] ?? 0n).toString(16)} != 0x${(b[i] ?? 0n).toString(16)}`);
  }
  return out;
}

/** Set bits of `a` missing from `b` and vice versa (page numbers, at most `limit` each). */
export function bitmapDiff(actual: Uint32Array, expected: Uint32Array, limit = 8): { missing: number[]; extra: number[] } {
  const missing: number[] = [];
  const extra: number[] = [];
  for (let w = 0; w < Math.max(actual.length, expected.length); w++) {
    const a = actual[w] ?? 0;
    const e = expected[w] ?? 0;
    for (let b = 0; b < 32; b++) {
      const bit = 1 << b;
      if (e & bit && !(a & bit) && missing.length < limit) missing.push(w * 32 + b);
      if (a & bit && !(e & bit) && extra.length < limit) extra.push(w * 32 + b);
    }
  }
  return { missing, extra };
}
