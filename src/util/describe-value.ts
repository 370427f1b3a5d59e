// How a rejected value from outside (CONFIG, a vCPU state) appears in an error message.
//
// Concurrency: pure function.

/** A short, printable description of `v`: strings quoted, containers named, at most 43 chars. */
export function describeValue(v: unknown): string {
  const s = typeof v === 'string' ? JSON.stringify(v) : typeof v === 'object' && v !== null ? (Array.isArray(v) ? 'an array' : 'an object') : String(v);
  return s.length > 40 ? `${s.slice(0, 40)}...` : s;
}
