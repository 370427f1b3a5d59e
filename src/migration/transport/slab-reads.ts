// Large socket reads for the receiving side. By default node reads a TCP socket 64 KiB at a
// time into a fresh buffer per read; at GB/s that is ~16k reads per GiB, each a syscall, a
// buffer and a 'data' event. net.Socket's `onread` option instead lets reads land in memory we
// provide: we hand out the free tail of a 4 MiB slab, so one read takes whatever the kernel has
// (often MiBs) and a chunk is just a view. A slab region is never handed out twice; a new slab
// starts when the tail gets short, and old slabs are freed by GC once no view refers to them, so
// chunks stay valid for as long as the decoder or its caller holds them.
//
// Server-side sockets cannot be given `onread` through node's public API (net.Server constructs
// them), so a connection accepted with pauseOnConnect is re-wrapped around its handle, which
// has not started reading yet. If that internal shape is not there (another node version) the
// socket is used as is, with 'data' events: slower, same behaviour.

import { Socket } from 'node:net';

const SLAB_BYTES = 4 << 20;
const MIN_READ_BYTES = 256 << 10;

export type ChunkSink = (chunk: Buffer) => void;

function slabReader(onChunk: ChunkSink) {
  let slab = Buffer.allocUnsafe(SLAB_BYTES);
  let used = 0;
  return {
    buffer: (): Buffer => {
      if (slab.length - used < MIN_READ_BYTES) {
        slab = Buffer.allocUnsafe(SLAB_BYTES);
        used = 0;
      }
      return slab.subarray(used);
    },
    callback: (nread: number, buf: Buffer): boolean => {
      used += nread;
      onChunk(buf.subarray(0, nread));
      return true;
    },
  };
}

/**
 * A socket delivering its data to onChunk in large reads. `socket` must have been accepted with
 * pauseOnConnect (server side). Returns the socket to use from now on.
 */
export function adoptWithSlabReads(socket: Socket, onChunk: ChunkSink): Socket {
  const internal = socket as unknown as { _handle?: { readStart?: unknown; reading?: boolean } | null };
  const handle = internal._handle;
  if (!handle || typeof handle.readStart !== 'function' || handle.reading) {
    socket.on('data', onChunk);
    socket.resume();
    return socket;
  }
  internal._handle = null; // the old wrapper must not touch the handle again
  const adopted = new Socket({ handle, readable: true, writable: true, onread: slabReader(onChunk) } as ConstructorParameters<typeof Socket>[0]);
  // The server counts the accepted wrapper as open until it is destroyed (server.close() waits
  // for that); destroying it with no handle only does that bookkeeping.
  adopted.once('close', () => socket.destroy());
  adopted.resume();
  return adopted;
}
