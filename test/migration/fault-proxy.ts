// A fault-injecting TCP proxy for the migration tests (issue 8): it sits between a source and a
// receiver on 127.0.0.1 and, per connection and direction, cuts (FIN both ways), resets (RST both
// ways), stalls (stops forwarding and reading, so TCP back-pressure reaches the sender; released
// later or never) or slows (rate-limits) the stream at a byte offset or where a given record
// starts. It reads the 8-byte record header of stream/format.ts (type at byte 0, payload length
// at bytes 4..7) to know the phase: CONFIG, RAM of round r (r = SYNC records seen + 1), SYNC,
// VCPU_STATE, END, GO one way; HELLO_ACK, READY, SYNC_ACK, COMPLETE, STARTED the other.
//
// A stalled connection is a black hole: from the stall on, neither side hears of the other
// closing it (no FIN, no RST passes) until a release, so each side must find the stall by its
// own idle timeout, as it would across a dead network path.
//
// Concurrency: single-threaded (the test's main thread); no shared memory.
import { connect, createServer, type Server, type Socket } from 'node:net';
import { RecordType } from '../../src/migration/stream/format.ts';

export type Fault = 'cut' | 'reset' | 'stall' | 'slow' | 'corrupt';
/** up: source -> destination; down: destination -> source. */
export type Direction = 'up' | 'down';
export type RecordName = keyof typeof RecordType;

export interface Trigger {
  /** Fire when this many bytes of the direction's stream have passed. */
  offset?: number;
  /** Fire where a record of this type starts (before its first byte is forwarded). */
  record?: RecordName;
  /** With record: only in this round (RAM/ZERO of round r; SYNC r closes round r). */
  round?: number;
  /** With record: the nth match (default 1). */
  nth?: number;
}

export interface FaultRule {
  /** Accepted connection, in accept order (0 = channel 0). Default 0. */
  conn?: number;
  dir: Direction;
  at: Trigger;
  fault: Fault;
  /** stall: forward again after this long (default: never). */
  releaseAfterMs?: number;
  /** slow: bytes per second from the trigger on. */
  bytesPerSec?: number;
  /** corrupt: XOR the byte this far past the trigger (default 0) with `xor` (default 0xff). */
  corruptOffset?: number;
  xor?: number;
}

export interface FaultEvent {
  rule: FaultRule;
  conn: number;
  dir: Direction;
  /** Stream offset where it fired. */
  offset: number;
  /** The record starting there, if the trigger was a record. */
  record?: string;
  round: number;
}

const NAMES = new Map<number, string>(Object.entries(RecordType).map(([k, v]) => [v, k]));

class Pipe {
  offset = 0;
  /** Round of the records passing now: SYNC (SYNC_ACK) records seen + 1; SYNC r closes round r. */
  round = 1;
  private hdr = Buffer.alloc(8);
  private hdrHave = 0;
  private skip = 0;
  private matches = new Map<FaultRule, number>();
  mode: 'forward' | 'stalled' | 'slow' | 'dead' = 'forward';
  private held: Buffer[] = [];
  private heldBytes = 0;
  private slowTimer: NodeJS.Timeout | undefined;
  private bytesPerSec = 0;
  ended = false;

  constructor(
    readonly conn: Conn,
    readonly dir: Direction,
    readonly from: Socket,
    readonly to: Socket,
    private rules: FaultRule[],
  ) {
    from.on('data', (c: Buffer) => this.onData(c));
    to.on('drain', () => {
      if (this.mode === 'forward') from.resume();
    });
  }

  /** Earliest rule firing within [0, chunk.length), advancing the parser up to it. */
  private scan(chunk: Buffer): { at: number; rule: FaultRule; record?: string } | null {
    for (let i = 0; i < chunk.length; ) {
      for (const r of this.rules) {
        if (r.at.offset !== undefined && r.at.record === undefined && this.offset + i >= r.at.offset) return { at: i, rule: r };
      }
      if (this.skip > 0) {
        const n = Math.min(this.skip, chunk.length - i);
        // An offset rule inside the skipped span fires at its exact byte.
        for (const r of this.rules) {
          if (r.at.offset !== undefined && r.at.record === undefined && r.at.offset < this.offset + i + n) {
            const at = r.at.offset - this.offset;
            this.skip -= at - i;
            return { at, rule: r };
          }
        }
        this.skip -= n;
        i += n;
        continue;
      }
      if (this.hdrHave === 0) {
        const type = chunk[i]!;
        const name = NAMES.get(type);
        for (const r of this.rules) {
          if (r.at.record === undefined || RecordType[r.at.record] !== type) continue;
          if (r.at.round !== undefined && r.at.round !== this.round) continue;
          const seen = (this.matches.get(r) ?? 0) + 1;
          this.matches.set(r, seen);
          if (seen >= (r.at.nth ?? 1)) return { at: i, rule: r, record: name };
        }
      }
      this.hdr[this.hdrHave++] = chunk[i]!;
      i++;
      if (this.hdrHave === 8) {
        this.hdrHave = 0;
        this.skip = this.hdr.readUInt32LE(4);
        if (this.hdr[0] === RecordType.SYNC || this.hdr[0] === RecordType.SYNC_ACK) this.round++;
      }
    }
    return null;
  }

  private onData(chunk: Buffer): void {
    if (this.mode === 'dead') return;
    if (this.mode !== 'forward') return this.hold(chunk);
    const hit = this.rules.length ? this.scan(chunk) : null;
    if (!hit) {
      this.offset += chunk.length;
      this.forward(this.corrupted(chunk, this.offset - chunk.length));
      return;
    }
    this.rules = this.rules.filter((r) => r !== hit.rule);
    const before = chunk.subarray(0, hit.at);
    const rest = chunk.subarray(hit.at);
    this.offset += before.length;
    if (before.length) this.forward(this.corrupted(before, this.offset - before.length));
    this.conn.proxy.fired.push({ rule: hit.rule, conn: this.conn.index, dir: this.dir, offset: this.offset, record: hit.record, round: this.round });
    this.apply(hit.rule);
    // The rest goes through the new mode (or, still forwarding, the remaining rules).
    if (rest.length) this.onData(rest);
  }

  /** Stream offset of the byte a 'corrupt' rule changes, and how (-1: none pending). */
  private corruptAt = -1;
  private corruptXor = 0xff;

  /** `b` (starting at stream offset `start`), with the pending corruption applied if it is in it. */
  private corrupted(b: Buffer, start: number): Buffer {
    if (this.corruptAt < start || this.corruptAt >= start + b.length) return b;
    const copy = Buffer.from(b);
    copy[this.corruptAt - start]! ^= this.corruptXor;
    this.corruptAt = -1;
    return copy;
  }

  private forward(b: Buffer): void {
    if (this.to.destroyed) return;
    if (!this.to.write(b)) this.from.pause();
  }

  private hold(chunk: Buffer): void {
    this.held.push(chunk);
    this.heldBytes += chunk.length;
    this.offset += chunk.length;
    if (this.mode === 'stalled' || this.heldBytes > 1 << 20) this.from.pause();
  }

  private apply(rule: FaultRule): void {
    switch (rule.fault) {
      case 'cut':
        this.conn.cut();
        return;
      case 'reset':
        this.conn.reset();
        return;
      case 'stall':
        this.mode = 'stalled';
        this.from.pause();
        this.conn.frozen++;
        if (rule.releaseAfterMs !== undefined) {
          setTimeout(() => this.release(), rule.releaseAfterMs).unref();
        }
        return;
      case 'corrupt':
        this.corruptAt = this.offset + (rule.corruptOffset ?? 0);
        this.corruptXor = (rule.xor ?? 0xff) & 0xff || 0xff;
        return;
      case 'slow':
        this.mode = 'slow';
        this.bytesPerSec = rule.bytesPerSec ?? 1 << 20;
        this.slowTimer = setInterval(() => this.drip(), 20);
        this.slowTimer.unref();
        return;
    }
  }

  private release(): void {
    if (this.mode !== 'stalled') return;
    this.mode = 'forward';
    this.conn.frozen--;
    const held = Buffer.concat(this.held);
    this.held = [];
    this.heldBytes = 0;
    // Held bytes go through the parser and the remaining rules like fresh ones.
    this.offset -= held.length;
    if (held.length) this.onData(held);
    if (this.mode === 'forward') this.from.resume();
    this.conn.propagatePending();
  }

  private drip(): void {
    let budget = Math.max(1, Math.floor(this.bytesPerSec / 50));
    while (budget > 0 && this.held.length) {
      const b = this.held[0]!;
      const n = Math.min(budget, b.length);
      if (!this.to.destroyed) this.to.write(b.subarray(0, n));
      if (n === b.length) this.held.shift();
      else this.held[0] = b.subarray(n);
      this.heldBytes -= n;
      budget -= n;
    }
    if (this.heldBytes < 256 << 10) this.from.resume();
    if (this.ended && this.held.length === 0) this.to.end();
  }

  stop(): void {
    this.mode = 'dead';
    clearInterval(this.slowTimer);
  }
}

class Conn {
  /** Stalled pipes: while > 0 no close passes either way (black hole). */
  frozen = 0;
  private pendingEnd = new Set<Socket>();
  private pendingClose = new Set<Socket>();
  private pipes: Pipe[] = [];

  constructor(
    readonly proxy: FaultProxy,
    readonly index: number,
    readonly client: Socket,
    readonly server: Socket,
    rules: FaultRule[],
  ) {
    const mine = (dir: Direction) => rules.filter((r) => (r.conn ?? 0) === index && r.dir === dir);
    const up = new Pipe(this, 'up', client, server, mine('up'));
    const down = new Pipe(this, 'down', server, client, mine('down'));
    this.pipes = [up, down];
    for (const [s, other, pipe] of [
      [client, server, up],
      [server, client, down],
    ] as const) {
      s.on('error', () => undefined);
      s.on('end', () => {
        pipe.ended = true;
        if (this.frozen > 0) this.pendingEnd.add(other);
        else if (pipe.mode !== 'slow') other.end();
      });
      s.on('close', (hadError) => {
        if (this.frozen > 0) this.pendingClose.add(other);
        else if (hadError) other.resetAndDestroy();
        else if (pipe.mode !== 'slow') setTimeout(() => other.destroy(), 50).unref();
      });
    }
  }

  cut(): void {
    for (const p of this.pipes) p.stop();
    this.client.end();
    this.server.end();
    setTimeout(() => {
      this.client.destroy();
      this.server.destroy();
    }, 200).unref();
  }

  reset(): void {
    for (const p of this.pipes) p.stop();
    this.client.resetAndDestroy();
    this.server.resetAndDestroy();
  }

  /** After a release: closes that happened during the stall now pass. */
  propagatePending(): void {
    if (this.frozen > 0) return;
    for (const s of this.pendingEnd) s.end();
    for (const s of this.pendingClose) s.destroy();
    this.pendingEnd.clear();
    this.pendingClose.clear();
  }

  destroy(): void {
    for (const p of this.pipes) p.stop();
    this.client.destroy();
    this.server.destroy();
  }

  bytes(dir: Direction): number {
    return this.pipes[dir === 'up' ? 0 : 1]!.offset;
  }
}

export class FaultProxy {
  readonly fired: FaultEvent[] = [];
  readonly conns: Conn[] = [];
  private server!: Server;

  private constructor(
    private readonly target: { host: string; port: number },
    private readonly rules: FaultRule[],
  ) {}

  /** Listen on 127.0.0.1 (a free port) and forward every connection to `target`. */
  static async start(target: { host: string; port: number }, rules: FaultRule[] = []): Promise<FaultProxy> {
    const p = new FaultProxy(target, rules);
    p.server = createServer({ pauseOnConnect: true }, (client) => p.accept(client));
    await new Promise<void>((r) => p.server.listen(0, '127.0.0.1', () => r()));
    return p;
  }

  get port(): number {
    const a = this.server.address();
    return typeof a === 'object' && a ? a.port : 0;
  }

  private accept(client: Socket): void {
    const index = this.conns.length;
    const server = connect({ host: this.target.host, port: this.target.port });
    client.on('error', () => undefined);
    server.on('error', () => client.destroy());
    server.once('connect', () => {
      this.conns[index] = new Conn(this, index, client, server, this.rules);
      client.resume();
    });
    this.conns.length = index + 1;
  }

  /** Bytes that passed the trigger point so far on connection `conn`, direction `dir`. */
  bytes(conn: number, dir: Direction): number {
    return this.conns[conn]?.bytes(dir) ?? 0;
  }

  async close(): Promise<void> {
    for (const c of this.conns) c?.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}
