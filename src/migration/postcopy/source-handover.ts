// The source's switch to post-copy (QEMU migration.c's postcopy_start): pause, vCPU states, the
// engine-internal slots' last pages (never paged on demand), POSTCOPY_DISCARD for every guest
// RAM page still pending (dirtied after it was sent, or never sent), POSTCOPY_RUN; COMPLETE ->
// GO -> STARTED as in stop-and-copy (switchover-commit.ts); then the post-copy phase
// (source-postcopy.ts) pushes and answers requests until the destination holds everything.
//
// The discard list is on the downtime path: its bitmaps are the pending bitmap's own bytes (a
// POSTCOPY_DISCARD bitmap is LSB-first bytes, the pending bitmap little-endian 32-bit words:
// the same bits in the same order), and the discarded pages leave the sent-page hash table in
// runs.
//
// Concurrency: the VMM's main thread; the Vm is paused from the switchover on.
import { PAGE_SIZE, type MemslotInfo } from '../../vmm/engine.ts';
import { countBits } from '../../vmm/dirty-bitmap.ts';
import { DestinationError, VerificationError } from '../errors.ts';
import { formatMemoryHash } from '../hash.ts';
import { MAX_DISCARD_PAGES } from '../stream/format.ts';
import { now, secs, type SourceRun } from '../source-run.ts';
import { commitSwitchover, endRecord, pauseForSwitchover, sendFinalSync, sendGo, switchoverTimes } from '../switchover-commit.ts';
import type { PostcopyOptions } from '../source.ts';
import { runPostcopySource, type PostcopySourceResult } from './source-postcopy.ts';

export interface HandoverResult {
  switchedAtSeconds: number;
  post: PostcopySourceResult;
}

/** Where the destination's post-copy listener is (from COMPLETE's details). */
export interface PostcopyEndpoint {
  port: number;
  token: bigint;
}

export async function postcopyHandover(run: SourceRun, pc: PostcopyOptions, onSwitched: (switchedAtSeconds: number) => void): Promise<HandoverResult> {
  const { state, link } = run;
  state.set('postcopy-active');
  const lastRound = run.round;
  const switchedAtSeconds = secs(run.t0);
  onSwitched(switchedAtSeconds);
  run.opts.onPhase?.('stop-and-copy', link);
  const ramSlots = run.slots.filter((s) => !s.internal);
  // Everything pending now stays pending (pre-copy sends no more RAM): listed while the guest
  // still runs, so the destination takes the lists, starts its pager and drops what it holds
  // outside the downtime; after the pause only what the guest dirtied since is listed.
  const early = await sendDiscards(run, ramSlots, null);
  // An empty round closes the lists: its SYNC_ACK, which the pause waits for, comes once the
  // destination has taken them.
  run.round = lastRound + 1;
  run.syncedRound = run.round;
  await run.sender.syncAll(run.round);
  const g = await pauseForSwitchover(run, run.round, 'postcopy-active');
  const tSend = now();
  const finalPages = await run.sendAllPending(false, Infinity, (s) => s.internal === true);
  await sendFinalSync(run);
  const { pending, missingPages } = await sendDiscards(run, ramSlots, early.pending);
  run.remainingBytes = missingPages * PAGE_SIZE;
  const { complete, tEnd } = await commitSwitchover(run, { ...endRecord(run, g), postcopy: { missingPages } }, ' (post-copy)');
  const endpoint = postcopyEndpoint(complete.details);
  await sendGo(run);
  Object.assign(run.result, switchoverTimes(g, tSend, tEnd));
  run.endRound('stop-and-copy', finalPages);
  // ---- post-copy: the guest runs on the destination.
  const post = await runPostcopySource({
    vm: run.vm,
    slots: ramSlots,
    pending,
    host: link.peerHost ?? '127.0.0.1',
    port: endpoint.port,
    token: endpoint.token,
    hasher: run.hasher,
    sentTable: run.sentTable,
    limiter: run.limiter,
    retries: pc.retries,
    retryDelayMs: pc.retryDelayMs,
    timeoutMs: run.idleMs,
    signal: run.opts.signal,
    log: run.opts.log,
    onStatus: (st) => state.set(st),
    onRequestCount: (n) => state.update({ postcopyRequests: n }),
    onConnected: pc.onConnected,
    onPushed: pc.onPushed,
    waitForResume: pc.waitForResume,
  });
  run.result.destinationHash = post.destinationHash;
  const sentHash = formatMemoryHash(run.sentTable.total());
  if (post.destinationHash !== sentHash) throw new VerificationError(`post-copy: the destination installed memory hash ${post.destinationHash}, the source sent ${sentHash}`);
  run.remainingBytes = 0;
  state.update({ remainingBytes: 0, postcopyRequests: post.requests });
  return { switchedAtSeconds, post };
}

/**
 * POSTCOPY_DISCARD for every pending guest RAM page not listed yet (`listed`: what an earlier
 * call returned, or null); those pages leave the sent table (what stays is what POSTCOPY_RUN's
 * hash vouches for). Returns a copy of all the pending bitmaps, the listed ones included (what
 * the post-copy phase still has to send), and their page count.
 */
async function sendDiscards(run: SourceRun, ramSlots: MemslotInfo[], listed: Map<number, Uint32Array> | null): Promise<{ pending: Map<number, Uint32Array>; missingPages: number }> {
  const pending = new Map<number, Uint32Array>();
  const fresh = new Map<number, Uint32Array>();
  let missingPages = 0;
  for (const s of ramSlots) {
    const words = Math.ceil(s.pages / 32);
    const all = new Uint32Array(words);
    const p = run.dirty.pendingOf(s.slot);
    if (p) all.set(p.subarray(0, words));
    const before = listed?.get(s.slot);
    if (before) for (let w = 0; w < words; w++) all[w]! |= before[w]!;
    // Bits past the slot's end (a partial last word) are never pages.
    if (s.pages % 32) all[words - 1]! &= (1 << (s.pages % 32)) - 1;
    pending.set(s.slot, all);
    missingPages += countBits(all);
    const copy = before ? all.map((w, i) => w & ~before[i]!) : all;
    fresh.set(s.slot, copy);
    const bytes = new Uint8Array(copy.buffer, copy.byteOffset, Math.ceil(s.pages / 8));
    for (let first = 0; first < s.pages; first += MAX_DISCARD_PAGES) {
      const count = Math.min(MAX_DISCARD_PAGES, s.pages - first);
      const w0 = first >>> 5;
      const w1 = Math.ceil((first + count) / 32);
      let any = false;
      for (let w = w0; w < w1; w++) if (copy[w] !== 0) { any = true; break; }
      if (!any) continue;
      // A copy: the record may sit on the socket while the bitmap is changed by the push.
      const bitmap = bytes.slice(first >>> 3, (first >>> 3) + Math.ceil(count / 8));
      await run.link.send({ type: 'discard', slot: s.slot, firstPage: first, count, bitmap });
    }
  }
  // After the lists went out (the destination works on them meanwhile): only END needs this.
  for (const s of ramSlots) clearRuns(run, s.slot, fresh.get(s.slot)!, s.pages);
  return { pending, missingPages };
}

/** Set every pending page's sent-table entry to zero (= not held), run by run. */
function clearRuns(run: SourceRun, slot: number, bits: Uint32Array, pages: number): void {
  let start = -1;
  const close = (end: number) => {
    if (start >= 0) run.sentTable.setZero(slot, start, end - start);
    start = -1;
  };
  for (let w = 0; w < bits.length; w++) {
    const word = bits[w]!;
    if (word === 0xffffffff) {
      if (start < 0) start = w * 32;
      continue;
    }
    if (word === 0) {
      close(w * 32);
      continue;
    }
    for (let b = 0; b < 32 && w * 32 + b < pages; b++) {
      if ((word >>> b) & 1) {
        if (start < 0) start = w * 32 + b;
      } else close(w * 32 + b);
    }
  }
  close(Math.min(pages, bits.length * 32));
}

function postcopyEndpoint(details: Record<string, unknown> | undefined): PostcopyEndpoint {
  const port = details?.postcopyPort;
  const token = details?.token;
  if (typeof port !== 'number' || !Number.isInteger(port) || port <= 0 || port > 65535 || typeof token !== 'string' || !/^[0-9a-f]{1,16}$/.test(token)) {
    throw new DestinationError('COMPLETE for post-copy without a valid post-copy port and token');
  }
  return { port, token: BigInt(`0x${token}`) };
}
