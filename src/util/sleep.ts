// Timers that never outlive a cancel.
//
// Concurrency: main thread only.

/** Resolves after `ms`, or at once when `signal` aborts; leaves no timer and no listener behind. */
export function sleepUnless(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise<void>((r) => {
    // The listener goes when the timer fires: a retry loop must not pile them up on the signal.
    const onAbort = () => (clearTimeout(t), r());
    const t = setTimeout(() => (signal.removeEventListener('abort', onAbort), r()), ms);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}
