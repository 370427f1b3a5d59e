// lz4 for RAM records (encoding 1). lz4-napi's block functions use lz4_flex's "size prepended"
// layout: a 4-byte little-endian uncompressed size, then the lz4 block. The decompressor sizes its
// output buffer from that prefix, so the prefix is checked against the record's count*4096
// BEFORE decompressing: a hostile prefix cannot make us allocate gigabytes.

import { compressSync, uncompressSync } from 'lz4-napi';
import { MigrationStreamError } from './format.ts';

const LZ4_PREFIX_BYTES = 4;

function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/**
 * Compress page data; returns undefined when lz4 does not save at least 1/8 of the bytes (random
 * data gets slightly bigger, and decompression is not free).
 */
export function compressPages(data: Uint8Array): Buffer | undefined {
  const block = compressSync(asBuffer(data));
  return block.length <= data.length - (data.length >>> 3) ? block : undefined;
}

/** Undo compressPages; the result must be exactly `expectedBytes` long. */
export function decompressPages(what: string, block: Uint8Array, expectedBytes: number): Buffer {
  if (block.length < LZ4_PREFIX_BYTES + 1) {
    throw new MigrationStreamError('bad-lz4', `${what}: lz4 block of ${block.length} bytes is too short`);
  }
  const declared = block[0]! | (block[1]! << 8) | (block[2]! << 16) | (block[3]! * 2 ** 24);
  if (declared !== expectedBytes) {
    throw new MigrationStreamError(
      'bad-lz4',
      `${what}: lz4 size prefix ${declared} != count*4096 = ${expectedBytes}`,
    );
  }
  let out: Buffer;
  try {
    out = uncompressSync(block);
  } catch (e) {
    throw new MigrationStreamError('bad-lz4', `${what}: lz4 block does not decompress (${(e as Error).message})`);
  }
  if (out.length !== expectedBytes) {
    throw new MigrationStreamError(
      'bad-lz4',
      `${what}: lz4 block decompressed to ${out.length} bytes, expected ${expectedBytes}`,
    );
  }
  return out;
}
