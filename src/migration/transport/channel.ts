// One TCP connection of a migration: a batched record writer and an incremental record reader
// over a node:net socket.
//
// Writing: records are encoded into a batch buffer (default 1 MiB) and the batch goes to the
// socket in one write when it is full or on flush(). At most maxBatchesInFlight batches are
// handed to the socket and not yet written; further sends wait for a write callback, which is
// the backpressure (node's own 'drain' high-water mark is far below one batch). A RateLimiter,
// when given, is charged before each socket write. Send calls on one channel that overlap (not
// awaited) are queued in call order, so records never interleave.
// Page data passed to sendRam is copied into the batch, so the caller may reuse it once the
// call resolves; fillRam lets the caller read guest memory straight into the batch instead.
//
// Reading: socket chunks go into a StreamDecoder; next() pulls one record or null. The socket
// is paused while more than readHighWaterBytes sit undecoded, so a reader that stops pulling
// (at a SYNC barrier, or because applying pages is slow) stops the sender through TCP. On a
// destination (slabReads) a RAM record's data is valid until the next next() on this channel
// (slab-reads.ts), unless recycleReadBuffers is false.
//
// Failure: a socket error, or the peer closing before the owner called expectEnd(), fails the
// channel with a MigrationTransportError('connection-lost'); every pending and later send or
// next() throws it. Everything runs on the owning (main) thread; no shared memory.

import type { Socket } from 'node:net';
import { StreamDecoder } from '../stream/decoder.ts';
import { encodeRecord, writeRamHeader } from '../stream/encoder.ts';
import {
  MAX_PAGES_PER_RECORD,
  RAM_HEADER_BYTES,
  RECORD_HEADER_BYTES,
  RamEncoding,
  STREAM_PAGE_SIZE,
  type MigrationRecord,
  type StreamDirection,
} from '../stream/format.ts';
import { compressPages } from '../stream/lz4.ts';
import { MigrationTransportError, describeSocketError } from './errors.ts';
import type { RateLimiter } from './rate-limiter.ts';
import { adoptWithSlabReads, type SlabReader } from './slab-reads.ts';

export interface ChannelOptions {
  index: number;
  /** "host:port" of the other end, for messages. */
  peer: string;
  /** Direction of the records this side receives. */
  incoming: StreamDirection;
  limiter?: RateLimiter;
  batchBytes?: number;
  maxBatchesInFlight?: number;
  readHighWaterBytes?: number;
  /** Called on every data, error or close event (a reader waiting on several channels). */
  onActivity?: () => void;
  /**
   * The socket was accepted with pauseOnConnect: re-wrap it for large slab reads
   * (slab-reads.ts). Otherwise 'data' events are used.
   */
  slabReads?: boolean;
  /**
   * With slabReads: reuse read slabs once their records are consumed, which makes a RAM
   * record's data valid only until the next next() on this channel. Default true.
   */
  recycleReadBuffers?: boolean;
}

export const DEFAULT_BATCH_BYTES = 1 << 20;
/** Smallest run sendRamBorrowed writes from the caller's memory instead of copying. */
export const ZERO_COPY_MIN_PAGES = 32;
const RECORD_OVERHEAD = RECORD_HEADER_BYTES + RAM_HEADER_BYTES;

export class Channel {
  /** Channel index in its session (the destination learns it from CHANNEL_HELLO). */
  index: number;
  readonly peer: string;
  readonly decoder: StreamDecoder;
  bytesSent = 0;
  bytesReceived = 0;
  /** Socket reads that delivered data (bytesReceived / chunksReceived = mean read size). */
  chunksReceived = 0;
  pagesSent = 0;
  /** Pages sent lz4-compressed, and the bytes their data took on the wire. */
  compressedPages = 0;
  compressedBytes = 0;

  private socket: Socket;
  private readonly limiter: RateLimiter | undefined;
  private readonly batchBytes: number;
  private readonly maxBatchesInFlight: number;
  private readonly readHighWaterBytes: number;
  private onActivity: (() => void) | undefined;
  private batch: Buffer | undefined;
  private batchLen = 0;
  private readonly freeBatches: Buffer[] = [];
  private batchesAllocated = 0;
  private inFlight = 0;
  private writeWaiters: (() => void)[] = [];
  private busy = false;
  private lockWaiters: (() => void)[] = [];
  private failure: Error | undefined;
  private endExpected = false;
  private closed = false;
  private readPaused = false;
  private slabReader: SlabReader | undefined;

  constructor(socket: Socket, opts: ChannelOptions) {
    this.socket = socket;
    this.index = opts.index;
    this.peer = opts.peer;
    this.limiter = opts.limiter;
    this.batchBytes = Math.max(opts.batchBytes ?? DEFAULT_BATCH_BYTES, 64 * 1024);
    this.maxBatchesInFlight = opts.maxBatchesInFlight ?? 4;
    this.readHighWaterBytes = opts.readHighWaterBytes ?? 16 << 20;
    this.onActivity = opts.onActivity;
    this.decoder = new StreamDecoder({ direction: opts.incoming });
    const onChunk = (chunk: Buffer): void => {
      this.bytesReceived += chunk.length;
      this.chunksReceived++;
      this.decoder.push(chunk);
      if (this.decoder.bufferedBytes > this.readHighWaterBytes && !this.readPaused) {
        this.readPaused = true;
        this.socket.pause();
      }
      this.onActivity?.();
    };
    if (opts.slabReads) {
      const adopted = adoptWithSlabReads(socket, onChunk, opts.recycleReadBuffers ?? true);
      socket = this.socket = adopted.socket;
      this.slabReader = adopted.reader;
    } else {
      socket.on('data', onChunk);
      socket.resume(); // a server socket accepted with pauseOnConnect starts paused
    }
    socket.setNoDelay(true);
    // A peer host that vanishes without FIN/RST is found by keepalive probes (and, on the
    // destination, by records()' idleTimeoutMs much sooner).
    socket.setKeepAlive(true, 5000);
    socket.on('error', (e) => {
      this.fail(new MigrationTransportError('connection-lost', `${this.describe()}: ${describeSocketError(e)} ${this.progress()}`));
    });
    socket.on('close', () => {
      this.closed = true;
      if (!this.endExpected) {
        this.fail(new MigrationTransportError('connection-lost', `${this.describe()}: peer closed the connection mid-stream ${this.progress()}`));
      }
      this.wakeWriters();
      this.onActivity?.();
    });
  }

  /** Read slabs allocated so far (slab reads only): stays small when slabs are recycled. */
  get readSlabsAllocated(): number {
    return this.slabReader?.slabsAllocated ?? 0;
  }

  setOnActivity(cb: (() => void) | undefined): void {
    this.onActivity = cb;
  }

  private describe(): string {
    return `channel ${this.index} (${this.peer})`;
  }

  private progress(): string {
    return `after ${this.bytesSent} bytes sent, ${this.bytesReceived} received`;
  }

  /** The failure that ended this channel, if any. */
  get error(): Error | undefined {
    return this.failure;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** From now on the peer may close without that being an error (END seen, or we are closing). */
  expectEnd(): void {
    this.endExpected = true;
  }

  /** Fail the channel (idempotent): pending and later calls throw `err`. */
  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.socket.destroy();
    this.wakeWriters();
    this.onActivity?.();
  }

  private check(): void {
    if (this.failure) throw this.failure;
    if (this.closed) throw new MigrationTransportError('closed', `${this.describe()} is closed`);
  }

  // ---- reading ----

  /**
   * The next received record, or null when none is complete yet (or the stream ended cleanly).
   * A malformed stream fails the channel but leaves the socket open, so the owner can still
   * tell the peer why (abortWith) before closing it.
   */
  next(): MigrationRecord | null {
    if (this.failure) throw this.failure;
    // The caller is done with every record it got before: their slabs may be reused.
    this.slabReader?.release(this.decoder.bytesConsumed);
    let rec: MigrationRecord | null;
    try {
      rec = this.decoder.next();
      if (rec === null && this.closed) this.decoder.finish();
    } catch (e) {
      this.failure = e as Error;
      this.wakeWriters();
      throw e;
    }
    if (this.readPaused && this.decoder.bufferedBytes < this.readHighWaterBytes / 2) {
      this.readPaused = false;
      this.socket.resume();
    }
    return rec;
  }

  // ---- writing ----

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

  private wakeWriters(): void {
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

  /** Flush, half-close, and wait for the peer to close (or `timeoutMs`). */
  async close(timeoutMs = 5000): Promise<void> {
    this.endExpected = true;
    if (!this.failure && !this.closed) await this.flush();
    if (this.closed) return;
    await new Promise<void>((resolve) => {
      const t = setTimeout(() => {
        this.socket.destroy();
        resolve();
      }, timeoutMs);
      this.socket.once('close', () => {
        clearTimeout(t);
        resolve();
      });
      this.socket.end();
    });
  }

  /**
   * Abort: discard what is still batched, send `bytes` (an encoded ERROR record) after what the
   * socket already has (always whole records), then close. Best effort.
   */
  abortWith(bytes: Uint8Array): void {
    this.endExpected = true;
    this.batch = undefined;
    this.batchLen = 0;
    if (this.closed || this.socket.destroyed) return;
    this.socket.end(bytes);
    setTimeout(() => this.socket.destroy(), 2000).unref();
  }

  /** Drop the connection now. */
  destroy(): void {
    this.endExpected = true;
    this.socket.destroy();
  }
}
