// Source side of the migration transport. API (for the pre-copy layer):
//
//   const conn = await MigrationConnection.connect({ host, port, channels, caps, timeoutMs,
//                                                    maxBandwidthBytesPerSec });
//     // HELLO / HELLO_ACK on channel 0, then CHANNEL_HELLO / HELLO_ACK on channels 1..n-1.
//     // conn.channelCount may be lower than asked when the destination accepts fewer;
//     // conn.caps holds the capabilities both sides agreed on (CAP_LZ4, CAP_MULTICHANNEL).
//   await conn.send({ kind: 'config', config })          // control records go on channel 0
//   await conn.sendPages(slot, firstPage, count, data, { channel })  // ZERO runs + RAM runs
//   await conn.sendRam(...) / conn.sendZero(...)  // explicit; sendRam copies data into a batch
//   await conn.sendRamRuns(slot, firstPages, counts, data)   // scattered pages, one call
//   await conn.sendRamBorrowed(slot, firstPage, count, data, written)   // no copy: the socket
//     // writes `data` itself and calls written() when the caller may reuse it
//   await conn.fillRam(slot, firstPage, count, (dst, first, n) => vm.readGuest(gpa(first), dst))
//     // reads guest memory straight into the batch: one copy fewer than read + sendRam
//   await conn.sync(round)                // SYNC(round) on every channel: closes the round
//   await conn.send({ kind: 'vcpu-state', state }); await conn.send({ kind: 'end', ... })
//   await conn.flush()
//   const done = await conn.nextBackRecord(['complete'], timeoutMs)   // or conn.onBackRecord(cb)
//     // back records: READY, SYNC_ACK {round}, COMPLETE {memoryHash, pages, details?},
//     // POSTCOPY_REQUEST; an ERROR from the destination is not queued: it fails the connection
//     // (MigrationTransportError 'remote-error', remoteCode = its code) and rejects the wait.
//   conn.setPhase({ label: 'waiting for COMPLETE', awaiting: true })   // liveness.ts: names the
//     // phase in the idle-timeout error, and says whether the destination's silence counts
//   await conn.close()        // or conn.destroy(err)
//   conn.bytesSent, conn.channels[i].bytesSent, .pagesSent, .compressedPages
//
// Batching: records sit in a per-channel batch (default 1 MiB) until it fills, sync() or
// flush(); after a record the destination must answer (CONFIG, END) call flush().
// Page records may go on any channel (`channel` option, default round-robin per call); within
// a round the caller must not send one page twice, across rounds it may. Calls on one channel
// that overlap are queued in call order; calls on different channels run concurrently.
// Liveness (liveness.ts): from the handshake on, a socket write that does not drain for
// idleTimeoutMs, or silence from the destination while setPhase says we await an answer, fails
// the connection with MigrationTransportError('idle-timeout') naming the phase.
// Failures (peer gone, ERROR from the destination, idle timeout) fail every channel and reject pending and
// later calls with a MigrationTransportError; conn.failure holds the first one.

import { randomBytes } from 'node:crypto';
import { encodeRecord } from '../stream/encoder.ts';
import {
  CAP_LZ4,
  CAP_MULTICHANNEL,
  describeErrorCode,
  MAX_CHANNELS,
  MAX_PAGES_PER_RECORD,
  STREAM_PAGE_SIZE,
  STREAM_VERSION,
  type MigrationRecord,
  type RecordKind,
} from '../stream/format.ts';
import { isZeroPage } from '../hash.ts';
import { Channel } from './channel.ts';
import { Signal, connectSocket } from './connect.ts';
import { secureOutgoing, type ClientSecurity } from './admission.ts';
import { MigrationTransportError } from './errors.ts';
import { RateLimiter } from './rate-limiter.ts';
import { IdleWatch, type LinkPhase } from './liveness.ts';

export interface ConnectOptions {
  host: string;
  port: number;
  /** TCP connections to open (1..64); all carry pages, channel 0 also the control records. */
  channels?: number;
  /** Capabilities to offer (CAP_LZ4, CAP_MULTICHANNEL added automatically when channels > 1). */
  caps?: number;
  /** For each connect and each handshake answer. Default 10 s. */
  timeoutMs?: number;
  /** Idle timeout once connected (liveness.ts); default DEFAULT_IDLE_TIMEOUT_MS. */
  idleTimeoutMs?: number;
  /** Cancels connecting and the handshake at once (SIGINT). */
  signal?: AbortSignal;
  /** --max-bandwidth: total bytes/s over all channels. */
  maxBandwidthBytesPerSec?: number;
  batchBytes?: number;
  maxBatchesInFlight?: number;
  /** Compress RAM records with lz4 when the destination accepted CAP_LZ4 (default: when offered). */
  compress?: boolean;
  /** TLS and/or the auth token, for every channel before its HELLO (admission.ts). */
  security?: ClientSecurity;
}

export interface PageSendOptions {
  channel?: number;
}

export class MigrationConnection {
  readonly channels: Channel[] = [];
  readonly sessionId: bigint;
  readonly peer: string;
  caps = 0;
  readonly limiter: RateLimiter | undefined;
  private compress = false;
  private readonly backQueue: MigrationRecord[] = [];
  private readonly backListeners: ((rec: MigrationRecord) => void)[] = [];
  private readonly activity = new Signal();
  private rr = 0;
  private closing = false;
  private watch: IdleWatch | undefined;
  failure: Error | undefined;

  private constructor(peer: string, sessionId: bigint, limiter: RateLimiter | undefined) {
    this.peer = peer;
    this.sessionId = sessionId;
    this.limiter = limiter;
  }

  static async connect(opts: ConnectOptions): Promise<MigrationConnection> {
    const want = opts.channels ?? 1;
    if (!Number.isInteger(want) || want < 1 || want > MAX_CHANNELS) {
      throw new RangeError(`channels = ${want}: must be 1..${MAX_CHANNELS}`);
    }
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const peer = `${opts.host}:${opts.port}`;
    const limiter = opts.maxBandwidthBytesPerSec ? new RateLimiter(opts.maxBandwidthBytesPerSec) : undefined;
    const conn = new MigrationConnection(peer, randomBytes(8).readBigUInt64LE(0), limiter);
    const channelOpts = {
      peer,
      incoming: 'to-source' as const,
      limiter,
      batchBytes: opts.batchBytes,
      maxBatchesInFlight: opts.maxBatchesInFlight,
      onActivity: conn.activity.notify,
    };
    const signal = opts.signal;
    const onAbort = () => {
      for (const ch of conn.channels) ch.destroy();
      conn.activity.notify();
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      // Connected and, where asked, secured and authenticated (admission.ts): then the stream.
      const open = async () => {
        const socket = await connectSocket(opts.host, opts.port, timeoutMs, signal);
        return opts.security ? await secureOutgoing(socket, opts.host, opts.security, peer, timeoutMs) : socket;
      };
      const control = new Channel(await open(), { ...channelOpts, index: 0 });
      conn.channels.push(control);
      const offered = (opts.caps ?? 0) | (want > 1 ? CAP_MULTICHANNEL : 0);
      await control.send({ kind: 'hello', version: STREAM_VERSION, channels: want, caps: offered, sessionId: conn.sessionId });
      await control.flush();
      const ack = await conn.handshakeAnswer(control, timeoutMs, signal);
      conn.caps = ack.caps & offered;
      conn.compress = (opts.compress ?? true) && (conn.caps & CAP_LZ4) !== 0;
      const channels = Math.min(want, ack.channels, conn.caps & CAP_MULTICHANNEL ? MAX_CHANNELS : 1);
      const extra = await Promise.all(
        Array.from({ length: channels - 1 }, async (_, i) => {
          const ch = new Channel(await open(), { ...channelOpts, index: i + 1 });
          conn.channels.push(ch); // so a failure below still closes it
          await ch.send({ kind: 'channel-hello', version: STREAM_VERSION, channelIndex: i + 1, sessionId: conn.sessionId });
          await ch.flush();
          await conn.handshakeAnswer(ch, timeoutMs, signal);
          return ch;
        }),
      );
      conn.channels.length = 1;
      conn.channels.push(...extra);
      for (const ch of conn.channels) ch.setOnActivity(() => conn.pump());
      conn.watch = new IdleWatch(() => conn.channels, 'destination', (e) => conn.fail(e), opts.idleTimeoutMs, 'after the handshake');
      conn.pump();
      return conn;
    } catch (e) {
      for (const ch of conn.channels) ch.destroy();
      if (signal?.aborted) throw new MigrationTransportError('closed', `connecting to ${peer} was cancelled`);
      if (e instanceof MigrationTransportError && e.code === 'connection-lost') {
        // A destination that requires TLS or an auth token drops a source without them unread.
        const hint = opts.security?.tls ? '' : ' (if the destination requires TLS, give --tls-ca; its log says why it refused)';
        throw new MigrationTransportError(e.code, `${e.message}, during the handshake${hint}`);
      }
      throw e;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  private async handshakeAnswer(ch: Channel, timeoutMs: number, signal?: AbortSignal): Promise<MigrationRecord & { kind: 'hello-ack' }> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (signal?.aborted) throw new MigrationTransportError('closed', `connecting to ${this.peer} was cancelled`);
      const rec = ch.next();
      if (rec?.kind === 'hello-ack') return rec;
      if (rec?.kind === 'error') {
        throw new MigrationTransportError('remote-error', `destination ${this.peer} refused channel ${ch.index}: ${rec.message}`, rec.code);
      }
      if (rec) throw new MigrationTransportError('handshake', `destination ${this.peer} answered channel ${ch.index}'s hello with ${rec.kind}`);
      if (ch.isClosed) throw new MigrationTransportError('handshake', `destination ${this.peer} closed channel ${ch.index} during the handshake`);
      const left = deadline - Date.now();
      if (left <= 0) throw new MigrationTransportError('handshake', `destination ${this.peer} did not answer channel ${ch.index}'s hello within ${timeoutMs} ms`);
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([this.activity.wait(), new Promise<void>((r) => (timer = setTimeout(r, left)))]);
      clearTimeout(timer);
    }
  }

  /** Drain received records on every channel: back-channel records, or failures. */
  private pump(): void {
    for (const ch of this.channels) {
      if (ch.error) {
        this.fail(ch.error);
        continue;
      }
      try {
        for (let rec = ch.next(); rec; rec = ch.next()) {
          if (rec.kind === 'error') {
            this.fail(new MigrationTransportError('remote-error', `destination ${this.peer} reported ${describeErrorCode(rec.code)}: ${rec.message}`, rec.code));
            continue;
          }
          if (ch.index !== 0 || rec.kind === 'hello-ack') {
            this.fail(new MigrationTransportError('protocol', `destination ${this.peer} sent ${rec.kind} on channel ${ch.index}`));
            continue;
          }
          this.backQueue.push(rec);
          for (const cb of this.backListeners) cb(rec);
        }
      } catch (e) {
        this.fail(e as Error);
      }
    }
    this.activity.notify();
  }

  /** Liveness (liveness.ts): what the source does now, and whether it awaits an answer. */
  setPhase(phase: LinkPhase): void {
    this.watch?.setPhase(phase);
  }

  private fail(err: Error): void {
    const label = this.watch?.label;
    this.watch?.stop();
    if (!this.failure && !this.closing) {
      // A dropped connection, or the destination's own error, also names the phase this side
      // was in (the idle timeout already does).
      if (err instanceof MigrationTransportError && label && err.code === 'connection-lost') err = new MigrationTransportError(err.code, `${err.message}, ${label}`);
      else if (err instanceof MigrationTransportError && label && err.code === 'remote-error') err = new MigrationTransportError(err.code, `${err.message} (source ${label})`, err.remoteCode);
      this.failure = err;
    }
    for (const ch of this.channels) ch.fail(err);
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  get control(): Channel {
    return this.channels[0]!;
  }

  get channelCount(): number {
    return this.channels.length;
  }

  get bytesSent(): number {
    let n = 0;
    for (const ch of this.channels) n += ch.bytesSent;
    return n;
  }

  private pick(opts?: PageSendOptions): Channel {
    this.check();
    if (opts?.channel !== undefined) {
      const ch = this.channels[opts.channel];
      if (!ch) throw new RangeError(`channel ${opts.channel}: this connection has ${this.channels.length}`);
      return ch;
    }
    const ch = this.channels[this.rr % this.channels.length]!;
    this.rr++;
    return ch;
  }

  /** A control record (CONFIG, VCPU_STATE, END, ERROR) on channel 0. */
  async send(rec: MigrationRecord): Promise<void> {
    this.check();
    await this.control.send(rec);
  }

  async sendRam(slot: number, firstPage: number, count: number, data: Uint8Array, opts?: PageSendOptions): Promise<void> {
    await this.pick(opts).sendRam(slot, firstPage, count, data, this.compress);
  }

  /** Scattered runs in one call (channel.ts sendRamRuns): run i = counts[i] pages from firstPages[i]. */
  async sendRamRuns(slot: number, firstPages: ArrayLike<number>, counts: ArrayLike<number>, data: Uint8Array, opts?: PageSendOptions): Promise<void> {
    await this.pick(opts).sendRamRuns(slot, firstPages, counts, data);
  }

  /** sendRam without the copy: `written` says when `data` may be reused (channel.ts). */
  async sendRamBorrowed(slot: number, firstPage: number, count: number, data: Uint8Array, written: () => void, opts?: PageSendOptions): Promise<void> {
    if (this.compress) {
      // lz4 writes a new block anyway: compress from `data`, which is free again at once.
      await this.pick(opts).sendRam(slot, firstPage, count, data, true);
      written();
      return;
    }
    await this.pick(opts).sendRamBorrowed(slot, firstPage, count, data, written);
  }

  async fillRam(
    slot: number,
    firstPage: number,
    count: number,
    fill: (dst: Uint8Array, firstPage: number, count: number) => void,
    opts?: PageSendOptions,
  ): Promise<void> {
    await this.pick(opts).fillRam(slot, firstPage, count, fill);
  }

  async sendZero(slot: number, firstPage: number, count: number, opts?: PageSendOptions): Promise<void> {
    const ch = this.pick(opts);
    for (let done = 0; done < count; done += MAX_PAGES_PER_RECORD) {
      await ch.send({ kind: 'zero', slot, firstPage: firstPage + done, count: Math.min(MAX_PAGES_PER_RECORD, count - done) });
    }
  }

  /**
   * Send count pages (data = count*4096 bytes) as ZERO records for all-zero runs and RAM records
   * for the rest, all on one channel. Returns how many of each.
   */
  async sendPages(slot: number, firstPage: number, count: number, data: Uint8Array, opts?: PageSendOptions): Promise<{ zeroPages: number; normalPages: number }> {
    const ch = this.pick(opts);
    let zeroPages = 0;
    let i = 0;
    while (i < count) {
      const zero = isZeroPage(data.subarray(i * STREAM_PAGE_SIZE, (i + 1) * STREAM_PAGE_SIZE));
      let j = i + 1;
      while (j < count && isZeroPage(data.subarray(j * STREAM_PAGE_SIZE, (j + 1) * STREAM_PAGE_SIZE)) === zero) j++;
      if (zero) {
        for (let p = i; p < j; p += MAX_PAGES_PER_RECORD) {
          await ch.send({ kind: 'zero', slot, firstPage: firstPage + p, count: Math.min(MAX_PAGES_PER_RECORD, j - p) });
        }
        zeroPages += j - i;
      } else {
        await ch.sendRam(slot, firstPage + i, j - i, data.subarray(i * STREAM_PAGE_SIZE, j * STREAM_PAGE_SIZE), this.compress);
      }
      i = j;
    }
    return { zeroPages, normalPages: count - zeroPages };
  }

  /** SYNC(round) on every channel, then write everything out: the end of a round. */
  async sync(round: number): Promise<void> {
    this.check();
    await Promise.all(this.channels.map(async (ch) => {
      await ch.send({ kind: 'sync', round });
      await ch.flush();
    }));
  }

  async flush(): Promise<void> {
    this.check();
    await Promise.all(this.channels.map((ch) => ch.flush()));
  }

  /** Like flush(), but resolves once every batch is handed to its socket, not once written. */
  async push(): Promise<void> {
    this.check();
    await Promise.all(this.channels.map((ch) => ch.push()));
  }

  /** SYNC(round) on every channel, left in the batches (the caller flushes or pushes next). */
  async syncBatched(round: number): Promise<void> {
    this.check();
    await Promise.all(this.channels.map((ch) => ch.send({ kind: 'sync', round })));
  }

  /**
   * After END: the data channels carry nothing more either way, so the destination closing them
   * (it does once the guest runs, and that FIN may overtake STARTED on channel 0) is no failure.
   */
  dataChannelsDone(): void {
    for (const ch of this.channels) if (ch !== this.control) ch.expectEnd();
  }

  onBackRecord(cb: (rec: MigrationRecord) => void): void {
    this.backListeners.push(cb);
  }

  /** The next back-channel record (of one of `kinds`, skipping others), or throw on failure/timeout. */
  async nextBackRecord(kinds?: readonly RecordKind[], timeoutMs = 60_000): Promise<MigrationRecord> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      while (this.backQueue.length) {
        const rec = this.backQueue.shift()!;
        if (!kinds || kinds.includes(rec.kind)) return rec;
      }
      this.check();
      if (this.control.isClosed) {
        throw new MigrationTransportError('connection-lost', `destination ${this.peer} closed the control channel while we waited for ${kinds?.join('/') ?? 'a record'}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new MigrationTransportError('protocol', `destination ${this.peer} sent no ${kinds?.join('/') ?? 'record'} within ${timeoutMs} ms`);
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([this.activity.wait(), new Promise<void>((r) => (timer = setTimeout(r, left)))]);
      clearTimeout(timer);
    }
  }

  /** Flush and close every channel; the destination may close first. */
  async close(): Promise<void> {
    this.closing = true;
    this.watch?.stop();
    for (const ch of this.channels) ch.expectEnd();
    await Promise.all(this.channels.map((ch) => ch.close().catch(() => undefined)));
  }

  /** Abort: tell the destination why (best effort) and drop every connection. */
  destroy(err?: Error): void {
    const first = !this.failure;
    if (err && first) {
      try {
        // Best effort: squeeze an ERROR into a fresh buffer and write it raw.
        const buf = Buffer.alloc(8 + 4 + 4096);
        const end = encodeRecord({ kind: 'error', code: 7, message: err.message }, buf, 0);
        this.control.abortWith(buf.subarray(0, end));
      } catch {
        /* the connection may already be gone */
      }
    }
    // Every pending and later call fails now (a wait for a back record included), even while
    // the ERROR above is still being written on the control channel.
    if (first) this.failure = err ?? new MigrationTransportError('closed', `connection to ${this.peer} destroyed`);
    this.closing = true;
    this.watch?.stop();
    for (const ch of this.channels) if (ch !== this.control || !err) ch.destroy();
    this.activity.notify();
  }
}
