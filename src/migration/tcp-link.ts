// A SourceLink / DestLink over plain TCP sockets, one socket per channel, with a fixed 24-byte
// frame header. It is the migration layer's own transport so that pre-copy works whatever the
// state of the wire helper's stream/transport modules (see link.ts for the ordering rules).
//
// Frames are tcp-frames.ts's. Handshake: channel 0 sends HELLO {version, session, channels},
// channels 1.. send CHANNEL_HELLO {session, index}; once all have joined, the destination
// answers HELLO_ACK on channel 0. Replies (READY, SYNCED, COMPLETE, ERROR) travel on channel 0.
//
// Concurrency: single-threaded (event loop); sockets are owned by the link object.
import { randomBytes } from 'node:crypto';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { MigrationLinkError, type DestLink, type DestRecord, type SourceLink, type SourceRecord } from './link.ts';
import { decodeDest, decodeSource, encodeDest, encodeSource, FrameReader, jsonFrame, LINK_VERSION, parseJson, T, type Frame } from './tcp-frames.ts';

export { LINK_VERSION };

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
