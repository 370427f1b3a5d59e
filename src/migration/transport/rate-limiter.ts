// Token-bucket bandwidth cap (--max-bandwidth), shared by all channels of a migration. take(n)
// charges n bytes and, when the bucket is in debt, sleeps until the debt is paid: over any
// interval T the bytes let through are at most bytesPerSecond*T + burstBytes (plus one write,
// which may overdraw). Callers are the channels' single-threaded writers on the main thread, so
// no locking is needed; the debt model keeps concurrent callers fair enough without a queue.

import { setTimeout as sleep } from 'node:timers/promises';

export class RateLimiter {
  private tokens: number;
  private last = process.hrtime.bigint();
  /** Seconds spent sleeping in take(), for stats. */
  throttledSeconds = 0;

  constructor(
    readonly bytesPerSecond: number,
    readonly burstBytes = Math.max(64 * 1024, Math.floor(bytesPerSecond / 20)),
  ) {
    if (!(bytesPerSecond > 0) || !Number.isFinite(bytesPerSecond)) {
      throw new RangeError(`RateLimiter: bytesPerSecond must be a positive number, got ${bytesPerSecond}`);
    }
    this.tokens = burstBytes;
  }

  private refill(): void {
    const now = process.hrtime.bigint();
    const elapsed = Number(now - this.last) / 1e9;
    this.last = now;
    this.tokens = Math.min(this.burstBytes, this.tokens + elapsed * this.bytesPerSecond);
  }

  /** Charge `bytes`; resolves when the caller may send them. */
  async take(bytes: number): Promise<void> {
    this.refill();
    this.tokens -= bytes;
    if (this.tokens >= 0) return;
    const waitSeconds = -this.tokens / this.bytesPerSecond;
    this.throttledSeconds += waitSeconds;
    await sleep(Math.ceil(waitSeconds * 1000));
  }
}
