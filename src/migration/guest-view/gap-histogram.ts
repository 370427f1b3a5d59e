// The gaps between a vCPU's consecutive units of progress (vmm/run/progress-clock.ts), kept as a
// log-bucketed histogram: buckets 1% wide from 1 us up, so any percentile is known to within 1%
// in bounded memory however long a migration runs, and histograms from the source and the
// destination add up. The largest gap is kept exactly beside it.
//
// Thread-confined (the VMM's main thread); plain data, JSON-serialisable through toJSON.

const MIN_MS = 0.001;
const RATIO = 1.01;
const LOG_RATIO = Math.log(RATIO);
const MAX_BUCKET = 2400; // 1 us * 1.01^2400: about 6 hours

/** [bucket, count] pairs, ascending bucket: a histogram as JSON carries it. */
export type GapBuckets = [number, number][];

export class GapHistogram {
  private readonly counts = new Map<number, number>();
  count = 0;
  maxMs = 0;

  static bucketOf(gapMs: number): number {
    if (!(gapMs > MIN_MS)) return 0;
    return Math.min(MAX_BUCKET, Math.ceil(Math.log(gapMs / MIN_MS) / LOG_RATIO - 1e-9));
  }

  /** The largest gap bucket `b` holds (its upper edge). */
  static upperMs(bucket: number): number {
    return MIN_MS * RATIO ** bucket;
  }

  add(gapMs: number, times = 1): void {
    const b = GapHistogram.bucketOf(gapMs);
    this.counts.set(b, (this.counts.get(b) ?? 0) + times);
    this.count += times;
    if (gapMs > this.maxMs) this.maxMs = gapMs;
  }

  merge(other: GapHistogram): void {
    for (const [b, n] of other.counts) this.counts.set(b, (this.counts.get(b) ?? 0) + n);
    this.count += other.count;
    this.maxMs = Math.max(this.maxMs, other.maxMs);
  }

  /**
   * The gap at quantile q (0..1]: the upper edge of the bucket holding the ceil(q * count)-th
   * smallest gap, never above the largest gap seen. Null when there are no gaps.
   */
  quantileMs(q: number): number | null {
    if (this.count === 0) return null;
    const rank = Math.max(1, Math.ceil(q * this.count));
    let seen = 0;
    for (const b of [...this.counts.keys()].sort((x, y) => x - y)) {
      seen += this.counts.get(b)!;
      if (seen >= rank) return Math.min(GapHistogram.upperMs(b), this.maxMs);
    }
    return this.maxMs;
  }

  toJSON(): { count: number; maxMs: number; buckets: GapBuckets } {
    return { count: this.count, maxMs: this.maxMs, buckets: [...this.counts.entries()].sort((x, y) => x[0] - y[0]) };
  }

  static fromJSON(j: { count: number; maxMs: number; buckets: GapBuckets }): GapHistogram {
    const h = new GapHistogram();
    for (const [b, n] of j.buckets) {
      if (!Number.isInteger(b) || b < 0 || b > MAX_BUCKET || !Number.isInteger(n) || n < 0) throw new RangeError(`gap histogram: bad bucket [${b}, ${n}]`);
      h.counts.set(b, (h.counts.get(b) ?? 0) + n);
      h.count += n;
    }
    h.maxMs = j.maxMs;
    return h;
  }
}
