// Whole-memory hash for verifying a migration at switchover.
//
// Definition (both sides must agree on it bit for bit):
//   pageHash(slot, page, bytes) = 0                                   if all 4096 bytes are zero
//                               = xxh64(bytes, seed = slot * 2^32 + page)  otherwise
//   memoryHash = sum of pageHash over every page of every memslot, mod 2^64
// The sum makes it order-independent (pages may arrive in any order, over any channel, and be
// re-sent in later rounds: the destination just replaces a page's entry). Seeding with the page's
// position makes moved or swapped contents change the hash. Zero pages contribute 0, so memory
// that was never written costs nothing: a fresh destination table starts at total 0 and a ZERO
// record simply clears entries. (A non-zero page whose xxh64 is exactly 0 would look like a
// zero page: probability 2^-64.)
//
// xxhash-wasm initialises asynchronously (it compiles a wasm module), hence createMemoryHasher().

import xxhash from 'xxhash-wasm';
import type { Vm } from '../vmm/engine.ts';
import type { SlotPages } from './stream/layout.ts';
import type { SlotMap } from './slot-map.ts';
import { allZero } from '../util/bulk-scan.ts';

/** setZero's stretch tested at once: 512 pages' entries (two 32-bit words each). */
const STRETCH_WORDS = 1024;

export const HASH_PAGE_SIZE = 4096;
const ZERO_PAGE = new Uint8Array(HASH_PAGE_SIZE);

/** True when the 4 KiB page is all zero (memcmp against a zero page; the first word rejects fast). */
export function isZeroPage(page: Uint8Array): boolean {
  return isZeroPageAt(page, 0);
}

/** isZeroPage of the page at byte `offset` of `buf`, without making a view of it. */
export function isZeroPageAt(buf: Uint8Array, offset: number): boolean {
  // Guest data pages usually differ from zero in their first bytes: a JS check of those is far
  // cheaper than a call into memcmp (measured: 8 ms vs 30-70 ms per GiB of such pages).
  for (let i = offset; i < offset + 32; i++) if (buf[i] !== 0) return false;
  if (buf[offset + 4095] !== 0) return false;
  return compareBytes.call(buf, ZERO_PAGE, 0, HASH_PAGE_SIZE, offset, offset + HASH_PAGE_SIZE) === 0;
}
const compareBytes = Buffer.prototype.compare;

export interface MemoryHasher {
  /** pageHash of one 4 KiB page (bytes.length must be 4096). */
  hashPage(slot: number, page: number, bytes: Uint8Array): bigint;
  /** Hash `count` consecutive pages held in data (count*4096 bytes) into the table. */
  hashInto(table: PageHashTable, slot: number, firstPage: number, count: number, data: Uint8Array): void;
  /**
   * memoryHash over a whole guest: readPages(slot, firstPage, dst) must fill dst (a whole number
   * of pages, up to batchPages) with the contents of slot's pages from firstPage on.
   */
  hashGuestMemory(
    readPages: (slot: number, firstPage: number, dst: Uint8Array) => void,
    layout: readonly SlotPages[],
    batchPages?: number,
  ): { memoryHash: bigint; pages: number };
}

let api: Promise<Awaited<ReturnType<typeof xxhash>>> | undefined;

export async function createMemoryHasher(): Promise<MemoryHasher> {
  api ??= xxhash();
  const { h64Raw } = await api;
  const hashPage = (slot: number, page: number, bytes: Uint8Array): bigint => {
    if (bytes.length !== HASH_PAGE_SIZE) throw new RangeError(`hashPage: ${bytes.length} bytes, expected 4096`);
    if (isZeroPage(bytes)) return 0n;
    return h64Raw(bytes, (BigInt(slot) << 32n) | BigInt(page));
  };
  return {
    hashPage,
    hashInto(table, slot, firstPage, count, data) {
      if (data.length !== count * HASH_PAGE_SIZE) {
        throw new RangeError(`hashInto: ${data.length} bytes for ${count} pages`);
      }
      // One range check and one mod-2^64 fold per run instead of per page.
      const entries = table.entriesFor(slot, firstPage, count);
      let delta = 0n;
      for (let i = 0; i < count; i++) {
        const off = i * HASH_PAGE_SIZE;
        const h = hashPage(slot, firstPage + i, data.subarray(off, off + HASH_PAGE_SIZE));
        delta += h - entries[firstPage + i]!;
        entries[firstPage + i] = h;
      }
      table.addToTotal(delta);
    },
    hashGuestMemory(readPages, layout, batchPages = 256) {
      const buf = new Uint8Array(batchPages * HASH_PAGE_SIZE);
      let sum = 0n;
      let pages = 0;
      for (const { slot, pages: slotPages } of layout) {
        for (let first = 0; first < slotPages; first += batchPages) {
          const n = Math.min(batchPages, slotPages - first);
          const dst = buf.subarray(0, n * HASH_PAGE_SIZE);
          readPages(slot, first, dst);
          for (let i = 0; i < n; i++) {
            const off = i * HASH_PAGE_SIZE;
            sum += hashPage(slot, first + i, dst.subarray(off, off + HASH_PAGE_SIZE));
          }
          sum = BigInt.asUintN(64, sum);
          pages += n;
        }
      }
      return { memoryHash: sum, pages };
    },
  };
}

/**
 * One pageHash per page of a memory layout, with the running memoryHash. The destination sets an
 * entry for every page it writes, so at END it knows the hash of what it holds without
 * rescanning. All entries start at 0 (= zero page), matching fresh, zeroed guest memory.
 */
export class PageHashTable {
  private readonly bySlot = new Map<number, BigUint64Array>();
  private sum = 0n;
  readonly pages: number;

  constructor(layout: readonly SlotPages[]) {
    let pages = 0;
    for (const { slot, pages: n } of layout) {
      this.bySlot.set(slot, new BigUint64Array(n));
      pages += n;
    }
    this.pages = pages;
  }

  /** The slot's entry array, after checking [page, page+count) is inside it (for hashInto). */
  entriesFor(slot: number, page: number, count: number): BigUint64Array {
    return this.entries(slot, page, count);
  }

  /** Fold a sum of entry changes made through entriesFor into the total. */
  addToTotal(delta: bigint): void {
    this.sum = BigInt.asUintN(64, this.sum + delta);
  }

  private entries(slot: number, page: number, count = 1): BigUint64Array {
    const t = this.bySlot.get(slot);
    if (!t) throw new RangeError(`PageHashTable: slot ${slot} is not in the layout`);
    if (!(page >= 0 && count >= 0 && page + count <= t.length)) {
      throw new RangeError(`PageHashTable: slot ${slot} pages ${page}..${page + count - 1} outside its ${t.length} pages`);
    }
    return t;
  }

  set(slot: number, page: number, h: bigint): void {
    const t = this.entries(slot, page);
    this.sum = BigInt.asUintN(64, this.sum - t[page]! + h);
    t[page] = h;
  }

  get(slot: number, page: number): bigint {
    return this.entries(slot, page)[page]!;
  }

  /** Mark count pages from firstPage as zero (a ZERO record). */
  setZero(slot: number, firstPage: number, count: number): void {
    const t = this.entries(slot, firstPage, count);
    if (count === 1) {
      this.sum = BigInt.asUintN(64, this.sum - t[firstPage]!);
      t[firstPage] = 0n;
      return;
    }
    // Runs of a whole slot sit on the post-copy switchover's path, where this loop runs cold:
    // a stretch of 512 pages the table does not hold (never sent: the common case when post-copy
    // starts during the bulk round) is skipped by a native test; the rest sums the entries'
    // 32-bit halves as plain numbers (exact below 2^53: flushed every 2^20 pages) instead of a
    // BigInt add per page.
    const words = new Uint32Array(t.buffer, t.byteOffset + firstPage * 8, count * 2);
    let removed = 0n;
    for (let c = 0; c < words.length; c += 2 << 20) {
      const end = Math.min(words.length, c + (2 << 20));
      let lo = 0;
      let hi = 0;
      for (let i = c; i < end; i += STRETCH_WORDS) {
        const stop = Math.min(end, i + STRETCH_WORDS);
        if (allZero(words.subarray(i, stop))) continue;
        for (let k = i; k < stop; k += 2) {
          lo += words[k]!;
          hi += words[k + 1]!;
        }
      }
      removed += (BigInt(hi) << 32n) + BigInt(lo);
    }
    t.fill(0n, firstPage, firstPage + count);
    this.sum = BigInt.asUintN(64, this.sum - removed);
  }

  /** memoryHash of the memory the table describes. */
  total(): bigint {
    return this.sum;
  }
}

/** A memoryHash as it appears in stats and logs: 16 hex digits. */
export function formatMemoryHash(h: bigint): string {
  return h.toString(16).padStart(16, '0');
}

/** memoryHash of a VM's memory over `slots`, read through readGuest: call only while it is paused. */
export function hashVmMemory(hasher: MemoryHasher, vm: Vm, slots: SlotMap): string {
  const read = (slot: number, firstPage: number, dst: Uint8Array) => vm.readGuest(slots.gpaOf(slot, firstPage)!, dst);
  return formatMemoryHash(hasher.hashGuestMemory(read, slots.layout).memoryHash);
}
