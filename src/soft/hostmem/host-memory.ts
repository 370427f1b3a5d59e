// Host physical memory: frames, their "struct page" (flags + refcount), and the frame allocator.
//
// Concurrency rules (every thread that attached may call every method below, except create):
// - Frame data lives in one SharedArrayBuffer per 1 GiB window. A frame's bytes belong to whoever
//   holds a reference to it; this file touches them only to zero a frame before handing it out.
// - flags[pfn]: PG_VALID and PG_RESERVED are written once by create() and never change.
//   PG_COMPOUND_HEAD/TAIL are written (plain stores) only by the thread that owns the chunk: by
//   allocHugeFrame before it returns, and by the free path after the last reference is gone. A
//   reader may trust them for a frame it holds a reference on, or reached through an Atomics
//   load (a host PTE) that was published after the flags were written.
// - refcount[pfn] (the head's for a compound frame) changes only by Atomics. 0 means free.
//   tryGetPageRef is get_page_unless_zero: it never resurrects a free frame. The put that takes a
//   count from 1 to 0 frees the frame, exactly once.
// - Allocation is lock-free: every thread owns a private "current chunk" (512 frames claimed with
//   one Atomics.add on the fresh-chunk cursor) and hands out its frames with plain arithmetic.
//   Freed 4 KiB frames and freed 2 MiB chunks go to AtomicBitPools (bitmap + CAS, see bitpool.ts).
//   A thread's unused chunk tail is not returned when the thread ends (it is headroom, by design).
//   There is no compaction: freed 4 KiB frames are reused as 4 KiB frames only, so once the fresh
//   chunks are gone a 2 MiB allocation succeeds only from a freed compound frame (THP then falls
//   back to 4 KiB pages, hugetlb fails with ENOMEM).
//
// Seed 001 (kvm_is_mmio_pfn): a pfn without a struct page (hole, device BAR) must be recognised
// by pfn_valid BEFORE anything reads its page flags; a valid page with PG_RESERVED (driver-owned
// RAM mapped with remap_pfn_range) is never refcounted; and no compound head/tail check is
// needed, because split_huge_page never carries PG_reserved from head to tails and a driver that
// maps a reserved huge page must mark every subpage reserved. classifyPfn therefore reads one
// flag word: the frame's own.

import { ENOMEM } from './errno.ts';
import { AtomicBitPool, type BitPoolShared } from './bitpool.ts';
import { resolveLayout, type HostMemoryLayout, type PhysRegion } from './layout.ts';
import {
  FRAME_WORDS,
  FRAME_WORDS_SHIFT,
  HUGE_FRAME_PAGES,
  PG_COMPOUND_HEAD,
  PG_COMPOUND_TAIL,
  PG_RESERVED,
  PG_VALID,
  WINDOW_FRAMES,
  WINDOW_MASK,
  WINDOW_SHIFT,
} from './page-flags.ts';

export type PfnClass = 'ram' | 'reserved' | 'mmio';

/** Only SharedArrayBuffers and numbers: structured-clonable into workerData. */
export interface HostMemoryShared {
  totalFrames: number;
  regions: PhysRegion[];
  windows: SharedArrayBuffer[];
  flags: SharedArrayBuffer;
  refcount: SharedArrayBuffer;
  /** Int32: chunk index -> head pfn of every fully-RAM, 512-aligned run of frames. */
  chunkPfns: SharedArrayBuffer;
  chunks: number;
  ctl: SharedArrayBuffer;
  freeFrames: BitPoolShared;
  freeChunks: BitPoolShared;
}

export interface HostMemoryStats {
  /** 4 KiB frames handed out by allocFrame since create (reused ones included). */
  framesAllocated: number;
  /** 2 MiB compound frames handed out by allocHugeFrame since create. */
  hugeFramesAllocated: number;
  framesFreed: number;
  hugeFramesFreed: number;
  /** Of framesAllocated / hugeFramesAllocated: how many came back from the free pools. */
  framesReused: number;
  hugeFramesReused: number;
  /** Live frames: allocated minus freed. */
  framesInUse: number;
  hugeFramesInUse: number;
  /** framesInUse * 4 KiB + hugeFramesInUse * 2 MiB. */
  bytesInUse: number;
  /** Never-used 2 MiB chunks left for the fresh-chunk cursor. */
  freshChunksLeft: number;
  totalFrames: number;
  ramFrames: number;
  reservedFrames: number;
  mmioFrames: number;
  holeFrames: number;
}

export class HostMemoryError extends Error {
  constructor(
    readonly pfn: number,
    message: string,
  ) {
    super(message);
    this.name = 'HostMemoryError';
  }
}

// ctl words, 16 apart (64 bytes) so counters bumped by different threads share no cache line.
const C_FRESH_CHUNK = 0;
const C_FRAMES_ALLOC = 16;
const C_HUGE_ALLOC = 32;
const C_FRAMES_FREED = 48;
const C_HUGE_FREED = 64;
const C_FRAMES_REUSED = 80;
const C_HUGE_REUSED = 96;
const CTL_WORDS = 112;

const HUGE_MASK = ~(HUGE_FRAME_PAGES - 1);

export class HostMemory {
  readonly shared: HostMemoryShared;
  readonly totalFrames: number;
  /** Int32 views over each data window: word w of pfn p is windows[p >>> 18][((p & 0x3ffff) << 10) + w]. */
  readonly windows: Int32Array[];
  /** The same windows as bytes. */
  readonly windowBytes: Uint8Array[];
  /** Per-frame flags (PG_*), see the concurrency rules above. */
  readonly flags: Int32Array;
  private readonly refs: Int32Array;
  private readonly chunkPfns: Int32Array;
  private readonly nChunks: number;
  private readonly ctl: Int32Array;
  private readonly freeFramePool: AtomicBitPool;
  private readonly freeChunkPool: AtomicBitPool;
  // This thread's private chunk: frames [localNext, localEnd) are ours to hand out.
  private localNext = 0;
  private localEnd = 0;
  private localNeedsZero = false;

  private constructor(shared: HostMemoryShared) {
    this.shared = shared;
    this.totalFrames = shared.totalFrames;
    this.windows = shared.windows.map((sab) => new Int32Array(sab));
    this.windowBytes = shared.windows.map((sab) => new Uint8Array(sab));
    this.flags = new Int32Array(shared.flags);
    this.refs = new Int32Array(shared.refcount);
    this.chunkPfns = new Int32Array(shared.chunkPfns);
    this.nChunks = shared.chunks;
    this.ctl = new Int32Array(shared.ctl);
    this.freeFramePool = AtomicBitPool.attach(shared.freeFrames);
    this.freeChunkPool = AtomicBitPool.attach(shared.freeChunks);
  }

  /** Build the physical map (main thread). Default: HostMemory.create({ ramBytes }). */
  static create(layout: HostMemoryLayout): HostMemory {
    const { regions, totalFrames } = resolveLayout(layout);
    const windows: SharedArrayBuffer[] = [];
    for (let first = 0; first < totalFrames; first += WINDOW_FRAMES) {
      windows.push(new SharedArrayBuffer(Math.min(WINDOW_FRAMES, totalFrames - first) * 4096));
    }
    const flags = new Int32Array(new SharedArrayBuffer(totalFrames * 4));
    const chunks: number[] = [];
    const edgeFrames: number[] = [];
    for (const r of regions) {
      if (r.kind === 'ram' || r.kind === 'reserved') {
        flags.fill(r.kind === 'ram' ? PG_VALID : PG_VALID | PG_RESERVED, r.startPfn, r.startPfn + r.frames);
      }
      if (r.kind !== 'ram') continue;
      const end = r.startPfn + r.frames;
      const firstChunk = Math.ceil(r.startPfn / HUGE_FRAME_PAGES) * HUGE_FRAME_PAGES;
      const lastChunkEnd = Math.floor(end / HUGE_FRAME_PAGES) * HUGE_FRAME_PAGES;
      if (firstChunk >= lastChunkEnd) {
        for (let p = r.startPfn; p < end; p++) edgeFrames.push(p);
        continue;
      }
      for (let p = r.startPfn; p < firstChunk; p++) edgeFrames.push(p);
      for (let p = firstChunk; p < lastChunkEnd; p += HUGE_FRAME_PAGES) chunks.push(p);
      for (let p = lastChunkEnd; p < end; p++) edgeFrames.push(p);
    }
    const chunkPfns = new Int32Array(new SharedArrayBuffer(Math.max(1, chunks.length) * 4));
    chunkPfns.set(chunks);
    const freeFrames = AtomicBitPool.create(totalFrames);
    for (const p of edgeFrames) freeFrames.put(p);
    const shared: HostMemoryShared = {
      totalFrames,
      regions,
      windows,
      flags: flags.buffer as SharedArrayBuffer,
      refcount: new SharedArrayBuffer(totalFrames * 4),
      chunkPfns: chunkPfns.buffer as SharedArrayBuffer,
      chunks: chunks.length,
      ctl: new SharedArrayBuffer(CTL_WORDS * 4),
      freeFrames: freeFrames.shared,
      freeChunks: AtomicBitPool.create(Math.max(1, chunks.length)).shared,
    };
    return new HostMemory(shared);
  }

  /** Attach from any worker to memory created elsewhere. */
  static attach(shared: HostMemoryShared): HostMemory {
    return new HostMemory(shared);
  }

  // ---- classification (seed 001) ----

  /** pfn_valid: the pfn has a struct page. */
  pfnValid(pfn: number): boolean {
    return pfn >= 0 && pfn < this.totalFrames && (this.flags[pfn]! & PG_VALID) !== 0;
  }

  /** kvm_is_mmio_pfn as seed 001 ends it: !pfn_valid -> mmio; PageReserved -> reserved; else ram. */
  classifyPfn(pfn: number): PfnClass {
    // pfn_valid first: a hole or BAR has no struct page, so its flag word means nothing.
    if (!(pfn >= 0 && pfn < this.totalFrames)) return 'mmio';
    const f = this.flags[pfn]!;
    if ((f & PG_VALID) === 0) return 'mmio';
    // The frame's own PG_reserved, no compound_head(): a reserved huge page has every subpage
    // marked, and split_huge_page never moves PG_reserved to tails (seed 001).
    return (f & PG_RESERVED) !== 0 ? 'reserved' : 'ram';
  }

  /** classifyPfn(pfn) !== 'ram': not refcounted, mapped with device attributes. */
  isMmioPfn(pfn: number): boolean {
    if (!(pfn >= 0 && pfn < this.totalFrames)) return true;
    return (this.flags[pfn]! & (PG_VALID | PG_RESERVED)) !== PG_VALID;
  }

  isCompoundHead(pfn: number): boolean {
    return (this.flags[pfn]! & PG_COMPOUND_HEAD) !== 0;
  }

  isCompoundTail(pfn: number): boolean {
    return (this.flags[pfn]! & PG_COMPOUND_TAIL) !== 0;
  }

  /** compound_head: the head pfn of a compound frame, or pfn itself. */
  compoundHead(pfn: number): number {
    return (this.flags[pfn]! & PG_COMPOUND_TAIL) !== 0 ? pfn & HUGE_MASK : pfn;
  }

  // ---- refcounts ----

  private refSlot(pfn: number, what: string): number {
    if (!(pfn >= 0 && pfn < this.totalFrames)) throw new HostMemoryError(pfn, `${what}(${pfn}): pfn outside the physical map (${this.totalFrames} frames)`);
    const f = this.flags[pfn]!;
    if ((f & (PG_VALID | PG_RESERVED)) !== PG_VALID) {
      throw new HostMemoryError(pfn, `${what}(${pfn}): pfn is ${this.classifyPfn(pfn)}, which is never refcounted`);
    }
    return (f & PG_COMPOUND_TAIL) !== 0 ? pfn & HUGE_MASK : pfn;
  }

  /** get_page: the frame must be allocated (refcount > 0). A tail counts on its head. */
  getPage(pfn: number): void {
    const slot = this.refSlot(pfn, 'getPage');
    const prev = Atomics.add(this.refs, slot, 1);
    if (prev <= 0) {
      Atomics.sub(this.refs, slot, 1);
      throw new HostMemoryError(pfn, `getPage(${pfn}): frame is free (refcount ${prev})`);
    }
  }

  /**
   * get_page_unless_zero, for a pfn read from a host PTE without holding a reference: returns the
   * refcount slot taken (pass it to putPageRef), or -1 if the frame is free or not refcounted.
   * The caller must re-check that the PTE still holds this pfn.
   */
  tryGetPageRef(pfn: number): number {
    if (!(pfn >= 0 && pfn < this.totalFrames)) return -1;
    const f = this.flags[pfn]!;
    if ((f & (PG_VALID | PG_RESERVED)) !== PG_VALID) return -1;
    const slot = (f & PG_COMPOUND_TAIL) !== 0 ? pfn & HUGE_MASK : pfn;
    for (;;) {
      const c = Atomics.load(this.refs, slot);
      if (c <= 0) return -1;
      if (Atomics.compareExchange(this.refs, slot, c, c + 1) === c) return slot;
    }
  }

  /** put_page: drop one reference; the last one frees the frame (compound or 4 KiB). */
  putPage(pfn: number): void {
    this.putPageRef(this.refSlot(pfn, 'putPage'));
  }

  /** put_page on a slot returned by tryGetPageRef (or a head pfn). */
  putPageRef(slot: number): void {
    const prev = Atomics.sub(this.refs, slot, 1);
    if (prev > 1) return;
    if (prev <= 0) {
      Atomics.add(this.refs, slot, 1);
      throw new HostMemoryError(slot, `putPage(${slot}): refcount underflow (was ${prev})`);
    }
    if ((this.flags[slot]! & PG_COMPOUND_HEAD) !== 0) this.releaseHuge(slot);
    else this.releaseFrame(slot);
  }

  /** The refcount (of the compound head for a tail); 0 for free, reserved and mmio frames. */
  refcount(pfn: number): number {
    if (this.isMmioPfn(pfn)) return 0;
    return Atomics.load(this.refs, this.compoundHead(pfn));
  }

  /** kvm_release_pfn_clean: drop the reference hva_to_pfn took, if the pfn is refcounted. */
  releasePfn(pfn: number): void {
    if (!this.isMmioPfn(pfn)) this.putPage(pfn);
  }

  // ---- allocation ----

  /** A zeroed 4 KiB frame with refcount 1, or ENOMEM. Any thread; lock-free. */
  allocFrame(): number {
    let pfn: number;
    if (this.localNext < this.localEnd) {
      pfn = this.localNext++;
      if (this.localNeedsZero) {
        this.zeroFrames(pfn, 1);
        Atomics.add(this.ctl, C_FRAMES_REUSED, 1);
      }
    } else {
      pfn = this.freeFramePool.claim();
      if (pfn >= 0) {
        this.zeroFrames(pfn, 1);
        Atomics.add(this.ctl, C_FRAMES_REUSED, 1);
      } else {
        let head = this.claimFreshChunk();
        this.localNeedsZero = false;
        if (head < 0) {
          const c = this.freeChunkPool.claim();
          if (c < 0) return ENOMEM;
          head = this.chunkPfns[c]!;
          this.localNeedsZero = true;
        }
        pfn = head;
        this.localNext = head + 1;
        this.localEnd = head + HUGE_FRAME_PAGES;
        if (this.localNeedsZero) {
          this.zeroFrames(pfn, 1);
          Atomics.add(this.ctl, C_FRAMES_REUSED, 1);
        }
      }
    }
    Atomics.store(this.refs, pfn, 1);
    Atomics.add(this.ctl, C_FRAMES_ALLOC, 1);
    return pfn;
  }

  /** A zeroed 2 MiB compound frame (512 aligned frames, head + tails flagged), refcount 1 on the head; or ENOMEM. */
  allocHugeFrame(): number {
    let head = -1;
    const c = this.freeChunkPool.claim();
    if (c >= 0) {
      head = this.chunkPfns[c]!;
      this.zeroFrames(head, HUGE_FRAME_PAGES);
      Atomics.add(this.ctl, C_HUGE_REUSED, 1);
    } else {
      head = this.claimFreshChunk();
      if (head < 0) return ENOMEM;
    }
    const flags = this.flags;
    for (let p = head + 1; p < head + HUGE_FRAME_PAGES; p++) flags[p] = flags[p]! | PG_COMPOUND_TAIL;
    flags[head] = flags[head]! | PG_COMPOUND_HEAD;
    Atomics.store(this.refs, head, 1);
    Atomics.add(this.ctl, C_HUGE_ALLOC, 1);
    return head;
  }

  /** Free a 4 KiB frame whose only reference is the caller's (refcount exactly 1). */
  freeFrame(pfn: number): void {
    const slot = this.refSlot(pfn, 'freeFrame');
    if (slot !== pfn || this.isCompoundHead(pfn)) throw new HostMemoryError(pfn, `freeFrame(${pfn}): part of a compound frame; use freeHugeFrame`);
    this.dropLastRef(pfn, 'freeFrame');
    this.releaseFrame(pfn);
  }

  /** Free a compound frame (by its head) whose only reference is the caller's. */
  freeHugeFrame(headPfn: number): void {
    this.refSlot(headPfn, 'freeHugeFrame');
    if (!this.isCompoundHead(headPfn)) throw new HostMemoryError(headPfn, `freeHugeFrame(${headPfn}): not a compound head`);
    this.dropLastRef(headPfn, 'freeHugeFrame');
    this.releaseHuge(headPfn);
  }

  private dropLastRef(pfn: number, what: string): void {
    const prev = Atomics.compareExchange(this.refs, pfn, 1, 0);
    if (prev !== 1) throw new HostMemoryError(pfn, `${what}(${pfn}): refcount is ${prev}, expected exactly 1`);
  }

  private releaseFrame(pfn: number): void {
    this.freeFramePool.put(pfn);
    Atomics.add(this.ctl, C_FRAMES_FREED, 1);
  }

  private releaseHuge(head: number): void {
    const flags = this.flags;
    for (let p = head; p < head + HUGE_FRAME_PAGES; p++) flags[p] = flags[p]! & ~(PG_COMPOUND_HEAD | PG_COMPOUND_TAIL);
    const c = this.chunkIndex(head);
    // put() is an Atomics.or: it orders the flag stores above before any claimer's reads.
    this.freeChunkPool.put(c);
    Atomics.add(this.ctl, C_HUGE_FREED, 1);
  }

  private chunkIndex(head: number): number {
    const pfns = this.chunkPfns;
    let lo = 0;
    let hi = this.nChunks - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const v = pfns[mid]!;
      if (v === head) return mid;
      if (v < head) lo = mid + 1;
      else hi = mid - 1;
    }
    throw new HostMemoryError(head, `pfn ${head} is not the head of a 2 MiB RAM chunk`);
  }

  private claimFreshChunk(): number {
    if (Atomics.load(this.ctl, C_FRESH_CHUNK) >= this.nChunks) return -1;
    const c = Atomics.add(this.ctl, C_FRESH_CHUNK, 1);
    return c < this.nChunks ? this.chunkPfns[c]! : -1;
  }

  private zeroFrames(pfn: number, frames: number): void {
    // A compound frame never crosses a window: windows are 2^18 frames, chunks 2^9 aligned.
    const off = (pfn & WINDOW_MASK) << FRAME_WORDS_SHIFT;
    this.windows[pfn >>> WINDOW_SHIFT]!.fill(0, off, off + frames * FRAME_WORDS);
  }

  // ---- frame data helpers ----

  /** Int32 view of the window holding pfn, and the word offset of the frame in it. */
  frameWords(pfn: number): { words: Int32Array; offset: number } {
    return { words: this.windows[pfn >>> WINDOW_SHIFT]!, offset: (pfn & WINDOW_MASK) << FRAME_WORDS_SHIFT };
  }

  /** Byte offset of a frame inside windowBytes[pfn >>> 18]. */
  static frameByteOffset(pfn: number): number {
    return (pfn & WINDOW_MASK) * 4096;
  }

  stats(): HostMemoryStats {
    const ctl = this.ctl;
    const kindFrames = (k: string) => this.shared.regions.filter((r) => r.kind === k).reduce((n, r) => n + r.frames, 0);
    const framesAllocated = Atomics.load(ctl, C_FRAMES_ALLOC);
    const hugeFramesAllocated = Atomics.load(ctl, C_HUGE_ALLOC);
    const framesFreed = Atomics.load(ctl, C_FRAMES_FREED);
    const hugeFramesFreed = Atomics.load(ctl, C_HUGE_FREED);
    return {
      framesAllocated,
      hugeFramesAllocated,
      framesFreed,
      hugeFramesFreed,
      framesReused: Atomics.load(ctl, C_FRAMES_REUSED),
      hugeFramesReused: Atomics.load(ctl, C_HUGE_REUSED),
      framesInUse: framesAllocated - framesFreed,
      hugeFramesInUse: hugeFramesAllocated - hugeFramesFreed,
      bytesInUse: (framesAllocated - framesFreed) * 4096 + (hugeFramesAllocated - hugeFramesFreed) * HUGE_FRAME_PAGES * 4096,
      freshChunksLeft: Math.max(0, this.nChunks - Atomics.load(ctl, C_FRESH_CHUNK)),
      totalFrames: this.totalFrames,
      ramFrames: kindFrames('ram'),
      reservedFrames: kindFrames('reserved'),
      mmioFrames: kindFrames('mmio'),
      holeFrames: this.totalFrames - kindFrames('ram') - kindFrames('reserved') - kindFrames('mmio'),
    };
  }
}
