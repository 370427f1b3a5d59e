// The one implementation of link.ts: SourceLink / DestLink over the versioned migration stream
// (stream/format.ts: typed, validated records, capability handshake) and its batched multi-
// channel TCP transport (transport/connection.ts, transport/listener.ts).
//
// What the adapter translates:
//   - pages: link.ts speaks guest-physical addresses; the stream speaks (slot, firstPage). Both
//     sides build the same SlotMap from the CONFIG record passing through.
//   - RAM: a record with onWritten goes out through sendRamBorrowed (the socket writes the
//     sender's buffer itself; onWritten fires once it is written), else through sendRam (copied
//     into the channel's batch).
//   - rounds: the stream's destination applies a round barrier (every page of round r before
//     any of r+1, whatever channel it came on), so the destination side is one logical channel
//     and a RAM/ZERO record belongs to round (last SYNC + 1).
//   - SYNC: link.ts sends SYNC per channel; the stream's sync() covers every channel (and
//     flushes them), so only the channel-0 SYNC is forwarded. The final SYNC stays batched:
//     END follows at once and is pushed with it.
//   - SYNCED (round acks) travels as the stream's SYNC_ACK back-record.
//   - batching: control records (VCPU_STATE) sit in channel 0's batch until the next SYNC or
//     END, which flush: the stop-and-copy burst leaves in as few writes as possible. So do the
//     POSTCOPY_DISCARD lists (pushing each at once measured ~3 ms a list here, against ~2.5 ms
//     for all four of a 1 GiB guest batched).
//   - END and COMPLETE carry hash.ts's memoryHash (formatted as 16 hex digits in link.ts).
//
// Concurrency: single-threaded, like the transport.
import type { VcpuState } from '../vmm/engine.ts';
import { MigrationConnection } from './transport/connection.ts';
import { MigrationListener, type IncomingMigration } from './transport/listener.ts';
import type { ClientSecurity, ServerSecurity } from './transport/admission.ts';
import { CAP_LZ4, CAP_MULTICHANNEL, CAP_POSTCOPY, type MigrationRecord, type StreamConfig } from './stream/format.ts';
import type { MigrationConfig } from './config.ts';
import { formatMemoryHash } from './hash.ts';
import { MigrationLinkError, type DestLink, type DestRecord, type LinkPhase, type SourceLink, type SourceRecord } from './link.ts';

const parseHash = (h: string): bigint => BigInt(`0x${h}`);

/**
 * The longest wait the transport's timers accept (setTimeout caps at 2^31-1 ms). receive() needs
 * no deadline of its own: the connection's idle watch (liveness.ts) fails it when the
 * destination goes silent while setPhase says we await an answer.
 */
const FOREVER_MS = 2 ** 31 - 1;

class WireSourceLink implements SourceLink {
  readonly acksRounds = true;
  /** Why destroy() was called: later failures report it instead of a socket-level symptom. */
  private destroyedWith: Error | null = null;

  constructor(
    private readonly conn: MigrationConnection,
    readonly peerHost?: string,
  ) {}

  get postcopyAllowed(): boolean {
    return (this.conn.caps & CAP_POSTCOPY) !== 0;
  }

  get channels(): number {
    return this.conn.channelCount;
  }

  async send(r: SourceRecord, channel = 0): Promise<void> {
    if (this.destroyedWith) throw this.destroyedWith;
    try {
      await this.sendRecord(r, channel);
    } catch (e) {
      throw this.destroyedWith ?? this.conn.failure ?? e;
    }
  }

  private async sendRecord(r: SourceRecord, channel: number): Promise<void> {
    switch (r.type) {
      case 'config':
        await this.conn.send({ kind: 'config', config: r.config as unknown as StreamConfig });
        return this.conn.flush(); // READY waits for it
      case 'ram': {
        const pages = r.data.length / 4096;
        if (r.onWritten) return this.conn.sendRamBorrowed(r.slot, r.page, pages, r.data, r.onWritten, { channel });
        return this.conn.sendRam(r.slot, r.page, pages, r.data, { channel });
      }
      case 'zero':
        return this.conn.sendZero(r.slot, r.page, r.pages, { channel });
      case 'sync':
        if (channel === 0) await (r.final ? this.conn.syncBatched(r.round) : this.conn.sync(r.round));
        return;
      case 'vcpu':
        return this.conn.send({ kind: 'vcpu-state', state: r.state });
      case 'discard':
        return this.conn.send({ kind: 'postcopy-discard', slot: r.slot, firstPage: r.firstPage, count: r.count, bitmap: r.bitmap });
      case 'end':
        if (r.postcopy) await this.conn.send({ kind: 'postcopy-run', memoryHash: parseHash(r.hash), pages: r.pagesSent, configDigest: r.configDigest, vcpuStateDigest: r.vcpuStateDigest, vcpuStates: r.vcpuStates, missingPages: r.postcopy.missingPages });
        else await this.conn.send({ kind: 'end', memoryHash: parseHash(r.hash), pages: r.pagesSent, configDigest: r.configDigest, vcpuStateDigest: r.vcpuStateDigest, vcpuStates: r.vcpuStates });
        await this.conn.push(); // COMPLETE is the answer to wait for, not the socket write
        this.conn.dataChannelsDone();
        return;
      case 'go':
        await this.conn.send({ kind: 'go' });
        return this.conn.push();
    }
  }

  async receive(): Promise<DestRecord> {
    if (this.destroyedWith) throw this.destroyedWith;
    const rec = await this.conn.nextBackRecord(['ready', 'sync-ack', 'complete', 'started', 'error'], FOREVER_MS).catch((e: Error) => {
      throw this.destroyedWith ?? this.conn.failure ?? e;
    });
    switch (rec.kind) {
      case 'ready':
        return { type: 'ready' };
      case 'sync-ack':
        return { type: 'synced', round: rec.round };
      case 'complete':
        return { type: 'complete', hash: formatMemoryHash(rec.memoryHash), pagesReceived: rec.pages, ...(rec.details ? { details: rec.details } : {}) };
      case 'started':
        return { type: 'started' };
      case 'error':
        return { type: 'error', message: rec.message };
      default:
        throw new MigrationLinkError(`protocol error: ${rec.kind} from the destination`);
    }
  }

  async flush(): Promise<void> {
    if (this.destroyedWith) throw this.destroyedWith;
    await this.conn.push().catch((e: Error) => {
      throw this.destroyedWith ?? this.conn.failure ?? e;
    });
  }

  bytesSent(): number {
    return this.conn.bytesSent;
  }

  compression(): { pages: number; wireBytes: number } {
    let pages = 0;
    let wireBytes = 0;
    for (const ch of this.conn.channels) {
      pages += ch.compressedPages;
      wireBytes += ch.compressedBytes;
    }
    return { pages, wireBytes };
  }

  setPhase(phase: LinkPhase): void {
    this.conn.setPhase(phase);
  }

  close(): void {
    this.conn.close().catch(() => undefined);
  }

  destroy(error?: Error): void {
    this.destroyedWith ??= error ?? new MigrationLinkError('link destroyed');
    this.conn.destroy(error);
  }
}

class WireDestLink implements DestLink {
  readonly channels = 1;

  constructor(private readonly incoming: IncomingMigration) {}

  get postcopyAllowed(): boolean {
    return (this.incoming.caps & CAP_POSTCOPY) !== 0;
  }

  run(onRecord: (record: SourceRecord, channel: number) => void | Promise<void>): Promise<void> {
    let round = 0;
    return this.incoming.run((rec: MigrationRecord) => {
      let r: SourceRecord;
      switch (rec.kind) {
        case 'config':
          // Checked field by field by the receiver (config-validate.ts) before any page is taken.
          r = { type: 'config', config: rec.config as unknown as MigrationConfig };
          break;
        case 'ram':
          r = { type: 'ram', round: round + 1, slot: rec.slot, page: rec.firstPage, data: rec.data };
          break;
        case 'zero':
          r = { type: 'zero', round: round + 1, slot: rec.slot, page: rec.firstPage, pages: rec.count };
          break;
        case 'sync':
          round = rec.round;
          r = { type: 'sync', round: rec.round };
          break;
        case 'vcpu-state':
          r = { type: 'vcpu', state: rec.state as VcpuState };
          break;
        case 'end':
          r = { type: 'end', finalRound: round, pagesSent: rec.pages, hash: formatMemoryHash(rec.memoryHash), configDigest: rec.configDigest, vcpuStateDigest: rec.vcpuStateDigest, vcpuStates: rec.vcpuStates };
          break;
        case 'postcopy-run':
          r = { type: 'end', finalRound: round, pagesSent: rec.pages, hash: formatMemoryHash(rec.memoryHash), configDigest: rec.configDigest, vcpuStateDigest: rec.vcpuStateDigest, vcpuStates: rec.vcpuStates, postcopy: { missingPages: rec.missingPages } };
          break;
        case 'postcopy-discard':
          // A view into the read slab: the receiver applies it during the call.
          r = { type: 'discard', slot: rec.slot, firstPage: rec.firstPage, count: rec.count, bitmap: rec.bitmap };
          break;
        default:
          throw new MigrationLinkError(`protocol error: ${rec.kind} from the source`);
      }
      return onRecord(r, 0);
    }).then(async () => {
      // The stream proper ends at END (answered with COMPLETE); GO, the commit, follows alone.
      await this.incoming.awaitGo();
      await onRecord({ type: 'go' }, 0);
    });
  }

  async send(r: DestRecord): Promise<void> {
    switch (r.type) {
      case 'ready':
        return this.incoming.reply({ kind: 'ready' });
      case 'complete':
        return this.incoming.reply({ kind: 'complete', memoryHash: parseHash(r.hash), pages: r.pagesReceived, ...(r.details ? { details: r.details } : {}) });
      case 'started':
        return this.incoming.reply({ kind: 'started' });
      case 'error':
        this.incoming.abort(new Error(r.message), r.code);
        return;
      case 'synced':
        return this.incoming.reply({ kind: 'sync-ack', round: r.round });
    }
  }

  close(): void {
    this.incoming.close().catch(() => undefined);
  }

  setIdleTimeout(ms: number): void {
    this.incoming.setIdleTimeout(ms);
  }
}

/**
 * Open `channels` TCP connections to a `receive` and do the stream handshake. `timeoutMs` bounds
 * each connect and handshake answer, and is the link's idle timeout until setPhase says
 * otherwise (default DEFAULT_IDLE_TIMEOUT_MS).
 */
export async function connectLink(opts: { host: string; port: number; channels: number; timeoutMs?: number; signal?: AbortSignal; postcopy?: boolean; security?: ClientSecurity; compress?: boolean }): Promise<SourceLink> {
  try {
    // lz4 (--compress lz4) is offered only when asked for: it costs ~4 us of CPU per page here.
    const caps = (opts.postcopy === false ? 0 : CAP_POSTCOPY) | (opts.compress ? CAP_LZ4 : 0);
    return new WireSourceLink(
      await MigrationConnection.connect({ host: opts.host, port: opts.port, channels: opts.channels, compress: opts.compress ?? false, timeoutMs: opts.timeoutMs, idleTimeoutMs: opts.timeoutMs, signal: opts.signal, caps, security: opts.security }),
      opts.host,
    );
  } catch (e) {
    throw new MigrationLinkError(`cannot connect to ${opts.host}:${opts.port}: ${(e as Error).message}`);
  }
}

export interface LinkListener {
  readonly host: string;
  readonly port: number;
  /** The next migration whose channels have all joined. */
  accept(): Promise<DestLink>;
  close(): void;
}

/** `timeoutMs`: each accepted link's handshake and idle timeout (default DEFAULT_IDLE_TIMEOUT_MS). */
export async function listenLink(opts: { host: string; port: number; timeoutMs?: number; postcopy?: boolean; security?: ServerSecurity; onRefused?: (peer: string, reason: string) => void }): Promise<LinkListener> {
  const acceptCaps = CAP_LZ4 | CAP_MULTICHANNEL | (opts.postcopy === false ? 0 : CAP_POSTCOPY);
  const server = await MigrationListener.listen({ host: opts.host, port: opts.port, handshakeTimeoutMs: opts.timeoutMs, idleTimeoutMs: opts.timeoutMs, acceptCaps, security: opts.security, onRefused: opts.onRefused });
  return {
    host: server.host,
    port: server.port,
    accept: async () => new WireDestLink(await server.accept()),
    close: () => {
      server.close().catch(() => undefined);
    },
  };
}
