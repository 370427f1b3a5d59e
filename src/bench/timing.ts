// Timing helpers shared by the benchmarks. All timings come from process.hrtime.bigint().

export type Instant = bigint;

export function now(): Instant {
  return process.hrtime.bigint();
}

/** Seconds elapsed since `t0`, as a float. */
export function secondsSince(t0: Instant): number {
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

/** Time an async or sync step; returns its value and the seconds it took. */
export async function timed<T>(step: () => T | Promise<T>): Promise<{ value: T; seconds: number }> {
  const t0 = now();
  const value = await step();
  return { value, seconds: secondsSince(t0) };
}

/** Seconds in the selftests' "%ld.%.9lds" form, e.g. 1.234567890s. */
export function formatSeconds(seconds: number): string {
  const whole = Math.floor(seconds);
  const nanos = Math.round((seconds - whole) * 1e9);
  return `${whole}.${String(Math.min(nanos, 999_999_999)).padStart(9, '0')}s`;
}

export function median(values: readonly number[]): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

export function mean(values: readonly number[]): number {
  return values.length === 0 ? NaN : values.reduce((a, b) => a + b, 0) / values.length;
}
