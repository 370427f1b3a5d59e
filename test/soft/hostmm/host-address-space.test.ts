import { describe, it, expect } from 'vitest';
import { once } from 'node:events';
import { startWorker } from '../../../src/util/worker.ts';
import {
  HostMemory,
  EAGAIN,
  EEXIST,
  EINVAL,
  EFAULT,
  EPERM,
  ENOMEM,
  DEFAULT_RESERVED_START_PFN,
  DEFAULT_MMIO_START_PFN,
  DEFAULT_RAM_START_PFN,
} from '../../../src/soft/hostmem/index.ts';
import { HostAddressSpace, GupResult, HostFaultError } from '../../../src/soft/hostmm/index.ts';

const MiB = 1 << 20;

function setup(ramBytes = 64 * MiB) {
  const mem = HostMemory.create({ ramBytes });
  const as = HostAddressSpace.create(mem);
  return { mem, as, out: new GupResult() };
}

describe('HostAddressSpace: anonymous memory', () => {
  it('first touch allocates one frame per page, later touches find it; the mapping holds one reference', () => {
    const { mem, as, out } = setup();
    const hva = as.mmap(16 * 4096, 'anonymous');
    expect(hva).toBeGreaterThan(0);
    expect(hva % (2 * MiB)).toBe(0);
    expect(as.lookupPfn(hva)).toBe(-1);
    const pfn = as.getUserPage(hva + 100, false, out);
    expect(pfn).toBeGreaterThanOrEqual(DEFAULT_RAM_START_PFN);
    expect(out).toMatchObject({ level: 0, kind: 'anonymous', writable: true, refcounted: true });
    expect(mem.refcount(pfn)).toBe(2); // mapping + caller
    mem.releasePfn(pfn);
    expect(mem.refcount(pfn)).toBe(1);
    expect(as.getUserPage(hva + 4095, true, out)).toBe(pfn);
    mem.releasePfn(pfn);
    expect(as.lookupPfn(hva)).toBe(pfn);
    const other = as.getUserPage(hva + 4096, true, out);
    expect(other).not.toBe(pfn);
    mem.releasePfn(other);
    expect(mem.stats().framesInUse).toBe(2);
  });

  it('EFAULT outside any VMA, EPERM on a write to a read-only VMA', () => {
    const { as, out } = setup();
    const hva = as.mmap(4096, 'anonymous', { readonly: true });
    expect(as.getUserPage(hva + 4096, false, out)).toBe(EFAULT); // guard gap
    expect(as.getUserPage(12345, false, out)).toBe(EFAULT);
    expect(as.getUserPage(hva, true, out)).toBe(EPERM);
    expect(as.getUserPage(hva, false, out)).toBeGreaterThan(0);
    expect(out.writable).toBe(false);
  });

  it('read of never-touched memory yields zeros and allocates nothing; write then read round-trips across pages', () => {
    const { mem, as } = setup();
    const hva = as.mmap(4 * 4096, 'anonymous');
    const dst = new Uint8Array(3 * 4096).fill(0xaa);
    as.read(hva + 10, dst);
    expect(dst.every((b) => b === 0)).toBe(true);
    expect(mem.stats().framesAllocated).toBe(0);
    const src = new Uint8Array(5000).map((_, i) => (i * 7 + 1) & 0xff);
    as.write(hva + 4000, src); // crosses into pages 0, 1, 2
    expect(mem.stats().framesInUse).toBe(3);
    const back = new Uint8Array(5000);
    as.read(hva + 4000, back);
    expect(back).toEqual(src);
    const head = new Uint8Array(4000);
    as.read(hva, head);
    expect(head.every((b) => b === 0)).toBe(true);
    expect(() => as.read(hva + 4 * 4096, new Uint8Array(1))).toThrow(HostFaultError);
    expect(() => as.write(hva + 4 * 4096 - 1, new Uint8Array(2))).toThrow(/EFAULT/);
  });

  it('VMAs mapped after a worker-side attach are visible through the attached instance', () => {
    const { mem, as, out } = setup();
    const other = HostAddressSpace.attach(structuredClone(as.shared), HostMemory.attach(structuredClone(mem.shared)));
    const hva = as.mmap(8192, 'anonymous');
    expect(other.findVma(hva + 5)).toEqual({ kind: 'anonymous', start: hva, end: hva + 8192, readonly: false });
    const pfn = other.getUserPage(hva, true, out);
    expect(as.lookupPfn(hva)).toBe(pfn);
  });
});

describe('HostAddressSpace: huge pages', () => {
  it('anonymous_thp maps a 2 MiB compound frame for blocks fully inside the VMA, 4 KiB for the tail', () => {
    const { mem, as, out } = setup();
    const hva = as.mmap(2 * MiB + 8192, 'anonymous_thp');
    const pfn = as.getUserPage(hva + 5 * 4096, true, out);
    expect(out.level).toBe(1);
    const head = pfn - 5;
    expect(head % 512).toBe(0);
    expect(mem.isCompoundHead(head)).toBe(true);
    expect(mem.isCompoundTail(pfn)).toBe(true);
    expect(mem.refcount(head)).toBe(2);
    mem.releasePfn(pfn);
    expect(as.lookupPfn(hva + 511 * 4096)).toBe(head + 511);
    const tail = as.getUserPage(hva + 2 * MiB, true, out);
    expect(out.level).toBe(0);
    expect(mem.isCompoundTail(tail) || mem.isCompoundHead(tail)).toBe(false);
    mem.releasePfn(tail);
    expect(mem.stats()).toMatchObject({ hugeFramesInUse: 1, framesInUse: 1 });
  });

  it('anonymous_thp falls back to 4 KiB pages when no 2 MiB frame is left; hugetlb fails with ENOMEM', () => {
    const mem = HostMemory.create({ regions: [{ kind: 'ram', startPfn: 512, frames: 512 + 100 }] }); // one chunk + 100 edge frames
    const as = HostAddressSpace.create(mem);
    const out = new GupResult();
    const thp = as.mmap(4 * MiB, 'anonymous_thp');
    const huge = as.getUserPage(thp, true, out);
    expect(out.level).toBe(1);
    mem.releasePfn(huge);
    const small = as.getUserPage(thp + 2 * MiB, true, out);
    expect(small).toBeGreaterThan(0);
    expect(out.level).toBe(0);
    mem.releasePfn(small);
    const tlb = as.mmap(2 * MiB, 'hugetlb');
    expect(as.getUserPage(tlb, true, out)).toBe(ENOMEM);
  });

  it('hugetlb is always 2 MiB compound and must be 2 MiB sized', () => {
    const { mem, as, out } = setup();
    expect(() => as.mmap(MiB, 'hugetlb')).toThrow(/2 MiB/);
    const hva = as.mmap(4 * MiB, 'hugetlb');
    expect(as.lookupPfn(hva)).toBe(-1);
    const pfn = as.getUserPage(hva + 2 * MiB + 4096 * 3, false, out);
    expect(out).toMatchObject({ level: 1, kind: 'hugetlb' });
    expect(mem.isCompoundHead(pfn - 3)).toBe(true);
    mem.releasePfn(pfn);
    const z = new Uint8Array(64);
    as.read(hva, z); // untouched first block stays unpopulated
    expect(as.lookupPfn(hva)).toBe(-1);
    expect(mem.stats().hugeFramesAllocated).toBe(1);
  });
});

describe('HostAddressSpace: pfnmap (seed 001 classes)', () => {
  it('maps MMIO and driver-owned reserved RAM without refcounts, ordinary RAM with one', () => {
    const { mem, as, out } = setup();
    const bar = as.mmap(4 * 4096, 'pfnmap', { basePfn: DEFAULT_MMIO_START_PFN });
    const pfn = as.getUserPage(bar + 2 * 4096, true, out);
    expect(pfn).toBe(DEFAULT_MMIO_START_PFN + 2);
    expect(out).toMatchObject({ level: 0, kind: 'pfnmap', refcounted: false });
    expect(mem.classifyPfn(pfn)).toBe('mmio');

    const drv = as.mmap(2 * MiB, 'pfnmap', { basePfn: DEFAULT_RESERVED_START_PFN });
    const r = as.getUserPage(drv + 511 * 4096, true, out);
    expect(mem.classifyPfn(r)).toBe('reserved');
    expect(out.refcounted).toBe(false);
    expect(out.level).toBe(0); // remap_pfn_range maps 4 KiB only
    expect(mem.refcount(r)).toBe(0);

    const frame = mem.allocFrame();
    const ram = as.mmap(4096, 'pfnmap', { basePfn: frame });
    expect(as.getUserPage(ram, false, out)).toBe(frame);
    expect(out.refcounted).toBe(true);
    expect(mem.refcount(frame)).toBe(2);
    mem.releasePfn(frame);

    // munmap of a pfnmap puts nothing
    as.munmap(drv, 2 * MiB);
    expect(mem.refcount(r)).toBe(0);
    expect(() => as.mmap(4096, 'pfnmap', { basePfn: mem.totalFrames })).toThrow(/basePfn/);
  });
});

describe('HostAddressSpace: munmap and the mmu-notifier sequence', () => {
  it('munmap bumps seq around synchronous notifiers and frees the frames', () => {
    const { mem, as, out } = setup();
    const hva = as.mmap(2 * MiB + 4 * 4096, 'anonymous_thp');
    mem.releasePfn(as.getUserPage(hva, true, out));
    mem.releasePfn(as.getUserPage(hva + 2 * MiB, true, out));
    const seen: Array<[number, number, number]> = [];
    as.addInvalidateNotifier((s, e) => seen.push([s, e, as.invalidateInProgress()]));
    const seq = as.notifierSeq();
    expect(as.retryNeeded(seq)).toBe(false);
    as.munmap(hva, 2 * MiB + 4 * 4096);
    expect(seen).toEqual([[hva, hva + 2 * MiB + 4 * 4096, 1]]);
    expect(as.notifierSeq()).toBe(seq + 2);
    expect(as.invalidateInProgress()).toBe(0);
    expect(as.retryNeeded(seq)).toBe(true);
    expect(as.findVma(hva)).toBeUndefined();
    expect(as.getUserPage(hva, false, out)).toBe(EFAULT);
    expect(mem.stats()).toMatchObject({ framesInUse: 0, hugeFramesInUse: 0 });
  });

  it('a getUserPage racing a munmap is caught by retryNeeded, and its reference keeps the frame until released', () => {
    const { mem, as, out } = setup();
    const hva = as.mmap(8 * 4096, 'anonymous');
    let racedPfn = -1;
    let racedSeq = -1;
    as.addInvalidateNotifier(() => {
      // A vCPU fault that read seq and resolved its pfn while the unmap is in progress.
      racedSeq = as.notifierSeq();
      racedPfn = as.getUserPage(hva + 4096, true, out);
    });
    const seq = as.notifierSeq(); // a fault that read seq before the unmap began
    const pfn = as.getUserPage(hva, true, out);
    as.munmap(hva, 8 * 4096);
    expect(as.retryNeeded(seq)).toBe(true);
    expect(racedPfn).toBeGreaterThan(0);
    expect(as.retryNeeded(racedSeq)).toBe(true);
    // The faults still own their references: the frames survive the unmap until released.
    expect(mem.refcount(pfn)).toBe(1);
    expect(mem.refcount(racedPfn)).toBe(1);
    mem.releasePfn(pfn);
    mem.releasePfn(racedPfn);
    expect(mem.stats().framesInUse).toBe(0);
  });

  it('refuses to split a VMA', () => {
    const { as } = setup();
    const hva = as.mmap(8 * 4096, 'anonymous');
    expect(() => as.munmap(hva, 4096)).toThrow(/partial/);
    as.munmap(hva - 4096, 16 * 4096); // covering gaps is fine
    expect(as.findVma(hva)).toBeUndefined();
  });
});

describe('HostAddressSpace: zapRange (MADV_DONTNEED) and splitHugePmd', () => {
  it('zapRange drops 4 KiB pages with an invalidation; the next touch zero-fills a new frame', () => {
    const { mem, as } = setup();
    const hva = as.mmap(8 * 4096, 'anonymous');
    as.write(hva, new Uint8Array([1, 2, 3]));
    as.write(hva + 4096, new Uint8Array([4]));
    const calls: Array<[number, number]> = [];
    as.addInvalidateNotifier((s, e) => calls.push([s, e]));
    const seq = as.notifierSeq();
    as.zapRange(hva, 4096);
    expect(calls).toEqual([[hva, hva + 4096]]);
    expect(as.retryNeeded(seq)).toBe(true);
    expect(as.lookupPfn(hva)).toBe(-1);
    expect(as.lookupPfn(hva + 4096)).toBeGreaterThan(0);
    expect(mem.stats().framesInUse).toBe(1);
    const b = new Uint8Array(3);
    as.read(hva, b);
    expect(Array.from(b)).toEqual([0, 0, 0]);
    expect(as.findVma(hva)).toBeDefined();
  });

  it('splitHugePmd keeps the compound frame and data but maps it with 4 KiB ptes', () => {
    const { mem, as, out } = setup();
    const hva = as.mmap(4 * MiB, 'anonymous_thp');
    const pfn = as.getUserPage(hva + 7 * 4096, true, out);
    expect(out.level).toBe(1);
    mem.releasePfn(pfn);
    as.write(hva + 7 * 4096, new Uint8Array([9]));
    const head = pfn - 7;
    const seq = as.notifierSeq();
    expect(as.splitHugePmd(hva + 100)).toBe(true);
    expect(as.retryNeeded(seq)).toBe(true);
    expect(as.splitHugePmd(hva + 100)).toBe(false); // already split
    expect(as.getUserPage(hva + 7 * 4096, false, out)).toBe(pfn);
    expect(out.level).toBe(0);
    mem.releasePfn(pfn);
    expect(mem.refcount(head)).toBe(512); // one per pte
    const b = new Uint8Array(1);
    as.read(hva + 7 * 4096, b);
    expect(b[0]).toBe(9);
    // zapping half the block puts half the references; the frame stays whole until the last one
    as.zapRange(hva, MiB);
    expect(mem.refcount(head)).toBe(256);
    expect(mem.isCompoundHead(head)).toBe(true);
    as.zapRange(hva + MiB, MiB);
    expect(mem.stats().hugeFramesInUse).toBe(0);
    expect(mem.isCompoundHead(head)).toBe(false);
  });

  it('zapRange over part of a huge THP block splits it and keeps the rest mapped', () => {
    const { mem, as, out } = setup();
    const hva = as.mmap(2 * MiB, 'anonymous_thp');
    const pfn = as.getUserPage(hva, true, out);
    mem.releasePfn(pfn);
    as.zapRange(hva + 4096, 4096);
    expect(as.lookupPfn(hva)).toBe(pfn);
    expect(as.lookupPfn(hva + 4096)).toBe(-1);
    expect(as.lookupPfn(hva + 2 * 4096)).toBe(pfn + 2);
    expect(mem.refcount(pfn)).toBe(511);
    // a new touch of the hole gets an ordinary 4 KiB frame
    const fresh = as.getUserPage(hva + 4096, true, out);
    expect(out.level).toBe(0);
    expect(mem.isCompoundTail(fresh)).toBe(false);
    mem.releasePfn(fresh);
    as.munmap(hva, 2 * MiB);
    expect(mem.stats()).toMatchObject({ framesInUse: 0, hugeFramesInUse: 0 });
  });

  it('hugetlb zaps only whole 2 MiB blocks', () => {
    const { mem, as, out } = setup();
    const hva = as.mmap(4 * MiB, 'hugetlb');
    mem.releasePfn(as.getUserPage(hva, true, out));
    expect(() => as.zapRange(hva, 4096)).toThrow(/2 MiB/);
    as.zapRange(hva, 2 * MiB);
    expect(mem.stats().hugeFramesInUse).toBe(0);
  });
});

describe('HostAddressSpace: userfaultfd MISSING hooks', () => {
  it('a registered VMA reports missing pages with EAGAIN; uffdCopy populates atomically once', () => {
    const { mem, as, out } = setup();
    const hva = as.mmap(4 * 4096, 'anonymous');
    mem.releasePfn(as.getUserPage(hva, true, out)); // populated before registration
    as.setUserfault(hva, 4 * 4096, true);
    expect(as.findVma(hva)!.userfault).toBe(true);
    expect(as.getUserPage(hva, true, out)).toBeGreaterThan(0); // present pages are unaffected
    mem.releasePfn(as.lookupPfn(hva));
    expect(as.getUserPage(hva + 4096, false, out)).toBe(EAGAIN);
    expect(mem.stats().framesInUse).toBe(1); // nothing allocated for the missing page
    const page = new Uint8Array(4096).fill(0x5a);
    expect(as.uffdCopy(hva + 4096, page)).toBe(0);
    expect(as.uffdCopy(hva + 4096, page)).toBe(EEXIST);
    expect(as.uffdCopy(hva, page)).toBe(EEXIST);
    expect(as.uffdCopy(hva + 2 * 4096, page.subarray(0, 100))).toBe(EINVAL);
    const pfn = as.getUserPage(hva + 4096 + 17, false, out);
    expect(mem.windowBytes[pfn >>> 18]![(pfn & 0x3ffff) * 4096 + 17]).toBe(0x5a);
    mem.releasePfn(pfn);
    // the VMM's own writes populate directly
    as.write(hva + 3 * 4096, new Uint8Array([1]));
    expect(as.lookupPfn(hva + 3 * 4096)).toBeGreaterThan(0);
    as.setUserfault(hva, 4 * 4096, false);
    expect(as.getUserPage(hva + 2 * 4096, true, out)).toBeGreaterThan(0);
  });

  it('THP VMAs get 4 KiB pages from uffdCopy; hugetlb takes whole 2 MiB pages', () => {
    const { mem, as, out } = setup();
    const thp = as.mmap(2 * MiB, 'anonymous_thp');
    as.setUserfault(thp, 2 * MiB, true);
    expect(as.getUserPage(thp, true, out)).toBe(EAGAIN);
    expect(as.uffdCopy(thp + 4096, new Uint8Array(4096))).toBe(0);
    expect(as.getUserPage(thp, true, out)).toBe(EAGAIN);
    const p = as.getUserPage(thp + 4096, true, out);
    expect(out.level).toBe(0);
    mem.releasePfn(p);
    const tlb = as.mmap(2 * MiB, 'hugetlb');
    as.setUserfault(tlb, 2 * MiB, true);
    expect(as.getUserPage(tlb + 4096, false, out)).toBe(EAGAIN);
    expect(as.uffdCopy(tlb, new Uint8Array(4096))).toBe(EINVAL);
    const big = new Uint8Array(2 * MiB);
    big[2 * MiB - 1] = 3;
    expect(as.uffdCopy(tlb, big)).toBe(0);
    const q = as.getUserPage(tlb + 2 * MiB - 1, false, out);
    expect(out.level).toBe(1);
    expect(mem.windowBytes[q >>> 18]![(q & 0x3ffff) * 4096 + 4095]).toBe(3);
    mem.releasePfn(q);
    expect(() => as.setUserfault(thp + 4096, 4096, true)).toThrow(/whole VMAs/);
  });
});

describe('HostAddressSpace: concurrent first touch from worker threads', () => {
  async function runWorkers(as: HostAddressSpace, mem: HostMemory, hva: number, pages: number, workers: number, mode: 'touch' | 'race-munmap' | 'uffd-copy' | 'fault-loop', whileRunning?: (sync: Int32Array) => Promise<void>) {
    const sync = new SharedArrayBuffer(16);
    const sync32 = new Int32Array(sync);
    const results = new SharedArrayBuffer(workers * Math.max(pages, 3) * 4);
    const ws = [];
    for (let w = 0; w < workers; w++) {
      ws.push(startWorker(new URL('./touch-worker.ts', import.meta.url), { mem: mem.shared, as: as.shared, hva, pages, sync, results, worker: w, mode }));
    }
    const done = ws.map((w) => once(w, 'message'));
    while (Atomics.load(sync32, 1) < workers) await new Promise((r) => setTimeout(r, 5));
    Atomics.store(sync32, 0, 1);
    Atomics.notify(sync32, 0);
    if (whileRunning) await whileRunning(sync32);
    await Promise.all(done);
    await Promise.all(ws.map((w) => w.terminate()));
    return new Int32Array(results);
  }

  it('exactly one frame wins per page; refcounts and frame counts are exact', async () => {
    const { mem, as } = setup();
    const pages = 4096;
    const workers = 4;
    const hva = as.mmap(pages * 4096, 'anonymous');
    const res = await runWorkers(as, mem, hva, pages, workers, 'touch');
    const pfns = new Set<number>();
    for (let i = 0; i < pages; i++) {
      const pfn = res[i]!;
      expect(pfn).toBeGreaterThan(0);
      for (let w = 1; w < workers; w++) expect(res[w * pages + i]).toBe(pfn);
      expect(mem.refcount(pfn)).toBe(1); // the mapping's reference only
      expect(as.lookupPfn(hva + i * 4096)).toBe(pfn);
      // every worker's write landed in the one winning frame
      for (let w = 0; w < workers; w++) expect(mem.windows[pfn >>> 18]![((pfn & 0x3ffff) << 10) + w]).toBe(i + 1);
      pfns.add(pfn);
    }
    expect(pfns.size).toBe(pages);
    const st = mem.stats();
    expect(st.framesInUse).toBe(pages); // losers freed their frames
    expect(st.framesAllocated - pages).toBe(st.framesFreed);
    as.munmap(hva, pages * 4096);
    expect(mem.stats().framesInUse).toBe(0);
  }, 30_000);

  it('THP: concurrent first touch of the same 2 MiB blocks installs one compound frame per block', async () => {
    const { mem, as } = setup();
    const pages = 4 * 512;
    const hva = as.mmap(pages * 4096, 'anonymous_thp');
    const res = await runWorkers(as, mem, hva, pages, 3, 'touch');
    for (let i = 0; i < pages; i++) {
      expect(res[i]! - (i & 511)).toBe(res[i & ~511]); // contiguous inside the block
      expect(res[pages + i]).toBe(res[i]);
      expect(res[2 * pages + i]).toBe(res[i]);
    }
    expect(mem.stats().hugeFramesInUse).toBe(4);
    for (let b = 0; b < 4; b++) expect(mem.refcount(res[b * 512]!)).toBe(1);
    as.munmap(hva, pages * 4096);
    expect(mem.stats()).toMatchObject({ hugeFramesInUse: 0, framesInUse: 0 });
  }, 30_000);

  it('racing uffdCopy of the same pages: one copy wins per page, whole, and the others get EEXIST', async () => {
    const { mem, as } = setup();
    const pages = 1024;
    const hva = as.mmap(pages * 4096, 'anonymous');
    as.setUserfault(hva, pages * 4096, true);
    const res = await runWorkers(as, mem, hva, pages, 3, 'uffd-copy');
    const buf = new Uint8Array(4096);
    for (let i = 0; i < pages; i++) {
      const codes = [res[i], res[pages + i], res[2 * pages + i]];
      expect(codes.filter((c) => c === 0)).toHaveLength(1);
      expect(codes.filter((c) => c === EEXIST)).toHaveLength(2);
      const winner = codes.indexOf(0) + 1;
      as.read(hva + i * 4096, buf);
      expect(buf.every((b) => b === winner)).toBe(true);
    }
    expect(mem.stats().framesInUse).toBe(pages);
    as.munmap(hva, pages * 4096);
    expect(mem.stats().framesInUse).toBe(0);
  }, 30_000);

  it('faults racing zapRange and splitHugePmd on a THP VMA never leak or double-free a frame', async () => {
    const { mem, as } = setup();
    const pages = 4 * 512;
    const hva = as.mmap(pages * 4096, 'anonymous_thp');
    let notified = 0;
    as.addInvalidateNotifier(() => notified++);
    const res = await runWorkers(as, mem, hva, pages, 2, 'fault-loop', async (sync) => {
      while (Atomics.load(sync, 2) < 2) await new Promise((r) => setTimeout(r, 1));
      for (let round = 0; round < 20; round++) {
        as.splitHugePmd(hva + (round % 4) * 2 * MiB);
        as.zapRange(hva + ((round * 5) % pages) * 4096, 64 * 4096);
        if (round % 5 === 4) as.zapRange(hva + (round % 4) * 2 * MiB, 2 * MiB);
        await new Promise((r) => setTimeout(r, 1));
      }
      Atomics.store(sync, 3, 1);
    });
    expect(notified).toBeGreaterThanOrEqual(24);
    for (let w = 0; w < 2; w++) {
      expect(res[w * 3]).toBeGreaterThan(0);
      expect(res[w * 3 + 2]).toBe(0);
    }
    // every populated page is mapped exactly once: the mapping's reference per pte / huge pmd
    for (let i = 0; i < pages; i++) {
      const pfn = as.lookupPfn(hva + i * 4096);
      if (pfn < 0) continue;
      expect(mem.refcount(pfn)).toBeGreaterThanOrEqual(1);
    }
    as.munmap(hva, pages * 4096);
    expect(mem.stats()).toMatchObject({ framesInUse: 0, hugeFramesInUse: 0 });
  }, 30_000);

  it('faults racing a munmap on the main thread either retry or see EFAULT, and nothing leaks', async () => {
    const { mem, as } = setup();
    const pages = 256;
    const hva = as.mmap(pages * 4096, 'anonymous');
    let notified = 0;
    as.addInvalidateNotifier(() => notified++);
    const res = await runWorkers(as, mem, hva, pages, 2, 'race-munmap', async (sync) => {
      while (Atomics.load(sync, 2) < 2) await new Promise((r) => setTimeout(r, 1)); // both workers mid-stream
      as.munmap(hva, pages * 4096);
    });
    expect(notified).toBe(1);
    for (let w = 0; w < 2; w++) {
      expect(res[w * 3]).toBeGreaterThan(0); // faults before the unmap went through
      expect(res[w * 3 + 2]).toBe(1); // then the VMA was gone
    }
    expect(mem.stats().framesInUse).toBe(0);
  }, 30_000);
});
