// The stage2 migration stream, version 4: what travels over every TCP connection of a migration.
// (Version 2 added GO and STARTED, the switchover commit; COMPLETE no longer means "running".
// Version 3 made END bind the whole migrated state: CONFIG and the vCPU states beside memory.
// Version 4 added post-copy: POSTCOPY_DISCARD, POSTCOPY_RUN, POSTCOPY_HELLO, and made
// POSTCOPY_REQUEST live; see "Post-copy" below.)
//
// Every record is a fixed 8-byte header and a payload, all integers little-endian:
//
//   offset size field
//   0      1    type           record type (table below); unknown types are rejected
//   1      1    flags          must be 0 (no flags are defined yet; reserved)
//   2      2    reserved       must be 0
//   4      4    payloadLength  bytes that follow; bounded per type (never above MAX_PAYLOAD_BYTES)
//   8      ...  payload
//
// Flags are never packed into address bits (QEMU's RAM_SAVE_FLAG_* live in the low bits of the
// page offset); every field here has its own bytes and is validated on its own.
//
// Source -> destination (S>D) and destination -> source (D>S) records:
//
//  type name             dir  payload (offset:size name)                            length
//  1    HELLO            S>D  0:8 magic "STAGE2MG", 8:2 version, 10:2 channels,      24
//                             12:4 caps, 16:8 sessionId
//  2    HELLO_ACK        D>S  0:2 version, 2:2 channels, 4:4 accepted caps            8
//  3    CHANNEL_HELLO    S>D  0:8 magic, 8:2 version, 10:2 channelIndex, 12:8 session 20
//  4    CONFIG           S>D  UTF-8 JSON object; must hold `memslots: {slot,pages}[]`  1..MAX_CONFIG_BYTES
//  5    RAM              S>D  0:4 slot, 4:4 firstPage, 8:4 count, 12:1 encoding,      16 + data
//                             13:3 reserved (0), 16: data
//                             encoding 0 raw: data is count*4096 bytes
//                             encoding 1 lz4: lz4 block with a 4-byte LE size prefix
//                             (lz4_flex "size prepended"); the prefix must equal
//                             count*4096 and the block must decompress to exactly that
//  6    ZERO             S>D  0:4 slot, 4:4 firstPage, 8:4 count                      12
//  7    SYNC             S>D  0:4 round: end of `round` on this channel (barrier)     4
//  8    VCPU_STATE       S>D  UTF-8 JSON (engine-opaque vCPU state)                   1..MAX_PAYLOAD_BYTES
//  9    END              S>D  0:8 memoryHash, 8:8 pages, 16:8 configDigest,           36
//                             24:8 vcpuStateDigest, 32:4 vcpuStates (the count sent)
//                             (digests: migration/state-digest.ts)
//  10   GO               S>D  (empty): the source has committed to the switchover     0
//  11   POSTCOPY_DISCARD both 0:4 slot, 4:4 firstPage, 8:4 count, 12: bitmap of      13..12+MAX_DISCARD_PAGES/8
//                             ceil(count/8) bytes, bit i (LSB first) = page firstPage+i;
//                             bits past count must be 0. S>D before POSTCOPY_RUN: these
//                             pages are missing on the destination (sent stale or never);
//                             D>S first on a resumed post-copy connection: still missing here
//  12   POSTCOPY_RUN     S>D  END's 36 bytes (memoryHash = pages the destination keeps,   44
//                             i.e. every page NOT discarded), 36:8 missingPages
//  13   POSTCOPY_HELLO   S>D  0:8 magic, 8:2 version, 10:2 role (0 background pages,      20
//                             1 preempt: requests and their answers), 12:8 token
//  16   READY            D>S  (empty): destination is set up and accepts pages        0
//  17   COMPLETE         D>S  0:8 memoryHash, 8:8 pages (hash of what it wrote),      16..16+MAX_DETAILS_BYTES
//                             16: optional UTF-8 JSON object with more details;
//                             everything is applied and checked, the guest NOT started
//  18   ERROR            both 0:2 code, 2:2 reserved, 4: UTF-8 message               4..4+MAX_ERROR_MESSAGE_BYTES
//  19   POSTCOPY_REQUEST D>S  0:4 slot, 4:4 page, 8:4 count: send these pages now      12
//                             (on the preempt connection; the source checks the range)
//  20   SYNC_ACK         D>S  0:4 round: every page of rounds <= round is applied     4
//  21   STARTED          D>S  (empty): the guest runs on the destination (answers GO) 0
//
// RAM and ZERO carry 1..MAX_PAGES_PER_RECORD pages; [firstPage, firstPage+count) must lie inside
// the memslot `slot` announced by CONFIG. Every length, slot, page and count is checked before a
// single byte of page data is handed to the caller; a failed check throws MigrationStreamError.
//
// Handshake: the source opens channel 0 and sends HELLO; the destination answers HELLO_ACK (caps
// it accepts, a subset of those offered) or ERROR and closes. The source then opens channels
// 1..channels-1, each sending CHANNEL_HELLO with the session id and its index; each is answered
// with HELLO_ACK or ERROR. Then channel 0 carries CONFIG first, and any channel carries RAM,
// ZERO and SYNC; after the last SYNC, channel 0 carries VCPU_STATE and END.
//
// Switchover is a commit in two steps, so that no failure can leave the guest running on both
// sides: the destination answers END with COMPLETE (or ERROR) and does not start the guest; the
// source, once it sends GO, never runs the guest again; the destination starts it only on GO and
// answers STARTED. A connection lost before GO: the source resumes and the destination discards.
// Lost after GO: the source stays paused (it cannot know whether GO arrived) and the destination
// runs the guest if GO arrived; at worst the guest runs nowhere until an operator resumes one side.
//
// Post-copy (CAP_POSTCOPY accepted in HELLO_ACK): instead of END the source, paused, sends the
// vCPU states, POSTCOPY_DISCARD records for every page the destination does not hold as it is
// now, and POSTCOPY_RUN; the destination drops those pages, checks the hash of what it keeps
// and answers COMPLETE with details {"postcopyPort": P, "token": T}; GO / STARTED as above: the
// point of no return is the destination starting the guest (on demand paging). Then the
// source opens two connections to P, each starting with POSTCOPY_HELLO(token) answered by
// HELLO_ACK: role 0 carries the background push (RAM / ZERO), role 1 (QEMU's postcopy-preempt)
// carries POSTCOPY_REQUEST D>S and their RAM / ZERO answers, so a request never queues behind
// bulk pages. Pages carry no round: the source is paused, every copy of a page is the same.
// When nothing is missing the destination sends COMPLETE(memoryHash of every page as
// installed, pages) on role 0 and the migration is over. If either connection drops, both
// sides keep everything (vCPUs needing a missing page wait): the source connects again, the
// destination answers the new role-0 HELLO with POSTCOPY_DISCARD records of what it still
// misses, and the push resumes with exactly those pages.
//
// Within a round a page
// appears at most once over all channels; round r is closed by SYNC(r) on every channel (like
// QEMU multifd's per-round sync packet), and the destination applies all of round r before any
// of round r+1.

export const STREAM_MAGIC = 'STAGE2MG';
export const STREAM_VERSION = 4;

export const RECORD_HEADER_BYTES = 8;
export const RAM_HEADER_BYTES = 16;
export const STREAM_PAGE_SIZE = 4096;
/** Largest RAM/ZERO record: 1024 pages = 4 MiB of data. */
export const MAX_PAGES_PER_RECORD = 1024;
export const MAX_PAYLOAD_BYTES = RAM_HEADER_BYTES + MAX_PAGES_PER_RECORD * STREAM_PAGE_SIZE;
export const MAX_CONFIG_BYTES = 1 << 20;
export const MAX_ERROR_MESSAGE_BYTES = 4096;
export const MAX_CHANNELS = 64;
/** Largest POSTCOPY_DISCARD record: pages one bitmap covers. */
export const MAX_DISCARD_PAGES = 65536;
/** Bound on COMPLETE's optional JSON details. */
export const MAX_DETAILS_BYTES = 64 * 1024;

/** Capability bits offered in HELLO and accepted in HELLO_ACK. */
export const CAP_LZ4 = 1 << 0;
export const CAP_MULTICHANNEL = 1 << 1;
/** Post-copy: the destination may run the guest before every page arrived (see above). */
export const CAP_POSTCOPY = 1 << 2;
export const KNOWN_CAPS = CAP_LZ4 | CAP_MULTICHANNEL | CAP_POSTCOPY;

export const RecordType = {
  HELLO: 1,
  HELLO_ACK: 2,
  CHANNEL_HELLO: 3,
  CONFIG: 4,
  RAM: 5,
  ZERO: 6,
  SYNC: 7,
  VCPU_STATE: 8,
  END: 9,
  GO: 10,
  POSTCOPY_DISCARD: 11,
  POSTCOPY_RUN: 12,
  POSTCOPY_HELLO: 13,
  READY: 16,
  COMPLETE: 17,
  ERROR: 18,
  POSTCOPY_REQUEST: 19,
  SYNC_ACK: 20,
  STARTED: 21,
} as const;

export const RamEncoding = { RAW: 0, LZ4: 1 } as const;
export type RamEncodingCode = (typeof RamEncoding)[keyof typeof RamEncoding];

/** Which way a stream flows; each side accepts only the record types meant for it. */
export type StreamDirection = 'to-destination' | 'to-source';

export interface HelloRecord { kind: 'hello'; version: number; channels: number; caps: number; sessionId: bigint }
export interface HelloAckRecord { kind: 'hello-ack'; version: number; channels: number; caps: number }
export interface ChannelHelloRecord { kind: 'channel-hello'; version: number; channelIndex: number; sessionId: bigint }
/** `config` is the parsed JSON; the stream only guarantees it is an object with valid memslots. */
export interface ConfigRecord { kind: 'config'; config: StreamConfig }
/**
 * Page contents for [firstPage, firstPage+count) of `slot`. On decode, data is always raw
 * (count*4096 bytes, lz4 already undone) and may be a view into a received socket chunk; the
 * decoder may split one wire record into several RAM records of whole pages.
 */
export interface RamRecord { kind: 'ram'; slot: number; firstPage: number; count: number; data: Uint8Array }
export interface ZeroRecord { kind: 'zero'; slot: number; firstPage: number; count: number }
export interface SyncRecord { kind: 'sync'; round: number }
export interface VcpuStateRecord { kind: 'vcpu-state'; state: unknown }
/**
 * The source's summary of everything the destination will run on: the memory hash, a digest of
 * the CONFIG it sent and one of the vCPU states it sent (and how many).
 */
export interface EndRecord { kind: 'end'; memoryHash: bigint; pages: number; configDigest: bigint; vcpuStateDigest: bigint; vcpuStates: number }
export interface GoRecord { kind: 'go' }
export interface ReadyRecord { kind: 'ready' }
export interface StartedRecord { kind: 'started' }
/** `details`: optional JSON object (the destination's report); absent when none was sent. */
export interface CompleteRecord { kind: 'complete'; memoryHash: bigint; pages: number; details?: Record<string, unknown> }
export interface ErrorRecord { kind: 'error'; code: number; message: string }
export interface PostcopyRequestRecord { kind: 'postcopy-request'; slot: number; page: number; count: number }
export interface SyncAckRecord { kind: 'sync-ack'; round: number }
/** bitmap: ceil(count/8) bytes, bit i (LSB first) = page firstPage + i. */
export interface PostcopyDiscardRecord { kind: 'postcopy-discard'; slot: number; firstPage: number; count: number; bitmap: Uint8Array }
/** END's fields (memoryHash over the pages the destination keeps) and how many pages are missing. */
export interface PostcopyRunRecord { kind: 'postcopy-run'; memoryHash: bigint; pages: number; configDigest: bigint; vcpuStateDigest: bigint; vcpuStates: number; missingPages: number }
export const POSTCOPY_ROLE_PUSH = 0;
export const POSTCOPY_ROLE_PREEMPT = 1;
export interface PostcopyHelloRecord { kind: 'postcopy-hello'; version: number; role: number; token: bigint }

export type MigrationRecord =
  | HelloRecord
  | HelloAckRecord
  | ChannelHelloRecord
  | ConfigRecord
  | RamRecord
  | ZeroRecord
  | SyncRecord
  | VcpuStateRecord
  | EndRecord
  | GoRecord
  | ReadyRecord
  | StartedRecord
  | CompleteRecord
  | ErrorRecord
  | PostcopyRequestRecord
  | SyncAckRecord
  | PostcopyDiscardRecord
  | PostcopyRunRecord
  | PostcopyHelloRecord;

export type RecordKind = MigrationRecord['kind'];

/** The part of CONFIG the stream itself reads; everything else is the migration layer's. */
export interface StreamConfig {
  memslots: readonly { slot: number; pages: number }[];
  [key: string]: unknown;
}

export const KIND_TO_TYPE: Record<RecordKind, number> = {
  hello: RecordType.HELLO,
  'hello-ack': RecordType.HELLO_ACK,
  'channel-hello': RecordType.CHANNEL_HELLO,
  config: RecordType.CONFIG,
  ram: RecordType.RAM,
  zero: RecordType.ZERO,
  sync: RecordType.SYNC,
  'vcpu-state': RecordType.VCPU_STATE,
  end: RecordType.END,
  go: RecordType.GO,
  ready: RecordType.READY,
  started: RecordType.STARTED,
  complete: RecordType.COMPLETE,
  error: RecordType.ERROR,
  'postcopy-request': RecordType.POSTCOPY_REQUEST,
  'sync-ack': RecordType.SYNC_ACK,
  'postcopy-discard': RecordType.POSTCOPY_DISCARD,
  'postcopy-run': RecordType.POSTCOPY_RUN,
  'postcopy-hello': RecordType.POSTCOPY_HELLO,
};

export const TYPE_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(RecordType).map(([name, code]) => [code, name]),
);

const TO_DESTINATION = new Set<number>([
  RecordType.HELLO, RecordType.CHANNEL_HELLO, RecordType.CONFIG, RecordType.RAM, RecordType.ZERO,
  RecordType.SYNC, RecordType.VCPU_STATE, RecordType.END, RecordType.GO, RecordType.ERROR,
  RecordType.POSTCOPY_DISCARD, RecordType.POSTCOPY_RUN, RecordType.POSTCOPY_HELLO,
]);
const TO_SOURCE = new Set<number>([
  RecordType.HELLO_ACK, RecordType.READY, RecordType.COMPLETE, RecordType.ERROR, RecordType.POSTCOPY_REQUEST,
  RecordType.SYNC_ACK, RecordType.STARTED, RecordType.POSTCOPY_DISCARD,
]);

export function typeAllowed(type: number, direction: StreamDirection): boolean {
  return (direction === 'to-destination' ? TO_DESTINATION : TO_SOURCE).has(type);
}

/** Payload length bounds per type: [min, max]. */
export function payloadBounds(type: number): readonly [number, number] | undefined {
  switch (type) {
    case RecordType.HELLO: return [24, 24];
    case RecordType.HELLO_ACK: return [8, 8];
    case RecordType.CHANNEL_HELLO: return [20, 20];
    case RecordType.CONFIG: return [1, MAX_CONFIG_BYTES];
    case RecordType.RAM: return [RAM_HEADER_BYTES + 4, MAX_PAYLOAD_BYTES];
    case RecordType.ZERO: return [12, 12];
    case RecordType.SYNC: return [4, 4];
    case RecordType.VCPU_STATE: return [1, MAX_PAYLOAD_BYTES];
    case RecordType.END: return [36, 36];
    case RecordType.GO: return [0, 0];
    case RecordType.READY: return [0, 0];
    case RecordType.STARTED: return [0, 0];
    case RecordType.COMPLETE: return [16, 16 + MAX_DETAILS_BYTES];
    case RecordType.ERROR: return [4, 4 + MAX_ERROR_MESSAGE_BYTES];
    case RecordType.POSTCOPY_REQUEST: return [12, 12];
    case RecordType.SYNC_ACK: return [4, 4];
    case RecordType.POSTCOPY_DISCARD: return [13, 12 + MAX_DISCARD_PAGES / 8];
    case RecordType.POSTCOPY_RUN: return [44, 44];
    case RecordType.POSTCOPY_HELLO: return [20, 20];
    default: return undefined;
  }
}

export type StreamErrorCode =
  | 'bad-magic'
  | 'bad-version'
  | 'unknown-type'
  | 'wrong-direction'
  | 'bad-flags'
  | 'bad-reserved'
  | 'bad-length'
  | 'oversize'
  | 'truncated'
  | 'out-of-range'
  | 'bad-encoding'
  | 'bad-data-length'
  | 'bad-lz4'
  | 'bad-json'
  | 'bad-config'
  | 'no-config'
  | 'unexpected-record'
  | 'bad-round'
  | 'duplicate-page';

/** The stream broke a rule of the format; `code` names the rule, the message the field and values. */
export class MigrationStreamError extends Error {
  constructor(
    readonly code: StreamErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'MigrationStreamError';
  }
}

/** Numeric codes for ERROR records, so a peer can tell what went wrong without parsing text. */
export const ErrorCode = {
  INTERNAL: 1,
  BAD_STREAM: 2,
  BAD_VERSION: 3,
  BAD_MAGIC: 4,
  UNKNOWN_SESSION: 5,
  BAD_CONFIG: 6,
  CANCELLED: 7,
  VERIFY_FAILED: 8,
  BAD_VCPU_STATE: 9,
} as const;

const ERROR_CODE_NAMES: Record<number, string> = Object.fromEntries(Object.entries(ErrorCode).map(([name, code]) => [code, name]));

/** "BAD_CONFIG (6)"; an unknown code as its number. */
export function describeErrorCode(code: number): string {
  return ERROR_CODE_NAMES[code] ? `${ERROR_CODE_NAMES[code]} (${code})` : `error ${code}`;
}

export function errorCodeFor(e: unknown): number {
  // A layer above may say what kind of failure it is (migration/link.ts MigrationLinkError).
  const carried = (e as { errorCode?: unknown } | null)?.errorCode;
  if (typeof carried === 'number') return carried;
  if (e instanceof MigrationStreamError) {
    if (e.code === 'bad-version') return ErrorCode.BAD_VERSION;
    if (e.code === 'bad-magic') return ErrorCode.BAD_MAGIC;
    if (e.code === 'bad-config' || e.code === 'no-config') return ErrorCode.BAD_CONFIG;
    return ErrorCode.BAD_STREAM;
  }
  return ErrorCode.INTERNAL;
}
