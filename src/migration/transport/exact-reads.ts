// Reading a connection's preamble (auth.ts, tls.ts) a few exact bytes at a time, before the
// socket is handed to a Channel.
//
// The preambles are lock-step: a side sends its next message only after it has the other's, so
// when the last preamble read returns nothing more is in flight and the socket can be handed over
// without losing a byte. finish() checks that (bytes beyond the preamble are a protocol error)
// and leaves the socket as the Channel expects it: paused, no listeners of ours, and where the
// Channel will take over the TCP handle for slab reads (slab-reads.ts, the fast path), the
// handle not reading.

import type { Socket } from 'node:net';
import { MigrationTransportError, describeSocketError } from './errors.ts';

export class ExactReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private failure: Error | null = null;
  private ended = false;
  private wake: (() => void) | null = null;
  private readonly onData = (c: Buffer): void => {
    this.chunks.push(c);
    this.buffered += c.length;
    this.notify();
  };
  private readonly onError = (e: Error): void => {
    this.failure ??= e;
    this.notify();
  };
  private readonly onEnd = (): void => {
    this.ended = true;
    this.notify();
  };

  constructor(
    private readonly socket: Socket,
    /** Names the peer in errors ("source 10.0.0.1:5555"). */
    private readonly who: string,
  ) {
    socket.on('data', this.onData);
    socket.on('error', this.onError);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.resume();
  }

  private notify(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  /** Whatever has arrived, up to `n` bytes, without waiting (may be empty). */
  peek(n: number): Buffer {
    return Buffer.concat(this.chunks).subarray(0, n);
  }

  /**
   * Exactly `n` bytes. Rejects when the peer closes or fails first, or after `deadline` (a
   * Date.now() value), naming `what` was awaited.
   */
  async read(n: number, deadline: number, what: string): Promise<Buffer> {
    while (this.buffered < n) {
      if (this.failure) throw new MigrationTransportError('handshake', `${this.who}: ${describeSocketError(this.failure)} while waiting for ${what}`);
      if (this.ended) throw new MigrationTransportError('handshake', `${this.who} closed the connection while we waited for ${what}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new MigrationTransportError('handshake', `${this.who} sent no ${what} in time`);
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        this.wake = resolve;
        timer = setTimeout(resolve, left);
      });
      clearTimeout(timer);
    }
    const all = Buffer.concat(this.chunks);
    this.chunks = [all.subarray(n)];
    this.buffered -= n;
    return all.subarray(0, n);
  }

  /**
   * Hand the socket on: nothing may be left over (see the header). `forSlabReads`: the next owner
   * re-wraps the socket's TCP handle (slab-reads.ts), so its reads are stopped here. Only then:
   * a socket read on with 'data' events must keep its handle reading (node's stream state still
   * counts the read it started as pending, and would never start another).
   */
  finish(forSlabReads = false): void {
    this.socket.off('data', this.onData);
    this.socket.off('error', this.onError);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    this.socket.pause();
    const handle = (this.socket as unknown as { _handle?: { reading?: boolean; readStop?: () => number } | null })._handle;
    // Stop the kernel reads node started for our 'data' listener, so the Channel may re-wrap
    // the handle for slab reads (slab-reads.ts takes only a handle that is not reading).
    if (forSlabReads && handle && handle.reading && typeof handle.readStop === 'function' && !('encrypted' in this.socket)) {
      handle.reading = false;
      handle.readStop();
    }
    if (this.buffered > 0) {
      throw new MigrationTransportError('handshake', `${this.who} sent ${this.buffered} bytes before the handshake was over`);
    }
  }

  /** Stop listening without handing over (the connection is being dropped). */
  abandon(): void {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    // Keep an error listener: a reset after we gave up must not become an uncaught exception.
    this.socket.off('error', this.onError);
    this.socket.on('error', () => undefined);
  }
}
