// Incremental stream decoder: socket chunks go in with push(), whole records come out of next()
// (null when more bytes are needed). A record may straddle any number of chunks and a chunk may
// hold many records. next() is pull-based so a reader can stop at a SYNC barrier and leave the
// rest of the chunk buffered.
//
// Validation: a header's type, direction, flags, reserved bits and payload length are checked
// as soon as its 8 bytes are here; a RAM record's slot, firstPage, count, encoding and data
// length are checked against the StreamLayout as soon as its 16-byte RAM header is here, before
// any page is handed out. After the first error the decoder is poisoned and rethrows it.
//
// Allocation: raw RAM data is handed out as page-granular views into the pushed chunks (a wire
// record larger than what has arrived comes out as several RAM records of whole pages, in order);
// only a page that straddles two chunks is copied (into a fresh 4 KiB array). Views stay valid as
// long as the caller does not modify the pushed chunks. lz4 and JSON payloads are assembled whole.

import {
  MAX_CHANNELS,
  MAX_DETAILS_BYTES,
  MAX_PAGES_PER_RECORD,
  MAX_DISCARD_PAGES,
  MigrationStreamError,
  RAM_HEADER_BYTES,
  RECORD_HEADER_BYTES,
  RamEncoding,
  RecordType,
  STREAM_MAGIC,
  STREAM_PAGE_SIZE,
  STREAM_VERSION,
  TYPE_NAMES,
  payloadBounds,
  typeAllowed,
  type MigrationRecord,
  type StreamDirection,
} from './format.ts';
import { StreamLayout, parseJsonPayload } from './layout.ts';
import { decompressPages } from './lz4.ts';

export interface DecoderOptions {
  direction: StreamDirection;
  /** Memslots to check pages against; for a destination it is set from CONFIG (setLayout). */
  layout?: StreamLayout;
}

type State = 'header' | 'payload' | 'ram-header' | 'ram-data';

const MAGIC = Buffer.from(STREAM_MAGIC, 'latin1');

function u32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16)) + b[o + 3]! * 0x1000000;
}
const textDecoder = new TextDecoder('utf-8');

export class StreamDecoder {
  readonly direction: StreamDirection;
  private layout: StreamLayout | undefined;
  private chunks: Uint8Array[] = [];
  private head = 0;
  private headOff = 0;
  private buffered = 0;
  private readonly scratch = new Uint8Array(32);
  private smallOff = 0;

  private state: State = 'header';
  private type = 0;
  private payloadLength = 0;
  private recordOffset = 0;
  private ramSlot = 0;
  private ramNextPage = 0;
  private ramPagesLeft = 0;
  private poisoned: MigrationStreamError | undefined;

  /** Bytes consumed from the stream so far (headers and payloads handed out). */
  bytesConsumed = 0;
  /** Wire records fully decoded. */
  recordsDecoded = 0;

  constructor(opts: DecoderOptions) {
    this.direction = opts.direction;
    this.layout = opts.layout;
  }

  setLayout(layout: StreamLayout): void {
    this.layout = layout;
  }

  /** Bytes pushed but not yet consumed. */
  get bufferedBytes(): number {
    return this.buffered;
  }

  /** True when the decoder stands between records (a clean place for the stream to end). */
  get atRecordBoundary(): boolean {
    return this.state === 'header' && this.buffered === 0;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
  }

  /** The stream ended: throw 'truncated' when it ended inside a record. */
  finish(): void {
    if (this.poisoned) throw this.poisoned;
    if (!this.atRecordBoundary) {
      const inside = this.state === 'header' ? 'a record header' : `a ${TYPE_NAMES[this.type]} record`;
      this.fail('truncated', `stream ended inside ${inside} at offset ${this.recordOffset} (${this.buffered} bytes left over)`);
    }
  }

  /** The next record, or null when the buffered bytes do not complete one yet. */
  next(): MigrationRecord | null {
    if (this.poisoned) throw this.poisoned;
    try {
      return this.step();
    } catch (e) {
      if (e instanceof MigrationStreamError) this.poisoned = e;
      throw e;
    }
  }

  private step(): MigrationRecord | null {
    for (;;) {
      switch (this.state) {
        case 'header': {
          if (this.buffered < RECORD_HEADER_BYTES) return null;
          this.recordOffset = this.bytesConsumed;
          const h = this.takeSmall(RECORD_HEADER_BYTES);
          const o = this.smallOff;
          this.checkHeader(h[o]!, h[o + 1]!, h[o + 2]! | (h[o + 3]! << 8), u32(h, o + 4));
          this.state = this.type === RecordType.RAM ? 'ram-header' : 'payload';
          continue;
        }
        case 'ram-header': {
          if (this.buffered < RAM_HEADER_BYTES) return null;
          const h = this.takeSmall(RAM_HEADER_BYTES);
          const o = this.smallOff;
          const slot = u32(h, o);
          const firstPage = u32(h, o + 4);
          const count = u32(h, o + 8);
          const encoding = h[o + 12]!;
          const reserved = h[o + 13]! | h[o + 14]! | h[o + 15]!;
          const dataBytes = this.payloadLength - RAM_HEADER_BYTES;
          if (reserved !== 0) this.fail('bad-reserved', `RAM reserved bytes are not zero`);
          if (encoding !== RamEncoding.RAW && encoding !== RamEncoding.LZ4) {
            this.fail('bad-encoding', `RAM encoding ${encoding}: only 0 (raw) and 1 (lz4) exist`);
          }
          if (count < 1 || count > MAX_PAGES_PER_RECORD) {
            this.fail('out-of-range', `RAM count ${count}: must be 1..${MAX_PAGES_PER_RECORD}`);
          }
          this.checkRange('RAM', slot, firstPage, count);
          if (encoding === RamEncoding.RAW && dataBytes !== count * STREAM_PAGE_SIZE) {
            this.fail('bad-data-length', `RAM raw data length ${dataBytes} != count ${count} * 4096 (slot ${slot} firstPage ${firstPage})`);
          }
          this.ramSlot = slot;
          this.ramNextPage = firstPage;
          this.ramPagesLeft = count;
          if (encoding === RamEncoding.LZ4) {
            if (this.buffered < dataBytes) {
              this.state = 'payload';
              this.payloadLength = dataBytes; // remaining: the lz4 block
              return null;
            }
            return this.lz4Record(this.take(dataBytes));
          }
          this.state = 'ram-data';
          continue;
        }
        case 'ram-data':
          return this.ramFragment();
        case 'payload': {
          if (this.buffered < this.payloadLength) return null;
          const payload = this.take(this.payloadLength);
          if (this.type === RecordType.RAM) return this.lz4Record(payload);
          this.state = 'header';
          this.recordsDecoded++;
          return this.decodePayload(payload);
        }
      }
    }
  }

  private checkHeader(type: number, flags: number, reserved: number, length: number): void {
    this.type = type;
    const bounds = payloadBounds(type);
    if (!bounds) this.fail('unknown-type', `unknown record type ${type} at offset ${this.recordOffset}`);
    const name = TYPE_NAMES[type]!;
    if (!typeAllowed(type, this.direction)) {
      this.fail('wrong-direction', `${name} record (type ${type}) is not valid on a stream ${this.direction}`);
    }
    if (flags !== 0) this.fail('bad-flags', `${name} flags = 0x${flags.toString(16)}: no flags are defined in version ${STREAM_VERSION}`);
    if (reserved !== 0) this.fail('bad-reserved', `${name} header reserved = 0x${reserved.toString(16)}, must be 0`);
    const [min, max] = bounds!;
    if (length > max) {
      this.fail(min === max ? 'bad-length' : 'oversize', `${name} payloadLength ${length} exceeds the maximum ${max}`);
    }
    if (length < min) this.fail('bad-length', `${name} payloadLength ${length} is below the minimum ${min}`);
    this.payloadLength = length;
  }

  private checkRange(what: string, slot: number, firstPage: number, count: number): void {
    if (!this.layout) this.fail('no-config', `${what} record before CONFIG: no memslots to check slot ${slot} against`);
    try {
      this.layout!.checkRange(what, slot, firstPage, count);
    } catch (e) {
      if (e instanceof MigrationStreamError) this.fail(e.code, e.message);
      throw e;
    }
  }

  private ramFragment(): MigrationRecord | null {
    const chunk = this.chunks[this.head];
    const inChunk = chunk ? chunk.length - this.headOff : 0;
    let count: number;
    let data: Uint8Array;
    if (inChunk >= STREAM_PAGE_SIZE) {
      count = Math.min(this.ramPagesLeft, Math.floor(inChunk / STREAM_PAGE_SIZE));
      data = chunk!.subarray(this.headOff, this.headOff + count * STREAM_PAGE_SIZE);
      this.consume(data.length);
    } else if (this.buffered >= STREAM_PAGE_SIZE) {
      count = 1;
      data = this.take(STREAM_PAGE_SIZE);
    } else {
      return null;
    }
    const rec: MigrationRecord = { kind: 'ram', slot: this.ramSlot, firstPage: this.ramNextPage, count, data };
    this.ramNextPage += count;
    this.ramPagesLeft -= count;
    if (this.ramPagesLeft === 0) {
      this.state = 'header';
      this.recordsDecoded++;
    }
    return rec;
  }

  private lz4Record(block: Uint8Array): MigrationRecord {
    const count = this.ramPagesLeft;
    const what = `RAM slot ${this.ramSlot} firstPage ${this.ramNextPage} count ${count}`;
    let data: Uint8Array;
    try {
      data = decompressPages(what, block, count * STREAM_PAGE_SIZE);
    } catch (e) {
      if (e instanceof MigrationStreamError) this.fail(e.code, e.message);
      throw e;
    }
    this.state = 'header';
    this.ramPagesLeft = 0;
    this.recordsDecoded++;
    return { kind: 'ram', slot: this.ramSlot, firstPage: this.ramNextPage, count, data: data! };
  }

  private decodePayload(p: Uint8Array): MigrationRecord {
    const dv = new DataView(p.buffer, p.byteOffset, p.byteLength);
    switch (this.type) {
      case RecordType.HELLO:
      case RecordType.CHANNEL_HELLO: {
        const name = TYPE_NAMES[this.type];
        if (Buffer.compare(p.subarray(0, 8), MAGIC) !== 0) {
          this.fail('bad-magic', `${name} magic is ${JSON.stringify(Buffer.from(p.subarray(0, 8)).toString('latin1'))}, expected "${STREAM_MAGIC}"`);
        }
        const version = dv.getUint16(8, true);
        this.checkVersion(name!, version);
        if (this.type === RecordType.HELLO) {
          const channels = dv.getUint16(10, true);
          if (channels < 1 || channels > MAX_CHANNELS) this.fail('out-of-range', `HELLO channels ${channels}: must be 1..${MAX_CHANNELS}`);
          return { kind: 'hello', version, channels, caps: dv.getUint32(12, true), sessionId: dv.getBigUint64(16, true) };
        }
        const channelIndex = dv.getUint16(10, true);
        if (channelIndex < 1 || channelIndex >= MAX_CHANNELS) {
          this.fail('out-of-range', `CHANNEL_HELLO channelIndex ${channelIndex}: must be 1..${MAX_CHANNELS - 1}`);
        }
        return { kind: 'channel-hello', version, channelIndex, sessionId: dv.getBigUint64(12, true) };
      }
      case RecordType.HELLO_ACK: {
        const version = dv.getUint16(0, true);
        this.checkVersion('HELLO_ACK', version);
        return { kind: 'hello-ack', version, channels: dv.getUint16(2, true), caps: dv.getUint32(4, true) };
      }
      case RecordType.CONFIG: {
        const config = parseJsonPayload('CONFIG', p);
        let layout: StreamLayout;
        try {
          layout = StreamLayout.fromConfig(config);
        } catch (e) {
          if (e instanceof MigrationStreamError) this.fail(e.code, e.message);
          throw e;
        }
        // The destination checks every later page against what CONFIG announced.
        if (this.direction === 'to-destination') this.layout = layout!;
        return { kind: 'config', config: config as never };
      }
      case RecordType.VCPU_STATE:
        return { kind: 'vcpu-state', state: parseJsonPayload('VCPU_STATE', p, p.length) };
      case RecordType.ZERO:
      case RecordType.POSTCOPY_REQUEST: {
        const slot = dv.getUint32(0, true);
        const first = dv.getUint32(4, true);
        const count = dv.getUint32(8, true);
        if (this.type === RecordType.ZERO) {
          if (count < 1 || count > MAX_PAGES_PER_RECORD) this.fail('out-of-range', `ZERO count ${count}: must be 1..${MAX_PAGES_PER_RECORD}`);
          this.checkRange('ZERO', slot, first, count);
          return { kind: 'zero', slot, firstPage: first, count };
        }
        if (count < 1 || count > MAX_PAGES_PER_RECORD) this.fail('out-of-range', `POSTCOPY_REQUEST count ${count}: must be 1..${MAX_PAGES_PER_RECORD}`);
        if (this.layout) this.checkRange('POSTCOPY_REQUEST', slot, first, count);
        return { kind: 'postcopy-request', slot, page: first, count };
      }
      case RecordType.SYNC:
        return { kind: 'sync', round: dv.getUint32(0, true) };
      case RecordType.SYNC_ACK:
        return { kind: 'sync-ack', round: dv.getUint32(0, true) };
      case RecordType.END:
      case RecordType.COMPLETE: {
        const memoryHash = dv.getBigUint64(0, true);
        const pages = dv.getBigUint64(8, true);
        if (pages > BigInt(Number.MAX_SAFE_INTEGER)) this.fail('out-of-range', `${TYPE_NAMES[this.type]} pages ${pages} is not a safe integer`);
        if (this.type === RecordType.END) {
          if (p.length !== 36) this.fail('bad-length', `END payloadLength ${p.length}, must be 36`);
          return { kind: 'end', memoryHash, pages: Number(pages), configDigest: dv.getBigUint64(16, true), vcpuStateDigest: dv.getBigUint64(24, true), vcpuStates: dv.getUint32(32, true) };
        }
        if (p.length === 16) return { kind: 'complete', memoryHash, pages: Number(pages) };
        const details = parseJsonPayload('COMPLETE details', p.subarray(16), MAX_DETAILS_BYTES);
        if (details === null || typeof details !== 'object' || Array.isArray(details)) {
          this.fail('bad-json', 'COMPLETE details is not a JSON object');
        }
        return { kind: 'complete', memoryHash, pages: Number(pages), details: details as Record<string, unknown> };
      }
      case RecordType.POSTCOPY_DISCARD: {
        const slot = dv.getUint32(0, true);
        const firstPage = dv.getUint32(4, true);
        const count = dv.getUint32(8, true);
        if (count < 1 || count > MAX_DISCARD_PAGES) this.fail('out-of-range', `POSTCOPY_DISCARD count ${count}: must be 1..${MAX_DISCARD_PAGES}`);
        const bytes = Math.ceil(count / 8);
        if (p.length !== 12 + bytes) this.fail('bad-length', `POSTCOPY_DISCARD payloadLength ${p.length}, count ${count} needs 12 + ${bytes}`);
        if (count % 8 !== 0 && (p[12 + bytes - 1]! >> (count % 8)) !== 0) this.fail('bad-reserved', `POSTCOPY_DISCARD bits past count ${count} are not zero`);
        if (this.layout) this.checkRange('POSTCOPY_DISCARD', slot, firstPage, count);
        else if (firstPage + count > 2 ** 32) this.fail('out-of-range', `POSTCOPY_DISCARD firstPage ${firstPage} + count ${count} overflows u32`);
        return { kind: 'postcopy-discard', slot, firstPage, count, bitmap: p.slice(12) };
      }
      case RecordType.POSTCOPY_RUN: {
        const pages = dv.getBigUint64(8, true);
        const missing = dv.getBigUint64(36, true);
        if (pages > BigInt(Number.MAX_SAFE_INTEGER) || missing > BigInt(Number.MAX_SAFE_INTEGER)) this.fail('out-of-range', `POSTCOPY_RUN pages ${pages} / missingPages ${missing} is not a safe integer`);
        return { kind: 'postcopy-run', memoryHash: dv.getBigUint64(0, true), pages: Number(pages), configDigest: dv.getBigUint64(16, true), vcpuStateDigest: dv.getBigUint64(24, true), vcpuStates: dv.getUint32(32, true), missingPages: Number(missing) };
      }
      case RecordType.POSTCOPY_HELLO: {
        if (Buffer.compare(p.subarray(0, 8), MAGIC) !== 0) this.fail('bad-magic', `POSTCOPY_HELLO magic is ${JSON.stringify(Buffer.from(p.subarray(0, 8)).toString('latin1'))}, expected "${STREAM_MAGIC}"`);
        const version = dv.getUint16(8, true);
        this.checkVersion('POSTCOPY_HELLO', version);
        const role = dv.getUint16(10, true);
        if (role > 1) this.fail('out-of-range', `POSTCOPY_HELLO role ${role}: must be 0 (push) or 1 (preempt)`);
        return { kind: 'postcopy-hello', version, role, token: dv.getBigUint64(12, true) };
      }
      case RecordType.READY:
        return { kind: 'ready' };
      case RecordType.GO:
        return { kind: 'go' };
      case RecordType.STARTED:
        return { kind: 'started' };
      case RecordType.ERROR: {
        if (dv.getUint16(2, true) !== 0) this.fail('bad-reserved', 'ERROR reserved field is not zero');
        return { kind: 'error', code: dv.getUint16(0, true), message: textDecoder.decode(p.subarray(4)) };
      }
    }
    // checkHeader admitted only known types.
    throw new Error(`unreachable: record type ${this.type}`);
  }

  private checkVersion(name: string, version: number): void {
    if (version !== STREAM_VERSION) {
      // Name both versions and both roles: the operator must know which side to upgrade.
      const [peer, self] = this.direction === 'to-destination' ? ['source', 'destination'] : ['destination', 'source'];
      this.fail('bad-version', `incompatible peer: the ${peer} speaks stream version ${version} (${name}), this ${self} speaks version ${STREAM_VERSION} only`);
    }
  }

  private fail(code: MigrationStreamError['code'], message: string): never {
    throw new MigrationStreamError(code, message);
  }

  private consume(n: number): void {
    this.buffered -= n;
    this.bytesConsumed += n;
    this.headOff += n;
    while (this.head < this.chunks.length && this.headOff >= this.chunks[this.head]!.length) {
      this.headOff -= this.chunks[this.head]!.length;
      this.head++;
    }
    if (this.head > 32) {
      this.chunks = this.chunks.slice(this.head);
      this.head = 0;
    }
  }

  /** n contiguous bytes: a view when they sit in one chunk, else a fresh copy. */
  private take(n: number): Uint8Array {
    const chunk = this.chunks[this.head];
    if (n === 0) return new Uint8Array(0);
    if (chunk && chunk.length - this.headOff >= n) {
      const v = chunk.subarray(this.headOff, this.headOff + n);
      this.consume(n);
      return v;
    }
    return this.copyOut(new Uint8Array(n));
  }

  /**
   * n <= 32 contiguous bytes, read in place when they sit in one chunk, else through the
   * scratch buffer: returns the array, with the first byte at this.smallOff. Valid until the
   * next call.
   */
  private takeSmall(n: number): Uint8Array {
    const chunk = this.chunks[this.head]!;
    if (chunk.length - this.headOff >= n) {
      this.smallOff = this.headOff;
      this.consume(n);
      return chunk;
    }
    this.smallOff = 0;
    return this.copyOut(this.scratch.subarray(0, n));
  }

  private copyOut(dst: Uint8Array): Uint8Array {
    let done = 0;
    while (done < dst.length) {
      const chunk = this.chunks[this.head]!;
      const k = Math.min(dst.length - done, chunk.length - this.headOff);
      dst.set(chunk.subarray(this.headOff, this.headOff + k), done);
      done += k;
      this.consume(k);
    }
    return dst;
  }
}
