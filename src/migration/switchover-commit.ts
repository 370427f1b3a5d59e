// The switchover and its two-step commit (QEMU migration.c's migration_completion, with the
// destination's COMPLETE standing in for its return path): pause the guest, send every vCPU's
// state, then END (stop-and-copy: after the last pages; post-copy: POSTCOPY_RUN after the
// discard list); the destination answers COMPLETE with the hash of what it holds and the guest
// still paused; the source commits by sending GO and waits for STARTED. The point of no return is
// GO: before it any failure resumes the guest here, after it nothing does (the destination may
// run it).
//
// Concurrency: the VMM's main thread; the Vm is paused from pauseForSwitchover() on.
import type { VcpuState } from '../vmm/engine.ts';
import { DestinationError, SwitchoverOutcomeUnknownError, VerificationError } from './errors.ts';
import { formatMemoryHash, hashVmMemory } from './hash.ts';
import type { DestRecord, SourceRecord } from './link.ts';
import type { MigrationStats } from './stats.ts';
import { now, secs, type SourceRun } from './source-run.ts';
import { blockMappings, hugePagesReformed } from './huge-reform.ts';

/** READY/COMPLETE allowance per GiB: the destination may re-hash all memory (--verify-rescan, ~7 GiB/s). */
export const COMPLETE_ALLOWANCE_MS_PER_GIB = 1_000;

export interface PausedGuest {
  tPause: bigint;
  tVcpu: bigint;
  tHarvest: bigint;
  vcpuStates: VcpuState[];
  vcpuStateDigest: bigint;
}

/**
 * Wait until the destination applied round `lastRound` (so the downtime does not include
 * draining socket buffers; the throttle holds the guest back meanwhile), pause, send the vCPU
 * states at once (the destination loads them while we harvest), harvest the dirty log a last time.
 */
export async function pauseForSwitchover(run: SourceRun, lastRound: number, label: string): Promise<PausedGuest> {
  const { vm, link } = run;
  run.sender.check();
  run.phase(`during ${label} (waiting for SYNC_ACK of round ${lastRound})`, true, run.drainAllowanceMs());
  if (link.acksRounds) await run.caughtUp(lastRound);
  run.phase(`during ${label} (switchover)`);
  const tPause = now();
  run.paused = true; // from here a failure must resume the guest (resume of a running VM is a no-op)
  await run.throttle.stop(true);
  await vm.pause();
  const tVcpu = now();
  run.result.passesAtSwitchover = vm.progress().map((p) => p.passesCompleted);
  const vcpuStates = Array.from({ length: vm.vcpuCount }, (_, v) => vm.saveVcpuState(v));
  for (const state of vcpuStates) await link.send({ type: 'vcpu', state });
  // flush() writes to the socket before it first yields; what it then awaits (the promise
  // chain, ~0.3 ms) overlaps the final harvest instead of preceding it.
  const flushed = link.flush();
  flushed.catch(() => undefined);
  // END's digest of them, while the flush is in flight (not between the last page and END).
  const vcpuStateDigest = run.digester.vcpuStates(vcpuStates);
  const tHarvest = now();
  run.dirty.harvest();
  await flushed;
  run.round = lastRound + 1;
  run.state.update({ round: run.round, dirtySyncCount: run.dirty.syncCount });
  return { tPause, tVcpu, tHarvest, vcpuStates, vcpuStateDigest };
}

/** SYNC(final) on every channel: the destination then knows the last round's data is complete. */
export async function sendFinalSync(run: SourceRun): Promise<void> {
  run.sender.check();
  run.syncedRound = run.round;
  for (let ch = 0; ch < run.link.channels; ch++) await run.link.send({ type: 'sync', round: run.round, final: true }, ch);
}

/**
 * END -> COMPLETE (checked against `hash`, what was sent and kept) -> GO -> STARTED. Returns
 * COMPLETE and when END went out. A failure after GO is a SwitchoverOutcomeUnknownError.
 */
export async function commitSwitchover(run: SourceRun, end: Extract<SourceRecord, { type: 'end' }>, what: string): Promise<{ complete: Extract<DestRecord, { type: 'complete' }>; tEnd: bigint }> {
  const { link } = run;
  run.endSent = true;
  await link.send(end);
  const tEnd = now();
  run.phase(`waiting for COMPLETE${what}`, true, run.ramGiB * COMPLETE_ALLOWANCE_MS_PER_GIB + run.drainAllowanceMs());
  const reply = await run.finalReply;
  if (run.destFailure) throw run.destFailure;
  if (reply.type === 'error') throw new DestinationError(reply.message);
  if (reply.type !== 'complete') throw new DestinationError(`expected COMPLETE, got ${reply.type}`);
  // COMPLETE says what the destination holds; commit only to exactly what was sent.
  if (reply.hash !== end.hash) throw new VerificationError(`the destination's COMPLETE reports memory hash ${reply.hash}${what ? ' for the pages it keeps' : ''}, the source sent ${end.hash}; not committing`);
  return { complete: reply, tEnd };
}

/** GO, then wait for STARTED: the guest runs on the destination from here. */
export async function sendGo(run: SourceRun): Promise<void> {
  run.sender.check(); // a cancel that came in while we waited still wins: nothing is committed yet
  run.committed = true;
  try {
    run.phase('waiting for STARTED after GO', true);
    await run.link.send({ type: 'go' });
    const r = await run.nextReply();
    run.phase('after STARTED');
    if (r.type !== 'started') throw new DestinationError(r.type === 'error' ? r.message : `expected STARTED, got ${r.type}`);
  } catch (e) {
    throw new SwitchoverOutcomeUnknownError((e as Error).message);
  }
}

/** Downtime and its parts, once STARTED came. */
export function switchoverTimes(g: PausedGuest, tSend: bigint, tEnd: bigint): { downtimeSeconds: number; stopAndCopy: NonNullable<MigrationStats['stopAndCopy']> } {
  return {
    downtimeSeconds: secs(g.tPause),
    stopAndCopy: { pauseSeconds: secs(g.tPause, g.tVcpu), vcpuStateSeconds: secs(g.tVcpu, g.tHarvest), harvestSeconds: secs(g.tHarvest, tSend), sendSeconds: secs(tSend, tEnd), waitCompleteSeconds: secs(tEnd) },
  };
}

/** Stop-and-copy: pause, the last pages, END, commit. */
/**
 * END as the switchover sends it: the final round, every page sent, the memory hash of what was
 * sent, and the digests of the CONFIG and of the vCPU states just saved (post-copy adds its own
 * field).
 */
export function endRecord(run: SourceRun, g: PausedGuest): Extract<SourceRecord, { type: 'end' }> {
  const { sender } = run;
  return {
    type: 'end',
    finalRound: run.round,
    pagesSent: sender.counters.zeroPages + sender.counters.normalPages,
    hash: formatMemoryHash(run.sentTable.total()),
    configDigest: run.configDigest,
    vcpuStateDigest: g.vcpuStateDigest,
    vcpuStates: g.vcpuStates.length,
  };
}

export async function stopAndCopy(run: SourceRun): Promise<void> {
  run.state.set('device');
  run.opts.onPhase?.('stop-and-copy', run.link);
  const g = await pauseForSwitchover(run, run.round, 'device');
  const tSend = now();
  const finalPages = await run.sendAllPending(false);
  await sendFinalSync(run);
  const { complete, tEnd } = await commitSwitchover(run, endRecord(run, g), '');
  await sendGo(run);
  Object.assign(run.result, switchoverTimes(g, tSend, tEnd));
  run.endRound('stop-and-copy', finalPages);
  run.result.destinationHash = complete.hash;
  run.state.update({ remainingBytes: 0 });
  run.remainingBytes = 0;
}

/**
 * Completed: hash the paused source memory off the downtime path, then let it go. A source kept
 * (destroyOnComplete false) stops logging too, and its huge mappings are re-formed
 * (huge-reform.ts), as QEMU's dirty-log stop does on completion; returns how many.
 */
export async function verifyAndRelease(run: SourceRun): Promise<number | null> {
  run.result.totalSeconds = secs(run.t0);
  run.state.set('completed');
  const tv = now();
  run.result.sourceHash = hashVmMemory(run.hasher, run.vm, run.slotMap);
  run.result.verifySeconds = secs(tv);
  run.link.close();
  if (run.opts.destroyOnComplete ?? true) {
    await run.vm.destroy();
    return null;
  }
  const blocksBefore = blockMappings(run.vm);
  if (run.dirty.logging) run.dirty.setLogging(false);
  return hugePagesReformed(run.vm, blocksBefore);
}
