// One TCP connection of a migration: a batched record writer (channel-writer.ts, the base
// class: send, sendRam, sendRamRuns, sendRamBorrowed, fillRam, flush) and an incremental
// record reader over a node:net socket, with the connection's lifecycle.
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
import type { MigrationRecord, StreamDirection } from '../stream/format.ts';
import { ChannelWriter, type WriterOptions } from './channel-writer.ts';
import { MigrationTransportError, describeSocketError } from './errors.ts';
import { adoptWithSlabReads, type SlabReader } from './slab-reads.ts';

export interface ChannelOptions extends WriterOptions {
  /** Direction of the records this side receives. */
  incoming: StreamDirection;
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

export { DEFAULT_BATCH_BYTES, ZERO_COPY_MIN_PAGES } from './channel-writer.ts';

export class Channel extends ChannelWriter {
  readonly decoder: StreamDecoder;
  /** Socket reads that delivered data (bytesReceived / chunksReceived = mean read size). */
  chunksReceived = 0;

  private readonly readHighWaterBytes: number;
  private onActivity: (() => void) | undefined;
  private endExpected = false;
  private readPaused = false;
  private slabReader: SlabReader | undefined;

  constructor(socket: Socket, opts: ChannelOptions) {
    super(socket, opts);
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
    // Every migration socket, both sides: a peer host that vanishes without FIN/RST is found by
    // keepalive probes (and, while this side waits on it, by liveness.ts's idle timeout sooner).
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
  override fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.socket.destroy();
    this.wakeWriters();
    this.onActivity?.();
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
    // Sends waiting for a write that may never drain (a stalled peer) end now; the socket stays
    // open only for the ERROR.
    this.failure ??= new MigrationTransportError('closed', `${this.describe()} was aborted`);
    this.wakeWriters();
    if (this.closed || this.socket.destroyed || this.socket.writableEnded) return;
    // Best effort: the socket no longer holds the process open, and it is dropped after 2 s
    // regardless, or after 0.5 s when earlier writes are still pending (a peer that stopped
    // reading: the ERROR behind them would not get through, and a pending write keeps a process
    // that is otherwise done alive).
    const pending = this.writesInFlight > 0 || this.socket.writableLength > 0;
    this.socket.end(bytes);
    this.socket.unref();
    setTimeout(() => this.socket.destroy(), pending ? 500 : 2000).unref();
  }

  /** Drop the connection now. */
  destroy(): void {
    this.endExpected = true;
    this.socket.destroy();
  }
}
