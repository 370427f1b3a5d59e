// Linux per-thread scheduler accounting, for benchmarks that must tell "the vCPU thread was
// slow" from "the vCPU thread was waiting for a CPU".
//
// /proc/<pid>/task/<tid>/schedstat holds three numbers: nanoseconds on a CPU, nanoseconds
// runnable but waiting on a run queue, and timeslices run. The kernel updates them at every
// context switch and tick, so a reading is exact to within one tick for a running thread.
// Any thread can read any sibling's file; reading costs a few microseconds (an open and a read),
// so callers sample at round boundaries, never per page.
import { readFileSync, readlinkSync } from 'node:fs';

export interface ThreadSched {
  onCpuNs: number;
  runQueueNs: number;
}

/** The calling thread's Linux thread id (gettid), from the /proc/thread-self link "PID/task/TID". */
export function linuxThreadId(): number {
  const m = /\/task\/(\d+)$/.exec(readlinkSync('/proc/thread-self'));
  return m ? Number(m[1]) : 0;
}

/** Scheduler accounting of one thread of this process; null if it has exited (or tid is 0). */
export function readThreadSched(tid: number): ThreadSched | null {
  if (tid <= 0) return null;
  try {
    const [onCpu, runQueue] = readFileSync(`/proc/self/task/${tid}/schedstat`, 'latin1').split(' ');
    return { onCpuNs: Number(onCpu), runQueueNs: Number(runQueue) };
  } catch {
    return null;
  }
}

/** Read every thread in `tids`; sum of the differences from `before` (threads gone count 0). */
export function schedSince(tids: readonly number[], before: readonly (ThreadSched | null)[]): ThreadSched {
  const out = { onCpuNs: 0, runQueueNs: 0 };
  tids.forEach((tid, i) => {
    const a = before[i];
    const b = readThreadSched(tid);
    if (!a || !b) return;
    out.onCpuNs += b.onCpuNs - a.onCpuNs;
    out.runQueueNs += b.runQueueNs - a.runQueueNs;
  });
  return out;
}
