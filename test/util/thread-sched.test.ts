// Linux per-thread scheduler accounting, read from /proc for this thread and for a worker.
import { describe, expect, it } from 'vitest';
import { Worker } from 'node:worker_threads';
import { readdirSync } from 'node:fs';
import { linuxThreadId, readThreadSched, schedSince } from '../../src/util/thread-sched.ts';

describe('thread-sched', () => {
  it("names this thread's Linux tid and its on-CPU time grows while it spins", () => {
    const tid = linuxThreadId();
    expect(readdirSync('/proc/self/task').map(Number)).toContain(tid);
    const before = readThreadSched(tid)!;
    const t0 = process.hrtime.bigint();
    while (process.hrtime.bigint() - t0 < 30_000_000n); // 30 ms busy
    const d = schedSince([tid], [before]);
    expect(d.onCpuNs).toBeGreaterThan(5e6); // well below 30 ms: the box may be loaded
    expect(d.runQueueNs).toBeGreaterThanOrEqual(0);
  });

  it("reads a worker thread's accounting by the tid it reports, and null once it is gone", async () => {
    const code = `
      const { parentPort } = require('node:worker_threads');
      const { readlinkSync } = require('node:fs');
      parentPort.postMessage(Number(/task\\/(\\d+)$/.exec(readlinkSync('/proc/thread-self'))[1]));
      parentPort.once('message', () => process.exit(0));`;
    const w = new Worker(code, { eval: true });
    const tid = await new Promise<number>((r) => w.once('message', r));
    expect(tid).not.toBe(linuxThreadId());
    expect(readThreadSched(tid)).not.toBeNull();
    const exited = new Promise((r) => w.once('exit', r));
    w.postMessage('stop');
    await exited;
    // The kernel reaps the task shortly after the thread exits.
    const t0 = Date.now();
    while (readThreadSched(tid) !== null && Date.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 10));
    expect(readThreadSched(tid)).toBeNull();
    expect(readThreadSched(0)).toBeNull();
    expect(schedSince([tid], [{ onCpuNs: 1, runQueueNs: 1 }])).toEqual({ onCpuNs: 0, runQueueNs: 0 });
  });
});
