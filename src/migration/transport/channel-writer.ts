// The writing half of a Channel: records encoded into batch buffers, handed to the socket a
// batch at a time, with backpressure and an optional rate limit.
//
// Records are encoded into a batch buffer (default 1 MiB) and the batch goes to the socket in
// one write when it is full or on flush(). At most maxBatchesInFlight writes are handed to the
// socket and not yet done; further sends wait for a write callback, which is the backpressure
// (node's own 'drain' high-water mark is far below one batch). A RateLimiter, when given, is
// charged before each socket write. Send calls that overlap (not awaited) queue on a lock in
// call order, so records never interleave. Page data passed to sendRam/sendRamRuns is copied
// into the batch (reusable once the call resolves); fillRam lets the caller write pages straight
// into the batch; sendRamBorrowed lets the socket write the caller's buffer itself.
// Single-threaded (the owning main thread); no shared memory.

import type { Socket } from 'node:net';
import { encodeRecord, writeRamHeader } from '../stream/encoder.ts';
import {
  MAX_PAGES_PER_RECORD,
  RAM_HEADER_BYTES,
  RECORD_HEADER_BYTES,
  RamEncoding,
  STREAM_PAGE_SIZE,
  type MigrationRecord,
} from '../stream/format.ts';
import { compressPages } from '../stream/lz4.ts';
import { MigrationTransportError, describeSocketError } from './errors.ts';
import type { RateLimiter } from './rate-limiter.ts';

export interface WriterOptions {
  index: number;
  /** "host:port" of the other end, for messages. */
  peer: string;
  limiter?: RateLimiter;
  batchBytes?: number;
  maxBatchesInFlight?: number;
}

export const DEFAULT_BATCH_BYTES = 1 << 20;
/** Smallest run sendRamBorrowed writes from the caller's memory instead of copying. */
export const ZERO_COPY_MIN_PAGES = 32;
const RECORD_OVERHEAD = RECORD_HEADER_BYTES + RAM_HEADER_BYTES;

export abstract class ChannelWriter {
  /** Channel index in its session (the destination learns it from CHANNEL_HELLO). */
  index: number;
  readonly peer: string;
  bytesSent = 0;
  bytesReceived = 0;
  pagesSent = 0;
  /** Pages sent lz4-compressed, and the bytes their data took on the wire. */
  compressedPages = 0;
  compressedBytes = 0;

  protected socket: Socket;
  protected failure: Error | undefined;
  protected closed = false;
  private readonly limiter: RateLimiter | undefined;
  private readonly batchBytes: number;
  private readonly maxBatchesInFlight: number;
  protected batch: Buffer | undefined;
  protected batchLen = 0;
  private readonly freeBatches: Buffer[] = [];
  private batchesAllocated = 0;
  private inFlight = 0;
  /** Socket writes completed so far (liveness.ts counts them as progress). */
  writesCompleted = 0;
  private writeWaiters: (() => void)[] = [];
  private busy = false;
  private lockWaiters: (() => void)[] = [];

  constructor(socket: Socket, opts: WriterOptions) {
    this.socket = socket;
    this.index = opts.index;
    this.peer = opts.peer;
    this.limiter = opts.limiter;
    this.batchBytes = Math.max(opts.batchBytes ?? DEFAULT_BATCH_BYTES, 64 * 1024);
    this.maxBatchesInFlight = opts.maxBatchesInFlight ?? 4;
  }

  /** Fail the channel (idempotent): pending and later calls throw `err`. */
  abstract fail(err: Error): void;

  /** Socket writes handed to the socket and not yet completed. */
  get writesInFlight(): number {
    return this.inFlight;
  }

  /** Bytes libuv still holds for this socket (it shrinks as the kernel takes a large write). */
  writeQueueBytes(): number {
    return (this.socket as unknown as { _handle?: { writeQueueSize?: number } | null })._handle?.writeQueueSize ?? 0;
  }

  protected describe(): string {
    return `channel ${this.index} (${this.peer})`;
  }

  protected progress(): string {
    return `after ${this.bytesSent} bytes sent, ${this.bytesReceived} received`;
  }

  protected check(): void {
    if (this.failure) throw this.failure;
    if (this.closed) throw new MigrationTransportError('closed', `${this.describe()} is closed`);
  }

  /**
   * Take the channel's send lock. Calls that overlap (a caller that did not await the previous
   * send) queue here in call order, so records never interleave.
   */
  private enter(): Promise<void> | undefined {
    this.check();
    if (!this.busy) {
      this.busy = true;
      return undefined;
    }
    return new Promise<void>((resolve) => this.lockWaiters.push(resolve)).then(() => {
      try {
        this.check();
      } catch (e) {
        this.leave();
        throw e;
      }
    });
  }

  /** Hand the lock to the next queued call, if any (it stays taken), else free it. */
  private leave(): void {
    const next = this.lockWaiters.shift();
    if (next) next();
    else this.busy = false;
  }

  protected wakeWriters(): void {
    const w = this.writeWaiters;
    this.writeWaiters = [];
    for (const f of w) f();
  }

  private async acquireBatch(): Promise<Buffer> {
    while (!this.batch) {
      this.check();
      const free = this.freeBatches.pop();
      if (free) {
        this.batch = free;
      } else if (this.batchesAllocated < this.maxBatchesInFlight + 1) {
        this.batchesAllocated++;
        this.batch = Buffer.allocUnsafe(this.batchBytes);
      } else {
        await new Promise<void>((resolve) => this.writeWaiters.push(resolve));
      }
    }
    return this.batch;
  }

  /** Hand the current batch to the socket (after the rate limiter allows it). */
  private async submit(): Promise<void> {
    const buf = this.batch;
    const len = this.batchLen;
    if (!buf || len === 0) return;
    this.batch = undefined;
    this.batchLen = 0;
    await this.writeBytes(buf, len, buf.length === this.batchBytes ? () => this.freeBatches.push(buf) : undefined);
  }

  /**
   * Hand buf[0..len) to the socket; `written` runs once the socket is done with the memory
   * (written out, or dropped because the connection failed).
   */
  private async writeBytes(buf: Uint8Array, len: number, written?: () => void): Promise<void> {
    if (this.limiter) await this.limiter.take(len);
    this.check();
    while (this.inFlight >= this.maxBatchesInFlight) {
      await new Promise<void>((resolve) => this.writeWaiters.push(resolve));
      this.check();
    }
    this.inFlight++;
    this.bytesSent += len;
    this.socket.write(len === buf.length ? buf : buf.subarray(0, len), (err) => {
      this.inFlight--;
      this.writesCompleted++;
      written?.();
      if (err) {
        this.fail(new MigrationTransportError('connection-lost', `${this.describe()}: ${describeSocketError(err)} ${this.progress()}`));
      }
      this.wakeWriters();
    });
  }

  /** Queue one record (any kind; RAM data raw). Resolves once it is in a batch. */
  async send(rec: MigrationRecord): Promise<void> {
    const queued = this.enter();
    if (queued) await queued;
    try {
      if (rec.kind === 'ram') {
        await this.ramLocked(rec.slot, rec.firstPage, rec.count, rec.data, false);
        return;
      }
      let batch = await this.acquireBatch();
      let end = encodeRecord(rec, batch, this.batchLen);
      if (end < 0) {
        await this.submit();
        batch = await this.acquireBatch();
        end = encodeRecord(rec, batch, 0);
        if (end < 0) {
          // Larger than a batch (a big JSON record): its own buffer, written once.
          const big = Buffer.allocUnsafe(rec.kind === 'vcpu-state' || rec.kind === 'config' ? (8 << 20) : this.batchBytes * 2);
          const bigEnd = encodeRecord(rec, big, 0);
          if (bigEnd < 0) throw new Error(`${this.describe()}: ${rec.kind} record does not fit in 8 MiB`);
          await this.writeBytes(big, bigEnd);
          return;
        }
      }
      this.batchLen = end;
    } finally {
      this.leave();
    }
  }

  /**
   * Queue `count` pages of `slot` from firstPage, data = count*4096 bytes (copied). Split into
   * RAM records at batch and MAX_PAGES_PER_RECORD boundaries. With compress, each record is
   * lz4-compressed when that saves at least 1/8 of its bytes.
   */
  async sendRam(slot: number, firstPage: number, count: number, data: Uint8Array, compress = false): Promise<void> {
    const queued = this.enter();
    if (queued) await queued;
    try {
      await this.ramLocked(slot, firstPage, count, data, compress);
    } finally {
      this.leave();
    }
  }

  private async ramLocked(slot: number, firstPage: number, count: number, data: Uint8Array, compress: boolean): Promise<void> {
    if (data.length !== count * STREAM_PAGE_SIZE) {
      throw new RangeError(`${this.describe()}: sendRam data is ${data.length} bytes for ${count} pages`);
    }
    let done = 0;
    while (done < count) {
      if (compress) {
        const n = Math.min(count - done, MAX_PAGES_PER_RECORD, this.pagesPerBatch());
        const raw = data.subarray(done * STREAM_PAGE_SIZE, (done + n) * STREAM_PAGE_SIZE);
        const block = compressPages(raw);
        if (block) {
          await this.reserve(RECORD_OVERHEAD + block.length);
          const p = writeRamHeader(this.batch!, this.batchLen, slot, firstPage + done, n, RamEncoding.LZ4, block.length);
          this.batch!.set(block, p);
          this.batchLen = p + block.length;
          this.compressedPages += n;
          this.compressedBytes += block.length;
          this.pagesSent += n;
          done += n;
          continue;
        }
      }
      const fit = this.pagesFitting(count - done);
      const n = fit > 0 ? fit : await this.reservePages(count - done);
      const p = writeRamHeader(this.batch!, this.batchLen, slot, firstPage + done, n, RamEncoding.RAW, n * STREAM_PAGE_SIZE);
      this.batch!.set(data.subarray(done * STREAM_PAGE_SIZE, (done + n) * STREAM_PAGE_SIZE), p);
      this.batchLen = p + n * STREAM_PAGE_SIZE;
      this.pagesSent += n;
      done += n;
    }
  }

  /**
   * Many runs in one call, for scattered dirty pages: run i is counts[i] pages of `slot` from
   * firstPages[i], and `data` holds all runs' pages back to back. Same records as one sendRam
   * per run, without a call, a lock and an await per run (which dominate for 1-page runs).
   */
  async sendRamRuns(slot: number, firstPages: ArrayLike<number>, counts: ArrayLike<number>, data: Uint8Array): Promise<void> {
    let total = 0;
    for (let i = 0; i < counts.length; i++) total += counts[i]!;
    if (firstPages.length !== counts.length || data.length !== total * STREAM_PAGE_SIZE) {
      throw new RangeError(`${this.describe()}: sendRamRuns got ${firstPages.length} firsts, ${counts.length} counts, ${data.length} bytes for ${total} pages`);
    }
    const queued = this.enter();
    if (queued) await queued;
    try {
      let off = 0;
      for (let r = 0; r < counts.length; r++) {
        const first = firstPages[r]!;
        const count = counts[r]!;
        for (let done = 0; done < count; ) {
          const fit = this.pagesFitting(count - done);
          const n = fit > 0 ? fit : await this.reservePages(count - done);
          const p = writeRamHeader(this.batch!, this.batchLen, slot, first + done, n, RamEncoding.RAW, n * STREAM_PAGE_SIZE);
          this.batch!.set(data.subarray(off, off + n * STREAM_PAGE_SIZE), p);
          this.batchLen = p + n * STREAM_PAGE_SIZE;
          this.pagesSent += n;
          off += n * STREAM_PAGE_SIZE;
          done += n;
        }
      }
    } finally {
      this.leave();
    }
  }

  /**
   * Like sendRam, but without copying the page data: the socket writes `data` itself, and
   * `written` is called once it no longer needs it (then the caller may reuse the buffer; also
   * called if the connection fails first). Runs under ZERO_COPY_MIN_PAGES pages are copied as
   * in sendRam (and `written` is called at once), since each borrowed run costs a socket write.
   */
  async sendRamBorrowed(slot: number, firstPage: number, count: number, data: Uint8Array, written: () => void): Promise<void> {
    if (count < ZERO_COPY_MIN_PAGES) {
      await this.sendRam(slot, firstPage, count, data);
      written();
      return;
    }
    if (data.length !== count * STREAM_PAGE_SIZE) {
      throw new RangeError(`${this.describe()}: sendRamBorrowed data is ${data.length} bytes for ${count} pages`);
    }
    const queued = this.enter();
    if (queued) await queued;
    let pending = 0;
    let allQueued = false;
    const pieceWritten = () => {
      if (--pending === 0 && allQueued) written();
    };
    try {
      for (let done = 0; done < count; ) {
        const n = Math.min(count - done, MAX_PAGES_PER_RECORD);
        await this.reserve(RECORD_OVERHEAD);
        // The header ends the current batch; the data follows it as its own socket write.
        this.batchLen = writeRamHeader(this.batch!, this.batchLen, slot, firstPage + done, n, RamEncoding.RAW, n * STREAM_PAGE_SIZE);
        await this.submit();
        const piece = data.subarray(done * STREAM_PAGE_SIZE, (done + n) * STREAM_PAGE_SIZE);
        pending++;
        try {
          await this.writeBytes(piece, piece.length, pieceWritten);
        } catch (e) {
          pending--; // never reached the socket: no callback will come
          throw e;
        }
        this.pagesSent += n;
        done += n;
      }
    } finally {
      allQueued = true;
      if (pending === 0) written(); // nothing reached the socket (failure before the first write)
      this.leave();
    }
  }

  /**
   * Like sendRam, but fill(dst, firstPage, count) writes the page contents straight into the
   * batch (e.g. vm.readGuest), saving a copy. fill may be called several times, for consecutive
   * sub-runs, in order.
   */
  async fillRam(slot: number, firstPage: number, count: number, fill: (dst: Uint8Array, firstPage: number, count: number) => void): Promise<void> {
    const queued = this.enter();
    if (queued) await queued;
    try {
      let done = 0;
      while (done < count) {
        const n = await this.reservePages(count - done);
        const p = writeRamHeader(this.batch!, this.batchLen, slot, firstPage + done, n, RamEncoding.RAW, n * STREAM_PAGE_SIZE);
        fill(this.batch!.subarray(p, p + n * STREAM_PAGE_SIZE), firstPage + done, n);
        this.batchLen = p + n * STREAM_PAGE_SIZE;
        this.pagesSent += n;
        done += n;
      }
    } finally {
      this.leave();
    }
  }

  private pagesPerBatch(): number {
    return Math.max(1, Math.floor((this.batchBytes - RECORD_OVERHEAD) / STREAM_PAGE_SIZE));
  }

  /** Make room for `bytes` in the current batch (submitting it first when needed). */
  private async reserve(bytes: number): Promise<void> {
    await this.acquireBatch();
    if (this.batch!.length - this.batchLen < bytes) {
      await this.submit();
      await this.acquireBatch();
    }
    if (this.batch!.length - this.batchLen < bytes) {
      throw new Error(`${this.describe()}: ${bytes} bytes do not fit in a ${this.batchBytes}-byte batch`);
    }
  }

  /** Synchronous fast path: pages of `want` that fit the current batch without waiting, or 0. */
  private pagesFitting(want: number): number {
    if (!this.batch) return 0;
    const room = Math.floor((this.batch.length - this.batchLen - RECORD_OVERHEAD) / STREAM_PAGE_SIZE);
    return room >= 1 && room >= Math.min(want, 16) ? Math.min(want, room, MAX_PAGES_PER_RECORD) : 0;
  }

  /** Make room for a raw RAM record of up to `want` pages; returns how many fit (>= 1). */
  private async reservePages(want: number): Promise<number> {
    await this.acquireBatch();
    let room = Math.floor((this.batch!.length - this.batchLen - RECORD_OVERHEAD) / STREAM_PAGE_SIZE);
    // Start a fresh batch rather than emit a sliver of a record.
    if (room < Math.min(want, 16)) {
      await this.submit();
      await this.acquireBatch();
      room = Math.floor((this.batch!.length - this.batchLen - RECORD_OVERHEAD) / STREAM_PAGE_SIZE);
    }
    return Math.min(want, room, MAX_PAGES_PER_RECORD);
  }

  /** Write out the current batch and wait until the socket has taken every queued byte. */
  /**
   * Hand the current batch to the socket without waiting for the socket to write it (flush()
   * waits): for the downtime path, where the next thing awaited is the peer's answer anyway.
   */
  async push(): Promise<void> {
    const queued = this.enter();
    if (queued) await queued;
    try {
      await this.submit();
    } finally {
      this.leave();
    }
  }

  async flush(): Promise<void> {
    const queued = this.enter();
    if (queued) await queued;
    try {
      await this.submit();
      while (this.inFlight > 0) {
        this.check();
        await new Promise<void>((resolve) => this.writeWaiters.push(resolve));
      }
      this.check();
    } finally {
      this.leave();
    }
  }

}
