// Shared set-up for the soft userfaultfd model's tests: a source image of guest RAM whose every
// byte says which page it belongs to, and the checks that memory equals it afterwards.
import { expect } from 'vitest';
import type { TestVm } from '../vcpu/harness.ts';
import { guestWriteValue } from '../../../src/guest/workload.ts';

export const PAGE = 4096;

/** Page i: u32 words (i * 2654435761 + w) for w = 0..1023: every page and word differ. */
export function makeSource(pages: number): SharedArrayBuffer {
  const sab = new SharedArrayBuffer(pages * PAGE);
  const u32 = new Uint32Array(sab);
  for (let i = 0; i < pages; i++) for (let w = 0; w < 1024; w++) u32[i * 1024 + w] = (Math.imul(i, 2654435761) + w) >>> 0;
  return sab;
}

export function sourcePage(src: SharedArrayBuffer, i: number): Uint8Array {
  return new Uint8Array(src, i * PAGE, PAGE).slice();
}

/**
 * Every page equals the source except word 0 (8 bytes), which the sequential workload's last
 * pass wrote: vCPU v owns pages [v * perVcpu, (v + 1) * perVcpu).
 */
export function expectMemoryEqualsSource(t: TestVm, src: SharedArrayBuffer, passes: number, perVcpu: number): void {
  const all = new Uint8Array(t.pages * PAGE);
  t.vm.readGuest(t.spec.gpaBase, all);
  const got = new Uint32Array(all.buffer);
  const want = new Uint32Array(src);
  let bad = 0;
  let first = -1;
  for (let i = 0; i < t.pages; i++) {
    const v = guestWriteValue(Math.floor(i / perVcpu), passes);
    if (got[i * 1024] !== v.lo || got[i * 1024 + 1] !== v.hi) {
      bad++;
      if (first < 0) first = i;
      continue;
    }
    for (let w = 2; w < 1024; w++) {
      if (got[i * 1024 + w] !== want[i * 1024 + w]) {
        bad++;
        if (first < 0) first = i;
        break;
      }
    }
  }
  expect({ bad, first }).toEqual({ bad: 0, first: -1 });
}
