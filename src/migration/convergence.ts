// When pre-copy stops iterating and how it makes the guest converge (QEMU migration.c's
// migration_iteration_run decision plus ram.c's auto-converge trigger), behind one small
// interface so that post-copy and dirty-limit can be further policies.
//
// The source calls decide() after every harvest (what is pending, what the link managed) and,
// after every iterative round, afterRound() with what the guest dirtied meanwhile against what
// was sent. The default policy:
//   - stop and copy once the pending bytes would go out within the downtime limit at the
//     measured bandwidth (QEMU's threshold_size), or once maxRounds iterative rounds are done;
//   - auto-converge: when the guest dirtied more than half of what a round sent
//     (throttle-trigger-threshold), throttle one step harder (20%, +10%, up to 99%). QEMU waits
//     for two such periods; with rounds capped at ROUND_MAX_MS (source.ts) one is enough.
//
// Concurrency: the VMM's main thread only.

export interface HarvestReport {
  /** Iterative rounds completed so far (0 after the bulk round). */
  iterativeRounds: number;
  pendingBytes: number;
  /** Bytes/s the link carried in the last round big enough to measure, 0 if none yet. */
  bandwidth: number;
}

export interface RoundReport {
  /** The round just finished (2 = the first iterative round). */
  round: number;
  sentBytes: number;
  /** Bytes the harvest that started this round found newly dirty (the guest's rate before it). */
  dirtiedBytes: number;
}

export interface ConvergenceDecision {
  action: 'iterate' | 'stop-and-copy';
  /** pendingBytes at the bandwidth decide() assumed (query-migrate's expected-downtime). */
  expectedDowntimeSeconds: number;
}

export interface ConvergencePolicy {
  decide(r: HarvestReport): ConvergenceDecision;
  afterRound(r: RoundReport): void;
}

/** What auto-converge acts on (cpu-throttle.ts). */
export interface Throttle {
  step(): number;
}

export interface PrecopyConvergenceOptions {
  downtimeLimitMs: number;
  maxRounds: number;
  /** --max-bandwidth (bytes/s, 0 = unlimited): the bandwidth to assume before one is measured. */
  maxBandwidth: number;
  autoConverge: boolean;
}

/** QEMU's throttle-trigger-threshold: dirtying above 50% of what was sent counts as "high". */
export const THROTTLE_TRIGGER = 0.5;
/** High periods in a row before the throttle steps up. */
const THROTTLE_HIGH_ROUNDS = 1;
/** Assumed before any round was big enough to measure, without --max-bandwidth: 1 GB/s. */
const DEFAULT_BANDWIDTH = 1e9;

export class PrecopyConvergence implements ConvergencePolicy {
  private highRounds = 0;

  constructor(
    private readonly o: PrecopyConvergenceOptions,
    private readonly throttle: Throttle,
  ) {}

  decide(r: HarvestReport): ConvergenceDecision {
    const bw = r.bandwidth > 0 ? r.bandwidth : this.o.maxBandwidth > 0 ? this.o.maxBandwidth : DEFAULT_BANDWIDTH;
    const expectedDowntimeSeconds = r.pendingBytes / bw;
    const done = expectedDowntimeSeconds * 1000 <= this.o.downtimeLimitMs || r.iterativeRounds >= this.o.maxRounds;
    return { action: done ? 'stop-and-copy' : 'iterate', expectedDowntimeSeconds };
  }

  afterRound(r: RoundReport): void {
    // The first iterative round's dirtying includes the bulk round's tail: judge from round 3.
    if (this.o.autoConverge && r.round > 2 && r.dirtiedBytes > r.sentBytes * THROTTLE_TRIGGER) {
      if (++this.highRounds >= THROTTLE_HIGH_ROUNDS) {
        this.throttle.step();
        this.highRounds = 0;
      }
    } else this.highRounds = 0;
  }
}
