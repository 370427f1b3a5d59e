// What the phases of one outgoing migration share (source.ts drives them): the VM, the link and
// the replies coming back on it, the page sender and dirty tracker, the hash of every page as
// sent, the round statistics, and the few facts that decide how a failure ends (paused,
// committed). precopy-rounds.ts, switchover-commit.ts and postcopy/source-handover.ts each take
// one of these.
//
// Concurrency: the VMM's main thread only; vCPUs keep running on their own threads until the
// pause.
import { PAGE_SIZE, type MemslotInfo, type Vm } from '../vmm/engine.ts';
import type { MigrationConfig } from './config.ts';
import type { CpuThrottle } from './cpu-throttle.ts';
import { DestinationError, MigrationCancelledError } from './errors.ts';
import type { DestRecord, SourceLink } from './link.ts';
import type { MemoryHasher, PageHashTable } from './hash.ts';
import type { SlotMap } from './slot-map.ts';
import type { PageSender } from './page-sender.ts';
import type { RateLimiter } from './transport/rate-limiter.ts';
import type { MigrationProgress, MigrationStats, RoundStats } from './stats.ts';
import type { MigrationState } from './migration-state.ts';
import type { DirtyTracker } from './dirty-tracker.ts';
import type { StateDigester } from './state-digest.ts';
import type { PrecopyOptions } from './source.ts';

/**
 * Bytes that may sit in socket buffers (ours, the network's, the destination's read window)
 * after our last write completed: they drain without any progress we can see, so a wait for an
 * answer to them (SYNC_ACK, COMPLETE) gets their drain time at the measured bandwidth on top
 * (~0.3 s at 1 Gbit/s; seconds on a slow link).
 */
const UNSEEN_BUFFER_BYTES = 32 << 20;

export const now = () => process.hrtime.bigint();
export const secs = (a: bigint, b: bigint = now()) => Number(b - a) / 1e9;

export interface SourceRunParts {
  vm: Vm;
  link: SourceLink;
  opts: PrecopyOptions;
  cfg: MigrationConfig;
  slots: MemslotInfo[];
  limiter: RateLimiter | null;
  sender: PageSender;
  throttle: CpuThrottle;
  dirty: DirtyTracker;
  state: MigrationState;
  slotMap: SlotMap;
  sentTable: PageHashTable;
  hasher: MemoryHasher;
  digester: StateDigester;
  idleMs: number;
}

export class SourceRun implements SourceRunParts {
  vm!: Vm;
  link!: SourceLink;
  opts!: PrecopyOptions;
  cfg!: MigrationConfig;
  slots!: MemslotInfo[];
  limiter!: RateLimiter | null;
  sender!: PageSender;
  throttle!: CpuThrottle;
  dirty!: DirtyTracker;
  state!: MigrationState;
  slotMap!: SlotMap;
  sentTable!: PageHashTable;
  hasher!: MemoryHasher;
  digester!: StateDigester;
  idleMs!: number;

  readonly t0 = now();
  readonly totalPages: number;
  readonly ramGiB: number;
  readonly manual: boolean;
  readonly configDigest: bigint;
  readonly rounds: RoundStats[] = [];
  setupSeconds = 0;
  remainingBytes: number;
  dirtyPagesRate = 0;
  expectedDowntimeSeconds = 0;
  /** Bytes/s measured on the link. */
  bandwidth = 0;
  /** The VM was paused for the switchover: a failure before GO must resume it. */
  paused = false;
  /** GO is being sent: from here this side never runs the guest again (stream/format.ts). */
  committed = false;
  endSent = false;
  destFailure: Error | null = null;
  /** The last round whose SYNC was sent: the destination cannot have applied a later one. */
  syncedRound = 0;
  ackedRound = 0;
  private readonly ackWaiters: (() => void)[] = [];
  /** The destination's next reply (COMPLETE, ERROR) once READY came; SYNC_ACKs are consumed. */
  finalReply: Promise<DestRecord> = Promise.reject(new Error('no link'));
  round = 1;
  private tRound = now();
  private bytesBefore = 0;
  private z0 = 0;
  private n0 = 0;
  private lastProgress = 0;
  roundStartSent = 0;
  roundStartPending: number;
  /** Filled in as the migration ends (finish() in source.ts). */
  result: Partial<MigrationStats> = {};

  constructor(p: SourceRunParts) {
    Object.assign(this, p);
    this.totalPages = p.cfg.ramBytes / PAGE_SIZE;
    this.ramGiB = p.cfg.ramBytes / 2 ** 30;
    this.manual = p.vm.config.manualDirtyLogProtect;
    this.configDigest = p.digester.config(p.cfg);
    this.remainingBytes = p.cfg.ramBytes;
    this.roundStartPending = this.totalPages;
    this.finalReply.catch(() => undefined);
    p.sender.check = () => {
      if (p.opts.signal?.aborted && !this.committed) throw new MigrationCancelledError();
      if (this.destFailure) throw this.destFailure;
    };
  }

  /** Tell the link what we do now (liveness: the idle-timeout error names it). */
  phase(label: string, awaiting = false, allowanceMs = 0): void {
    this.link.setPhase?.({ label, awaiting, idleTimeoutMs: this.idleMs + Math.ceil(allowanceMs) });
  }

  drainAllowanceMs(): number {
    return this.bandwidth > 0 ? (Math.min(this.link.bytesSent(), UNSEEN_BUFFER_BYTES) / this.bandwidth) * 1000 : 0;
  }

  /** Wait until the destination has applied every round up to `round` (or the link failed). */
  async caughtUp(round: number): Promise<void> {
    while (this.ackedRound < round && !this.destFailure) await new Promise<void>((r) => this.ackWaiters.push(r));
    this.sender.check();
  }

  /** The destination's next reply other than SYNC_ACK (which it consumes on the way). */
  async nextReply(): Promise<DestRecord> {
    for (;;) {
      const r = await this.link.receive();
      if (r.type === 'synced') {
        if (r.round > this.syncedRound) this.destFailure ??= new DestinationError(`protocol error: SYNC_ACK for round ${r.round}, but rounds up to ${this.syncedRound} were sent`);
        else this.ackedRound = Math.max(this.ackedRound, r.round);
        for (const w of this.ackWaiters.splice(0)) w();
        continue;
      }
      if (r.type === 'error') this.destFailure = new DestinationError(r.message);
      // COMPLETE answers END: one that comes earlier vouches for pages not yet sent.
      else if (r.type === 'complete' && !this.endSent) this.destFailure = new DestinationError('protocol error: COMPLETE before END');
      return r;
    }
  }

  /** After READY: read replies from here on (SYNC_ACKs, then the one that answers END). */
  listenForReplies(): void {
    this.finalReply = this.nextReply();
    this.finalReply.catch((e: Error) => {
      this.destFailure ??= e;
      for (const w of this.ackWaiters.splice(0)) w();
    });
  }

  progress(force = false): void {
    const t = performance.now();
    const { opts, sender } = this;
    if (!opts.onProgress || (!force && t - this.lastProgress < 100)) return;
    this.lastProgress = t;
    const sent = sender.counters.zeroPages + sender.counters.normalPages;
    const el = secs(this.t0) - this.setupSeconds;
    const p: MigrationProgress = {
      status: this.state.status,
      round: this.round,
      sentPages: sent,
      totalPages: this.totalPages,
      roundSentPages: sent - this.roundStartSent,
      roundTotalPages: this.roundStartPending,
      remainingBytes: this.remainingBytes,
      throughputMBps: el > 0 ? this.link.bytesSent() / el / 1e6 : 0,
      throttlePercent: this.throttle.percent,
    };
    opts.onProgress(p);
  }

  /** Start measuring a round (the bulk round starts with setup done). */
  startRound(): void {
    this.tRound = now();
    this.bytesBefore = this.link.bytesSent();
  }

  /** Close the round in `rounds`; the bandwidth estimate follows rounds of at least 1 MiB. */
  endRound(kind: RoundStats['kind'], dirtyPages: number): { bytes: number; seconds: number } {
    const seconds = secs(this.tRound);
    const bytes = this.link.bytesSent() - this.bytesBefore;
    const { zeroPages, normalPages } = this.sender.counters;
    this.rounds.push({ round: this.round, kind, dirtyPages, zeroPages: zeroPages - this.z0, normalPages: normalPages - this.n0, bytes, seconds, throttlePercent: this.throttle.percent });
    if (bytes >= 1 << 20 && seconds > 0) this.bandwidth = bytes / seconds;
    this.z0 = zeroPages;
    this.n0 = normalPages;
    this.startRound();
    return { bytes, seconds };
  }

  /** Send every pending page of every slot (a round, or the final pages). */
  async sendAllPending(clearLog = this.manual, deadlineMs = Infinity, only?: (s: MemslotInfo) => boolean): Promise<number> {
    let n = 0;
    for (const s of this.slots) {
      if (only && !only(s)) continue;
      const pending = this.dirty.pendingOf(s.slot);
      if (!pending) continue;
      n += await this.sender.sendPending(s, pending, this.round, clearLog && this.dirty.hasEngineLog(s.slot), deadlineMs);
      this.progress();
    }
    return n;
  }
}
