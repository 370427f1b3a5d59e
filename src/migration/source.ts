// The source side of live migration (QEMU migration.c's migration_thread): one state machine
// whose phases live in their own files and share a SourceRun (source-run.ts):
//
//   setup     CONFIG -> destination builds the VM -> READY; dirty logging on for every memslot
//   active    the bulk round, then iterative rounds until the convergence policy decides
//             (precopy-rounds.ts, convergence.ts)
//   device    stop-and-copy: pause, last pages, vCPU states, END; COMPLETE -> GO -> STARTED
//             (switchover-commit.ts): pause to STARTED is the downtime
//   postcopy-active  or the switch to post-copy: pause, vCPU states, the discard list,
//             POSTCOPY_RUN, the same commit; then pages are pushed and requested while the guest
//             runs on the destination (postcopy/source-handover.ts, postcopy/source-postcopy.ts)
//   completed hash the paused source memory (off the downtime path), compare with the
//             destination's, destroy the source VM
//
// Any failure or cancel before the commit (GO): the link is dropped, the throttle stopped, the
// VM resumed with dirty logging off, and the result says failed/cancelled with sourceIntact; the
// destination, which starts the guest only on GO, discards everything. After the commit nothing
// resumes the guest here: if STARTED does not come back, the destination may or may not run it,
// so the source stays paused (failed, sourceRunning false) rather than risk running it twice.
//
// Liveness: every wait on the destination is bounded by an idle timeout (opts.timeoutMs; the
// mechanism is the link's, transport/liveness.ts): a write that does not drain in any phase, and
// the destination's silence while we await READY, a round's SYNC_ACK, COMPLETE or STARTED. The
// link is told the phase as it changes, so the failure names it ("no progress from the
// destination for 10000 ms waiting for COMPLETE"); it then fails like any broken link (before
// GO: resume; after: stay paused). A cancel (SIGINT) after GO also ends the wait for STARTED and
// leaves the source paused.
//
// Concurrency: runs on the VMM's main thread, which owns the Vm; vCPUs keep running on their
// own threads until the pause.
import { type Backing, type MemslotInfo, type Vm } from '../vmm/engine.ts';
import type { WorkloadSpec } from '../guest/workload.ts';
import { describeVm } from './config.ts';
import { CpuThrottle } from './cpu-throttle.ts';
import { DEFAULT_VCPU_DIRTY_LIMIT, DirtyLimitThrottle } from './dirty-limit.ts';
import { DestinationError, MigrationCancelledError } from './errors.ts';
import { DEFAULT_IDLE_TIMEOUT_MS, type SourceLink } from './link.ts';
import { createMemoryHasher, PageHashTable } from './hash.ts';
import { SlotMap } from './slot-map.ts';
import { PageSender } from './page-sender.ts';
import { RateLimiter } from './transport/rate-limiter.ts';
import type { MigrationProgress, MigrationStats } from './stats.ts';
import { MigrationState } from './migration-state.ts';
import { checkSourceIntact } from './source-intact.ts';
import { DirtyTracker } from './dirty-tracker.ts';
import { PostcopyConvergence, PrecopyConvergence, type ConvergencePolicy, type OnNoConvergence } from './convergence.ts';
import { createStateDigester } from './state-digest.ts';
import type { PostcopySourceOptions, PostcopySourceResult } from './postcopy/source-postcopy.ts';
import { blockMappings, hugePagesReformed } from './huge-reform.ts';
import { secs, SourceRun } from './source-run.ts';
import { runPrecopyRounds } from './precopy-rounds.ts';
import { stopAndCopy, verifyAndRelease } from './switchover-commit.ts';
import { postcopyHandover } from './postcopy/source-handover.ts';

export { NoConvergenceError } from './errors.ts';
export { COMPLETE_ALLOWANCE_MS_PER_GIB } from './switchover-commit.ts';

export interface PostcopyOptions {
  /** Rounds before switching (1: after the bulk round, 0: before it), 'auto', or null: only when pre-copy gives up. */
  switchAfter: number | 'auto' | null;
  onNoConvergence: OnNoConvergence;
  /** Reconnections after a dropped post-copy connection (--postcopy-retry). */
  retries: number;
  retryDelayMs?: number;
  /** Test hooks (postcopy/source-postcopy.ts). */
  onConnected?: PostcopySourceOptions['onConnected'];
  onPushed?: PostcopySourceOptions['onPushed'];
  /** Manual recovery once the reconnections are used up (postcopy/source-postcopy.ts). */
  waitForResume?: PostcopySourceOptions['waitForResume'];
}

export interface PrecopyOptions {
  workload: WorkloadSpec;
  backing: Backing;
  /** Bytes per second, 0 = unlimited. */
  maxBandwidth?: number;
  downtimeLimitMs?: number;
  /** Iterative rounds after the bulk round before stop-and-copy is forced. */
  maxRounds?: number;
  autoConverge?: boolean;
  /**
   * How a guest that dirties faster than the link drains is made to converge: auto-converge
   * (slow every vCPU, cpu-throttle.ts; the default) or dirty-limit (hold each vCPU to
   * vcpuDirtyLimit bytes/s, dirty-limit.ts; needs a VM with a dirty ring).
   */
  converge?: 'auto-converge' | 'dirty-limit';
  /** dirty-limit: bytes per second per vCPU (default 1 MiB/s, QEMU's). */
  vcpuDirtyLimit?: number;
  signal?: AbortSignal;
  onProgress?: (p: MigrationProgress) => void;
  /** Test hook: called as each phase starts (may destroy the link to inject a failure). */
  onPhase?: (phase: 'setup' | 'bulk' | 'iterative' | 'stop-and-copy', link: SourceLink) => void;
  /** When to stop iterating and how to make the guest converge (default: PrecopyConvergence). */
  convergence?: ConvergencePolicy;
  /** Post-copy (wraps the convergence policy in PostcopyConvergence). Absent: pre-copy only. */
  postcopy?: PostcopyOptions;
  /** Destroy the source VM after a completed migration (default true). */
  destroyOnComplete?: boolean;
  /**
   * Where this migration stands (status and query-migrate counters); pass one to read query()
   * while migrateVm runs. A fresh one is made otherwise.
   */
  state?: MigrationState;
  /**
   * Idle timeout of every wait on the destination, ms (transport/liveness.ts; default
   * DEFAULT_IDLE_TIMEOUT_MS). READY and COMPLETE get an allowance per GiB on top.
   */
  timeoutMs?: number;
  /** Lines worth telling the user while it runs (post-copy drops and reconnections). */
  log?: (line: string) => void;
  /** Observer of every dirty-log harvest (dirty-tracker.ts), e.g. the dashboard's heatmap. */
  onDirtyHarvest?: (slot: MemslotInfo, newlyDirty: Uint32Array) => void;
}

/**
 * Extra idle time for READY per GiB of guest RAM: the destination builds the VM and, by default,
 * preallocates it without a word (first touch measured at ~3 s/GiB on these machines).
 */
export const READY_ALLOWANCE_MS_PER_GIB = 10_000;

export const DEFAULT_DOWNTIME_LIMIT_MS = 300;
export const DEFAULT_MAX_ROUNDS = 60;

export async function migrateVm(vm: Vm, link: SourceLink, opts: PrecopyOptions): Promise<MigrationStats> {
  const downtimeLimitMs = opts.downtimeLimitMs ?? DEFAULT_DOWNTIME_LIMIT_MS;
  const maxRounds = opts.maxRounds ?? DEFAULT_MAX_ROUNDS;
  const autoConverge = opts.autoConverge ?? true;
  const maxBandwidth = opts.maxBandwidth ?? 0;
  const cfg = describeVm(vm, opts.workload, opts.backing);
  const slots = [...vm.memslots()];
  const limiter = maxBandwidth > 0 && Number.isFinite(maxBandwidth) ? new RateLimiter(maxBandwidth) : null;
  const sender = new PageSender(vm, link, limiter);
  const throttle = new CpuThrottle(vm);
  // Created before anything is sent: a VM without a dirty ring is refused at once.
  let roundNow = () => 0;
  const dirtyLimit = opts.converge === 'dirty-limit' ? new DirtyLimitThrottle(vm, opts.vcpuDirtyLimit ?? DEFAULT_VCPU_DIRTY_LIMIT, () => roundNow()) : null;
  const state = opts.state ?? new MigrationState();
  state.update({ ramBytes: cfg.ramBytes, remainingBytes: cfg.ramBytes });
  state.setSampler(() => ({ transferredBytes: link.bytesSent(), zeroPages: sender.counters.zeroPages, normalPages: sender.counters.normalPages, throttlePercent: throttle.percent }));
  const slotMap = new SlotMap(cfg.memslots);
  const dirty = new DirtyTracker(vm, slots, opts.onDirtyHarvest);
  const run = new SourceRun({
    vm,
    link,
    opts: { ...opts, downtimeLimitMs },
    cfg,
    slots,
    limiter,
    sender,
    throttle,
    dirty,
    state,
    slotMap,
    // memoryHash (hash.ts) of every page as sent: END carries it, and the destination refuses to
    // start the guest unless its own table agrees (catches a lost or corrupted page before
    // switchover).
    sentTable: new PageHashTable(slotMap.layout),
    hasher: await createMemoryHasher(),
    // END binds the CONFIG and vCPU states sent, beside the memory hash (state-digest.ts).
    digester: await createStateDigester(),
    idleMs: opts.timeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS,
  });
  roundNow = () => run.round;
  const precopyPolicy: ConvergencePolicy = opts.convergence ?? new PrecopyConvergence({ downtimeLimitMs, maxRounds, maxBandwidth, autoConverge }, dirtyLimit ?? throttle);
  const pcPolicy = opts.postcopy ? new PostcopyConvergence(precopyPolicy, { downtimeLimitMs, switchAfter: opts.postcopy.switchAfter, onNoConvergence: opts.postcopy.onNoConvergence, postcopyAllowed: () => link.postcopyAllowed ?? false }) : null;
  let switchReason: string | null = null;
  let switchedAtSeconds = 0;
  let switchedAfterRound = 0;
  let postcopyResult: PostcopySourceResult | null = null;
  let downtimeExceeded: string | null = null;
  /** Failure, or completion with the source kept: block mappings re-formed once logging stopped (huge-reform.ts). */
  let reformed = 0;
  let reformedOnComplete = false;
  sender.onSent = (slot, page, data, pages) => {
    if (data) run.hasher.hashInto(run.sentTable, slot, page, pages, data);
    else run.sentTable.setZero(slot, page, pages);
    dirty.recordSent(slot, page, data, pages);
  };

  // After GO a cancel cannot resume the guest here, but it still ends the wait for STARTED: the
  // source then stays paused and says so (the catch below).
  const onAbort = () => link.destroy(new MigrationCancelledError());
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  if (opts.signal?.aborted) onAbort();

  try {
    // ---- setup
    opts.onPhase?.('setup', link);
    run.phase('during setup (waiting for READY)', true, run.ramGiB * READY_ALLOWANCE_MS_PER_GIB);
    await link.send({ type: 'config', config: cfg });
    const ready = await link.receive();
    if (ready.type === 'error') throw new DestinationError(ready.message);
    if (ready.type !== 'ready') throw new DestinationError(`expected READY, got ${ready.type}`);
    // From here on the destination speaks to acknowledge rounds, to fail, or to confirm.
    run.listenForReplies();
    dirty.setLogging(true);
    run.setupSeconds = secs(run.t0);

    // ---- active
    const outcome = await runPrecopyRounds(run, pcPolicy ?? precopyPolicy, pcPolicy);
    if (outcome.action === 'postcopy') {
      switchReason = outcome.reason;
      switchedAfterRound = outcome.duringBulk ? 0 : run.round;
      const r = await postcopyHandover(run, opts.postcopy!, (t) => (switchedAtSeconds = t));
      postcopyResult = r.post;
    } else {
      downtimeExceeded = outcome.downtimeExceeded;
      await stopAndCopy(run);
    }
    const kept = await verifyAndRelease(run);
    if (kept !== null) {
      reformed = kept;
      reformedOnComplete = true;
    }
    return finish();
  } catch (e) {
    const err = e as Error;
    const cancelled = !run.committed && (err instanceof MigrationCancelledError || (opts.signal?.aborted ?? false));
    // (Completed already only if the verification read after STARTED failed: that stays.)
    // (post-copy states end only in failed: a cancel before GO still resumes the guest below.)
    if (!state.finished) state.set(cancelled && !state.status.startsWith('postcopy') ? 'cancelled' : 'failed', cancelled ? 'migration cancelled' : err.message);
    link.destroy(err);
    await throttle.stop();
    dirtyLimit?.stop();
    const blocksBefore = blockMappings(vm);
    if (dirty.logging) dirty.setLogging(false);
    if (run.committed) return finish(err.message, true, false); // paused for good: see the header
    if (run.paused) vm.resume();
    reformed = await hugePagesReformed(vm, blocksBefore);
    const intact = await checkSourceIntact(vm, opts.workload);
    return finish(cancelled ? 'migration cancelled' : err.message, intact);
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
  }

  function finish(error?: string, sourceIntact?: boolean, sourceRunning = true): MigrationStats {
    const r = run.result;
    const totalSeconds = r.totalSeconds ?? secs(run.t0);
    const transferredBytes = link.bytesSent() + (postcopyResult?.bytesSent ?? 0);
    const { zeroPages, normalPages } = sender.counters;
    const active = Math.max(totalSeconds - run.setupSeconds, 1e-9);
    const sourceHash = r.sourceHash ?? null;
    const destinationHash = r.destinationHash ?? null;
    const stats: MigrationStats = {
      status: state.status,
      verified: state.status === 'completed' && sourceHash !== null && sourceHash === destinationHash,
      engine: vm.engine,
      totalSeconds,
      setupSeconds: run.setupSeconds,
      downtimeSeconds: r.downtimeSeconds ?? 0,
      verifySeconds: r.verifySeconds ?? 0,
      transferredBytes,
      ramBytes: cfg.ramBytes,
      remainingBytes: run.remainingBytes,
      zeroPages,
      normalPages,
      dirtySyncCount: dirty.syncCount,
      dirtyPagesRate: run.dirtyPagesRate,
      throughputMBps: transferredBytes / active / 1e6,
      pagesPerSecond: Math.round((zeroPages + normalPages) / active),
      postcopyRequests: postcopyResult?.requests ?? state.counters.postcopyRequests,
      throttlePercent: throttle.percent,
      expectedDowntimeSeconds: run.expectedDowntimeSeconds,
      rounds: run.rounds,
      sourceHash,
      destinationHash,
      passesAtSwitchover: r.passesAtSwitchover ?? [],
      stopAndCopy: r.stopAndCopy ?? null,
      params: { vcpus: cfg.vcpus, ramBytes: cfg.ramBytes, channels: link.channels, maxBandwidth, downtimeLimitMs, maxRounds, autoConverge, workload: opts.workload.kind },
    };
    if (switchReason !== null) {
      const p = postcopyResult;
      stats.postcopy = {
        reason: switchReason,
        switchedAtSeconds,
        switchedAfterRound,
        ...(p ? { seconds: p.seconds, pushedPages: p.pushedPages, requestedPages: p.requestedPages, recoveries: p.recoveries, vcpuPageWaits: p.waits ?? [], destination: p.destination ?? {} } : {}),
      };
    }
    if (dirtyLimit) stats.dirtyLimit = dirtyLimit.report();
    const c = link.compression?.();
    if (c && c.pages > 0) stats.compression = { ...c, ratio: (c.pages * 4096) / c.wireBytes };
    if (downtimeExceeded) stats.downtimeExceeded = `${downtimeExceeded}: actual downtime ${(stats.downtimeSeconds * 1000).toFixed(1)} ms against the ${downtimeLimitMs} ms limit`;
    if (error !== undefined) {
      stats.error = error;
      stats.sourceIntact = sourceIntact ?? false;
      stats.sourceRunning = sourceRunning;
      stats.hugePagesReformed = reformed;
    } else if (!stats.verified) {
      stats.error = `verification failed: source memory ${sourceHash}, destination ${destinationHash}`;
    }
    if (error === undefined && reformedOnComplete) stats.hugePagesReformed = reformed;
    return stats;
  }
}
