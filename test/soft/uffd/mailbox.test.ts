// The soft demand pager's request mailbox (userfaultfd.ts): a request stays in it after its page
// arrived by another path (a post-copy push) until the main thread drains it, while the vCPU asks
// for its next page. A main thread that installs pages one by one in a synchronous loop, each
// right after the vCPU asked, and never yields, owes a request for every page: the mailbox holds
// one per page, so the vCPU keeps running. (Found by the post-copy tests: the mailbox was sized by
// thread count and its overflow killed the vCPU thread.)
import { describe, expect, it } from 'vitest';
import { openEngine } from '../../../src/vmm/factory.ts';
import { createSourceVm } from '../../../src/migration/source-vm.ts';

const engine = await openEngine('soft');

describe('soft demand pager: requests for pages installed by another path', () => {
  it('a vCPU whose requested pages keep arriving by push while the main thread is busy keeps running', async () => {
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
