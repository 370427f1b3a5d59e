// Per-vCPU page-wait times (fault -> re-entry) for DemandPager.waits(): a log-scale histogram per
// vCPU, 8 buckets per octave from 100 ns (p50/p99 within ~9%), plus exact count, total and max.
//
// Concurrency rules: line v of the Float64Array is written by vCPU v's thread only, with plain
// stores; the main thread reads racy snapshots (a figure may lag by the wait being recorded).

import type { VcpuPageWaits } from '../../vmm/demand-paging.ts';

const H_COUNT = 0;
const H_TOTAL = 1;
const H_MAX = 2;
const H_BUCKETS = 3;
const BUCKETS = 256;
const LINE = H_BUCKETS + BUCKETS;
const MIN_SECONDS = 1e-7;
const PER_OCTAVE = 8;

export class WaitHistogram {
  private readonly f: Float64Array;

  constructor(readonly sab: SharedArrayBuffer) {
    this.f = new Float64Array(sab);
  }

  static create(vcpus: number): WaitHistogram {
    return new WaitHistogram(new SharedArrayBuffer(vcpus * LINE * 8));
  }

  get vcpus(): number {
    return this.f.length / LINE;
  }

  /** vCPU v's own thread only. */
  record(v: number, seconds: number): void {
    const f = this.f;
    const b = v * LINE;
    f[b + H_COUNT]! += 1;
    f[b + H_TOTAL]! += seconds;
    if (seconds > f[b + H_MAX]!) f[b + H_MAX] = seconds;
    const k = seconds <= MIN_SECONDS ? 0 : Math.min(BUCKETS - 1, Math.floor(Math.log2(seconds / MIN_SECONDS) * PER_OCTAVE));
    f[b + H_BUCKETS + k]! += 1;
  }

  read(v: number): VcpuPageWaits {
    const f = this.f;
    const b = v * LINE;
    const n = f[b + H_COUNT]!;
    const max = f[b + H_MAX]!;
    const pct = (q: number): number => {
      if (n === 0) return 0;
      const want = Math.ceil(q * n);
      let seen = 0;
      for (let k = 0; k < BUCKETS; k++) {
        seen += f[b + H_BUCKETS + k]!;
        if (seen >= want) return Math.min(max, MIN_SECONDS * 2 ** ((k + 1) / PER_OCTAVE));
      }
      return max;
    };
    return { vcpu: v, faults: n, p50: pct(0.5), p99: pct(0.99), max, total: f[b + H_TOTAL]! };
  }
}
