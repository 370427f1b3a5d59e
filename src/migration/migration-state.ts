// One migration's state, readable at any moment (QEMU's MigrationState and query-migrate): the
// status names every phase, and query() returns the query-migrate figures as they stand. The
// source state machine (source.ts) is the only writer; the CLI's progress bar, `--json` and
// tests read it while the migration runs.
//
// Status (QEMU's MigrationStatus; transitions are the only ones allowed, checked in set()):
//   setup  --> active --> device --> completed
//     |          |          |
//     |          +--> postcopy-active --> completed   (post-copy)
//     |                  ^    |
//     |    postcopy-recover <- postcopy-paused  (a connection dropped; reconnecting)
//     +----------+----------+--> failed | cancelled    (any state that is not final)
//
// Concurrency: single-threaded (the VMM's main thread); readers get copies.
import type { MigrationStatus } from './stats.ts';

const NEXT: Record<MigrationStatus, readonly MigrationStatus[]> = {
  setup: ['active', 'failed', 'cancelled'],
  active: ['device', 'postcopy-active', 'failed', 'cancelled'],
  'postcopy-active': ['completed', 'failed', 'postcopy-paused'],
  'postcopy-paused': ['postcopy-recover', 'failed'],
  'postcopy-recover': ['postcopy-active', 'postcopy-paused', 'failed'],
  device: ['completed', 'failed', 'cancelled'],
  completed: [],
  failed: [],
  cancelled: [],
};

/** The counters query() reports, as the source keeps them. */
export interface MigrationCounters {
  /** Guest RAM being migrated (QEMU's ram total). */
  ramBytes: number;
  /** The round being sent (1 = bulk); 0 during setup. */
  round: number;
  transferredBytes: number;
  remainingBytes: number;
  zeroPages: number;
  normalPages: number;
  dirtySyncCount: number;
  /** Pages the guest dirtied per second over the last round (between two harvests). */
  dirtyPagesRate: number;
  throttlePercent: number;
  expectedDowntimeSeconds: number;
  postcopyRequests: number;
}

/** query-migrate, in camelCase. Seconds are floats, counts integers. */
export interface MigrationQuery extends MigrationCounters {
  status: MigrationStatus;
  /** Since the migration started (frozen once it ends). */
  totalSeconds: number;
  /** Setup's length once it is over, else 0. */
  setupSeconds: number;
  /** Decimal MB/s of what was sent since setup ended. */
  throughputMBps: number;
  pagesPerSecond: number;
  error?: string;
}

/** A status change the table above does not allow: a bug in the state machine. */
export class MigrationStateError extends Error {
  constructor(from: MigrationStatus, to: MigrationStatus) {
    super(`migration state: ${from} -> ${to} is not a transition`);
    this.name = 'MigrationStateError';
  }
}

const now = () => process.hrtime.bigint();

export class MigrationState {
  private status_: MigrationStatus = 'setup';
  private readonly t0 = now();
  private tSetupDone: bigint | null = null;
  private tEnd: bigint | null = null;
  private error_: string | undefined;
  private readonly listeners: ((s: MigrationStatus) => void)[] = [];
  private sampler: (() => Partial<MigrationCounters>) | null = null;
  readonly counters: MigrationCounters = {
    ramBytes: 0,
    round: 0,
    transferredBytes: 0,
    remainingBytes: 0,
    zeroPages: 0,
    normalPages: 0,
    dirtySyncCount: 0,
    dirtyPagesRate: 0,
    throttlePercent: 0,
    expectedDowntimeSeconds: 0,
    postcopyRequests: 0,
  };

  get status(): MigrationStatus {
    return this.status_;
  }

  get finished(): boolean {
    return NEXT[this.status_].length === 0;
  }

  /** Move to `to`; `error` with failed/cancelled. Throws MigrationStateError on a bad move. */
  set(to: MigrationStatus, error?: string): void {
    if (!NEXT[this.status_].includes(to)) throw new MigrationStateError(this.status_, to);
    if (this.status_ === 'setup') this.tSetupDone = now();
    this.status_ = to;
    if (error !== undefined) this.error_ = error;
    if (this.finished) {
      this.tEnd = now();
      if (this.sampler) this.update(this.sampler());
      this.sampler = null;
    }
    for (const l of this.listeners) l(to);
  }

  onStatus(listener: (s: MigrationStatus) => void): void {
    this.listeners.push(listener);
  }

  /** Update counters (any subset). */
  update(c: Partial<MigrationCounters>): void {
    Object.assign(this.counters, c);
  }

  /**
   * Counters that move continuously (bytes and pages sent, throttle) are read by `sampler` when
   * query() is called, so the hot paths update nothing; it is dropped once the migration ends
   * (after a last sample).
   */
  setSampler(sampler: (() => Partial<MigrationCounters>) | null): void {
    this.sampler = sampler;
  }

  query(): MigrationQuery {
    if (this.sampler) this.update(this.sampler());
    const end = this.tEnd ?? now();
    const totalSeconds = Number(end - this.t0) / 1e9;
    const setupSeconds = this.tSetupDone === null ? 0 : Number(this.tSetupDone - this.t0) / 1e9;
    const active = this.tSetupDone === null ? 0 : Number(end - this.tSetupDone) / 1e9;
    const c = this.counters;
    return {
      status: this.status_,
      totalSeconds,
      setupSeconds,
      throughputMBps: active > 0 ? c.transferredBytes / active / 1e6 : 0,
      pagesPerSecond: active > 0 ? Math.round((c.zeroPages + c.normalPages) / active) : 0,
      ...c,
      ...(this.error_ !== undefined ? { error: this.error_ } : {}),
    };
  }
}
