// What `stage2 migrate --json` prints (DESIGN.md's contract; QEMU's query-migrate names in
// camelCase). Seconds are floats, counts integers. throughputMBps is decimal megabytes (10^6
// bytes) per second of the migration after setup.
import type { GuestView } from './guest-view/guest-view.ts';

/** QEMU's MigrationStatus (postcopy-active is reserved for post-copy). */
export type MigrationStatus = 'setup' | 'active' | 'postcopy-active' | 'postcopy-paused' | 'postcopy-recover' | 'device' | 'completed' | 'failed' | 'cancelled';

export interface RoundStats {
  round: number;
  /** 'bulk' (every page once), 'iterative' (dirty pages), 'stop-and-copy' (VM paused). */
  kind: 'bulk' | 'iterative' | 'stop-and-copy';
  dirtyPages: number;
  zeroPages: number;
  normalPages: number;
  bytes: number;
  seconds: number;
  throttlePercent: number;
}

export interface MigrationStats {
  status: MigrationStatus;
  verified: boolean;
  engine: string;
  totalSeconds: number;
  setupSeconds: number;
  downtimeSeconds: number;
  /** Time to hash the paused source memory after the destination confirmed (not downtime). */
  verifySeconds: number;
  transferredBytes: number;
  ramBytes: number;
  /** Dirty bytes left to send at the last harvest before stop-and-copy (QEMU remaining). */
  remainingBytes: number;
  zeroPages: number;
  normalPages: number;
  dirtySyncCount: number;
  /** Pages dirtied per second, measured over the last iterative round. */
  dirtyPagesRate: number;
  throughputMBps: number;
  pagesPerSecond: number;
  postcopyRequests: number;
  throttlePercent: number;
  expectedDowntimeSeconds: number;
  rounds: RoundStats[];
  sourceHash: string | null;
  destinationHash: string | null;
  /** vCPU pass counters when the source paused (what the destination continues from). */
  passesAtSwitchover: number[];
  /** Where the downtime went: pause, final harvest, last pages, vCPU state + END, wait for COMPLETE and STARTED. */
  stopAndCopy: { pauseSeconds: number; harvestSeconds: number; sendSeconds: number; vcpuStateSeconds: number; waitCompleteSeconds: number } | null;
  params: {
    vcpus: number;
    ramBytes: number;
    channels: number;
    maxBandwidth: number;
    downtimeLimitMs: number;
    maxRounds: number;
    autoConverge: boolean;
    workload: string;
  };
  /** Present when the migration switched to post-copy: when, why, and how the pages came. */
  postcopy?: {
    reason: string;
    /** Seconds since the migration started. */
    switchedAtSeconds: number;
    /** The last pre-copy round completed before the switch (1 = the bulk round; 0: the switch came before or part-way through it). */
    switchedAfterRound: number;
    seconds?: number;
    pushedPages?: number;
    requestedPages?: number;
    recoveries?: number;
    /** How long each destination vCPU waited for missing pages (DemandPager.waits()), seconds. */
    vcpuPageWaits?: { vcpu: number; faults: number; p50: number; p99: number; max: number; total: number }[];
    destination?: Record<string, unknown>;
  };
  /** Set when stop-and-copy was forced above the downtime limit (--on-no-convergence force). */
  downtimeExceeded?: string;
  /** --compress lz4: pages sent compressed, and their bytes on the wire (4096 each uncompressed). */
  compression?: { pages: number; wireBytes: number; ratio: number };
  /**
   * What the migration cost the guest as it saw it, from its progress clock: per vCPU the longest
   * and p99 gap between completed units (source, switchover, destination), the rate before and
   * during, the dip (guest-view/guest-view.ts). Set by `migrate`, which watches both sides.
   */
  guest?: GuestView;
  /** --converge dirty-limit: the per-vCPU limit, the round it went on (0: never), each vCPU's sleep. */
  dirtyLimit?: { bytesPerSecond: number; activatedAtRound: number; vcpuSleepMs: number[] };
  error?: string;
  /** On failure: the source VM and its memory are as before the migration (logging off). */
  sourceIntact?: boolean;
  /** On failure, or on completion when the source is kept (destroyOnComplete false): 2 MiB block mappings the source re-formed once logging stopped (migration/huge-reform.ts). */
  hugePagesReformed?: number;
  /**
   * On failure: the source guest runs again. False only when the link broke after the source
   * committed (sent GO): the destination may run the guest, so the source stays paused.
   */
  sourceRunning?: boolean;
}

export interface MigrationProgress {
  status: MigrationStatus;
  round: number;
  sentPages: number;
  totalPages: number;
  /** Pages sent in this round, and the pages the round set out to send. */
  roundSentPages: number;
  roundTotalPages: number;
  remainingBytes: number;
  throughputMBps: number;
  throttlePercent: number;
}
