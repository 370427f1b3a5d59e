// KNOWN ENGINE BUG (soft engine's demand pager, src/soft/uffd/): reported, not fixed here (the
// engine is not this branch's to change). The pager's mailbox of page requests to the main
// thread is a bounded ring (fault-queue.ts, 64 entries for 2 vCPUs) drained by the main thread
// between event-loop turns. A request stays in it after its page arrived by another path (a
// post-copy push), and the vCPU then moves on to its next missing page and requests again. While
// the main thread is busy installing pushed pages just ahead of a sequential guest, a vCPU fills
// the ring and its thread dies with FaultQueueFull ("a fault was queued twice"), which is not
// what happened. Seen in the in-process post-copy tests in most runs with path 'exit' and some
// with 'uffd' (the reader threads drop requests for pages present by then, which helps but does
// not close it). Until it is fixed post-copy pages the soft engine with the VMM-side
// interim exit pager (migration/postcopy/interim-exit-pager.ts).
//
// This test makes it certain: the main thread installs pages one by one in a synchronous loop,
// each right after the vCPU asked for it, and never yields. `it.fails`: it passes while the
// bug is there and fails once the pager copes (then make it a plain `it`).
import { describe, expect, it } from 'vitest';
import { openEngine } from '../../../src/vmm/factory.ts';
import { createSourceVm } from '../../../src/migration/source-vm.ts';

const engine = await openEngine('soft');

describe('soft demand pager: requests for pages installed by another path', () => {
  it.fails('a vCPU whose requested pages keep arriving by push while the main thread is busy keeps running', async () => {
    const { vm } = await createSourceVm(engine, { vcpus: 1, bytesPerVcpu: 4 << 20, backing: 'anonymous', workload: 'sequential' });
    try {
      await vm.pause();
      const ram = vm.memslots().filter((s) => !s.internal);
      const s = ram[0]!;
      const image = new Uint8Array(s.memorySize);
      vm.readGuest(s.guestPhysAddr, image);
      const pager = vm.startDemandPaging!({ path: 'exit', mode: 'missing', sharedUffd: true, readers: 1 });
      pager.discard(s.slot, Array.from({ length: s.pages }, (_, i) => i));
      pager.onRequest(() => undefined); // answered by the "push" below
      vm.resume();
      // The busy main thread: install each page as soon as the vCPU is waiting on it.
      const deadline = Date.now() + 2000;
      let next = 0;
      while (next < s.pages && Date.now() < deadline) {
        const st = pager.stats();
        if (st.faults > next || st.requests > next) {
          pager.install(s.slot, next, image.subarray(next * 4096, (next + 1) * 4096));
          next++;
        }
      }
      for (; next < s.pages; next++) pager.install(s.slot, next, image.subarray(next * 4096, (next + 1) * 4096));
      pager.finish();
      // The guest must still run.
      const p0 = vm.progress()[0]!.passesCompleted;
      await vm.waitForPasses(p0 + 2, 10_000);
      expect(vm.progress()[0]!.passesCompleted).toBeGreaterThanOrEqual(p0 + 2);
    } finally {
      await vm.destroy();
    }
  }, 30_000);
});
