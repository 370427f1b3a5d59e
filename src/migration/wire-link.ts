// SourceLink / DestLink over the wire helper's versioned stream and TCP transport
// (transport/connection.ts, transport/listener.ts, stream/format.ts): a thin adapter, so the
// pre-copy state machines run unchanged on either transport.
//
// What the adapter translates:
//   - pages: link.ts speaks guest-physical addresses; the stream speaks (slot, firstPage). The
//     slot geometry comes from the CONFIG record passing through (both sides).
//   - rounds: the stream's destination applies a round barrier (every page of round r before
//     any of r+1), so the destination side is one logical channel and a RAM/ZERO record belongs
//     to round (last SYNC + 1).
//   - SYNC: link.ts sends SYNC per channel; the stream's sync() covers every channel, so only the
//     channel-0 SYNC is forwarded.
//   - END and COMPLETE carry page-digest.ts's digest: its 64-bit value in memoryHash, its /pages
//     suffix in `pages` (END's pages-sent count does not travel; the destination sees -1).
//   - SYNCED (round acks) travels as the stream's SYNC_ACK back-record.
//
// Concurrency: single-threaded, like the transport.
import { PAGE_SIZE, type VcpuState } from '../vmm/engine.ts';
import { MigrationConnection } from './transport/connection.ts';
import { MigrationListener, type IncomingMigration } from './transport/listener.ts';
import type { StreamConfig } from './stream/format.ts';
import type { MigrationConfig } from './config.ts';
import { MigrationLinkError, type DestLink, type DestRecord, type SourceLink, type SourceRecord } from './link.ts';

interface SlotGeometry {
  slot: number;
  gpa: number;
  pages: number;
}

function geometry(cfg: MigrationConfig): SlotGeometry[] {
  return cfg.memslots.map((s) => ({ slot: s.slot, gpa: s.guestPhysAddr, pages: s.memorySize / PAGE_SIZE }));
}

function toSlotPage(slots: readonly SlotGeometry[], gpa: number): { slot: number; firstPage: number } {
  for (const s of slots) {
    if (gpa >= s.gpa && gpa < s.gpa + s.pages * PAGE_SIZE) return { slot: s.slot, firstPage: (gpa - s.gpa) / PAGE_SIZE };
  }
  throw new MigrationLinkError(`gpa 0x${gpa.toString(16)} is in no memslot of the CONFIG sent`);
}

function toGpa(slots: readonly SlotGeometry[], slot: number, firstPage: number): number {
  const s = slots.find((x) => x.slot === slot);
  if (!s) throw new MigrationLinkError(`protocol error: pages for unknown memslot ${slot}`);
  return s.gpa + firstPage * PAGE_SIZE;
}

/** "hhhhhhhhhhhhhhhh/pages" (page-digest.ts) <-> 64-bit hash + page count. */
function digestToWire(d: string): { memoryHash: bigint; pages: number } {
  const [hex, pages] = d.split('/');
  return { memoryHash: BigInt(`0x${hex}`), pages: Number(pages) };
}
function digestFromWire(h: bigint, pages: number): string {
  return `${h.toString(16).padStart(16, '0')}/${pages}`;
}

/** The longest wait the transport's timers accept (setTimeout caps at 2^31-1 ms). */
const FOREVER_MS = 2 ** 31 - 1;

class WireSourceLink implements SourceLink {
  readonly acksRounds = true;
  private slots: SlotGeometry[] = [];

  constructor(private readonly conn: MigrationConnection) {}

  get channels(): number {
    return this.conn.channelCount;
  }

  /** Why destroy() was called: later failures report it instead of a socket-level symptom. */
  private destroyedWith: Error | null = null;

  async send(r: SourceRecord, channel = 0): Promise<void> {
    if (this.destroyedWith) throw this.destroyedWith;
    try {
      await this.sendRecord(r, channel);
    } catch (e) {
      throw this.destroyedWith ?? e;
    }
  }

  private async sendRecord(r: SourceRecord, channel: number): Promise<void> {
    switch (r.type) {
      case 'config':
        this.slots = geometry(r.config);
        await this.conn.send({ kind: 'config', config: r.config as unknown as StreamConfig });
        return this.conn.flush(); // batched otherwise, and READY waits for it
      case 'ram': {
        const { slot, firstPage } = toSlotPage(this.slots, r.gpa);
        await this.conn.sendRam(slot, firstPage, r.data.length / PAGE_SIZE, r.data, { channel });
        r.onWritten?.(); // the transport copied the pages into its batch
        return;
      }
      case 'zero': {
        const { slot, firstPage } = toSlotPage(this.slots, r.gpa);
        return this.conn.sendZero(slot, firstPage, r.pages, { channel });
      }
      case 'sync':
        if (channel === 0) await this.conn.sync(r.round);
        return;
      case 'vcpu':
        return this.conn.send({ kind: 'vcpu-state', state: r.state });
      case 'end':
        await this.conn.send({ kind: 'end', ...digestToWire(r.hash) });
        return this.conn.flush();
    }
  }

  async receive(): Promise<DestRecord> {
    if (this.destroyedWith) throw this.destroyedWith;
    const rec = await this.conn.nextBackRecord(['ready', 'sync-ack', 'complete', 'error'], FOREVER_MS).catch((e: Error) => {
      throw this.destroyedWith ?? e;
    });
    switch (rec.kind) {
      case 'ready':
        return { type: 'ready' };
      case 'sync-ack':
        return { type: 'synced', round: rec.round };
      case 'complete':
        return { type: 'complete', hash: digestFromWire(rec.memoryHash, rec.pages), pagesReceived: rec.pages };
      case 'error':
        return { type: 'error', message: rec.message };
      default:
        throw new MigrationLinkError(`protocol error: ${rec.kind} from the destination`);
    }
  }

  bytesSent(): number {
    return this.conn.bytesSent;
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
  private slots: SlotGeometry[] = [];

  constructor(private readonly incoming: IncomingMigration) {}

  async run(onRecord: (record: SourceRecord, channel: number) => void | Promise<void>): Promise<void> {
    let round = 0;
    for await (const rec of this.incoming.records()) {
      let r: SourceRecord;
      switch (rec.kind) {
        case 'config': {
          const cfg = rec.config as unknown as MigrationConfig;
          if (!Array.isArray(cfg.memslots) || cfg.memslots.some((s) => typeof s.guestPhysAddr !== 'number' || typeof s.memorySize !== 'number')) {
            throw new MigrationLinkError('protocol error: CONFIG memslots lack guestPhysAddr/memorySize');
          }
          this.slots = geometry(cfg);
          r = { type: 'config', config: cfg };
          break;
        }
        case 'ram':
          r = { type: 'ram', round: round + 1, gpa: toGpa(this.slots, rec.slot, rec.firstPage), data: rec.data };
          break;
        case 'zero':
          r = { type: 'zero', round: round + 1, gpa: toGpa(this.slots, rec.slot, rec.firstPage), pages: rec.count };
          break;
        case 'sync':
          round = rec.round;
          r = { type: 'sync', round: rec.round };
          break;
        case 'vcpu-state':
          r = { type: 'vcpu', state: rec.state as VcpuState };
          break;
        case 'end':
          r = { type: 'end', finalRound: round, pagesSent: -1, hash: digestFromWire(rec.memoryHash, rec.pages) };
          break;
        default:
          throw new MigrationLinkError(`protocol error: ${rec.kind} from the source`);
      }
      const p = onRecord(r, 0);
      if (p) await p;
    }
  }

  async send(r: DestRecord): Promise<void> {
    switch (r.type) {
      case 'ready':
        return this.incoming.reply({ kind: 'ready' });
      case 'complete':
        return this.incoming.reply({ kind: 'complete', ...digestToWire(r.hash) });
      case 'error':
        this.incoming.abort(new Error(r.message));
        return;
      case 'synced':
        return this.incoming.reply({ kind: 'sync-ack', round: r.round });
    }
  }

  close(): void {
    this.incoming.close().catch(() => undefined);
  }
}

export async function connectWireLink(opts: { host: string; port: number; channels: number }): Promise<SourceLink> {
  try {
    return new WireSourceLink(await MigrationConnection.connect({ host: opts.host, port: opts.port, channels: opts.channels, compress: false }));
  } catch (e) {
    throw new MigrationLinkError(`cannot connect to ${opts.host}:${opts.port}: ${(e as Error).message}`);
  }
}

export async function listenWireLink(opts: { host: string; port: number }): Promise<{ host: string; port: number; accept(): Promise<DestLink>; close(): void }> {
  const server = await MigrationListener.listen({ host: opts.host, port: opts.port });
  return {
    host: server.host,
    port: server.port,
    accept: async () => new WireDestLink(await server.accept()),
    close: () => {
      server.close().catch(() => undefined);
    },
  };
}
