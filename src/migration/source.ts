// The source side of pre-copy live migration (QEMU migration.c's migration_thread and ram.c's
// ram_save_* in one state machine):
//
//   setup    CONFIG -> destination builds the VM -> READY; dirty logging on for every memslot
//   active   round 1: every page (bulk stage); rounds 2..: harvest the dirty log (dirty-
//            tracker.ts), send the dirty pages, SYNC -- until the convergence policy says stop
//            (convergence.ts; by default: the pages left fit the downtime limit at the measured
//            bandwidth, or the round limit; auto-converge throttles the vCPUs meanwhile)
//   device   pause the VM, last harvest, last pages, every vCPU's state, SYNC, END; wait for
//            COMPLETE (all applied and checked, guest not started), commit and send GO, wait
//            for STARTED (the guest runs on the destination): pause to STARTED is the downtime
//   completed  hash the paused source memory (off the downtime path), compare with the
//            destination's, destroy the source VM
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
import { PAGE_SIZE, type Backing, type MemslotInfo, type Vm } from '../vmm/engine.ts';
import type { WorkloadSpec } from '../guest/workload.ts';
import { describeVm } from './config.ts';
import { CpuThrottle } from './cpu-throttle.ts';
import { DestinationError, MigrationCancelledError, SwitchoverOutcomeUnknownError, VerificationError } from './errors.ts';
import { DEFAULT_IDLE_TIMEOUT_MS, type DestRecord, type SourceLink } from './link.ts';
import { createMemoryHasher, formatMemoryHash, hashVmMemory, PageHashTable } from './hash.ts';
import { SlotMap } from './slot-map.ts';
import { PageSender } from './page-sender.ts';
import { RateLimiter } from './transport/rate-limiter.ts';
import type { MigrationProgress, MigrationStats, RoundStats } from './stats.ts';
import { MigrationState } from './migration-state.ts';
import { checkSourceIntact } from './source-intact.ts';
import { DirtyTracker } from './dirty-tracker.ts';
import { PostcopyConvergence, PrecopyConvergence, type ConvergencePolicy, type OnNoConvergence } from './convergence.ts';
import { createStateDigester } from './state-digest.ts';
import { MAX_DISCARD_PAGES } from './stream/format.ts';
import { runPostcopySource, type PostcopySourceOptions, type PostcopySourceResult } from './postcopy/source-postcopy.ts';

/** Pre-copy gave up above the downtime limit and the policy says fail (--on-no-convergence). */
export class NoConvergenceError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NoConvergenceError';
  }
}

export interface PostcopyOptions {
  /** Rounds before switching (1: after the bulk round), 'auto', or null: only when pre-copy gives up. */
  switchAfter: number | 'auto' | null;
  onNoConvergence: OnNoConvergence;
  /** Reconnections after a dropped post-copy connection (--postcopy-retry). */
  retries: number;
  retryDelayMs?: number;
  /** Test hooks (postcopy/source-postcopy.ts). */
  onConnected?: PostcopySourceOptions['onConnected'];
  onPushed?: PostcopySourceOptions['onPushed'];
  /** Test hook: rewrite each POSTCOPY_REQUEST before it is answered? No: the destination side is real; see tests. */
}
import { blockMappings, hugePagesReformed } from './huge-reform.ts';

export interface PrecopyOptions {
  workload: WorkloadSpec;
  backing: Backing;
  /** Bytes per second, 0 = unlimited. */
  maxBandwidth?: number;
  downtimeLimitMs?: number;
  /** Iterative rounds after the bulk round before stop-and-copy is forced. */
  maxRounds?: number;
  autoConverge?: boolean;
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
   * DEFAULT_IDLE_TIMEOUT_MS). READY and COMPLETE get an allowance per GiB on top (below).
   */
  timeoutMs?: number;
}

/**
 * Extra idle time for READY per GiB of guest RAM: the destination builds the VM and, by default,
 * preallocates it without a word (first touch measured at ~3 s/GiB on these machines).
 */
export const READY_ALLOWANCE_MS_PER_GIB = 10_000;
/** Extra idle time for COMPLETE per GiB: the destination may re-hash all memory (--verify-rescan, ~7 GiB/s). */
export const COMPLETE_ALLOWANCE_MS_PER_GIB = 1_000;
/**
 * Bytes that may sit in socket buffers (ours, the network's, the destination's read window)
 * after our last write completed: they drain without any progress we can see, so a wait for an
 * answer to them (SYNC_ACK, COMPLETE) gets their drain time at the measured bandwidth on top
 * (~0.3 s at 1 Gbit/s; seconds on a slow link).
 */
const UNSEEN_BUFFER_BYTES = 32 << 20;

export const DEFAULT_DOWNTIME_LIMIT_MS = 300;
export const DEFAULT_MAX_ROUNDS = 60;
/**
 * An iterative round sends for at most this long, then harvests again (what is left stays
 * pending). It bounds how stale the convergence estimate gets and how long auto-converge waits
 * between steps, like QEMU's periodic bitmap sync.
 */
const ROUND_MAX_MS = 1000;

const now = () => process.hrtime.bigint();
const secs = (a: bigint, b: bigint = now()) => Number(b - a) / 1e9;

export async function migrateVm(vm: Vm, link: SourceLink, opts: PrecopyOptions): Promise<MigrationStats> {
  const downtimeLimitMs = opts.downtimeLimitMs ?? DEFAULT_DOWNTIME_LIMIT_MS;
  const maxRounds = opts.maxRounds ?? DEFAULT_MAX_ROUNDS;
  const autoConverge = opts.autoConverge ?? true;
  const maxBandwidth = opts.maxBandwidth ?? 0;
  const cfg = describeVm(vm, opts.workload, opts.backing);
  const slots: MemslotInfo[] = [...vm.memslots()];
  const totalPages = cfg.ramBytes / PAGE_SIZE;
  const limiter = maxBandwidth > 0 && Number.isFinite(maxBandwidth) ? new RateLimiter(maxBandwidth) : null;
  const sender = new PageSender(vm, link, limiter);
  const throttle = new CpuThrottle(vm);
  const rounds: RoundStats[] = [];
  const state = opts.state ?? new MigrationState();
  state.update({ ramBytes: cfg.ramBytes, remainingBytes: cfg.ramBytes });
  state.setSampler(() => ({ transferredBytes: link.bytesSent(), zeroPages: sender.counters.zeroPages, normalPages: sender.counters.normalPages, throttlePercent: throttle.percent }));
  const t0 = now();
  let setupSeconds = 0;
  let downtimeSeconds = 0;
  let verifySeconds = 0;
  let remainingBytes = cfg.ramBytes;
  let dirtyPagesRate = 0;
  let expectedDowntimeSeconds = 0;
  let bandwidth = 0; // bytes/s measured on the link
  let paused = false;
  /** Failure: block mappings re-formed once logging stopped (huge-reform.ts). */
  let reformed = 0;
  /** GO is being sent: from here this side never runs the guest again (stream/format.ts). */
  let committed = false;
  let endSent = false;
  let destFailure: Error | null = null;
  let sourceHash: string | null = null;
  let destinationHash: string | null = null;
  let passesAtSwitchover: number[] = [];
  let activeSeconds = 0;
  let ackedRound = 0;
  /** The last round whose SYNC was sent: the destination cannot have applied a later one. */
  let syncedRound = 0;
  const ackWaiters: (() => void)[] = [];
  /** Wait until the destination has applied every round up to `round` (or the link failed). */
  const caughtUp = async (round: number) => {
    while (ackedRound < round && !destFailure) await new Promise<void>((r) => ackWaiters.push(r));
    sender.check();
  };
  let stopAndCopy: MigrationStats['stopAndCopy'] = null;

  // After GO a cancel cannot resume the guest here, but it still ends the wait for STARTED: the
  // source then stays paused and says so (the catch below).
  const onAbort = () => link.destroy(new MigrationCancelledError());
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  if (opts.signal?.aborted) onAbort();
  const idleMs = opts.timeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS;
  const ramGiB = cfg.ramBytes / 2 ** 30;
  /** Tell the link what we do now (liveness: the idle-timeout error names it). */
  const phase = (label: string, awaiting = false, allowanceMs = 0) => link.setPhase?.({ label, awaiting, idleTimeoutMs: idleMs + Math.ceil(allowanceMs) });
  const drainAllowanceMs = () => (bandwidth > 0 ? (Math.min(link.bytesSent(), UNSEEN_BUFFER_BYTES) / bandwidth) * 1000 : 0);
  sender.check = () => {
    if (opts.signal?.aborted && !committed) throw new MigrationCancelledError();
    if (destFailure) throw destFailure;
  };
  let lastProgress = 0;
  let roundStartSent = 0;
  let roundStartPending = cfg.ramBytes / PAGE_SIZE;
  const progress = (round: number, force = false) => {
    const t = performance.now();
    if (!opts.onProgress || (!force && t - lastProgress < 100)) return;
    lastProgress = t;
    const sent = sender.counters.zeroPages + sender.counters.normalPages;
    const el = secs(t0) - setupSeconds;
    opts.onProgress({ status: state.status, round, sentPages: sent, totalPages, roundSentPages: sent - roundStartSent, roundTotalPages: roundStartPending, remainingBytes, throughputMBps: el > 0 ? link.bytesSent() / el / 1e6 : 0, throttlePercent: throttle.percent });
  };
  const dirty = new DirtyTracker(vm, slots);
  const precopyPolicy: ConvergencePolicy = opts.convergence ?? new PrecopyConvergence({ downtimeLimitMs, maxRounds, maxBandwidth, autoConverge }, throttle);
  const pcPolicy = opts.postcopy ? new PostcopyConvergence(precopyPolicy, { downtimeLimitMs, switchAfter: opts.postcopy.switchAfter, onNoConvergence: opts.postcopy.onNoConvergence, postcopyAllowed: () => link.postcopyAllowed ?? false }) : null;
  const convergence: ConvergencePolicy = pcPolicy ?? precopyPolicy;
  let switchReason: string | null = null;
  let switchedAtSeconds = 0;
  let switchedAfterRound = 0;
  let postcopyResult: PostcopySourceResult | null = null;
  let postcopyBytes = 0;
  let downtimeExceeded: string | null = null;
  // memoryHash (hash.ts) of every page as sent: END carries it, and the destination refuses to
  // start the guest unless its own table agrees (catches a lost or corrupted page before
  // switchover).
  const slotMap = new SlotMap(cfg.memslots);
  const sentTable = new PageHashTable(slotMap.layout);
  const hasher = await createMemoryHasher();
  // END binds the CONFIG and vCPU states sent, beside the memory hash (state-digest.ts).
  const digester = await createStateDigester();
  const configDigest = digester.config(cfg);
  sender.onSent = (slot, page, data, pages) => {
    if (data) hasher.hashInto(sentTable, slot, page, pages, data);
    else sentTable.setZero(slot, page, pages);
    dirty.recordSent(slot, page, data, pages);
  };
  const manual = vm.config.manualDirtyLogProtect;
  let endRoundRef: (kind: RoundStats['kind'], dirtyPages: number) => unknown = () => undefined;
  let nextReplyAfterGo: () => Promise<DestRecord> = () => Promise.reject(new Error('no link'));
  let finalReply: Promise<DestRecord> = Promise.reject(new Error('no link'));
  finalReply.catch(() => undefined);

  try {
    // ---- setup
    opts.onPhase?.('setup', link);
    phase('during setup (waiting for READY)', true, ramGiB * READY_ALLOWANCE_MS_PER_GIB);
    await link.send({ type: 'config', config: cfg });
    const ready = await link.receive();
    if (ready.type === 'error') throw new DestinationError(ready.message);
    if (ready.type !== 'ready') throw new DestinationError(`expected READY, got ${ready.type}`);
    // From here on the destination speaks to acknowledge rounds, to fail, or to confirm.
    const nextReply = async (): Promise<DestRecord> => {
      for (;;) {
        const r = await link.receive();
        if (r.type === 'synced') {
          if (r.round > syncedRound) {
            destFailure ??= new DestinationError(`protocol error: SYNC_ACK for round ${r.round}, but rounds up to ${syncedRound} were sent`);
            for (const w of ackWaiters.splice(0)) w();
            continue;
          }
          ackedRound = Math.max(ackedRound, r.round);
          for (const w of ackWaiters.splice(0)) w();
          continue;
        }
        if (r.type === 'error') destFailure = new DestinationError(r.message);
        // COMPLETE answers END: one that comes earlier vouches for pages not yet sent.
        else if (r.type === 'complete' && !endSent) destFailure = new DestinationError('protocol error: COMPLETE before END');
        return r;
      }
    };
    nextReplyAfterGo = nextReply;
    finalReply = nextReply();
    finalReply.catch((e: Error) => {
      destFailure ??= e;
      for (const w of ackWaiters.splice(0)) w();
    });
    dirty.setLogging(true);
    setupSeconds = secs(t0);

    // ---- active: bulk round
    state.set('active');
    opts.onPhase?.('bulk', link);
    let round = 1;
    state.update({ round });
    phase(`during active (round ${round})`);
    let tRound = now();
    let bytesBefore = link.bytesSent();
    let z0 = 0;
    let n0 = 0;
    const endRound = (kind: RoundStats['kind'], dirtyPages: number) => {
      const seconds = secs(tRound);
      const bytes = link.bytesSent() - bytesBefore;
      const { zeroPages, normalPages } = sender.counters;
      rounds.push({ round, kind, dirtyPages, zeroPages: zeroPages - z0, normalPages: normalPages - n0, bytes, seconds, throttlePercent: throttle.percent });
      if (bytes >= 1 << 20 && seconds > 0) bandwidth = bytes / seconds;
      z0 = zeroPages;
      n0 = normalPages;
      tRound = now();
      bytesBefore = link.bytesSent();
      return { bytes, seconds };
    };
    endRoundRef = endRound;
    for (const s of slots) {
      await sender.sendSlot(s, round);
      progress(round);
    }
    syncedRound = round;
    await sender.syncAll(round);
    pcPolicy?.bulkSent(endRound('bulk', totalPages).bytes);

    // ---- active: iterative rounds
    opts.onPhase?.('iterative', link);
    let tHarvest = now();
    for (;;) {
      sender.check();
      const pendingPages = dirty.harvest();
      // The guest's dirty rate over the round just sent (between two harvests).
      const sinceHarvest = secs(tHarvest);
      tHarvest = now();
      if (sinceHarvest > 0) dirtyPagesRate = Math.round(dirty.newlyDirty / sinceHarvest);
      remainingBytes = pendingPages * PAGE_SIZE;
      const decision = convergence.decide({ iterativeRounds: round - 1, pendingBytes: remainingBytes, bandwidth });
      expectedDowntimeSeconds = decision.expectedDowntimeSeconds;
      state.update({ remainingBytes, dirtySyncCount: dirty.syncCount, dirtyPagesRate, expectedDowntimeSeconds });
      progress(round, true);
      if (decision.action === 'fail') throw new NoConvergenceError(`${decision.reason}`);
      if (decision.action === 'postcopy') {
        switchReason = decision.reason ?? 'post-copy';
        break;
      }
      if (decision.action === 'stop-and-copy') {
        if (decision.expectedDowntimeSeconds * 1000 > downtimeLimitMs) downtimeExceeded = decision.reason ?? `stop-and-copy forced with expected downtime ${(decision.expectedDowntimeSeconds * 1000).toFixed(0)} ms over the ${downtimeLimitMs} ms limit`;
        break;
      }
      round++;
      state.update({ round });
      phase(`during active (round ${round})`);
      roundStartSent = sender.counters.zeroPages + sender.counters.normalPages;
      roundStartPending = pendingPages;
      const sent = await sendAllPending(round, manual, performance.now() + ROUND_MAX_MS);
      syncedRound = round;
      await sender.syncAll(round);
      const { bytes } = endRound('iterative', sent);
      convergence.afterRound({ round, sentBytes: bytes, dirtiedBytes: dirty.newlyDirty * PAGE_SIZE });
    }

    if (switchReason !== null) {
      await postcopySwitchover(round);
      return finish();
    }

    // ---- device: stop-and-copy
    state.set('device');
    opts.onPhase?.('stop-and-copy', link);
    sender.check();
    // Pause only once the destination has applied what is in flight: otherwise the downtime
    // would include draining the socket buffers. The throttle keeps holding the guest back
    // meanwhile, and stops only right before the pause, so the guest gets no unthrottled
    // window to dirty memory after the convergence decision.
    phase(`during device (waiting for SYNC_ACK of round ${round})`, true, drainAllowanceMs());
    if (link.acksRounds) await caughtUp(round);
    phase('during device (stop-and-copy)');
    const tPause = now();
    paused = true; // from here a failure must resume the guest (resume of a running VM is a no-op)
    await throttle.stop(true);
    await vm.pause();
    // vCPU state first, flushed at once: the destination loads it while we harvest and send
    // the last pages, instead of after them.
    const tVcpu = now();
    passesAtSwitchover = vm.progress().map((p) => p.passesCompleted);
    const vcpuStates = Array.from({ length: vm.vcpuCount }, (_, v) => vm.saveVcpuState(v));
    for (const state of vcpuStates) await link.send({ type: 'vcpu', state });
    // flush() writes to the socket before it first yields; what it then awaits (the promise
    // chain, ~0.3 ms) overlaps the final harvest instead of preceding it.
    const vcpuStatesFlushed = link.flush();
    vcpuStatesFlushed.catch(() => undefined);
    // END's digest of them, while the flush is in flight (not between the last page and END).
    const vcpuStateDigest = digester.vcpuStates(vcpuStates);
    const tHarvestFinal = now();
    dirty.harvest();
    await vcpuStatesFlushed;
    round++;
    state.update({ round, dirtySyncCount: dirty.syncCount });
    const tSend = now();
    const finalPages = await sendAllPending(round, false);
    sender.check();
    syncedRound = round;
    for (let ch = 0; ch < link.channels; ch++) await link.send({ type: 'sync', round, final: true }, ch);
    const sentHash = formatMemoryHash(sentTable.total());
    endSent = true;
    await link.send({
      type: 'end',
      finalRound: round,
      pagesSent: sender.counters.zeroPages + sender.counters.normalPages,
      hash: sentHash,
      configDigest,
      vcpuStateDigest,
      vcpuStates: vcpuStates.length,
    });
    const tEnd = now();
    phase('waiting for COMPLETE', true, ramGiB * COMPLETE_ALLOWANCE_MS_PER_GIB + drainAllowanceMs());
    const reply = await finalReply;
    if (destFailure) throw destFailure;
    if (reply.type === 'error') throw new DestinationError(reply.message);
    if (reply.type !== 'complete') throw new DestinationError(`expected COMPLETE, got ${reply.type}`);
    // COMPLETE says what the destination holds; commit only to exactly what was sent.
    if (reply.hash !== sentHash) throw new VerificationError(`the destination's COMPLETE reports memory hash ${reply.hash}, the source sent ${sentHash}; not committing`);
    sender.check(); // a cancel that came in while we waited still wins: nothing is committed yet
    committed = true;
    try {
      phase('waiting for STARTED after GO', true);
      await link.send({ type: 'go' });
      const r = await nextReply();
      phase('after STARTED');
      if (r.type !== 'started') throw new DestinationError(r.type === 'error' ? r.message : `expected STARTED, got ${r.type}`);
    } catch (e) {
      throw new SwitchoverOutcomeUnknownError((e as Error).message);
    }
    downtimeSeconds = secs(tPause);
    stopAndCopy = { pauseSeconds: secs(tPause, tVcpu), vcpuStateSeconds: secs(tVcpu, tHarvestFinal), harvestSeconds: secs(tHarvestFinal, tSend), sendSeconds: secs(tSend, tEnd), waitCompleteSeconds: secs(tEnd) };
    endRound('stop-and-copy', finalPages);
    activeSeconds = secs(t0);
    destinationHash = reply.hash;
    state.update({ remainingBytes: 0 });
    state.set('completed');

    // ---- completed: verify off the downtime path; the source stays paused until destroyed.
    const tv = now();
    sourceHash = hashVmMemory(hasher, vm, slotMap);
    verifySeconds = secs(tv);
    link.close();
    if (opts.destroyOnComplete ?? true) await vm.destroy();
  } catch (e) {
    const err = e as Error;
    const cancelled = !committed && (err instanceof MigrationCancelledError || (opts.signal?.aborted ?? false));
    // (Completed already only if the verification read after STARTED failed: that stays.)
    // (post-copy states end only in failed: a cancel before GO still resumes the guest below.)
    if (!state.finished) state.set(cancelled && !state.status.startsWith('postcopy') ? 'cancelled' : 'failed', cancelled ? 'migration cancelled' : err.message);
    link.destroy(err);
    await throttle.stop();
    const blocksBefore = blockMappings(vm);
    if (dirty.logging) dirty.setLogging(false);
    if (committed) return finish(err.message, true, false); // paused for good: see the header
    if (paused) vm.resume();
    reformed = await hugePagesReformed(vm, blocksBefore);
    const intact = await checkSourceIntact(vm, opts.workload);
    return finish(cancelled ? 'migration cancelled' : err.message, intact);
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
  }
  return finish();

  /**
   * Post-copy switchover (stream/format.ts, "Post-copy"): pause, vCPU states, the engine-internal
   * slots' last pages (never paged on demand), POSTCOPY_DISCARD for every guest RAM page still
   * pending, POSTCOPY_RUN; COMPLETE -> GO -> STARTED as in stop-and-copy; then the post-copy
   * phase pushes and answers requests until the destination holds everything.
   */
  async function postcopySwitchover(lastRound: number): Promise<void> {
    state.set('postcopy-active');
    switchedAtSeconds = secs(t0);
    switchedAfterRound = lastRound;
    opts.onPhase?.('stop-and-copy', link);
    sender.check();
    phase(`during postcopy-active (waiting for SYNC_ACK of round ${lastRound})`, true, drainAllowanceMs());
    if (link.acksRounds) await caughtUp(lastRound);
    phase('during postcopy-active (switchover)');
    const tPause = now();
    paused = true;
    await throttle.stop(true);
    await vm.pause();
    const tVcpu = now();
    passesAtSwitchover = vm.progress().map((p) => p.passesCompleted);
    const vcpuStates = Array.from({ length: vm.vcpuCount }, (_, v) => vm.saveVcpuState(v));
    for (const st of vcpuStates) await link.send({ type: 'vcpu', state: st });
    const flushed = link.flush();
    flushed.catch(() => undefined);
    const vcpuStateDigest = digester.vcpuStates(vcpuStates);
    const tHarvestFinal = now();
    dirty.harvest();
    await flushed;
    const round = lastRound + 1;
    state.update({ round, dirtySyncCount: dirty.syncCount });
    const tSend = now();
    let finalPages = 0;
    for (const s of slots) {
      const pending = dirty.pendingOf(s.slot);
      if (s.internal && pending) finalPages += await sender.sendPending(s, pending, round, false);
    }
    sender.check();
    syncedRound = round;
    for (let ch = 0; ch < link.channels; ch++) await link.send({ type: 'sync', round, final: true }, ch);
    // The discard list: pending guest RAM pages, whose entries leave the sent table (the
    // destination drops its copies too); what stays is what END's hash vouches for.
    const ramSlots = slots.filter((s) => !s.internal);
    const pendingCopy = new Map<number, Uint32Array>();
    let missingPages = 0;
    for (const s of ramSlots) {
      const p = dirty.pendingOf(s.slot);
      const copy = new Uint32Array(Math.ceil(s.pages / 32));
      if (p) copy.set(p.subarray(0, copy.length));
      pendingCopy.set(s.slot, copy);
      for (let first = 0; first < s.pages; first += MAX_DISCARD_PAGES) {
        const count = Math.min(MAX_DISCARD_PAGES, s.pages - first);
        const bitmap = new Uint8Array(Math.ceil(count / 8));
        let any = false;
        for (let i = 0; i < count; i++) {
          const pg = first + i;
          if ((copy[pg >>> 5]! >>> (pg & 31)) & 1) {
            bitmap[i >> 3]! |= 1 << (i & 7);
            sentTable.setZero(s.slot, pg, 1);
            missingPages++;
            any = true;
          }
        }
        if (any) await link.send({ type: 'discard', slot: s.slot, firstPage: first, count, bitmap });
      }
    }
    remainingBytes = missingPages * PAGE_SIZE;
    const keptHash = formatMemoryHash(sentTable.total());
    endSent = true;
    await link.send({ type: 'end', finalRound: round, pagesSent: sender.counters.zeroPages + sender.counters.normalPages, hash: keptHash, configDigest, vcpuStateDigest, vcpuStates: vcpuStates.length, postcopy: { missingPages } });
    const tEnd = now();
    phase('waiting for COMPLETE (post-copy)', true, ramGiB * COMPLETE_ALLOWANCE_MS_PER_GIB + drainAllowanceMs());
    const reply = await finalReply;
    if (destFailure) throw destFailure;
    if (reply.type === 'error') throw new DestinationError(reply.message);
    if (reply.type !== 'complete') throw new DestinationError(`expected COMPLETE, got ${reply.type}`);
    if (reply.hash !== keptHash) throw new VerificationError(`the destination's COMPLETE reports memory hash ${reply.hash} for the pages it keeps, the source sent ${keptHash}; not committing`);
    const pcPort = reply.details?.postcopyPort;
    const pcToken = reply.details?.token;
    if (typeof pcPort !== 'number' || typeof pcToken !== 'string' || !/^[0-9a-f]{1,16}$/.test(pcToken)) throw new DestinationError('COMPLETE for post-copy without a post-copy port and token');
    sender.check();
    committed = true;
    try {
      phase('waiting for STARTED after GO', true);
      await link.send({ type: 'go' });
      const r = await nextReplyAfterGo();
      phase('after STARTED');
      if (r.type !== 'started') throw new DestinationError(r.type === 'error' ? r.message : `expected STARTED, got ${r.type}`);
    } catch (e) {
      throw new SwitchoverOutcomeUnknownError((e as Error).message);
    }
    downtimeSeconds = secs(tPause);
    stopAndCopy = { pauseSeconds: secs(tPause, tVcpu), vcpuStateSeconds: secs(tVcpu, tHarvestFinal), harvestSeconds: secs(tHarvestFinal, tSend), sendSeconds: secs(tSend, tEnd), waitCompleteSeconds: secs(tEnd) };
    endRoundRef('stop-and-copy', finalPages);
    // ---- post-copy: the guest runs on the destination.
    const pc = opts.postcopy!;
    postcopyResult = await runPostcopySource({
      vm,
      slots: ramSlots,
      pending: pendingCopy,
      host: link.peerHost ?? '127.0.0.1',
      port: pcPort,
      token: BigInt(`0x${pcToken}`),
      hasher,
      sentTable,
      limiter,
      retries: pc.retries,
      retryDelayMs: pc.retryDelayMs,
      timeoutMs: idleMs,
      signal: opts.signal,
      onStatus: (st) => state.set(st),
      onRequestCount: (n) => state.update({ postcopyRequests: n }),
      onConnected: pc.onConnected,
      onPushed: pc.onPushed,
    });
    postcopyBytes = postcopyResult.bytesSent;
    activeSeconds = secs(t0);
    destinationHash = postcopyResult.destinationHash;
    const sentHash = formatMemoryHash(sentTable.total());
    if (destinationHash !== sentHash) throw new VerificationError(`post-copy: the destination installed memory hash ${destinationHash}, the source sent ${sentHash}`);
    state.update({ remainingBytes: 0, postcopyRequests: postcopyResult.requests });
    state.set('completed');
    const tv = now();
    sourceHash = hashVmMemory(hasher, vm, slotMap);
    verifySeconds = secs(tv);
    link.close();
    if (opts.destroyOnComplete ?? true) await vm.destroy();
  }

  async function sendAllPending(round: number, clearLog = manual, deadlineMs = Infinity): Promise<number> {
    let n = 0;
    for (const s of slots) {
      const pending = dirty.pendingOf(s.slot);
      if (!pending) continue;
      n += await sender.sendPending(s, pending, round, clearLog && dirty.hasEngineLog(s.slot), deadlineMs);
      progress(round);
    }
    return n;
  }

  function finish(error?: string, sourceIntact?: boolean, sourceRunning = true): MigrationStats {
    const totalSeconds = activeSeconds || secs(t0);
    const transferredBytes = link.bytesSent() + postcopyBytes;
    const { zeroPages, normalPages } = sender.counters;
    const active = Math.max(totalSeconds - setupSeconds, 1e-9);
    const stats: MigrationStats = {
      status: state.status,
      verified: state.status === 'completed' && sourceHash !== null && sourceHash === destinationHash,
      engine: vm.engine,
      totalSeconds,
      setupSeconds,
      downtimeSeconds,
      verifySeconds,
      transferredBytes,
      ramBytes: cfg.ramBytes,
      remainingBytes,
      zeroPages,
      normalPages,
      dirtySyncCount: dirty.syncCount,
      dirtyPagesRate,
      throughputMBps: transferredBytes / active / 1e6,
      pagesPerSecond: Math.round((zeroPages + normalPages) / active),
      postcopyRequests: postcopyResult?.requests ?? state.counters.postcopyRequests,
      throttlePercent: throttle.percent,
      expectedDowntimeSeconds,
      rounds,
      sourceHash,
      destinationHash,
      passesAtSwitchover,
      stopAndCopy,
      params: { vcpus: cfg.vcpus, ramBytes: cfg.ramBytes, channels: link.channels, maxBandwidth, downtimeLimitMs, maxRounds, autoConverge, workload: opts.workload.kind },
    };
    if (switchReason !== null) {
      const r = postcopyResult;
      stats.postcopy = {
        reason: switchReason,
        switchedAtSeconds,
        switchedAfterRound,
        ...(r ? { seconds: r.seconds, pushedPages: r.pushedPages, requestedPages: r.requestedPages, recoveries: r.recoveries, vcpuPageWaits: r.waits ?? [], destination: r.destination ?? {} } : {}),
      };
    }
    if (downtimeExceeded) stats.downtimeExceeded = `${downtimeExceeded}: actual downtime ${(downtimeSeconds * 1000).toFixed(1)} ms against the ${downtimeLimitMs} ms limit`;
    if (error !== undefined) {
      stats.error = error;
      stats.sourceIntact = sourceIntact ?? false;
      stats.sourceRunning = sourceRunning;
      stats.hugePagesReformed = reformed;
    } else if (!stats.verified) {
      stats.error = `verification failed: source memory ${sourceHash}, destination ${destinationHash}`;
    }
    return stats;
  }
}
