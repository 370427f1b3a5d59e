// One post-copy connection (stream/format.ts, "Post-copy"): records of the versioned stream over
// a plain TCP socket, unbatched, each written as soon as it is sent -- a page request and its
// answer must not wait for a batch to fill. Incoming bytes go through the same StreamDecoder
// as every other connection (direction and, where a layout is set, page ranges are checked).
//
// Concurrency: main thread only (socket events).
import { connect as netConnect, type Socket } from 'node:net';
import { encodeToBytes } from '../stream/encoder.ts';
import { StreamDecoder } from '../stream/decoder.ts';
import { describeErrorCode, type MigrationRecord, type StreamDirection } from '../stream/format.ts';
import type { StreamLayout } from '../stream/layout.ts';
import { MigrationLinkError } from '../link.ts';

export class RecordSocket {
  private readonly decoder: StreamDecoder;
  private ended: Error | null = null;
  private readonly closeListeners: ((e: Error) => void)[] = [];
  /** Called for each decoded record, in order. A throw fails the connection with that error. */
  onRecord: (rec: MigrationRecord) => void = () => undefined;
  bytesSent = 0;

  constructor(
    readonly socket: Socket,
    incoming: StreamDirection,
    layout?: StreamLayout,
    readonly name = 'post-copy connection',
  ) {
    socket.setNoDelay(true);
    this.decoder = new StreamDecoder({ direction: incoming, layout });
    socket.on('data', (chunk: Buffer) => {
      if (this.ended) return;
      try {
        this.decoder.push(chunk);
        for (let r = this.decoder.next(); r && !this.ended; r = this.decoder.next()) {
          if (r.kind === 'error') throw new MigrationLinkError(`the peer reported ${describeErrorCode(r.code)} on the ${this.name}: ${r.message}`, r.code);
          this.onRecord(r);
        }
      } catch (e) {
        this.fail(e as Error);
      }
    });
    socket.on('error', (e) => this.fail(new MigrationLinkError(`${this.name} failed: ${e.message}`)));
    socket.on('close', () => this.fail(new MigrationLinkError(`${this.name} closed by the peer`)));
  }

  get closed(): Error | null {
    return this.ended;
  }

  /** Resolves once the socket takes more (TCP back-pressure); rejects once the connection is gone. */
  async send(rec: MigrationRecord): Promise<void> {
    if (this.ended) throw this.ended;
    const bytes = encodeToBytes(rec);
    this.bytesSent += bytes.length;
    if (!this.socket.write(bytes)) {
      await new Promise<void>((resolve, reject) => {
        const onDrain = () => (this.closeListeners.splice(this.closeListeners.indexOf(onClose), 1), resolve());
        const onClose = (e: Error) => (this.socket.off('drain', onDrain), reject(e));
        this.socket.once('drain', onDrain);
        this.closeListeners.push(onClose);
      });
    }
  }

  /** Called once, when the connection ends for any reason. */
  onClose(listener: (e: Error) => void): void {
    if (this.ended) listener(this.ended);
    else this.closeListeners.push(listener);
  }

  /** Send ERROR (best effort) and close. */
  abort(code: number, message: string): void {
    if (this.ended) return;
    try {
      this.socket.end(encodeToBytes({ kind: 'error', code, message }));
    } catch {
      this.socket.destroy();
    }
    this.fail(new MigrationLinkError(message, code));
  }

  destroy(err?: Error): void {
    this.fail(err ?? new MigrationLinkError(`${this.name} destroyed`));
  }

  private fail(err: Error): void {
    if (this.ended) return;
    this.ended = err;
    this.socket.destroy();
    for (const l of this.closeListeners.splice(0)) l(err);
  }
}

export function connectSocket(host: string, port: number, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = netConnect({ host, port });
    const t = setTimeout(() => (s.destroy(), reject(new MigrationLinkError(`cannot connect to ${host}:${port} within ${timeoutMs} ms`))), timeoutMs);
    s.once('connect', () => (clearTimeout(t), s.removeAllListeners('error'), resolve(s)));
    s.once('error', (e) => (clearTimeout(t), reject(new MigrationLinkError(`cannot connect to ${host}:${port}: ${e.message}`))));
  });
}
