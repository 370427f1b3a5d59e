// A SourceLink / DestLink over plain TCP sockets, one socket per channel, with a fixed 24-byte
// frame header. It is the migration layer's own transport so that pre-copy works whatever the
// state of the wire helper's stream/transport modules (see link.ts for the ordering rules).
//
// Frame: u32 payloadBytes | u8 type | u8 0 | u16 0 | u32 round | u32 pages | f64 gpa | payload.
// JSON payloads for control records; raw page bytes for RAM. Every header is checked: unknown
// type, oversized payload, or a RAM payload that is not `pages` whole pages is a protocol error.
//
// Concurrency: single-threaded (event loop); sockets are owned by the link object.
import { randomBytes } from 'node:crypto';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { PAGE_SIZE } from '../vmm/engine.ts';
import { MigrationLinkError, type DestLink, type DestRecord, type SourceLink, type SourceRecord } from './link.ts';

const HEADER_BYTES = 24;
const MAX_PAYLOAD_BYTES = 64 * 2 ** 20;
export const LINK_VERSION = 1;

const enum T {
  HELLO = 1,
  HELLO_ACK = 2,
  CHANNEL_HELLO = 3,
  CONFIG = 4,
  RAM = 5,
  ZERO = 6,
  SYNC = 7,
  VCPU = 8,
  END = 9,
  READY = 10,
  COMPLETE = 11,
  ERROR = 12,
  SYNCED = 13,
}

interface Frame {
  type: number;
  round: number;
  pages: number;
  gpa: number;
  payload: Buffer;
}

function header(type: number, payloadBytes: number, round = 0, pages = 0, gpa = 0): Buffer {
  const h = Buffer.allocUnsafe(HEADER_BYTES);
  h.writeUInt32LE(payloadBytes, 0);
  h.writeUInt32LE(type, 4);
  h.writeUInt32LE(round >>> 0, 8);
  h.writeUInt32LE(pages >>> 0, 12);
  h.writeDoubleLE(gpa, 16);
  return h;
}

function jsonFrame(type: number, value: unknown): Buffer {
  const body = Buffer.from(JSON.stringify(value));
  return Buffer.concat([header(type, body.length), body]);
}

/** Incremental frame parser: push() socket chunks, then take frames while next() returns one. */
class FrameReader {
  private chunks: Buffer[] = [];
  private buffered = 0;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
  }

  /**
   * RAM payloads that span socket chunks are reassembled here, not in a fresh buffer: the
   * destination applies a RAM record before the next one is parsed (see DestLink.run).
   */
  private scratch: Buffer | null = null;

  private take(n: number, reuse = false): Buffer {
    if (this.chunks[0]!.length >= n) {
      const first = this.chunks[0]!;
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return out;
    }
    let out: Buffer;
    if (reuse) {
      if (!this.scratch || this.scratch.length < n) this.scratch = Buffer.allocUnsafeSlow(Math.max(n, 1 << 20));
      out = this.scratch.subarray(0, n);
    } else out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - off);
      c.copy(out, off, 0, k);
      off += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
    return out;
  }

  private peekHeader(): Buffer {
    return this.chunks[0]!.length >= HEADER_BYTES ? this.chunks[0]!.subarray(0, HEADER_BYTES) : Buffer.concat(this.chunks).subarray(0, HEADER_BYTES);
  }

  next(): Frame | null {
    if (this.buffered < HEADER_BYTES) return null;
    const h = this.peekHeader();
    const len = h.readUInt32LE(0);
    const type = h.readUInt32LE(4);
    if (type < T.HELLO || type > T.SYNCED) throw new MigrationLinkError(`protocol error: unknown record type ${type}`);
    if (len > MAX_PAYLOAD_BYTES) throw new MigrationLinkError(`protocol error: record of ${len} bytes exceeds ${MAX_PAYLOAD_BYTES}`);
    if (this.buffered < HEADER_BYTES + len) return null;
    const round = h.readUInt32LE(8);
    const pages = h.readUInt32LE(12);
    const gpa = h.readDoubleLE(16);
    this.take(HEADER_BYTES);
    const payload = len ? this.take(len, type === T.RAM) : Buffer.alloc(0);
    if (type === T.RAM && len !== pages * PAGE_SIZE) throw new MigrationLinkError(`protocol error: RAM record of ${len} bytes for ${pages} pages`);
    if ((type === T.RAM || type === T.ZERO) && (gpa % PAGE_SIZE !== 0 || !Number.isSafeInteger(gpa))) throw new MigrationLinkError(`protocol error: unaligned gpa ${gpa}`);
    return { type, round, pages, gpa, payload };
  }
}

function parseJson<X>(f: Frame): X {
  try {
    return JSON.parse(f.payload.toString('utf8')) as X;
  } catch {
    throw new MigrationLinkError(`protocol error: record type ${f.type} carries malformed JSON`);
  }
}

function encodeSource(r: SourceRecord): Buffer[] {
  switch (r.type) {
    case 'config':
      return [jsonFrame(T.CONFIG, r.config)];
    case 'ram':
      return [header(T.RAM, r.data.length, r.round, r.data.length / PAGE_SIZE, r.gpa), r.data as Buffer];
    case 'zero':
      return [header(T.ZERO, 0, r.round, r.pages, r.gpa)];
    case 'sync':
      return [header(T.SYNC, 0, r.round)];
    case 'vcpu':
      return [jsonFrame(T.VCPU, r.state)];
    case 'end':
      return [jsonFrame(T.END, { finalRound: r.finalRound, pagesSent: r.pagesSent, hash: r.hash })];
  }
}

function decodeSource(f: Frame): SourceRecord {
  switch (f.type) {
    case T.CONFIG:
      return { type: 'config', config: parseJson(f) };
    case T.RAM:
      return { type: 'ram', round: f.round, gpa: f.gpa, data: f.payload };
    case T.ZERO:
      return { type: 'zero', round: f.round, gpa: f.gpa, pages: f.pages };
    case T.SYNC:
      return { type: 'sync', round: f.round };
    case T.VCPU:
      return { type: 'vcpu', state: parseJson(f) };
    case T.END: {
      const e = parseJson<{ finalRound: number; pagesSent: number; hash: string }>(f);
      if (typeof e.hash !== 'string') throw new MigrationLinkError('protocol error: END without a memory hash');
      return { type: 'end', finalRound: e.finalRound, pagesSent: e.pagesSent, hash: e.hash };
    }
    default:
      throw new MigrationLinkError(`protocol error: record type ${f.type} not expected from the source`);
  }
}

function encodeDest(r: DestRecord): Buffer {
  switch (r.type) {
    case 'ready':
      return header(T.READY, 0);
    case 'synced':
      return header(T.SYNCED, 0, r.round);
    case 'complete':
      return jsonFrame(T.COMPLETE, r);
    case 'error':
      return jsonFrame(T.ERROR, { message: r.message });
  }
}

function decodeDest(f: Frame): DestRecord {
  switch (f.type) {
    case T.READY:
      return { type: 'ready' };
    case T.SYNCED:
      return { type: 'synced', round: f.round };
    case T.COMPLETE:
      return { ...parseJson<object>(f), type: 'complete' } as DestRecord;
    case T.ERROR:
      return { type: 'error', message: parseJson<{ message: string }>(f).message };
    default:
      throw new MigrationLinkError(`protocol error: record type ${f.type} not expected from the destination`);
  }
}

function write(sock: Socket, bufs: Buffer[], onWritten?: () => void): Promise<void> {
  if (sock.destroyed || sock.writableEnded) return Promise.reject(new MigrationLinkError('connection closed'));
  let ok = true;
  for (let i = 0; i < bufs.length; i++) ok = i === bufs.length - 1 && onWritten ? sock.write(bufs[i]!, () => onWritten()) : sock.write(bufs[i]!);
  if (ok) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const onDrain = () => {
      sock.off('close', onClose);
      resolve();
    };
    const onClose = () => {
      sock.off('drain', onDrain);
      reject(new MigrationLinkError('connection closed while sending'));
    };
    sock.once('drain', onDrain);
    sock.once('close', onClose);
  });
}

function connectOne(host: string, port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = createConnection({ host, port, noDelay: true });
    s.once('connect', () => {
      s.off('error', reject);
      resolve(s);
    });
    s.once('error', reject);
  });
}

class TcpSourceLink implements SourceLink {
  readonly acksRounds = true;
  private sent = 0;
  private replies: DestRecord[] = [];
  private waiters: { resolve: (r: DestRecord) => void; reject: (e: Error) => void }[] = [];
  private failure: Error | null = null;

  constructor(private readonly socks: Socket[]) {
    const reader = new FrameReader();
    for (const s of socks) {
      s.on('error', (e) => this.fail(new MigrationLinkError(`connection to destination failed: ${e.message}`)));
      s.on('close', () => this.fail(new MigrationLinkError('connection to destination closed')));
    }
    socks[0]!.on('data', (chunk: Buffer) => {
      reader.push(chunk);
      try {
        for (let f = reader.next(); f; f = reader.next()) this.deliver(decodeDest(f));
      } catch (e) {
        this.destroy(e as Error);
      }
    });
  }

  get channels(): number {
    return this.socks.length;
  }

  private deliver(r: DestRecord): void {
    const w = this.waiters.shift();
    if (w) w.resolve(r);
    else this.replies.push(r);
  }

  private fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    for (const w of this.waiters.splice(0)) w.reject(e);
  }

  send(record: SourceRecord, channel = 0): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    const bufs = encodeSource(record);
    for (const b of bufs) this.sent += b.length;
    return write(this.socks[channel]!, bufs, record.type === 'ram' ? record.onWritten : undefined);
  }

  receive(): Promise<DestRecord> {
    const r = this.replies.shift();
    if (r) return Promise.resolve(r);
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  bytesSent(): number {
    return this.sent;
  }

  cork(): void {
    for (const s of this.socks) s.cork();
  }

  uncork(): void {
    for (const s of this.socks) s.uncork();
  }

  close(): void {
    this.failure ??= new MigrationLinkError('link closed');
    for (const s of this.socks) s.end();
  }

  destroy(error?: Error): void {
    this.fail(error ?? new MigrationLinkError('link destroyed'));
    for (const s of this.socks) s.destroy();
  }
}

/** Open `channels` TCP connections to a destination and do the handshake. */
export async function connectTcpLink(opts: { host: string; port: number; channels: number }): Promise<SourceLink> {
  const session = randomBytes(8).toString('hex');
  const socks: Socket[] = [];
  try {
    for (let i = 0; i < opts.channels; i++) {
      const s = await connectOne(opts.host, opts.port);
      socks.push(s);
      s.write(i === 0 ? jsonFrame(T.HELLO, { version: LINK_VERSION, session, channels: opts.channels }) : jsonFrame(T.CHANNEL_HELLO, { session, index: i }));
    }
  } catch (e) {
    for (const s of socks) s.destroy();
    throw new MigrationLinkError(`cannot connect to ${opts.host}:${opts.port}: ${(e as Error).message}`);
  }
  // HELLO_ACK arrives on channel 0 before anything else.
  const ack = await new Promise<Frame>((resolve, reject) => {
    const reader = new FrameReader();
    const s = socks[0]!;
    const onData = (c: Buffer) => {
      reader.push(c);
      try {
        const f = reader.next();
        if (!f) return;
        cleanup();
        if (f.type !== T.HELLO_ACK) reject(new MigrationLinkError(f.type === T.ERROR ? `destination refused: ${parseJson<{ message: string }>(f).message}` : `protocol error: expected HELLO_ACK, got type ${f.type}`));
        else resolve(f);
      } catch (e) {
        cleanup();
        reject(e as Error);
      }
    };
    const onClose = () => {
      cleanup();
      reject(new MigrationLinkError('destination closed the connection during the handshake'));
    };
    const cleanup = () => {
      s.off('data', onData);
      s.off('close', onClose);
    };
    s.on('data', onData);
    s.on('close', onClose);
  }).catch((e) => {
    for (const s of socks) s.destroy();
    throw e;
  });
  const a = parseJson<{ version: number }>(ack);
  if (a.version !== LINK_VERSION) throw new MigrationLinkError(`destination speaks version ${a.version}, not ${LINK_VERSION}`);
  return new TcpSourceLink(socks);
}

class TcpDestLink implements DestLink {
  private closing = false;
  /** A channel that closed before run() attached its handlers. */
  private droppedEarly = false;
  constructor(
    private readonly socks: Socket[],
    private readonly readers: FrameReader[],
  ) {
    for (const s of socks) s.once('close', () => (this.droppedEarly = true));
  }

  get channels(): number {
    return this.socks.length;
  }

  run(onRecord: (record: SourceRecord, channel: number) => void | Promise<void>): Promise<void> {
    return new Promise((resolve, reject) => {
      let blocked = false;
      let done = false;
      let ended = 0;
      const finish = (e?: Error) => {
        if (done) return;
        done = true;
        // On error the sockets stay open so the caller can still send ERROR, then close().
        if (e) reject(e);
        else resolve();
      };
      const pump = (): void => {
        try {
          for (let progress = true; progress && !blocked && !done; ) {
            progress = false;
            for (let ch = 0; ch < this.socks.length && !blocked && !done; ch++) {
              const f = this.readers[ch]!.next();
              if (!f) continue;
              progress = true;
              const p = onRecord(decodeSource(f), ch);
              if (p) {
                blocked = true;
                for (const s of this.socks) s.pause();
                p.then(
                  () => {
                    blocked = false;
                    for (const s of this.socks) s.resume();
                    pump();
                  },
                  (e: Error) => finish(e),
                );
              }
            }
          }
        } catch (e) {
          finish(e as Error);
        }
      };
      if (this.droppedEarly || this.socks.some((s) => s.destroyed)) {
        finish(new MigrationLinkError('connection from source dropped'));
        return;
      }
      this.socks.forEach((s, ch) => {
        s.on('data', (c: Buffer) => {
          this.readers[ch]!.push(c);
          if (!blocked) pump();
        });
        s.resume();
        s.on('end', () => {
          if (++ended === this.socks.length) finish();
        });
        s.on('close', () => {
          if (!this.closing) finish(new MigrationLinkError('connection from source dropped'));
        });
        s.on('error', (e) => finish(new MigrationLinkError(`connection from source failed: ${e.message}`)));
      });
      pump();
    });
  }

  send(record: DestRecord): Promise<void> {
    return write(this.socks[0]!, [encodeDest(record)]);
  }

  close(): void {
    this.closing = true;
    for (const s of this.socks) s.end();
  }
}

export interface TcpListener {
  readonly host: string;
  readonly port: number;
  /** The next complete session (all its channels connected, HELLO_ACK sent). */
  accept(): Promise<DestLink>;
  close(): void;
}

/** Listen for migration sessions. */
export function listenTcpLink(opts: { host: string; port: number }): Promise<TcpListener> {
  const server: Server = createServer({ noDelay: true });
  interface Pending {
    socks: Socket[];
    readers: FrameReader[];
    want: number;
  }
  const sessions = new Map<string, Pending>();
  const ready: DestLink[] = [];
  const waiters: ((l: DestLink) => void)[] = [];
  const complete = (p: Pending) => {
    p.socks[0]!.write(jsonFrame(T.HELLO_ACK, { version: LINK_VERSION }));
    const link = new TcpDestLink(p.socks, p.readers);
    const w = waiters.shift();
    if (w) w(link);
    else ready.push(link);
  };
  server.on('connection', (sock: Socket) => {
    const reader = new FrameReader();
    const onData = (c: Buffer) => {
      reader.push(c);
      let f: Frame | null;
      try {
        f = reader.next();
      } catch {
        sock.destroy();
        return;
      }
      if (!f) return;
      sock.off('data', onData);
      sock.pause();
      if (f.type === T.HELLO) {
        const h = parseJson<{ version: number; session: string; channels: number }>(f);
        if (h.version !== LINK_VERSION) {
          sock.end(jsonFrame(T.ERROR, { message: `unsupported stream version ${h.version} (this receiver speaks ${LINK_VERSION})` }));
          return;
        }
        const p = sessions.get(h.session) ?? { socks: [], readers: [], want: h.channels };
        p.want = h.channels;
        p.socks[0] = sock;
        p.readers[0] = reader;
        sessions.set(h.session, p);
        if (p.socks.filter(Boolean).length === p.want) complete(p);
      } else if (f.type === T.CHANNEL_HELLO) {
        const h = parseJson<{ session: string; index: number }>(f);
        const p = sessions.get(h.session) ?? { socks: [], readers: [], want: Infinity };
        p.socks[h.index] = sock;
        p.readers[h.index] = reader;
        sessions.set(h.session, p);
        if (p.socks.filter(Boolean).length === p.want) complete(p);
      } else sock.destroy();
    };
    sock.on('data', onData);
    sock.on('error', () => undefined);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host, () => {
      server.off('error', reject);
      const addr = server.address();
      const port = typeof addr === 'object' && addr ? addr.port : opts.port;
      resolve({
        host: opts.host,
        port,
        accept: () => {
          const l = ready.shift();
          return l ? Promise.resolve(l) : new Promise((r) => waiters.push(r));
        },
        close: () => server.close(),
      });
    });
  });
}
