// Threads that touch registered memory for the uffd tests: each is a real worker thread that
// blocks in the kernel on a missing page until another thread resolves it.
//
// Concurrency: a toucher reads/writes only the registered buffer (pages it is given) and
// publishes its progress in its own slot of `progress` (a separate, never registered
// SharedArrayBuffer) with Atomics.store, so the test thread can see it is still blocked without
// touching registered memory itself.
import { Worker } from 'node:worker_threads';
import { Userfaultfd } from '../../src/uffd/userfaultfd.ts';

export const PAGE = 4096;

const TOUCHER = `
const { workerData, parentPort } = require('node:worker_threads');
const { buffer, pages, progress, slot } = workerData;
const words = new Int32Array(buffer);
const prog = new Int32Array(progress);
const seen = [];
for (const p of pages) {
  seen.push(Atomics.load(words, p * 1024), Atomics.load(words, p * 1024 + 1023));
  Atomics.add(prog, slot, 1);
}
parentPort.postMessage(seen);
`;

export interface Toucher {
  /** [first word, last word] of each page, in the order touched. */
  done: Promise<number[]>;
  progress: () => number;
}

export function touch(buffer: SharedArrayBuffer, pages: number[]): Toucher {
  const progress = new SharedArrayBuffer(4);
  const w = new Worker(TOUCHER, { eval: true, workerData: { buffer, pages, progress, slot: 0 } });
  const done = new Promise<number[]>((resolve, reject) => {
    w.once('message', (m: number[]) => resolve(m));
    w.once('error', reject);
    w.once('exit', (code) => reject(new Error(`toucher exited with ${code} before answering`)));
  });
  return { done, progress: () => Atomics.load(new Int32Array(progress), 0) };
}

/** A page's contents: words 0 and 1023 hold tag, the rest a pattern, so halves cannot pass for whole. */
export function pagePattern(tag: number): Uint8Array {
  const w = new Int32Array(1024);
  for (let i = 0; i < 1024; i++) w[i] = (tag * 2654435761 + i) | 0;
  w[0] = tag;
  w[1023] = tag;
  return new Uint8Array(w.buffer);
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Userfaultfd.open(), or the reason it cannot be opened here (the tests then skip saying so). */
export function openOrReason(): { uffd: Userfaultfd | null; reason: string } {
  try {
    return { uffd: Userfaultfd.open(), reason: '' };
  } catch (e) {
    const reason = `userfaultfd cannot be opened: ${(e as Error).message}`;
    console.log(`[test/uffd] skipped: ${reason}`);
    return { uffd: null, reason };
  }
}
