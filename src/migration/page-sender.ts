// Reads runs of guest pages through the engine and puts them on the link: zero pages become ZERO
// markers, the rest RAM records (QEMU's save_zero_page / ram_save_page). Runs are spread over
// the channels round-robin; nothing waits for the destination except TCP back-pressure and the
// rate limiter, so the stream is pipelined.
//
// Dirty pages come from a per-slot "pending" bitmap that the harvest ORs the engine's dirty log
// into. Sending a chunk of it first clears those bits in the engine's log (KVM_CLEAR_DIRTY_LOG,
// which write-protects the pages again) and only then reads the pages, so a write that lands
// after the read is caught by the next harvest.
//
// Concurrency: single-threaded (the VMM's main thread); vCPUs may write guest memory while a run
// is read, which is harmless because such a page is dirty again and will be re-sent.
import { PAGE_SIZE, type MemslotInfo, type Vm } from '../vmm/engine.ts';

import { isZeroPageAt } from './hash.ts';
import type { SourceLink } from './link.ts';
import type { RateLimiter } from './transport/rate-limiter.ts';

/** Pages per RAM record at most (1 MiB). */
export const RUN_PAGES = 256;
/** KVM_CLEAR_DIRTY_LOG chunk, pages (a multiple of 64): no call covers a whole large slot. */
export const CLEAR_CHUNK_PAGES = 262144;

export interface SendCounters {
  zeroPages: number;
  normalPages: number;
}

/** Bytes sent between two yields to the event loop (timers, signals, socket events). */
const YIELD_BYTES = 2 << 20;
const yieldToLoop = () => new Promise<void>((r) => setImmediate(r));

export class PageSender {
  private channel = 0;
  private sinceYield = 0;
  readonly counters: SendCounters = { zeroPages: 0, normalPages: 0 };
  /** Checked between runs; throws to abort the stream. */
  check: () => void = () => undefined;
  /** Told about every page run put on the link (data null: zero pages). */
  onSent: ((slot: number, page: number, data: Uint8Array | null, pages: number) => void) | null = null;

  constructor(
    private readonly vm: Vm,
    private readonly link: SourceLink,
    /** --max-bandwidth (null: unlimited). */
    private readonly limiter: RateLimiter | null,
  ) {}

  private nextChannel(): number {
    const ch = this.channel;
    this.channel = (this.channel + 1) % this.link.channels;
    return ch;
  }

  /** Send `pages` pages of `slot` from `first` on, tagged with `round`. */
  async sendRun(slot: MemslotInfo, first: number, pages: number, round: number): Promise<void> {
    // Sends that never block resolve as microtasks: without this the loop would starve timers
    // (the throttle, progress), signal handlers and socket events for a whole round.
    this.sinceYield += pages * PAGE_SIZE;
    if (this.sinceYield >= YIELD_BYTES) {
      this.sinceYield = 0;
      await yieldToLoop();
    }
    this.check();
    const whole = this.acquire();
    const buf = whole.subarray(0, pages * PAGE_SIZE);
    this.vm.readGuest(slot.guestPhysAddr + first * PAGE_SIZE, buf);
    // Refcount of RAM records still queued on a socket that point into buf (+1 while we work).
    let users = 1;
    const release = () => {
      if (--users === 0) this.pool.push(whole);
    };
    let i = 0;
    while (i < pages) {
      const zero = isZeroPageAt(buf, i * PAGE_SIZE);
      let j = i + 1;
      while (j < pages && isZeroPageAt(buf, j * PAGE_SIZE) === zero) j++;
      const page = first + i;
      const ch = this.nextChannel();
      if (zero) {
        this.counters.zeroPages += j - i;
        this.onSent?.(slot.slot, page, null, j - i);
        await this.link.send({ type: 'zero', round, slot: slot.slot, page, pages: j - i }, ch);
      } else {
        this.counters.normalPages += j - i;
        if (this.limiter) await this.limiter.take((j - i) * PAGE_SIZE);
        const data = buf.subarray(i * PAGE_SIZE, j * PAGE_SIZE);
        this.onSent?.(slot.slot, page, data, j - i);
        users++;
        await this.link.send({ type: 'ram', round, slot: slot.slot, page, data, onWritten: release }, ch);
      }
      i = j;
    }
    release();
  }

  /** Run buffers are reused once the socket has written them: no GC churn, no fresh pages. */
  private readonly pool: Buffer[] = [];
  private acquire(): Buffer {
    return this.pool.pop() ?? Buffer.allocUnsafeSlow(RUN_PAGES * PAGE_SIZE);
  }

  /** Every page of the slot (the bulk stage). */
  async sendSlot(slot: MemslotInfo, round: number): Promise<void> {
    for (let p = 0; p < slot.pages; p += RUN_PAGES) {
      await this.sendRun(slot, p, Math.min(RUN_PAGES, slot.pages - p), round);
    }
  }

  /**
   * Send and forget every page set in `pending` (a slot-sized bitmap), chunk by chunk; with
   * `clearLog` each chunk's bits are cleared in the engine's dirty log before its pages are read.
   * Stops early (leaving the rest set) once `deadlineMs` (performance.now()) has passed.
   * Returns the number of pages sent.
   */
  async sendPending(slot: MemslotInfo, pending: Uint32Array, round: number, clearLog: boolean, deadlineMs = Infinity): Promise<number> {
    let sent = 0;
    for (let first = 0; first < slot.pages; first += CLEAR_CHUNK_PAGES) {
      if (performance.now() > deadlineMs) break;
      const n = Math.min(CLEAR_CHUNK_PAGES, slot.pages - first);
      const w0 = first >>> 5;
      const w1 = Math.min(pending.length, ((first + n + 63) >>> 6) * 2);
      let any = false;
      for (let w = w0; w < w1; w++) if (pending[w] !== 0) { any = true; break; }
      if (!any) continue;
      if (clearLog) this.vm.clearDirtyLog(slot.slot, first, n, pending.subarray(w0, w1));
      let runStart = -1;
      let runLen = 0;
      for (let w = w0; w < w1; w++) {
        let word = pending[w]!;
        if (word === 0) continue;
        // Out of time for this round: the rest stays pending (its log bits may already be
        // cleared, which is fine: pending is what decides what gets sent).
        if (deadlineMs !== Infinity && (w & 31) === 0 && performance.now() > deadlineMs) break;
        pending[w] = 0;
        while (word !== 0) {
          const page = w * 32 + (31 - Math.clz32(word & -word));
          word &= word - 1;
          if (runLen > 0 && page === runStart + runLen && runLen < RUN_PAGES) {
            runLen++;
            continue;
          }
          if (runLen > 0) {
            await this.sendRun(slot, runStart, runLen, round);
            sent += runLen;
          }
          runStart = page;
          runLen = 1;
        }
      }
      if (runLen > 0) {
        await this.sendRun(slot, runStart, runLen, round);
        sent += runLen;
      }
    }
    return sent;
  }

  /** SYNC(round) on every channel: the destination's marker that the round's data is complete. */
  async syncAll(round: number): Promise<void> {
    await yieldToLoop();
    for (let ch = 0; ch < this.link.channels; ch++) await this.link.send({ type: 'sync', round }, ch);
  }
}
