// The VMA table of a host address space: a fixed array of entries in shared memory, written by
// the main thread (mmap/munmap) and read lock-free by every thread.
//
// Concurrency rules:
// - Entries are never reused. mmap takes the next entry (main thread only), writes every field
//   with plain stores, then publishes it with Atomics.store(state, LIVE) and bumps the table
//   generation. A reader that Atomics.loads state === LIVE may read the fields with plain loads:
//   the atomic store/load pair orders them (JS memory model: seq-cst atomics synchronize).
// - A LIVE entry's fields never change, except F_UFFD (userfaultfd registration), which is
//   written with Atomics.store by the main thread and read with Atomics.load. munmap moves state LIVE -> DYING (before it zaps the
//   entry's page table) -> DEAD (after). Readers treat anything but LIVE as "no VMA here", and a
//   thread that installed a PTE must re-check state afterwards (see host-address-space.ts).
// - count (entries ever published) only grows; readers scan [0, count).

export type VmaKind = 'anonymous' | 'anonymous_thp' | 'hugetlb' | 'pfnmap';

export const VMA_KINDS: readonly VmaKind[] = ['anonymous', 'anonymous_thp', 'hugetlb', 'pfnmap'];
export const K_ANON = 0;
export const K_THP = 1;
export const K_HUGETLB = 2;
export const K_PFNMAP = 3;

export const VMA_FREE = 0;
export const VMA_LIVE = 1;
export const VMA_DYING = 2;
export const VMA_DEAD = 3;

// Int32 fields per entry.
export const F_STATE = 0;
export const F_KIND = 1;
export const F_READONLY = 2;
export const F_BASE_PFN = 3; // pfnmap: first pfn
export const F_PTE_BASE = 4; // index of page 0 in the pte pool (-1: none)
export const F_PMD_BASE = 5; // index of 2 MiB block 0 in the pmd pool (-1: none)
export const F_PAGES = 6;
export const F_UFFD = 7; // userfaultfd MISSING registration: the one field that changes while LIVE (Atomics)
export const I32_PER_VMA = 8;

// Table-wide Int32 control words, 16 apart.
export const T_COUNT = 0;
export const T_GENERATION = 16;
export const T_SEQ = 32; // mmu_invalidate_seq
export const T_IN_PROGRESS = 48; // mmu_invalidate_in_progress
export const T_PTE_USED = 64;
export const T_PMD_USED = 80;
export const T_CTL_WORDS = 96;

export interface VmaInfo {
  kind: VmaKind;
  /** First hva. */
  start: number;
  /** One past the last hva. */
  end: number;
  readonly: boolean;
  /** Registered with userfaultfd in MISSING mode. */
  userfault?: boolean;
  /** pfnmap only: the pfn mapped at `start`. */
  basePfn?: number;
}

export interface VmaTableShared {
  maxVmas: number;
  i32: SharedArrayBuffer;
  /** Float64 [start, end] per entry: hvas need 47 bits. */
  f64: SharedArrayBuffer;
  ctl: SharedArrayBuffer;
}

export class VmaTable {
  readonly i32: Int32Array;
  readonly f64: Float64Array;
  readonly ctl: Int32Array;
  readonly maxVmas: number;

  constructor(readonly shared: VmaTableShared) {
    this.i32 = new Int32Array(shared.i32);
    this.f64 = new Float64Array(shared.f64);
    this.ctl = new Int32Array(shared.ctl);
    this.maxVmas = shared.maxVmas;
  }

  static createShared(maxVmas: number): VmaTableShared {
    return {
      maxVmas,
      i32: new SharedArrayBuffer(maxVmas * I32_PER_VMA * 4),
      f64: new SharedArrayBuffer(maxVmas * 2 * 8),
      ctl: new SharedArrayBuffer(T_CTL_WORDS * 4),
    };
  }

  state(e: number): number {
    return Atomics.load(this.i32, e * I32_PER_VMA + F_STATE);
  }

  start(e: number): number {
    return this.f64[e * 2]!;
  }

  end(e: number): number {
    return this.f64[e * 2 + 1]!;
  }

  field(e: number, f: number): number {
    return this.i32[e * I32_PER_VMA + f]!;
  }

  /** The LIVE entry containing hva, or -1. */
  find(hva: number): number {
    const n = Atomics.load(this.ctl, T_COUNT);
    for (let e = 0; e < n; e++) {
      if (this.state(e) !== VMA_LIVE) continue;
      if (hva >= this.f64[e * 2]! && hva < this.f64[e * 2 + 1]!) return e;
    }
    return -1;
  }

  /** LIVE entries intersecting [start, end). */
  intersecting(start: number, end: number): number[] {
    const out: number[] = [];
    const n = Atomics.load(this.ctl, T_COUNT);
    for (let e = 0; e < n; e++) {
      if (this.state(e) !== VMA_LIVE) continue;
      if (this.f64[e * 2]! < end && this.f64[e * 2 + 1]! > start) out.push(e);
    }
    return out;
  }

  info(e: number): VmaInfo {
    const kind = this.field(e, F_KIND);
    const info: VmaInfo = { kind: VMA_KINDS[kind]!, start: this.start(e), end: this.end(e), readonly: this.field(e, F_READONLY) !== 0 };
    if (kind === K_PFNMAP) info.basePfn = this.field(e, F_BASE_PFN);
    if (Atomics.load(this.i32, e * I32_PER_VMA + F_UFFD) !== 0) info.userfault = true;
    return info;
  }

  /** Main thread: write a new entry and publish it. */
  publish(start: number, end: number, kind: number, readonly: boolean, basePfn: number, pteBase: number, pmdBase: number, pages: number): number {
    const e = Atomics.load(this.ctl, T_COUNT);
    if (e >= this.maxVmas) throw new Error(`host address space is out of VMA entries (${this.maxVmas}); entries are not reused`);
    const b = e * I32_PER_VMA;
    this.f64[e * 2] = start;
    this.f64[e * 2 + 1] = end;
    this.i32[b + F_KIND] = kind;
    this.i32[b + F_READONLY] = readonly ? 1 : 0;
    this.i32[b + F_BASE_PFN] = basePfn;
    this.i32[b + F_PTE_BASE] = pteBase;
    this.i32[b + F_PMD_BASE] = pmdBase;
    this.i32[b + F_PAGES] = pages;
    this.i32[b + F_UFFD] = 0;
    Atomics.store(this.i32, b + F_STATE, VMA_LIVE);
    Atomics.store(this.ctl, T_COUNT, e + 1);
    Atomics.add(this.ctl, T_GENERATION, 1);
    return e;
  }

  setState(e: number, state: number): void {
    Atomics.store(this.i32, e * I32_PER_VMA + F_STATE, state);
    Atomics.add(this.ctl, T_GENERATION, 1);
  }
}
