// One accepted migration on the destination (MigrationListener.accept() hands it out): its
// channels' records in barrier order, the back channel, the wait for GO. API in listener.ts.
//
// The round barrier: each channel is read until it reaches SYNC(r); it is then parked (not read,
// so its socket fills and TCP stops its sender) until every channel has reached SYNC(r). Only
// then is one 'sync' record yielded and the channels read on into round r+1. So every page of
// round r is yielded before any page of round r+1, whatever channel either came on, which is
// what lets a later round's copy of a page overwrite an earlier one safely (QEMU's multifd does
// the same with its per-round sync packets). Within a round the order among channels is
// arbitrary; the source sends each page at most once per round, and a page that comes on two
// channels within one round is rejected ('duplicate-page'); on one channel order is kept.
//
// Liveness (liveness.ts): while the destination waits for the source (the next record, GO) or
// a reply does not drain, idleTimeoutMs without progress fails the migration with
// MigrationTransportError('idle-timeout') naming the phase ("no progress from the source for
// 10000 ms during round 2"); the source is told with an ERROR record when the link still takes
// one. A session whose channels do not all join within handshakeTimeoutMs is dropped.
//
// Errors: a malformed stream throws MigrationStreamError out of records(); a channel lost before
// END, or an ERROR record from the source, throws MigrationTransportError. Either way all
// channels are closed. Everything runs on the main thread; no shared memory.

import {
  ErrorCode,
  MigrationStreamError,
  describeErrorCode,
  errorCodeFor,
  type MigrationRecord,
} from '../stream/format.ts';
import { encodeRecord } from '../stream/encoder.ts';
import { StreamLayout } from '../stream/layout.ts';
import type { Channel } from './channel.ts';
import { Signal } from './connect.ts';
import { MigrationTransportError } from './errors.ts';
import { IdleWatch } from './liveness.ts';

export class IncomingMigration {
  readonly sessionId: bigint;
  readonly channels: readonly Channel[];
  readonly caps: number;
  layout: StreamLayout | undefined;
  /** The last round whose barrier was passed (-1 before the first SYNC). */
  round = -1;
  /** Channel the record just yielded by records() came on (0 for the barrier's 'sync'). */
  recordChannel = 0;
  private readonly activity = new Signal();
  private done = false;
  private readonly watch: IdleWatch;
  /** Set by the idle timeout (or abort): every wait throws it. */
  private failure: Error | undefined;

  constructor(sessionId: bigint, channels: Channel[], caps: number, idleTimeoutMs?: number) {
    this.sessionId = sessionId;
    this.channels = channels;
    this.caps = caps;
    for (const ch of channels) ch.setOnActivity(this.activity.notify);
    this.watch = new IdleWatch(() => this.channels, 'source', (e) => this.stalled(e), idleTimeoutMs, 'waiting for CONFIG');
  }

  /** The idle timeout for every wait on the source from now on (liveness.ts). */
  setIdleTimeout(ms: number): void {
    this.watch.setIdleTimeout(ms);
  }

  private stalled(err: Error): void {
    this.failure ??= err;
    this.abort(err);
    this.activity.notify();
  }

  /** What we wait for now, for the idle timeout's message. */
  private waitingFor(): string {
    return this.layout ? `during round ${Math.max(this.round, 0) + 1}` : 'waiting for CONFIG';
  }

  get control(): Channel {
    return this.channels[0]!;
  }

  get bytesReceived(): number {
    let n = 0;
    for (const ch of this.channels) n += ch.bytesReceived;
    return n;
  }

  // Per page: the round (+1) it last came in and on which channel, to reject a page sent on
  // two channels within one round (their order would be undefined). 5 bytes per 4 KiB page.
  private pageRound = new Map<number, Uint32Array>();
  private pageChannel = new Map<number, Uint8Array>();

  private checkOncePerRound(channel: number, slot: number, firstPage: number, count: number): void {
    const rounds = this.pageRound.get(slot)!;
    const chans = this.pageChannel.get(slot)!;
    const tag = this.round + 2; // round in progress, +1 so that 0 means never
    for (let p = firstPage; p < firstPage + count; p++) {
      if (rounds[p] === tag && chans[p] !== channel) {
        throw new MigrationStreamError('duplicate-page', `slot ${slot} page ${p} came on channel ${chans[p]} and again on channel ${channel} in round ${this.round + 1}: a page may travel once per round`);
      }
      rounds[p] = tag;
      chans[p] = channel;
    }
  }

  // Barrier state (see the header): parked[i] is the SYNC round channel i stopped at.
  private parked: (number | undefined)[] = [];
  private parkedCount = 0;
  private pagesSinceBarrier = false;
  private cursor = 0;

  /**
   * The next record in barrier order, or null when no channel has one ready (wait for
   * activity). Sets `done` when it returns END.
   */
  private pull(): MigrationRecord | null {
    if (this.failure) throw this.failure;
    const n = this.channels.length;
    if (this.parked.length !== n) this.parked = new Array<number | undefined>(n).fill(undefined);
    for (const ch of this.channels) if (ch.error) throw ch.error;
    for (let idle = 0; idle < n; ) {
      const i = this.cursor;
      // Data channels wait until CONFIG (on channel 0) gives us the memslots to check against.
      const rec = this.parked[i] === undefined && (i === 0 || this.layout) ? this.channels[i]!.next() : null;
      if (!rec) {
        this.cursor = (i + 1) % n;
        idle++;
        continue;
      }
      idle = 0;
      switch (rec.kind) {
        case 'sync':
          if (rec.round <= this.round) {
            throw new MigrationStreamError('bad-round', `channel ${i}: SYNC round ${rec.round} after round ${this.round} was already closed`);
          }
          this.parked[i] = rec.round;
          this.parkedCount++;
          continue;
        case 'ram':
        case 'zero':
          if (n > 1) this.checkOncePerRound(i, rec.slot, rec.firstPage, rec.count);
          this.pagesSinceBarrier = true;
          this.recordChannel = i;
          return rec;
        case 'config':
          if (i !== 0 || this.layout) throw new MigrationStreamError('unexpected-record', `CONFIG on channel ${i}${this.layout ? ' (a second one)' : ''}`);
          this.layout = StreamLayout.fromConfig(rec.config);
          for (const c of this.channels) c.decoder.setLayout(this.layout);
          if (n > 1) {
            for (const { slot, pages } of this.layout.slots) {
              this.pageRound.set(slot, new Uint32Array(pages));
              this.pageChannel.set(slot, new Uint8Array(pages));
            }
          }
          this.recordChannel = 0;
          return rec;
        case 'vcpu-state':
        case 'postcopy-discard':
        case 'postcopy-run':
        case 'end':
          if (i !== 0) throw new MigrationStreamError('unexpected-record', `${rec.kind.toUpperCase()} on data channel ${i}`);
          // POSTCOPY_RUN ends the stream like END (post-copy pages follow on their own connections).
          if (rec.kind === 'end' || rec.kind === 'postcopy-run') {
            if (this.pagesSinceBarrier || this.parkedCount > 0) {
              throw new MigrationStreamError('unexpected-record', `${rec.kind.toUpperCase()} inside an unfinished round: SYNC every channel before it`);
            }
            this.done = true;
            for (const c of this.channels) c.expectEnd();
          }
          this.recordChannel = 0;
          return rec;
        case 'error':
          throw new MigrationTransportError('remote-error', `source on channel ${i} reported ${describeErrorCode(rec.code)}: ${rec.message}`, rec.code);
        default:
          throw new MigrationStreamError('unexpected-record', `${rec.kind} on channel ${i} after the handshake`);
      }
    }
    if (this.parkedCount === n) {
      const round = this.parked[0]!;
      for (let i = 1; i < n; i++) {
        if (this.parked[i] !== round) {
          throw new MigrationStreamError('bad-round', `channels disagree on the round: channel 0 at SYNC ${round}, channel ${i} at SYNC ${this.parked[i]}`);
        }
      }
      this.parked.fill(undefined);
      this.parkedCount = 0;
      this.pagesSinceBarrier = false;
      this.round = round;
      this.recordChannel = 0;
      this.cursor = 0;
      return { kind: 'sync', round };
    }
    return null;
  }

  /** Wait for data, a close or an error on any channel; the idle watch bounds the wait. */
  private async waitActivity(): Promise<void> {
    this.watch.setPhase({ label: this.waitingFor(), awaiting: true });
    await this.activity.wait();
    this.watch.setPhase({ label: this.waitingFor(), awaiting: false });
    if (this.failure) throw this.failure;
  }

  /**
   * Records in barrier order (see the header). Ends after END; throws on any failure. A source
   * that sends nothing on any channel for idleTimeoutMs (a host that vanished without closing
   * its sockets) fails the migration with 'idle-timeout' (default: the listener's).
   */
  async *records(opts: { idleTimeoutMs?: number } = {}): AsyncGenerator<MigrationRecord, void, undefined> {
    // One delivery loop (run): each record is handed to the consumer, and run goes on once the
    // consumer asks for the next one.
    type Next = { rec: MigrationRecord } | null;
    let give!: (n: Next) => void;
    let fail!: (e: Error) => void;
    const expect = () => new Promise<Next>((res, rej) => ((give = res), (fail = rej)));
    let next = expect();
    let consumed: () => void = () => undefined;
    this.run((rec) => new Promise<void>((res) => ((consumed = res), give({ rec }))), opts).then(
      () => give(null),
      (e: Error) => fail(e),
    );
    for (;;) {
      const n = await next;
      if (!n) return;
      next = expect();
      yield n.rec;
      consumed();
    }
  }

  /**
   * The same records as records(), handed to onRecord; the next one comes once onRecord has
   * returned (or its promise has resolved). Cheaper per record than the async iterator: records
   * that are already buffered are delivered in a plain loop. Resolves after END.
   */
  async run(onRecord: (rec: MigrationRecord) => void | Promise<void>, opts: { idleTimeoutMs?: number } = {}): Promise<void> {
    if (opts.idleTimeoutMs !== undefined) this.watch.setIdleTimeout(opts.idleTimeoutMs);
    try {
      for (;;) {
        const rec = this.pull();
        if (rec) {
          const p = onRecord(rec);
          if (p) await p;
          if (this.failure) throw this.failure;
          if (this.done) return;
        } else {
          await this.waitActivity();
        }
      }
    } catch (e) {
      const err = this.failure ?? (e as Error);
      this.abort(err);
      throw err;
    }
  }

  /**
   * After END (run() or records() has finished): wait for the source's GO on channel 0. Rejects
   * when the source reports an error, sends anything else, or closes the connection first.
   */
  async awaitGo(): Promise<void> {
    const ch = this.control;
    this.watch.setPhase({ label: 'waiting for GO after COMPLETE', awaiting: true });
    try {
      for (;;) {
        if (this.failure) throw this.failure;
        const rec = ch.next(); // throws the channel's failure, if any
        if (rec) {
          if (rec.kind === 'go') return;
          if (rec.kind === 'error') throw new MigrationTransportError('remote-error', `source reported ${describeErrorCode(rec.code)}: ${rec.message}`, rec.code);
          throw new MigrationStreamError('unexpected-record', `${rec.kind} after END: expected GO`);
        }
        if (ch.isClosed) throw new MigrationTransportError('connection-lost', 'the source closed the connection after END without GO');
        await this.activity.wait();
      }
    } catch (e) {
      throw this.failure ?? e;
    } finally {
      this.watch.setPhase({ label: 'after GO', awaiting: false });
    }
  }

  /** A back-channel record on channel 0 (READY, COMPLETE, STARTED, ERROR, ...), written now. */
  async reply(rec: MigrationRecord): Promise<void> {
    try {
      if (this.failure) throw this.failure;
      await this.control.send(rec);
      await this.control.flush();
    } catch (e) {
      throw this.failure ?? e;
    }
  }

  /** Tell the source why we give up (best effort) and drop every channel. */
  abort(err: Error, errorCode?: number): void {
    this.done = true;
    this.watch.stop();
    // Waits in run() / awaitGo() end now, with this error (unless a failure came first).
    this.failure ??= err;
    this.activity.notify();
    const code = errorCode ?? (err instanceof MigrationTransportError && err.remoteCode ? ErrorCode.INTERNAL : errorCodeFor(err));
    const buf = Buffer.alloc(8 + 4 + 4096);
    this.control.abortWith(buf.subarray(0, encodeRecord({ kind: 'error', code, message: err.message }, buf, 0)));
    for (const ch of this.channels.slice(1)) ch.destroy();
  }

  /** Close every channel (after END and the final reply). */
  async close(): Promise<void> {
    this.watch.stop();
    for (const ch of this.channels) ch.expectEnd();
    await Promise.all(this.channels.map((ch) => ch.close().catch(() => undefined)));
  }
}
