// Large socket reads into recycled slabs, for the receiving side.
//
// By default node reads a TCP socket 64 KiB at a time into a fresh buffer per read: at GB/s
// that is ~16k reads, 16k buffers and ~260k first-touch page faults per GiB, and V8 collects
// garbage constantly because of the external memory. net.Socket's `onread` option instead lets
// reads land in memory we provide: we hand out the free tail of a 4 MiB slab, so one read takes
// whatever the kernel has (often MiBs) and a chunk is a view into the slab.
//
// Recycling rule (single thread, no locks): a slab that has been filled ("retired") goes back to
// the free list once the decoder has consumed every byte of it (its end offset <= the decoder's
// bytesConsumed) AND the consumer has asked for the next record, which the owner signals by
// calling release() at the start of each Channel.next(). So a RAM record's data view is valid
// until the next record is requested from the same channel, not longer. Owners that keep data
// longer must pass recycle=false (slabs are then left to GC, as with node's own buffers).
//
// Server-side sockets cannot be given `onread` through node's public API (net.Server constructs
// them), so a connection accepted with pauseOnConnect is re-wrapped around its handle, which
// has not started reading yet. If that internal shape is not there (another node version) the
// socket is used as is, with 'data' events: slower, same behaviour.

import { Socket } from 'node:net';

const SLAB_BYTES = 4 << 20;
const MIN_READ_BYTES = 256 << 10;
const MAX_FREE_SLABS = 8;

export type ChunkSink = (chunk: Buffer) => void;

export class SlabReader {
  private slab: Buffer = Buffer.allocUnsafe(SLAB_BYTES);
  private used = 0;
  /** Total bytes delivered so far = stream offset of the next byte. */
  private received = 0;
  private readonly retired: { buf: Buffer; endOffset: number }[] = [];
  private readonly free: Buffer[] = [];
  slabsAllocated = 1;

  constructor(
    private readonly onChunk: ChunkSink,
    private readonly recycle: boolean,
  ) {}

  readonly buffer = (): Buffer => {
    if (this.slab.length - this.used < MIN_READ_BYTES) {
      if (this.recycle) this.retired.push({ buf: this.slab, endOffset: this.received });
      const reused = this.free.pop();
      if (!reused) this.slabsAllocated++;
      this.slab = reused ?? Buffer.allocUnsafe(SLAB_BYTES);
      // Keep slab offset = stream offset (mod 8): a stream whose records keep page data 8-byte
      // aligned then delivers it aligned (copies into guest memory are word-wise only then).
      this.used = this.received & 7;
    }
    return this.slab.subarray(this.used);
  };

  readonly callback = (nread: number, buf: Buffer): boolean => {
    this.used += nread;
    this.received += nread;
    this.onChunk(buf.subarray(0, nread));
    return true;
  };

  /** Everything before stream offset `consumedOffset` is consumed and released by its reader. */
  release(consumedOffset: number): void {
    while (this.retired.length > 0 && this.retired[0]!.endOffset <= consumedOffset) {
      const { buf } = this.retired.shift()!;
      if (this.free.length < MAX_FREE_SLABS) this.free.push(buf);
    }
  }
}

/**
 * Re-wrap `socket` (accepted with pauseOnConnect) so its data reaches onChunk through slab
 * reads. Returns the socket to use from now on, and the SlabReader (undefined on the fallback).
 */
export function adoptWithSlabReads(socket: Socket, onChunk: ChunkSink, recycle: boolean): { socket: Socket; reader?: SlabReader } {
  const internal = socket as unknown as { _handle?: { readStart?: unknown; reading?: boolean } | null };
  const handle = internal._handle;
  if (!handle || typeof handle.readStart !== 'function' || handle.reading) {
    socket.on('data', onChunk);
    socket.resume();
    return { socket };
  }
  internal._handle = null; // the old wrapper must not touch the handle again
  const reader = new SlabReader(onChunk, recycle);
  const adopted = new Socket({ handle, readable: true, writable: true, onread: reader } as ConstructorParameters<typeof Socket>[0]);
  // The server counts the accepted wrapper as open until it is destroyed (server.close() waits
  // for that); destroying it with no handle only does that bookkeeping.
  adopted.once('close', () => socket.destroy());
  adopted.resume();
  return { socket: adopted, reader };
}
