// Order-independent digest of guest memory, used to prove that the destination holds exactly
// the source's memory at switchover. Each page contributes mix(xxh64(page), gfn) to two 32-bit
// lane sums, so the digest does not depend on the order pages were hashed in, and a page that is
// re-sent replaces its old contribution (PageDigestTable) instead of adding a second one.
//
// Concurrency: single-threaded; a table belongs to the destination's main thread.
import xxhash from 'xxhash-wasm';
import { PAGE_SIZE, type Vm } from '../vmm/engine.ts';

type XX = Awaited<ReturnType<typeof xxhash>>;
let xx: XX | null = null;
const ZERO_PAGE = new Uint8Array(PAGE_SIZE);
let zeroLo = 0;
let zeroHi = 0;

export async function initDigest(): Promise<void> {
  if (xx) return;
  xx = await xxhash();
  const h = xx.h64Raw(ZERO_PAGE, 0n);
  zeroLo = Number(h & 0xffffffffn);
  zeroHi = Number(h >> 32n);
}

function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** xxh64 of one page as two uint32 halves written to out[0], out[1]. */
function hashPage(page: Uint8Array, out: Uint32Array, isZero: boolean): void {
  if (isZero) {
    out[0] = zeroLo;
    out[1] = zeroHi;
    return;
  }
  const h = xx!.h64Raw(page, 0n);
  out[0] = Number(h & 0xffffffffn);
  out[1] = Number(h >> 32n);
}

/** A page's contribution to the two lanes, bound to its gfn so that swapped pages differ. */
function laneA(lo: number, hi: number, gfn: number): number {
  return fmix32(lo ^ Math.imul(gfn | 0, 0x9e3779b1) ^ fmix32(hi));
}
function laneB(lo: number, hi: number, gfn: number): number {
  return fmix32(hi ^ Math.imul(Math.floor(gfn / 2 ** 32) ^ (gfn | 0), 0x27d4eb2f) ^ lo);
}

function format(a: number, b: number, pages: number): string {
  return `${(b >>> 0).toString(16).padStart(8, '0')}${(a >>> 0).toString(16).padStart(8, '0')}/${pages}`;
}

/** All 4096 bytes zero? Word scan that stops at the first non-zero word (usually the first). */
export function isZeroPage(page: Uint8Array): boolean {
  if ((page.byteOffset & 7) === 0) {
    const w = new Float64Array(page.buffer, page.byteOffset, PAGE_SIZE / 8);
    // Float64 compare: +0 and -0 are both "=== 0", so also check the sign via 1/x.
    for (let i = 0; i < w.length; i++) if (w[i] !== 0 || 1 / w[i]! < 0) return false;
    return true;
  }
  return Buffer.from(page.buffer, page.byteOffset, page.byteLength).equals(ZERO_PAGE);
}

/**
 * The destination's per-page table: the digest of the last content received for each page of a
 * set of memslots; digest() is O(1) because lane sums are kept up to date.
 */
export class PageDigestTable {
  private readonly lo: Uint32Array;
  private readonly hi: Uint32Array;
  private readonly seen: Uint8Array;
  private a = 0;
  private b = 0;
  private pages = 0;
  private readonly tmp = new Uint32Array(2);

  /** `regions`: [gpa, pages] of each memslot, in any order. */
  constructor(private readonly regions: readonly { gpa: number; pages: number; base: number }[]) {
    const total = regions.reduce((n, r) => n + r.pages, 0);
    this.lo = new Uint32Array(total);
    this.hi = new Uint32Array(total);
    this.seen = new Uint8Array(total);
  }

  static forSlots(slots: readonly { guestPhysAddr: number; memorySize: number }[]): PageDigestTable {
    let base = 0;
    const regions = slots.map((s) => {
      const r = { gpa: s.guestPhysAddr, pages: s.memorySize / PAGE_SIZE, base };
      base += r.pages;
      return r;
    });
    return new PageDigestTable(regions);
  }

  /** Index of the page at gpa in this table, or -1. */
  indexOf(gpa: number): number {
    for (const r of this.regions) {
      if (gpa >= r.gpa && gpa < r.gpa + r.pages * PAGE_SIZE) return r.base + (gpa - r.gpa) / PAGE_SIZE;
    }
    return -1;
  }

  /** Record that the page at table index `idx` (guest-physical `gpa`) now holds `page`. */
  set(idx: number, gpa: number, page: Uint8Array | null): void {
    hashPage(page ?? ZERO_PAGE, this.tmp, page === null);
    const gfn = gpa / PAGE_SIZE;
    if (this.seen[idx]) {
      this.a -= laneA(this.lo[idx]!, this.hi[idx]!, gfn);
      this.b -= laneB(this.lo[idx]!, this.hi[idx]!, gfn);
    } else {
      this.seen[idx] = 1;
      this.pages++;
    }
    this.lo[idx] = this.tmp[0]!;
    this.hi[idx] = this.tmp[1]!;
    this.a = (this.a + laneA(this.tmp[0]!, this.tmp[1]!, gfn)) >>> 0;
    this.b = (this.b + laneB(this.tmp[0]!, this.tmp[1]!, gfn)) >>> 0;
  }

  /** Pages never received count as zero pages (fresh anonymous memory is zero). */
  digest(): string {
    let a = this.a;
    let b = this.b;
    if (this.pages < this.seen.length) for (const r of this.regions) {
      for (let i = 0; i < r.pages; i++) {
        if (this.seen[r.base + i]) continue;
        const gfn = r.gpa / PAGE_SIZE + i;
        a = (a + laneA(zeroLo, zeroHi, gfn)) >>> 0;
        b = (b + laneB(zeroLo, zeroHi, gfn)) >>> 0;
      }
    }
    return format(a, b, this.seen.length);
  }

  get missingPages(): number {
    return this.seen.length - this.pages;
  }
}

const SCAN_PAGES = 256;

/** Digest of the VM's memory right now (read through readGuest): call only while it is paused. */
export function digestVmMemory(vm: Vm, slots: readonly { guestPhysAddr: number; memorySize: number }[]): string {
  const buf = new Uint8Array(SCAN_PAGES * PAGE_SIZE);
  const tmp = new Uint32Array(2);
  let a = 0;
  let b = 0;
  let pages = 0;
  for (const s of slots) {
    const n = s.memorySize / PAGE_SIZE;
    for (let p = 0; p < n; p += SCAN_PAGES) {
      const k = Math.min(SCAN_PAGES, n - p);
      const view = buf.subarray(0, k * PAGE_SIZE);
      vm.readGuest(s.guestPhysAddr + p * PAGE_SIZE, view);
      for (let i = 0; i < k; i++) {
        const page = view.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
        hashPage(page, tmp, isZeroPage(page));
        const gfn = s.guestPhysAddr / PAGE_SIZE + p + i;
        a = (a + laneA(tmp[0]!, tmp[1]!, gfn)) >>> 0;
        b = (b + laneB(tmp[0]!, tmp[1]!, gfn)) >>> 0;
      }
      pages += k;
    }
  }
  return format(a, b, pages);
}
