import { describe, it, expect } from 'vitest';
import { once } from 'node:events';
import { startWorker } from '../../../src/util/worker.ts';
import {
  HostMemory,
  HostMemoryError,
  ENOMEM,
  HUGE_FRAME_PAGES,
  DEFAULT_RESERVED_START_PFN,
  DEFAULT_HOLE_START_PFN,
  DEFAULT_MMIO_START_PFN,
  DEFAULT_RAM_START_PFN,
  HostLayoutError,
} from '../../../src/soft/hostmem/index.ts';

function smallMemory(ramFrames = 2048 + 7): HostMemory {
  // RAM with a ragged end so edge frames (outside any 2 MiB chunk) exist too.
  return HostMemory.create({
    regions: [
      { kind: 'reserved', startPfn: 0, frames: 512 },
      { kind: 'mmio', startPfn: 1024, frames: 16 },
      { kind: 'ram', startPfn: 1536, frames: ramFrames },
    ],
  });
}

describe('HostMemory classification (seed 001: kvm_is_mmio_pfn)', () => {
  it('classifies the default layout: reserved block, hole, BAR, RAM', () => {
    const mem = HostMemory.create({ ramBytes: 8 << 20 });
    expect(mem.classifyPfn(DEFAULT_RESERVED_START_PFN)).toBe('reserved');
    expect(mem.classifyPfn(DEFAULT_RESERVED_START_PFN + 511)).toBe('reserved');
    expect(mem.classifyPfn(DEFAULT_HOLE_START_PFN)).toBe('mmio');
    expect(mem.pfnValid(DEFAULT_HOLE_START_PFN)).toBe(false);
    expect(mem.classifyPfn(DEFAULT_MMIO_START_PFN + 3)).toBe('mmio');
    expect(mem.classifyPfn(DEFAULT_RAM_START_PFN)).toBe('ram');
    expect(mem.classifyPfn(mem.totalFrames)).toBe('mmio'); // beyond the map: no struct page
    expect(mem.classifyPfn(-1)).toBe('mmio');
    expect(mem.isMmioPfn(DEFAULT_RESERVED_START_PFN)).toBe(true);
    expect(mem.isMmioPfn(DEFAULT_RAM_START_PFN)).toBe(false);
    // ram must hold 8 MiB plus headroom
    expect(mem.stats().ramFrames).toBeGreaterThanOrEqual(2048);
  });

  it('uncovered pfns of an explicit layout are holes', () => {
    const mem = smallMemory();
    expect(mem.classifyPfn(700)).toBe('mmio');
    expect(mem.pfnValid(700)).toBe(false);
    expect(mem.stats().holeFrames).toBe((1024 - 512) + (1536 - 1040));
  });

  it('rejects overlapping regions', () => {
    expect(() => HostMemory.create({ regions: [{ kind: 'ram', startPfn: 0, frames: 10 }, { kind: 'mmio', startPfn: 5, frames: 10 }] })).toThrow(HostLayoutError);
  });

  it('a valid reserved frame is never refcounted; an mmio pfn has no page to count', () => {
    const mem = smallMemory();
    expect(() => mem.getPage(3)).toThrow(/reserved/);
    expect(() => mem.putPage(3)).toThrow(HostMemoryError);
    expect(() => mem.getPage(1030)).toThrow(/mmio/);
    expect(mem.tryGetPageRef(3)).toBe(-1);
    expect(mem.tryGetPageRef(1030)).toBe(-1);
    expect(mem.refcount(3)).toBe(0);
    mem.releasePfn(3); // kvm_release_pfn_clean skips non-refcounted pfns
    mem.releasePfn(1030);
    expect(mem.refcount(3)).toBe(0);
  });
});

describe('HostMemory refcounts and allocation', () => {
  it('allocFrame returns a zeroed ram frame with refcount 1; the last putPage frees it', () => {
    const mem = smallMemory();
    const pfn = mem.allocFrame();
    expect(mem.classifyPfn(pfn)).toBe('ram');
    expect(mem.refcount(pfn)).toBe(1);
    mem.getPage(pfn);
    expect(mem.refcount(pfn)).toBe(2);
    mem.putPage(pfn);
    expect(mem.refcount(pfn)).toBe(1);
    mem.putPage(pfn);
    expect(mem.refcount(pfn)).toBe(0);
    expect(mem.stats().framesFreed).toBe(1);
    expect(() => mem.getPage(pfn)).toThrow(/free/);
    expect(() => mem.putPage(pfn)).toThrow(/underflow/);
    expect(mem.tryGetPageRef(pfn)).toBe(-1);
  });

  it('a reused frame comes back zeroed and is counted as reused', () => {
    const mem = smallMemory(512); // exactly one chunk
    const frames: number[] = [];
    for (let i = 0; i < 512; i++) frames.push(mem.allocFrame());
    expect(new Set(frames).size).toBe(512);
    expect(mem.allocFrame()).toBe(ENOMEM);
    const victim = frames[100]!;
    const { words, offset } = mem.frameWords(victim);
    words[offset + 5] = 1234;
    mem.freeFrame(victim);
    const again = mem.allocFrame();
    expect(again).toBe(victim);
    expect(words[offset + 5]).toBe(0);
    expect(mem.stats().framesReused).toBe(1);
  });

  it('freeFrame refuses a frame someone else still references', () => {
    const mem = smallMemory();
    const pfn = mem.allocFrame();
    mem.getPage(pfn);
    expect(() => mem.freeFrame(pfn)).toThrow(/refcount is 2/);
  });

  it('allocHugeFrame gives 512 aligned contiguous frames with head and tail flags; tails count on the head', () => {
    const mem = smallMemory();
    const head = mem.allocHugeFrame();
    expect(head % HUGE_FRAME_PAGES).toBe(0);
    expect(mem.isCompoundHead(head)).toBe(true);
    expect(mem.isCompoundTail(head)).toBe(false);
    for (const off of [1, 2, 255, 511]) {
      expect(mem.isCompoundTail(head + off)).toBe(true);
      expect(mem.compoundHead(head + off)).toBe(head);
      expect(mem.classifyPfn(head + off)).toBe('ram');
    }
    expect(mem.isCompoundTail(head + 512)).toBe(false);
    mem.getPage(head + 17);
    expect(mem.refcount(head)).toBe(2);
    expect(mem.refcount(head + 300)).toBe(2);
    mem.putPage(head + 99);
    mem.putPage(head);
    expect(mem.stats().hugeFramesFreed).toBe(1);
    expect(mem.isCompoundTail(head + 1)).toBe(false);
    expect(mem.isCompoundHead(head)).toBe(false);
  });

  it('runs out of 2 MiB chunks with ENOMEM and reuses freed ones zeroed', () => {
    const mem = smallMemory(1024 + 7); // two chunks + 7 edge frames
    const a = mem.allocHugeFrame();
    const b = mem.allocHugeFrame();
    expect(a).not.toBe(b);
    expect(mem.allocHugeFrame()).toBe(ENOMEM);
    // 4 KiB allocations still find the edge frames
    const edge = mem.allocFrame();
    expect(edge).toBeGreaterThanOrEqual(1536 + 1024);
    const bytes = mem.windowBytes[a >>> 18]!;
    bytes[HostMemory.frameByteOffset(a + 3) + 9] = 7;
    mem.freeHugeFrame(a);
    const c = mem.allocHugeFrame();
    expect(c).toBe(a);
    expect(bytes[HostMemory.frameByteOffset(a + 3) + 9]).toBe(0);
    expect(mem.stats().hugeFramesReused).toBe(1);
    expect(() => mem.freeHugeFrame(c + 1)).toThrow(/compound head/);
    expect(() => mem.freeFrame(c)).toThrow(/compound/);
  });

  it('windows address frames at word ((p & 0x3ffff) << 10) of window p >>> 18', () => {
    const mem = HostMemory.create({ regions: [{ kind: 'ram', startPfn: (1 << 18) - 512, frames: 1024 }] });
    expect(mem.windows.length).toBe(2);
    const pfns: number[] = [];
    for (let i = 0; i < 1024; i++) pfns.push(mem.allocFrame());
    const high = pfns.find((p) => p >= 1 << 18)!;
    mem.windows[high >>> 18]![((high & 0x3ffff) << 10) + 3] = 99;
    expect(new Int32Array(mem.shared.windows[1]!)[((high - (1 << 18)) << 10) + 3]).toBe(99);
  });

  it('attach sees the same frames, flags and counts', () => {
    const mem = smallMemory();
    const other = HostMemory.attach(structuredClone(mem.shared));
    const pfn = other.allocFrame();
    expect(mem.refcount(pfn)).toBe(1);
    const head = mem.allocHugeFrame();
    expect(other.isCompoundTail(head + 5)).toBe(true);
    expect(other.allocFrame()).not.toBe(pfn);
    expect(mem.stats().framesAllocated).toBe(2);
  });
});

describe('HostMemory: freed chunks reused for 4 KiB frames', () => {
  it('zeroes and counts each reused frame as it is handed out', () => {
    const mem = HostMemory.create({ regions: [{ kind: 'ram', startPfn: 512, frames: 512 }] });
    const head = mem.allocHugeFrame();
    const bytes = mem.windowBytes[0]!;
    bytes.fill(0xee, HostMemory.frameByteOffset(head), HostMemory.frameByteOffset(head) + 2 * 4096);
    mem.putPage(head);
    const a = mem.allocFrame();
    const b = mem.allocFrame();
    expect([a, b]).toEqual([head, head + 1]);
    expect(bytes.subarray(HostMemory.frameByteOffset(a), HostMemory.frameByteOffset(a) + 2 * 4096).every((x) => x === 0)).toBe(true);
    expect(mem.stats()).toMatchObject({ framesReused: 2, framesInUse: 2, hugeFramesInUse: 0, bytesInUse: 8192 });
    expect(mem.allocHugeFrame()).toBe(ENOMEM); // no compaction
  });
});

describe('HostMemory: lock-free allocation from several threads', () => {
  it('never hands one frame to two owners, and counts balance', async () => {
    const mem = HostMemory.create({ ramBytes: 64 << 20, headroomFrames: 0 });
    const workers = 3;
    const perWorker = 3000;
    const sync = new SharedArrayBuffer(8);
    const sync32 = new Int32Array(sync);
    const held = new SharedArrayBuffer(workers * (perWorker + 1) * 4);
    const ws = Array.from({ length: workers }, (_, w) =>
      startWorker(new URL('./alloc-worker.ts', import.meta.url), { mem: mem.shared, sync, held, worker: w, perWorker, rounds: 30 }),
    );
    const done = ws.map((w) => once(w, 'message'));
    while (Atomics.load(sync32, 1) < workers) await new Promise((r) => setTimeout(r, 5));
    Atomics.store(sync32, 0, 1);
    Atomics.notify(sync32, 0);
    await Promise.all(done);
    await Promise.all(ws.map((w) => w.terminate()));
    const h = new Int32Array(held);
    const owned = new Set<number>();
    let smallCount = 0;
    let hugeCount = 0;
    for (let w = 0; w < workers; w++) {
      const base = w * (perWorker + 1);
      for (let k = 1; k <= h[base]!; k++) {
        const v = h[base + k]!;
        const frames = v < 0 ? Array.from({ length: 512 }, (_, i) => -v - 1 + i) : [v];
        if (v < 0) hugeCount++;
        else smallCount++;
        for (const p of frames) {
          expect(owned.has(p)).toBe(false);
          owned.add(p);
        }
        expect(mem.refcount(v < 0 ? -v - 1 : v)).toBe(1);
      }
    }
    const st = mem.stats();
    expect(st.framesInUse).toBe(smallCount);
    expect(st.hugeFramesInUse).toBe(hugeCount);
    expect(st.framesReused + st.hugeFramesReused).toBeGreaterThan(0);
  }, 30_000);
});
