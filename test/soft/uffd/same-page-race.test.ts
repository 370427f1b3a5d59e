// The userfaultfd model under contention, without a VM around it: many threads fault the same
// pages at once (hot pages first, then every page in a random order per thread) while reader
// threads serve the queue and the main thread pushes pages. Invariants: every fault resumes
// with the right contents; every page is installed exactly once; at most one request per page;
// every install beyond the first of a page is counted as a duplicate, none is lost.
import { describe, it, expect } from 'vitest';
import { HostMemory } from '../../../src/soft/hostmem/host-memory.ts';
import { HostAddressSpace } from '../../../src/soft/hostmm/host-address-space.ts';
import { SoftDemandPager } from '../../../src/soft/uffd/pager.ts';
import { startWorker } from '../../../src/util/worker.ts';
import type { FaultPath, UffdMode } from '../../../src/vmm/demand-paging.ts';
import { PAGE, makeSource, sourcePage } from './helpers.ts';

async function race(path: FaultPath, mode: UffdMode, sharedUffd: boolean, threads: number, pages: number, pushes: boolean): Promise<void> {
  const mem = HostMemory.create({ ramBytes: 64 * 2 ** 20 });
  const mm = HostAddressSpace.create(mem);
  const hva = mm.mmap(pages * PAGE, 'anonymous');
  const src = makeSource(pages);
  const slot = { slot: 0, flags: 0, guestPhysAddr: 2 ** 32, memorySize: pages * PAGE, userspaceAddr: hva, pages, internal: false };
  const pager = new SoftDemandPager(
    { mm, mem, vcpus: threads, ports: [], memslots: () => [slot], setUserMemoryRegion: () => {} },
    { path, mode, sharedUffd, readers: 3, localSource: { buffer: src, delayUs: 20 } },
  );
  try {
    const results = Promise.all(
      Array.from({ length: threads }, (_, t) => {
        const w = startWorker(new URL('./fault-thread.ts', import.meta.url), { shared: pager.uffd.sh, mem: mem.shared, mm: mm.shared, thread: t, seed: 1000 + t * 7919, hot: 8 });
        return new Promise<{ wrong: number; notResumed: number; faults: number }>((res, rej) => {
          w.once('message', res);
          w.once('error', rej);
        });
      }),
    );
    let pushed = 0;
    let pushedInstalled = 0;
    if (pushes) {
      // The main thread pushes pages in its own order while the threads fault (post-copy's
      // background stream racing page requests).
      let done = false;
      void results.then(() => (done = true));
      for (let i = pages - 1; i >= 0 && !done; i -= 3) {
        if (pager.install(0, i, sourcePage(src, i)) === 'installed') pushedInstalled++;
        pushed++;
        if (i % 12 === 0) await new Promise((r) => setImmediate(r));
      }
    }
    const rs = await results;
    expect(rs.map((r) => [r.wrong, r.notResumed])).toEqual(rs.map(() => [0, 0]));
    const s = pager.stats();
    expect(s.installed).toBe(pages);
    expect(s.missing).toBe(0);
    expect(s.requests).toBeLessThanOrEqual(pages);
    expect(s.requests + pushedInstalled).toBeGreaterThanOrEqual(pages);
    // Every install call either installed the page or counted a duplicate.
    expect(s.installed + s.duplicates).toBe(s.requests + pushed);
    expect(s.faults).toBeGreaterThanOrEqual(pages - pushedInstalled);
    for (let i = 0; i < pages; i++) expect(mm.lookupPfn(hva + i * PAGE)).toBeGreaterThanOrEqual(0);
    // The frames in use: one per page (no frame leaked by a losing COPY), plus MINOR's page cache
    // (the same frames: CONTINUE maps the page-cache frame).
    expect(mem.stats().framesInUse).toBe(pages);
  } finally {
    await pager.close();
    mm.munmap(hva, pages * PAGE);
  }
}

describe('userfaultfd model: the same-page race', () => {
  it('uffd path, one uffd, 8 threads, pushes racing requests', async () => {
    await race('uffd', 'missing', true, 8, 512, true);
  }, 120_000);
  it('uffd path, a uffd per thread, MINOR (write + CONTINUE), 8 threads', async () => {
    await race('uffd', 'minor', false, 8, 512, true);
  }, 120_000);
  it('exit path (each faulter fetches on its own thread), 8 threads, pushes racing', async () => {
    await race('exit', 'missing', true, 8, 512, true);
  }, 120_000);
  it('exit path, MINOR, 6 threads, no pushes: exactly one request per page', async () => {
    await race('exit', 'minor', true, 6, 256, false);
  }, 120_000);
});
