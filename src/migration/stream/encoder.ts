// Record encoder: writes records (format.ts) into a caller-owned buffer at an offset, so a
// channel can pack many records into one reusable batch and hand the batch to the socket in a
// single write. Nothing here allocates except JSON payloads (CONFIG, VCPU_STATE, ERROR text).
// Outbound records are checked against the same bounds the decoder enforces: a sender cannot
// produce a stream its peer would reject for size.

import {
  KIND_TO_TYPE,
  MAX_CONFIG_BYTES,
  MAX_DETAILS_BYTES,
  MAX_DISCARD_PAGES,
  MAX_ERROR_MESSAGE_BYTES,
  MAX_PAGES_PER_RECORD,
  MAX_PAYLOAD_BYTES,
  MigrationStreamError,
  RAM_HEADER_BYTES,
  RECORD_HEADER_BYTES,
  RamEncoding,
  RecordType,
  STREAM_MAGIC,
  STREAM_PAGE_SIZE,
  type MigrationRecord,
  type RamEncodingCode,
} from './format.ts';

const MAGIC_BYTES = Buffer.from(STREAM_MAGIC, 'latin1');

function views(dst: Uint8Array): DataView {
  return new DataView(dst.buffer, dst.byteOffset, dst.byteLength);
}

function putU32(dst: Uint8Array, off: number, v: number): void {
  dst[off] = v & 0xff;
  dst[off + 1] = (v >>> 8) & 0xff;
  dst[off + 2] = (v >>> 16) & 0xff;
  dst[off + 3] = (v >>> 24) & 0xff;
}

function writeHeader(dv: DataView, off: number, type: number, payloadLength: number): void {
  dv.setUint8(off, type);
  dv.setUint8(off + 1, 0);
  dv.setUint16(off + 2, 0, true);
  dv.setUint32(off + 4, payloadLength, true);
}

function checkU32(what: string, v: number): void {
  if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) {
    throw new MigrationStreamError('out-of-range', `${what} = ${v}: not a u32`);
  }
}

function checkPageRun(what: string, slot: number, firstPage: number, count: number): void {
  checkU32(`${what} slot`, slot);
  checkU32(`${what} firstPage`, firstPage);
  if (!Number.isInteger(count) || count < 1 || count > MAX_PAGES_PER_RECORD) {
    throw new MigrationStreamError('out-of-range', `${what} count = ${count}: must be 1..${MAX_PAGES_PER_RECORD}`);
  }
  if (firstPage + count > 2 ** 32) {
    throw new MigrationStreamError('out-of-range', `${what} firstPage ${firstPage} + count ${count} overflows u32`);
  }
}

function jsonPayload(what: string, value: unknown, max: number): Buffer {
  const bytes = Buffer.from(JSON.stringify(value) ?? 'null', 'utf8');
  if (bytes.length > max) {
    throw new MigrationStreamError('oversize', `${what}: ${bytes.length} bytes of JSON, at most ${max}`);
  }
  return bytes;
}

/** ERROR text as UTF-8, cut on a character boundary to MAX_ERROR_MESSAGE_BYTES. */
function errorText(message: string): Buffer {
  const text = Buffer.from(message, 'utf8');
  if (text.length <= MAX_ERROR_MESSAGE_BYTES) return text;
  let cut = MAX_ERROR_MESSAGE_BYTES - 3;
  while (cut > 0 && (text[cut]! & 0xc0) === 0x80) cut--; // back off continuation bytes
  return Buffer.concat([text.subarray(0, cut), Buffer.from('...')]);
}

function u64(v: bigint): bigint {
  return BigInt.asUintN(64, v);
}

/**
 * Encode `rec` at dst[off..]; returns the offset after it, or -1 when it does not fit (nothing is
 * written then). RAM records are encoded raw (use writeRamHeader for lz4).
 */
export function encodeRecord(rec: MigrationRecord, dst: Uint8Array, off: number): number {
  const type = KIND_TO_TYPE[rec.kind];
  const room = dst.length - off;
  const dv = views(dst);
  switch (rec.kind) {
    case 'hello':
    case 'channel-hello': {
      const len = rec.kind === 'hello' ? 24 : 20;
      if (room < RECORD_HEADER_BYTES + len) return -1;
      writeHeader(dv, off, type, len);
      const p = off + RECORD_HEADER_BYTES;
      dst.set(MAGIC_BYTES, p);
      dv.setUint16(p + 8, rec.version, true);
      if (rec.kind === 'hello') {
        dv.setUint16(p + 10, rec.channels, true);
        dv.setUint32(p + 12, rec.caps >>> 0, true);
        dv.setBigUint64(p + 16, u64(rec.sessionId), true);
      } else {
        dv.setUint16(p + 10, rec.channelIndex, true);
        dv.setBigUint64(p + 12, u64(rec.sessionId), true);
      }
      return p + len;
    }
    case 'hello-ack': {
      if (room < RECORD_HEADER_BYTES + 8) return -1;
      writeHeader(dv, off, type, 8);
      const p = off + RECORD_HEADER_BYTES;
      dv.setUint16(p, rec.version, true);
      dv.setUint16(p + 2, rec.channels, true);
      dv.setUint32(p + 4, rec.caps >>> 0, true);
      return p + 8;
    }
    case 'config':
    case 'vcpu-state': {
      const bytes = rec.kind === 'config'
        ? jsonPayload('CONFIG', rec.config, MAX_CONFIG_BYTES)
        : jsonPayload('VCPU_STATE', rec.state, MAX_PAYLOAD_BYTES);
      if (room < RECORD_HEADER_BYTES + bytes.length) return -1;
      writeHeader(dv, off, type, bytes.length);
      dst.set(bytes, off + RECORD_HEADER_BYTES);
      return off + RECORD_HEADER_BYTES + bytes.length;
    }
    case 'ram': {
      const dataBytes = rec.count * STREAM_PAGE_SIZE;
      if (rec.data.length !== dataBytes) {
        throw new MigrationStreamError('bad-data-length', `RAM data is ${rec.data.length} bytes, count*4096 = ${dataBytes}`);
      }
      if (room < RECORD_HEADER_BYTES + RAM_HEADER_BYTES + dataBytes) return -1;
      const p = writeRamHeader(dst, off, rec.slot, rec.firstPage, rec.count, RamEncoding.RAW, dataBytes);
      dst.set(rec.data, p);
      return p + dataBytes;
    }
    case 'zero':
    case 'postcopy-request': {
      const first = rec.kind === 'zero' ? rec.firstPage : rec.page;
      checkPageRun(rec.kind === 'zero' ? 'ZERO' : 'POSTCOPY_REQUEST', rec.slot, first, rec.count);
      if (room < RECORD_HEADER_BYTES + 12) return -1;
      writeHeader(dv, off, type, 12);
      const p = off + RECORD_HEADER_BYTES;
      dv.setUint32(p, rec.slot, true);
      dv.setUint32(p + 4, first, true);
      dv.setUint32(p + 8, rec.count, true);
      return p + 12;
    }
    case 'sync':
    case 'sync-ack': {
      checkU32(`${rec.kind.toUpperCase()} round`, rec.round);
      if (room < RECORD_HEADER_BYTES + 4) return -1;
      writeHeader(dv, off, type, 4);
      dv.setUint32(off + RECORD_HEADER_BYTES, rec.round, true);
      return off + RECORD_HEADER_BYTES + 4;
    }
    case 'end':
    case 'complete': {
      if (!Number.isSafeInteger(rec.pages) || rec.pages < 0) {
        throw new MigrationStreamError('out-of-range', `${rec.kind.toUpperCase()} pages = ${rec.pages}: not a count`);
      }
      const details = rec.kind === 'complete' && rec.details !== undefined
        ? jsonPayload('COMPLETE details', rec.details, MAX_DETAILS_BYTES)
        : undefined;
      const len = rec.kind === 'end' ? 36 : 16 + (details?.length ?? 0);
      if (rec.kind === 'end') checkU32('END vcpuStates', rec.vcpuStates);
      if (room < RECORD_HEADER_BYTES + len) return -1;
      writeHeader(dv, off, type, len);
      const p = off + RECORD_HEADER_BYTES;
      dv.setBigUint64(p, u64(rec.memoryHash), true);
      dv.setBigUint64(p + 8, BigInt(rec.pages), true);
      if (rec.kind === 'end') {
        dv.setBigUint64(p + 16, u64(rec.configDigest), true);
        dv.setBigUint64(p + 24, u64(rec.vcpuStateDigest), true);
        dv.setUint32(p + 32, rec.vcpuStates, true);
      }
      if (details) dst.set(details, p + 16);
      return p + len;
    }
    case 'ready':
    case 'go':
    case 'started': {
      if (room < RECORD_HEADER_BYTES) return -1;
      writeHeader(dv, off, type, 0);
      return off + RECORD_HEADER_BYTES;
    }
    case 'postcopy-discard': {
      checkU32('POSTCOPY_DISCARD slot', rec.slot);
      checkU32('POSTCOPY_DISCARD firstPage', rec.firstPage);
      if (!Number.isInteger(rec.count) || rec.count < 1 || rec.count > MAX_DISCARD_PAGES || rec.firstPage + rec.count > 2 ** 32) {
        throw new MigrationStreamError('out-of-range', `POSTCOPY_DISCARD count = ${rec.count}: must be 1..${MAX_DISCARD_PAGES} within u32 pages`);
      }
      const bytes = Math.ceil(rec.count / 8);
      if (rec.bitmap.length !== bytes) throw new MigrationStreamError('bad-data-length', `POSTCOPY_DISCARD bitmap is ${rec.bitmap.length} bytes, ceil(count/8) = ${bytes}`);
      if (room < RECORD_HEADER_BYTES + 12 + bytes) return -1;
      writeHeader(dv, off, type, 12 + bytes);
      const p = off + RECORD_HEADER_BYTES;
      dv.setUint32(p, rec.slot, true);
      dv.setUint32(p + 4, rec.firstPage, true);
      dv.setUint32(p + 8, rec.count, true);
      dst.set(rec.bitmap, p + 12);
      // Bits past count are zero on the wire whatever the caller left there.
      if (rec.count % 8 !== 0) dst[p + 12 + bytes - 1]! &= (1 << (rec.count % 8)) - 1;
      return p + 12 + bytes;
    }
    case 'postcopy-run': {
      if (!Number.isSafeInteger(rec.pages) || rec.pages < 0 || !Number.isSafeInteger(rec.missingPages) || rec.missingPages < 0) {
        throw new MigrationStreamError('out-of-range', `POSTCOPY_RUN pages = ${rec.pages}, missingPages = ${rec.missingPages}: not counts`);
      }
      checkU32('POSTCOPY_RUN vcpuStates', rec.vcpuStates);
      if (room < RECORD_HEADER_BYTES + 44) return -1;
      writeHeader(dv, off, type, 44);
      const p = off + RECORD_HEADER_BYTES;
      dv.setBigUint64(p, u64(rec.memoryHash), true);
      dv.setBigUint64(p + 8, BigInt(rec.pages), true);
      dv.setBigUint64(p + 16, u64(rec.configDigest), true);
      dv.setBigUint64(p + 24, u64(rec.vcpuStateDigest), true);
      dv.setUint32(p + 32, rec.vcpuStates, true);
      dv.setBigUint64(p + 36, BigInt(rec.missingPages), true);
      return p + 44;
    }
    case 'postcopy-hello': {
      if (rec.role !== 0 && rec.role !== 1) throw new MigrationStreamError('out-of-range', `POSTCOPY_HELLO role = ${rec.role}: must be 0 or 1`);
      if (room < RECORD_HEADER_BYTES + 20) return -1;
      writeHeader(dv, off, type, 20);
      const p = off + RECORD_HEADER_BYTES;
      dst.set(MAGIC_BYTES, p);
      dv.setUint16(p + 8, rec.version, true);
      dv.setUint16(p + 10, rec.role, true);
      dv.setBigUint64(p + 12, u64(rec.token), true);
      return p + 20;
    }
    case 'error': {
      const text = errorText(rec.message);
      if (room < RECORD_HEADER_BYTES + 4 + text.length) return -1;
      writeHeader(dv, off, type, 4 + text.length);
      const p = off + RECORD_HEADER_BYTES;
      dv.setUint16(p, rec.code, true);
      dv.setUint16(p + 2, 0, true);
      dst.set(text, p + 4);
      return p + 4 + text.length;
    }
  }
}

/**
 * Write the record header and RAM header of a RAM record whose `dataBytes` of data the caller
 * writes at the returned offset (raw: count*4096 bytes; lz4: the size-prefixed block). The
 * caller guarantees room for RECORD_HEADER_BYTES + RAM_HEADER_BYTES + dataBytes.
 */
export function writeRamHeader(
  dst: Uint8Array,
  off: number,
  slot: number,
  firstPage: number,
  count: number,
  encoding: RamEncodingCode,
  dataBytes: number,
): number {
  checkPageRun('RAM', slot, firstPage, count);
  if (encoding === RamEncoding.RAW && dataBytes !== count * STREAM_PAGE_SIZE) {
    throw new MigrationStreamError('bad-data-length', `RAM raw data is ${dataBytes} bytes, count*4096 = ${count * STREAM_PAGE_SIZE}`);
  }
  const payload = RAM_HEADER_BYTES + dataBytes;
  if (payload > MAX_PAYLOAD_BYTES) {
    throw new MigrationStreamError('oversize', `RAM payload ${payload} bytes, at most ${MAX_PAYLOAD_BYTES}`);
  }
  // Plain byte stores: this runs once per RAM record, a DataView per call would be garbage.
  dst[off] = RecordType.RAM;
  dst[off + 1] = 0;
  dst[off + 2] = 0;
  dst[off + 3] = 0;
  putU32(dst, off + 4, payload);
  const p = off + RECORD_HEADER_BYTES;
  putU32(dst, p, slot);
  putU32(dst, p + 4, firstPage);
  putU32(dst, p + 8, count);
  putU32(dst, p + 12, encoding); // encoding u8 + 3 reserved zero bytes
  return p + RAM_HEADER_BYTES;
}

/** Bytes `rec` takes on the wire (JSON kinds are serialised to find out). */
export function encodedSize(rec: MigrationRecord): number {
  switch (rec.kind) {
    case 'ram': return RECORD_HEADER_BYTES + RAM_HEADER_BYTES + rec.count * STREAM_PAGE_SIZE;
    case 'config': return RECORD_HEADER_BYTES + jsonPayload('CONFIG', rec.config, MAX_CONFIG_BYTES).length;
    case 'vcpu-state': return RECORD_HEADER_BYTES + jsonPayload('VCPU_STATE', rec.state, MAX_PAYLOAD_BYTES).length;
    case 'error': return RECORD_HEADER_BYTES + 4 + errorText(rec.message).length;
    case 'postcopy-discard': return RECORD_HEADER_BYTES + 12 + Math.ceil(rec.count / 8);
    case 'complete':
      return RECORD_HEADER_BYTES + 16 + (rec.details === undefined ? 0 : jsonPayload('COMPLETE details', rec.details, MAX_DETAILS_BYTES).length);
    default: {
      const scratch = new Uint8Array(64);
      return encodeRecord(rec, scratch, 0);
    }
  }
}

/** Encode one record into a fresh buffer (tests, handshakes, rare control records). */
export function encodeToBytes(rec: MigrationRecord): Uint8Array {
  const out = new Uint8Array(encodedSize(rec));
  const end = encodeRecord(rec, out, 0);
  if (end !== out.length) throw new Error(`encoder size mismatch for ${rec.kind}: ${end} != ${out.length}`);
  return out;
}
