// Destination side of the migration transport. API (for the receive layer):
//
//   const server = await MigrationListener.listen({ host, port });   // port 0: server.port
//   const incoming = await server.accept();      // HELLO answered, every channel joined
//   for await (const rec of incoming.records()) {        // or: await incoming.run((rec) => ...)
//     // 'config' first; then 'ram' / 'zero' (already range-checked against CONFIG's memslots),
//     // 'sync' once per round after that round's pages from EVERY channel; then 'vcpu-state',
//     // 'end' (last). RAM data is a view into a read buffer that is reused once the next record
//     // is requested: apply (copy) it before asking for more, or listen with
//     // recycleReadBuffers: false.
//   }
//   await incoming.reply({ kind: 'complete', memoryHash, pages })    // back channel (channel 0)
//   await incoming.awaitGo()   // the source's commit (stream/format.ts); then start the guest
//   await incoming.reply({ kind: 'started' })
//   await incoming.close(); await server.close();
//
// The round barrier, liveness while receiving and the errors records() throws: incoming.ts.
// A session whose channels do not all join within handshakeTimeoutMs is dropped. Everything runs
// on the main thread; no shared memory.

import { createServer, type Server, type Socket } from 'node:net';
import {
  CAP_LZ4,
  CAP_MULTICHANNEL,
  MAX_CHANNELS,
  MigrationStreamError,
  STREAM_VERSION,
  errorCodeFor,
  ErrorCode,
  type MigrationRecord,
} from '../stream/format.ts';
import { encodeRecord } from '../stream/encoder.ts';
import { Channel } from './channel.ts';
import { Signal } from './connect.ts';
import { MigrationTransportError } from './errors.ts';
import { IncomingMigration } from './incoming.ts';
import { Admission, type ServerSecurity } from './admission.ts';

export { IncomingMigration };

export interface ListenOptions {
  host?: string;
  port: number;
  /** Capabilities this destination accepts. Default: lz4 and multichannel. */
  acceptCaps?: number;
  maxChannels?: number;
  handshakeTimeoutMs?: number;
  /** Idle timeout of an accepted migration (liveness.ts); default DEFAULT_IDLE_TIMEOUT_MS. */
  idleTimeoutMs?: number;
  readHighWaterBytes?: number;
  /** Large slab reads (slab-reads.ts); default true. False: node's 64 KiB 'data' chunks. */
  slabReads?: boolean;
  /**
   * Reuse read buffers (default true): a RAM record's data is then valid only until the next
   * record is requested. Pass false to keep data views valid indefinitely.
   */
  recycleReadBuffers?: boolean;
  /** TLS and/or an auth token every connection must pass before its HELLO (admission.ts). */
  security?: ServerSecurity;
  /**
   * Told about every connection turned away (failed TLS or authentication, a bad HELLO): the
   * listener keeps waiting for the right source, and the operator should see why.
   */
  onRefused?: (peer: string, reason: string) => void;
}

interface PendingSession {
  channels: (Channel | undefined)[];
  joined: number;
  caps: number;
}

export class MigrationListener {
  private readonly server: Server;
  private readonly opts: ListenOptions;
  private readonly pending = new Map<bigint, PendingSession>();
  private readonly ready: IncomingMigration[] = [];
  private readonly arrived = new Signal();
  private closed = false;
  private readonly admission: Admission | undefined;
  /** Connections still in admission: close() must not wait for their timeouts. */
  private readonly admitting = new Set<Socket>();

  private constructor(server: Server, opts: ListenOptions) {
    this.server = server;
    this.opts = opts;
    this.admission = opts.security ? new Admission(opts.security) : undefined;
  }

  static async listen(opts: ListenOptions): Promise<MigrationListener> {
    const server = createServer({ noDelay: true, pauseOnConnect: true });
    const listener = new MigrationListener(server, opts);
    server.on('connection', (socket) => void listener.handshake(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e: NodeJS.ErrnoException) => {
        reject(new MigrationTransportError('connect-failed', `cannot listen on ${opts.host ?? '0.0.0.0'}:${opts.port}: ${e.code ?? e.message}`));
      });
      server.listen(opts.port, opts.host, () => resolve());
    });
    return listener;
  }

  get port(): number {
    const a = this.server.address();
    return typeof a === 'object' && a ? a.port : this.opts.port;
  }

  get host(): string {
    return this.opts.host ?? '0.0.0.0';
  }

  /** The next migration whose channels have all joined. */
  async accept(timeoutMs = Infinity): Promise<IncomingMigration> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = this.ready.shift();
      if (m) return m;
      if (this.closed) throw new MigrationTransportError('closed', `listener on ${this.host}:${this.port} is closed`);
      const left = deadline - Date.now();
      if (left <= 0) throw new MigrationTransportError('connect-timeout', `no migration arrived on ${this.host}:${this.port} within ${timeoutMs} ms`);
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        this.arrived.wait(),
        Number.isFinite(left) ? new Promise<void>((r) => (timer = setTimeout(r, left))) : new Promise<void>(() => undefined),
      ]);
      clearTimeout(timer);
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const s of this.pending.values()) for (const ch of s.channels) ch?.destroy();
    this.pending.clear();
    for (const s of this.admitting) s.destroy();
    this.arrived.notify();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private async handshake(socket: Socket): Promise<void> {
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    const timeoutMs = this.opts.handshakeTimeoutMs ?? 10_000;
    let slabReads = this.opts.slabReads ?? true;
    if (this.admission?.requiresAnything) {
      // Nothing of this connection reaches the stream decoder, let alone guest memory, before
      // it is admitted.
      const raw = socket;
      this.admitting.add(raw);
      try {
        const admitted = await this.admission.admit(socket, peer, timeoutMs, slabReads);
        socket = admitted.socket;
        slabReads = admitted.slabReads;
      } catch (e) {
        if (!this.closed) this.opts.onRefused?.(peer, (e as Error).message);
        return;
      } finally {
        this.admitting.delete(raw);
      }
      if (this.closed) {
        socket.destroy();
        return;
      }
    }
    const signal = new Signal();
    const ch = new Channel(socket, {
      index: 0,
      peer,
      incoming: 'to-destination',
      readHighWaterBytes: this.opts.readHighWaterBytes,
      onActivity: signal.notify,
      slabReads,
      recycleReadBuffers: this.opts.recycleReadBuffers ?? true,
    });
    const deadline = Date.now() + timeoutMs;
    try {
      let rec: MigrationRecord | null = null;
      while (!(rec = ch.next())) {
        if (ch.isClosed) return; // gone before saying hello: nothing to answer
        const left = deadline - Date.now();
        if (left <= 0) throw new MigrationTransportError('handshake', `${peer} sent no HELLO within ${timeoutMs} ms`);
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([signal.wait(), new Promise<void>((r) => (timer = setTimeout(r, left)))]);
        clearTimeout(timer);
      }
      if (this.closed) throw new MigrationTransportError('closed', 'listener closed');
      const acceptCaps = this.opts.acceptCaps ?? (CAP_LZ4 | CAP_MULTICHANNEL);
      if (rec.kind === 'hello') {
        const caps = rec.caps & acceptCaps;
        const channels = caps & CAP_MULTICHANNEL ? Math.min(rec.channels, this.opts.maxChannels ?? MAX_CHANNELS) : 1;
        if (this.pending.has(rec.sessionId)) throw new MigrationStreamError('unexpected-record', `HELLO for session ${rec.sessionId} which already exists`);
        const session: PendingSession = { channels: new Array<Channel | undefined>(channels).fill(undefined), joined: 1, caps };
        session.channels[0] = ch;
        await ch.send({ kind: 'hello-ack', version: STREAM_VERSION, channels, caps });
        await ch.flush();
        this.pending.set(rec.sessionId, session);
        const sessionId = rec.sessionId;
        // Channels that never join (a source that died between them) must not hold the rest.
        setTimeout(() => {
          if (this.pending.get(sessionId) !== session) return;
          this.pending.delete(sessionId);
          for (const c of session.channels) c?.destroy();
        }, timeoutMs).unref();
        this.maybeReady(rec.sessionId, session);
      } else if (rec.kind === 'channel-hello') {
        const session = this.pending.get(rec.sessionId);
        if (!session) {
          throw new MigrationTransportError('handshake', `CHANNEL_HELLO for unknown session ${rec.sessionId.toString(16)}`, ErrorCode.UNKNOWN_SESSION);
        }
        if (rec.channelIndex >= session.channels.length || session.channels[rec.channelIndex]) {
          throw new MigrationStreamError('out-of-range', `CHANNEL_HELLO channelIndex ${rec.channelIndex}: session has ${session.channels.length} channels and it is taken or out of range`);
        }
        ch.index = rec.channelIndex;
        session.channels[rec.channelIndex] = ch;
        session.joined++;
        await ch.send({ kind: 'hello-ack', version: STREAM_VERSION, channels: session.channels.length, caps: session.caps });
        await ch.flush();
        this.maybeReady(rec.sessionId, session);
      } else {
        throw new MigrationStreamError('unexpected-record', `first record from ${peer} is ${rec.kind}, expected HELLO or CHANNEL_HELLO`);
      }
    } catch (e) {
      // Tell the peer why (best effort), then drop it.
      const code = e instanceof MigrationTransportError && e.remoteCode ? e.remoteCode : errorCodeFor(e);
      const msg = (e as Error).message;
      this.opts.onRefused?.(peer, msg);
      try {
        const buf = Buffer.alloc(8 + 4 + 4096);
        ch.abortWith(buf.subarray(0, encodeRecord({ kind: 'error', code, message: msg }, buf, 0)));
      } catch {
        ch.destroy();
      }
    }
  }

  private maybeReady(sessionId: bigint, session: PendingSession): void {
    if (session.joined !== session.channels.length) return;
    this.pending.delete(sessionId);
    this.ready.push(new IncomingMigration(sessionId, session.channels as Channel[], session.caps, this.opts.idleTimeoutMs));
    this.arrived.notify();
  }
}
