// Token bucket for --max-bandwidth (QEMU's max-bandwidth / migration rate limit): the sender
// asks for N bytes and waits until the bucket holds them. Burst = 50 ms worth of bandwidth, so
// the link never idles longer than a timer tick and never bursts far above the limit.
//
// Concurrency: single-threaded (one sender loop).
export class TokenBucket {
  private tokens: number;
  private last = performance.now();
  private readonly burst: number;

  /** bytesPerSecond 0 or Infinity means unlimited. */
  constructor(private readonly bytesPerSecond: number) {
    this.burst = Math.max(256 * 1024, bytesPerSecond * 0.05);
    this.tokens = this.burst;
  }

  get unlimited(): boolean {
    return !(this.bytesPerSecond > 0) || !Number.isFinite(this.bytesPerSecond);
  }

  /** Resolve when `bytes` may be sent (immediately, without a promise tick, when unlimited). */
  take(bytes: number): Promise<void> | null {
    if (this.unlimited) return null;
    const now = performance.now();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.bytesPerSecond);
    this.last = now;
    this.tokens -= bytes;
    if (this.tokens >= 0) return null;
    const waitMs = (-this.tokens / this.bytesPerSecond) * 1000;
    return new Promise((r) => setTimeout(r, waitMs));
  }
}
