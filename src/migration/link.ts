// What the pre-copy state machines need from a migration connection, as records (QEMU's
// migration stream sections, simplified). wire-link.ts implements it over the versioned stream
// and its TCP transport; the state machines in source.ts and destination.ts see only this file.
//
// Ordering: records on one channel arrive in order. RAM and ZERO records may travel on any
// channel, so a page sent in round 2 on channel 1 can overtake the same page sent in round 1 on
// channel 0; every RAM/ZERO record carries its round and the destination keeps, per page, the
// newest round applied (see destination.ts). Control records (CONFIG, VCPU_STATE, END) travel on
// channel 0. Before END the source sends SYNC(final round) on every channel, so END's receiver
// knows all page data has arrived once it has seen that SYNC on each channel. Switchover then
// commits in two steps: END -> COMPLETE (ready, not running), GO -> STARTED (running).
import type { VcpuState } from '../vmm/engine.ts';
import type { MigrationConfig } from './config.ts';
import type { LinkPhase } from './transport/liveness.ts';

export type { LinkPhase };
export { DEFAULT_IDLE_TIMEOUT_MS } from './transport/liveness.ts';

export type SourceRecord =
  | { type: 'config'; config: MigrationConfig }
  /**
   * `data` holds data.length / 4096 consecutive pages of memslot `slot` from `page` on (pages are
   * (slot, page) here as in the stream: slot-map.ts). The link may keep a reference to `data`
   * until it calls onWritten (then the sender may reuse it).
   */
  | { type: 'ram'; round: number; slot: number; page: number; data: Uint8Array; onWritten?: () => void }
  /** `pages` consecutive all-zero pages of memslot `slot` from `page` on. */
  | { type: 'zero'; round: number; slot: number; page: number; pages: number }
  /** End of a round on this channel; `final`: stop-and-copy's, END follows at once (no flush needed). */
  | { type: 'sync'; round: number; final?: boolean }
  | { type: 'vcpu'; state: VcpuState }
  /**
   * Stop-and-copy is over: `finalRound` is the round number of the last SYNC on every channel;
   * `hash` is the memoryHash (hash.ts, 16 hex digits) of every page as sent, `configDigest` and
   * `vcpuStateDigest` (state-digest.ts) those of the CONFIG and the `vcpuStates` vCPU states sent.
   * The destination must hold exactly that state before it may start the guest.
   */
  | { type: 'end'; finalRound: number; pagesSent: number; hash: string; configDigest: bigint; vcpuStateDigest: bigint; vcpuStates: number; postcopy?: { missingPages: number } }
  /**
   * Post-copy only, before END{postcopy}: pages [firstPage, +count) of `slot` whose bit is set in
   * `bitmap` (LSB first) are missing on the destination; it drops any copy it holds.
   */
  | { type: 'discard'; slot: number; firstPage: number; count: number; bitmap: Uint8Array }
  /** The source has committed to the switchover and will not run the guest again: start it. */
  | { type: 'go' };

export type DestRecord =
  /** The destination created the VM and is ready for pages (answers CONFIG). */
  | { type: 'ready' }
  /** Every page of rounds up to `round` is applied (lets the source pause only once caught up). */
  | { type: 'synced'; round: number }
  /**
   * Answers END: every page is applied and `hash` (the memory hash of what it holds) matched
   * END's; the guest is ready but NOT started, and starts only on GO (see stream/format.ts).
   */
  | { type: 'complete'; hash: string; pagesReceived: number; details?: Record<string, unknown> }
  /** Answers GO: the guest runs on the destination. */
  | { type: 'started' }
  /** `code`: what kind of failure (stream/format.ts ErrorCode), for the source to report. */
  | { type: 'error'; message: string; code?: number };

export interface SourceLink {
  readonly channels: number;
  /** The destination accepted post-copy (CAP_POSTCOPY) in the handshake. */
  readonly postcopyAllowed?: boolean;
  /** The destination's host, where post-copy's own connections go. */
  readonly peerHost?: string;
  /** The destination answers every completed round with SYNCED. */
  readonly acksRounds: boolean;
  /** Queue a record on `channel` (default 0). Resolves when the channel can take more. */
  send(record: SourceRecord, channel?: number): Promise<void>;
  /** The next record from the destination; rejects when the connection drops. */
  receive(): Promise<DestRecord>;
  /** Put every record queued so far on the wire now (the link may batch them otherwise). */
  flush(): Promise<void>;
  /** Bytes handed to the sockets so far, all channels. */
  bytesSent(): number;
  /** RAM pages sent lz4-compressed and the bytes their data took on the wire (--compress lz4). */
  compression?(): { pages: number; wireBytes: number };
  close(): void;
  /** Drop every channel at once (failure injection, cancel). */
  destroy(error?: Error): void;
  /**
   * Liveness (transport/liveness.ts): what the source does now, named in the idle-timeout error
   * ("no progress from the destination for 10000 ms waiting for COMPLETE"), whether it awaits
   * an answer (then the destination's silence counts, not only writes that do not drain), and
   * this phase's idle timeout. When the timeout fires, send/receive/flush reject with it.
   * Optional so that test wrappers may leave it out (the link then keeps its last phase).
   */
  setPhase?(phase: LinkPhase): void;
}

export interface DestLink {
  readonly channels: number;
  /** This side accepted post-copy in the handshake. */
  readonly postcopyAllowed?: boolean;
  /**
   * Deliver every record from the source to `onRecord`, channel by channel in arrival order.
   * While a returned promise is pending no further record is delivered (back-pressure reaches
   * the source through TCP). A RAM record's data is valid only during the call. Resolves when
   * the source closes; rejects when a channel drops or a
   * record is malformed.
   */
  run(onRecord: (record: SourceRecord, channel: number) => void | Promise<void>): Promise<void>;
  send(record: DestRecord): Promise<void>;
  close(): void;
  /**
   * Liveness (transport/liveness.ts): the idle timeout of every wait on the source from now on
   * (the next record, GO, a reply that does not drain). When it fires, run() rejects with an
   * error naming the phase. Optional so that test wrappers may leave it out.
   */
  setIdleTimeout?(ms: number): void;
}

/**
 * The connection broke or the peer broke the protocol; `errorCode` (stream/format.ts ErrorCode)
 * says how, if known: the ERROR record sent to the peer carries it.
 */
export class MigrationLinkError extends Error {
  constructor(
    message: string,
    readonly errorCode?: number,
  ) {
    super(message);
    this.name = 'MigrationLinkError';
  }
}
