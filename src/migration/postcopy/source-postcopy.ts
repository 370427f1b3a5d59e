// The source's post-copy phase (QEMU ram.c's postcopy page sender and migration.c's return
// path): the guest runs on the destination, this side is paused for good. Push every page still
// pending over the push connection; answer each POSTCOPY_REQUEST at once on the preempt
// connection and move the push cursor right after the requested page (QEMU continues from the
// requested page's block and offset: the guest probably touches its neighbours next). Done when
// the destination answers COMPLETE with the hash of everything it installed.
//
// Recovery (QEMU's postcopy-paused / postcopy-recover): a connection that drops leaves both
// sides as they are. With retries left, this side connects again (after a short pause); the
// destination answers the new push HELLO with the bitmap of what it still misses, which
// replaces `pending`, and the push goes on. Without, the migration fails saying so: the guest
// runs on the destination, the source stays paused with its memory intact (never resumed: the
// guest would run twice).
//
// Concurrency: the VMM's main thread; the Vm is paused throughout.
import { PAGE_SIZE, type MemslotInfo, type Vm } from '../../vmm/engine.ts';
import { ErrorCode, POSTCOPY_ROLE_PREEMPT, POSTCOPY_ROLE_PUSH, STREAM_VERSION, type MigrationRecord } from '../stream/format.ts';
import { formatMemoryHash, isZeroPageAt, type MemoryHasher, type PageHashTable } from '../hash.ts';
import { MigrationLinkError } from '../link.ts';
import type { RateLimiter } from '../transport/rate-limiter.ts';
import type { VcpuPageWaits } from '../../vmm/demand-paging.ts';
import { connectSocket, RecordSocket } from './record-socket.ts';

/** A page request for memory the guest does not have: the destination is broken or hostile. */
export class PostcopyRequestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PostcopyRequestError';
  }
}

/** The post-copy connection dropped and could not be re-established. */
export class PostcopyUnrecoverableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PostcopyUnrecoverableError';
  }
}

export interface PostcopySourceOptions {
  vm: Vm;
  /** Guest RAM memslots paged on demand. */
  slots: readonly MemslotInfo[];
  /** Per slot: pages the destination misses (a bit per page); cleared as pages are sent. */
  pending: Map<number, Uint32Array>;
  host: string;
  port: number;
  token: bigint;
  hasher: MemoryHasher;
  sentTable: PageHashTable;
  limiter: RateLimiter | null;
  /** Reconnections allowed after a drop (--postcopy-retry). */
  retries: number;
  retryDelayMs?: number;
  timeoutMs: number;
  signal?: AbortSignal;
  log?: (line: string) => void;
  /** Status changes: 'postcopy-paused' when a connection drops, 'postcopy-recover' while reconnecting, 'postcopy-active' again. */
  onStatus?: (s: 'postcopy-paused' | 'postcopy-recover' | 'postcopy-active') => void;
  onRequestCount?: (n: number) => void;
  /**
   * Manual recovery (migrate --resume): called once the automatic reconnections are used up,
   * with why the connection is gone; resolves true to try again (then with `retries` more
   * automatic ones), false to give up. Absent: give up at once.
   */
  waitForResume?: (why: string) => Promise<boolean>;
  /** Test hook: each connection pair once it is up (may destroy either to inject a drop). */
  onConnected?: (conns: { push: RecordSocket; preempt: RecordSocket; attempt: number }) => void;
  /** Test hook: after each pushed run. */
  onPushed?: (pagesPushed: number, conns: { push: RecordSocket; preempt: RecordSocket }) => void;
}

export interface PostcopySourceResult {
  destinationHash: string;
  /** POSTCOPY_REQUEST records answered. */
  requests: number;
  pushedPages: number;
  requestedPages: number;
  recoveries: number;
  bytesSent: number;
  seconds: number;
  /** From the destination's COMPLETE details. */
  waits?: VcpuPageWaits[];
  destination?: Record<string, unknown>;
}

const RUN = 64;
/** How long a failed connection waits for a COMPLETE already on its way (see settled()). */
const COMPLETE_GRACE_MS = 1_000;

export async function runPostcopySource(o: PostcopySourceOptions): Promise<PostcopySourceResult> {
  const t0 = process.hrtime.bigint();
  const bySlot = new Map(o.slots.map((s) => [s.slot, s]));
  let requests = 0;
  let pushedPages = 0;
  let requestedPages = 0;
  let bytesSent = 0;
  let recoveries = 0;
  // The push cursor: slot index and page.
  let cur = { si: 0, page: 0 };
  const buf = Buffer.allocUnsafeSlow(RUN * PAGE_SIZE);

  const isPending = (slot: number, p: number) => ((o.pending.get(slot)![p >>> 5]! >>> (p & 31)) & 1) === 1;
  const clearPending = (slot: number, p: number) => {
    const w = o.pending.get(slot)!;
    w[p >>> 5]! &= ~(1 << (p & 31));
  };

  /** Read `count` pages of `slot` from `first`, hash them as sent, put them on `rs`. */
  const sendPages = async (rs: RecordSocket, s: MemslotInfo, first: number, count: number) => {
    const data = buf.subarray(0, count * PAGE_SIZE);
    o.vm.readGuest(s.guestPhysAddr + first * PAGE_SIZE, data);
    let i = 0;
    while (i < count) {
      const zero = isZeroPageAt(data, i * PAGE_SIZE);
      let j = i + 1;
      while (j < count && isZeroPageAt(data, j * PAGE_SIZE) === zero) j++;
      if (zero) {
        o.sentTable.setZero(s.slot, first + i, j - i);
        await rs.send({ kind: 'zero', slot: s.slot, firstPage: first + i, count: j - i });
      } else {
        const run = data.subarray(i * PAGE_SIZE, j * PAGE_SIZE);
        o.hasher.hashInto(o.sentTable, s.slot, first + i, j - i, run);
        await rs.send({ kind: 'ram', slot: s.slot, firstPage: first + i, count: j - i, data: run });
      }
      i = j;
    }
  };

  /** The next pending run at or after the cursor (wrapping once), cleared; null when none. */
  const nextRun = (): { s: MemslotInfo; first: number; count: number } | null => {
    for (let pass = 0; pass <= o.slots.length; pass++) {
      const s = o.slots[cur.si]!;
      const w = o.pending.get(s.slot)!;
      let p = cur.page;
      while (p < s.pages) {
        if (w[p >>> 5] === 0) {
          p = ((p >>> 5) + 1) << 5;
          continue;
        }
        if (isPending(s.slot, p)) {
          let n = 0;
          while (n < RUN && p + n < s.pages && isPending(s.slot, p + n)) clearPending(s.slot, p + n++);
          cur = { si: cur.si, page: p + n };
          return { s, first: p, count: n };
        }
        p++;
      }
      cur = { si: (cur.si + 1) % o.slots.length, page: 0 };
    }
    return null;
  };

  /** The last attempt allowed before asking for a manual resume (or giving up). */
  let lastAttempt = o.retries;
  for (let attempt = 0; ; attempt++) {
    if (o.signal?.aborted) throw new PostcopyUnrecoverableError('post-copy cancelled: the guest runs on the destination, which still misses pages; the source stays paused');
    let push: RecordSocket | null = null;
    let preempt: RecordSocket | null = null;
    try {
      if (attempt > 0) o.onStatus?.('postcopy-recover');
      push = new RecordSocket(await connectSocket(o.host, o.port, o.timeoutMs), 'to-source', undefined, 'post-copy push connection');
      preempt = new RecordSocket(await connectSocket(o.host, o.port, o.timeoutMs), 'to-source', undefined, 'post-copy preempt connection');
      const conns = { push, preempt };
      let complete: Extract<MigrationRecord, { kind: 'complete' }> | null = null;
      let failure: Error | null = null;
      let wake: () => void = () => undefined;
      const fail = (e: Error) => {
        failure ??= e;
        wake();
      };
      push.onClose(fail);
      preempt.onClose(fail);
      // The push HELLO is answered with what is still missing, then HELLO_ACK.
      let missingReset = false;
      let pushAcked = false;
      push.onRecord = (rec) => {
        if (rec.kind === 'postcopy-discard') {
          if (!missingReset) {
            for (const w of o.pending.values()) w.fill(0);
            missingReset = true;
          }
          const s = bySlot.get(rec.slot);
          if (!s || rec.firstPage + rec.count > s.pages) throw new PostcopyRequestError(`the destination reports missing pages [${rec.firstPage}, +${rec.count}) of memslot ${rec.slot}, outside guest RAM`);
          for (let i = 0; i < rec.count; i++) if (rec.bitmap[i >> 3]! & (1 << (i & 7))) o.pending.get(rec.slot)![(rec.firstPage + i) >>> 5]! |= 1 << ((rec.firstPage + i) & 31);
        } else if (rec.kind === 'hello-ack') {
          if (!missingReset) for (const w of o.pending.values()) w.fill(0); // nothing missing
          missingReset = true;
          pushAcked = true;
        } else if (rec.kind === 'complete') complete = rec;
        else throw new MigrationLinkError(`${rec.kind} on the post-copy push connection`);
        wake();
      };
      // Requests are answered from the event handler's turn: ahead of any push still queued.
      let answering = Promise.resolve();
      preempt.onRecord = (rec) => {
        if (rec.kind === 'hello-ack') return;
        if (rec.kind !== 'postcopy-request') throw new MigrationLinkError(`${rec.kind} on the post-copy preempt connection`);
        const s = bySlot.get(rec.slot);
        if (!s || rec.page + rec.count > s.pages) {
          const msg = `the destination requested pages [${rec.page}, +${rec.count}) of memslot ${rec.slot}, which is not guest RAM (${o.slots.map((x) => `memslot ${x.slot}: ${x.pages} pages`).join(', ')})`;
          // The failure first: abort() closes the connection, and a close alone reads as a
          // drop that a reconnection would recover from.
          fail(new PostcopyRequestError(msg));
          preempt!.abort(ErrorCode.BAD_STREAM, msg);
          return;
        }
        requests++;
        o.onRequestCount?.(requests);
        for (let i = 0; i < rec.count; i++) clearPending(rec.slot, rec.page + i);
        requestedPages += rec.count;
        cur = { si: o.slots.indexOf(s), page: rec.page + rec.count };
        answering = answering.then(() => sendPages(preempt!, s, rec.page, rec.count)).catch(fail);
        wake();
      };
      push.onClose((e) => (e instanceof PostcopyRequestError ? fail(e) : undefined));
      preempt.onClose((e) => (e instanceof PostcopyRequestError ? fail(e) : undefined));
      await push.send({ kind: 'postcopy-hello', version: STREAM_VERSION, role: POSTCOPY_ROLE_PUSH, token: o.token });
      await preempt.send({ kind: 'postcopy-hello', version: STREAM_VERSION, role: POSTCOPY_ROLE_PREEMPT, token: o.token });
      const waitEvent = (ms: number) =>
        new Promise<void>((r) => {
          const t = setTimeout(r, ms);
          wake = () => (clearTimeout(t), (wake = () => undefined), r());
        });
      while (!pushAcked && !failure) await waitEvent(o.timeoutMs);
      if (failure) throw failure;
      if (attempt > 0) {
        recoveries++;
        o.log?.(`post-copy: reconnected (attempt ${attempt}); pushing what the destination still misses`);
      }
      if (attempt > 0) o.onStatus?.('postcopy-active');
      o.onConnected?.({ push, preempt, attempt });
      let lastEvent = Date.now();
      // A connection that fails may only be the other end closing after COMPLETE, which the
      // push connection delivers before its own close (one socket keeps its order; two do not):
      // before calling it a drop, wait for the push connection to settle.
      const settled = async (e: Error) => {
        if (e instanceof PostcopyRequestError) throw e;
        const until = Date.now() + COMPLETE_GRACE_MS;
        while (!complete && !push!.closed && Date.now() < until) await waitEvent(until - Date.now());
        if (!complete) throw e;
      };
      push.onClose(() => wake());
      while (!complete) {
        if (failure) {
          await settled(failure);
          break;
        }
        const run = nextRun();
        if (!run) {
          // Everything sent: wait for COMPLETE (or a request for a page lost in a drop).
          await waitEvent(Math.max(1, o.timeoutMs - (Date.now() - lastEvent)));
          if (!complete && !failure && Date.now() - lastEvent >= o.timeoutMs) throw new MigrationLinkError(`no COMPLETE from the destination ${o.timeoutMs} ms after the last page`);
          continue;
        }
        lastEvent = Date.now();
        if (o.limiter) await o.limiter.take(run.count * PAGE_SIZE);
        try {
          await sendPages(push, run.s, run.first, run.count);
        } catch (e) {
          await settled(e as Error);
          break;
        }
        pushedPages += run.count;
        o.onPushed?.(pushedPages, conns);
        // Let requests in between runs.
        await new Promise<void>((r) => setImmediate(r));
      }
      await answering;
      bytesSent += push.bytesSent + preempt.bytesSent;
      push.destroy();
      preempt.destroy();
      const c = complete as unknown as Extract<MigrationRecord, { kind: 'complete' }>;
      const details = c.details ?? {};
      return {
        destinationHash: formatMemoryHash(c.memoryHash),
        requests,
        pushedPages,
        requestedPages,
        recoveries,
        bytesSent,
        seconds: Number(process.hrtime.bigint() - t0) / 1e9,
        waits: Array.isArray(details.waits) ? (details.waits as VcpuPageWaits[]) : undefined,
        destination: details,
      };
    } catch (e) {
      bytesSent += (push?.bytesSent ?? 0) + (preempt?.bytesSent ?? 0);
      push?.destroy();
      preempt?.destroy();
      if (e instanceof PostcopyRequestError) throw e;
      // Pages in flight when it dropped: the destination's bitmap on reconnect says which.
      o.onStatus?.('postcopy-paused');
      if (attempt >= lastAttempt && o.waitForResume) {
        const why = `post-copy connection lost (${(e as Error).message})`;
        o.log?.(`${why}: postcopy-paused; the guest waits on the destination, this source keeps its pages`);
        if (await o.waitForResume(why)) {
          lastAttempt = attempt + 1 + o.retries;
          o.log?.('post-copy: resuming (manual recovery)');
          continue;
        }
      }
      if (attempt >= lastAttempt) {
        throw new PostcopyUnrecoverableError(
          `post-copy connection lost (${(e as Error).message})${o.retries > 0 ? ` and ${o.retries} reconnection(s) failed` : ''}: the guest runs on the destination and waits for pages only this source has; the source stays paused with its memory intact (--postcopy-retry N reconnects automatically; migrate --resume PID by hand while the source waits)`,
        );
      }
      o.log?.(`post-copy: connection lost (${(e as Error).message}); postcopy-paused, reconnecting (attempt ${attempt + 1})`);
      await new Promise((r) => setTimeout(r, o.retryDelayMs ?? 200));
    }
  }
}
