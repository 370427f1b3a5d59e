// The destination's post-copy phase (QEMU postcopy-ram.c's listen thread and fault thread, in
// one event loop): after the guest started on demand paging, take pages from the source's push
// and preempt connections (stream/format.ts, "Post-copy"), ask for the pages vCPUs wait on, and
// answer COMPLETE once nothing is missing.
//
//   - A page request (DemandPager.onRequest) for a page this side already holds (received in
//     pre-copy as ZERO and never written, so not populated) is installed at once from here; any other
//     goes to the source as POSTCOPY_REQUEST on the preempt connection. Requests made while no
//     connection is up wait and are sent again on the next preempt connection.
//   - Pages held here are also installed in the background, a chunk per event-loop turn.
//   - Every page installed from the source is hashed into the table as it arrives (never read
//     back from guest RAM, which the guest already changes), so COMPLETE's hash is the hash of
//     exactly the memory the source had at switchover. A page that comes twice (pushed and
//     requested) is installed once: install() answers 'exists' and the table is not touched.
//   - Connections may drop and come back (recovery): nothing is dropped here; each new push
//     connection is answered with the bitmap of pages still missing, then HELLO_ACK.
//
// Concurrency: the VMM's main thread; vCPUs reach the pager only through it (demand-paging.ts).
import { createServer, type Server, type Socket } from 'node:net';
import { PAGE_SIZE } from '../../vmm/engine.ts';
import type { DemandPager, PageRequest } from '../../vmm/demand-paging.ts';
import { ErrorCode, MAX_DISCARD_PAGES, POSTCOPY_ROLE_PUSH, STREAM_VERSION, type MigrationRecord } from '../stream/format.ts';
import { StreamLayout } from '../stream/layout.ts';
import { formatMemoryHash, type MemoryHasher, type PageHashTable } from '../hash.ts';
import type { SlotMap } from '../slot-map.ts';
import { MigrationLinkError } from '../link.ts';
import { RecordSocket } from './record-socket.ts';

/** Held pages installed per event-loop turn in the background. */
const BACKGROUND_PAGES_PER_TURN = 64;
/** How long after COMPLETE a source may keep its post-copy connections open. */
const CLOSE_GRACE_MS = 5_000;

export interface PostcopyDestinationOptions {
  pager: DemandPager;
  slotMap: SlotMap;
  table: PageHashTable;
  hasher: MemoryHasher;
  /** Pages of guest RAM (non-internal slots) that are part of demand paging. */
  ramSlots: readonly { slot: number; pages: number }[];
  /** The page's contents when this side holds it already (no request needed), else null. */
  heldPage: (slot: number, page: number) => Uint8Array | null;
  token: bigint;
  log: (line: string) => void;
  /** No source connection for this long while pages are missing: give up (the guest keeps waiting). */
  recoverTimeoutMs: number;
}

export interface PostcopyDestinationResult {
  hash: string;
  pagesFromSource: number;
  /** POSTCOPY_REQUEST pages sent to the source. */
  remoteRequests: number;
  /** Requests served from pages held here. */
  localRequests: number;
  duplicates: number;
  reconnects: number;
  seconds: number;
}

export class PostcopyDestination {
  private readonly server: Server;
  private push: RecordSocket | null = null;
  private preempt: RecordSocket | null = null;
  /** Requested from the source and not installed yet (key slot*2^32+page). */
  private readonly outstanding = new Map<number, PageRequest>();
  private readonly layout: StreamLayout;
  private result: PostcopyDestinationResult | null = null;
  private failed: Error | null = null;
  private settle!: { resolve: (r: PostcopyDestinationResult) => void; reject: (e: Error) => void };
  readonly done: Promise<PostcopyDestinationResult>;
  private pagesFromSource = 0;
  private remoteRequests = 0;
  private localRequests = 0;
  private duplicates = 0;
  private connections = 0;
  private readonly t0 = process.hrtime.bigint();
  private lostTimer: NodeJS.Timeout | null = null;

  /** o: the post-copy phase's inputs; server: from openServer() (listening already, off the downtime path). */
  constructor(private readonly o: PostcopyDestinationOptions, server: Server) {
    this.server = server;
    this.layout = new StreamLayout([...o.ramSlots]);
    this.done = new Promise((resolve, reject) => (this.settle = { resolve, reject }));
    this.done.catch(() => undefined);
    o.pager.onRequest((req) => this.onRequest(req));
    server.on('connection', (s) => this.onConnection(s));
    this.armLostTimer();
  }

  /** The listener for the source's push and preempt connections (opened at CONFIG time). */
  static async openServer(host: string): Promise<Server> {
    const server = createServer({ noDelay: true });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, host, () => resolve());
    });
    // Connections before POSTCOPY_RUN have nobody to talk to (the constructor adds the handler).
    server.on('connection', (s) => {
      if (server.listenerCount('connection') === 1) s.destroy();
    });
    return server;
  }

  get port(): number {
    const a = this.server.address();
    return typeof a === 'object' && a ? a.port : 0;
  }

  /** Start installing held pages in the background (call once the guest runs). */
  startBackground(): void {
    const { pager } = this.o;
    let si = 0;
    let page = 0;
    const step = () => {
      if (this.result || this.failed) return;
      let n = 0;
      // Few pages per turn: the pager's request mailbox is drained by this same thread, between
      // turns (see the report on the soft pager's bounded mailbox).
      while (si < this.o.ramSlots.length && n < BACKGROUND_PAGES_PER_TURN) {
        const s = this.o.ramSlots[si]!;
        if (page >= s.pages) {
          si++;
          page = 0;
          continue;
        }
        if (pager.isMissing(s.slot, page)) {
          const data = this.o.heldPage(s.slot, page);
          if (data) pager.install(s.slot, page, data);
          n++;
        }
        page++;
      }
      this.maybeComplete();
      if (si < this.o.ramSlots.length) setImmediate(step);
    };
    setImmediate(step);
  }

  private key(slot: number, page: number): number {
    return slot * 2 ** 32 + page;
  }

  private onRequest(req: PageRequest): void {
    const held = this.o.heldPage(req.slot, req.page);
    if (held) {
      this.localRequests++;
      // Not from inside the fault path's own call: the pager expects install() later.
      queueMicrotask(() => {
        this.o.pager.install(req.slot, req.page, held);
        this.maybeComplete();
      });
      return;
    }
    const k = this.key(req.slot, req.page);
    if (this.outstanding.has(k)) return;
    this.outstanding.set(k, req);
    this.remoteRequests++;
    if (this.preempt) this.preempt.send({ kind: 'postcopy-request', slot: req.slot, page: req.page, count: 1 }).catch(() => undefined);
  }

  private onConnection(socket: Socket): void {
    const rs = new RecordSocket(socket, 'to-destination', this.layout, 'post-copy connection from the source');
    let role = -1;
    rs.onRecord = (rec: MigrationRecord) => {
      if (role < 0) {
        if (rec.kind !== 'postcopy-hello') throw new MigrationLinkError(`first record on a post-copy connection is ${rec.kind}, expected POSTCOPY_HELLO`, ErrorCode.BAD_STREAM);
        if (rec.token !== this.o.token) throw new MigrationLinkError('POSTCOPY_HELLO for another migration (token mismatch)', ErrorCode.UNKNOWN_SESSION);
        role = rec.role;
        this.attach(rs, role);
        return;
      }
      if (rec.kind === 'ram') return this.onPages(rec.slot, rec.firstPage, rec.count, rec.data);
      if (rec.kind === 'zero') return this.onPages(rec.slot, rec.firstPage, rec.count, null);
      throw new MigrationLinkError(`${rec.kind} on a post-copy connection`, ErrorCode.BAD_STREAM);
    };
    rs.onClose((e) => {
      if (role < 0) return;
      if (role === POSTCOPY_ROLE_PUSH && this.push === rs) this.push = null;
      else if (this.preempt === rs) this.preempt = null;
      if (!this.result && !this.failed) {
        this.o.log(`post-copy connection lost (${e.message}): vCPUs needing missing pages wait; ${this.o.pager.missingCount()} pages missing, waiting for the source to reconnect`);
        this.armLostTimer();
      }
    });
  }

  private attach(rs: RecordSocket, role: number): void {
    this.connections++;
    if (role === POSTCOPY_ROLE_PUSH) {
      this.push?.destroy();
      this.push = rs;
      // What is still missing, then HELLO_ACK: the source pushes exactly these.
      void this.sendMissing(rs)
        .then(() => rs.send({ kind: 'hello-ack', version: STREAM_VERSION, channels: 1, caps: 0 }))
        .then(() => this.maybeComplete())
        .catch(() => undefined);
    } else {
      this.preempt?.destroy();
      this.preempt = rs;
      void rs.send({ kind: 'hello-ack', version: STREAM_VERSION, channels: 1, caps: 0 }).catch(() => undefined);
      for (const r of this.outstanding.values()) void rs.send({ kind: 'postcopy-request', slot: r.slot, page: r.page, count: 1 }).catch(() => undefined);
    }
    if (this.push && this.preempt && this.lostTimer) {
      clearTimeout(this.lostTimer);
      this.lostTimer = null;
    }
  }

  private async sendMissing(rs: RecordSocket): Promise<void> {
    const { pager } = this.o;
    for (const s of this.o.ramSlots) {
      for (let first = 0; first < s.pages; first += MAX_DISCARD_PAGES) {
        const count = Math.min(MAX_DISCARD_PAGES, s.pages - first);
        const bitmap = new Uint8Array(Math.ceil(count / 8));
        let any = false;
        for (let i = 0; i < count; i++) {
          if (pager.isMissing(s.slot, first + i) && !this.o.heldPage(s.slot, first + i)) {
            bitmap[i >> 3]! |= 1 << (i & 7);
            any = true;
          }
        }
        if (any) await rs.send({ kind: 'postcopy-discard', slot: s.slot, firstPage: first, count, bitmap });
      }
    }
  }

  private onPages(slot: number, first: number, count: number, data: Uint8Array | null): void {
    // Pages the source put on the wire before it read COMPLETE: every page is here already.
    if (this.result) {
      this.duplicates += count;
      return;
    }
    const { pager, table, hasher } = this.o;
    const zero = new Uint8Array(PAGE_SIZE);
    for (let i = 0; i < count; i++) {
      const page = first + i;
      const bytes = data ? data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE) : zero;
      this.pagesFromSource++;
      if (pager.install(slot, page, bytes) === 'installed') table.set(slot, page, data ? hasher.hashPage(slot, page, bytes) : 0n);
      else this.duplicates++;
      this.outstanding.delete(this.key(slot, page));
    }
    this.maybeComplete();
  }

  private maybeComplete(): void {
    if (this.result || this.failed || this.o.pager.missingCount() > 0 || !this.push) return;
    const hash = formatMemoryHash(this.o.table.total());
    this.result = {
      hash,
      pagesFromSource: this.pagesFromSource,
      remoteRequests: this.remoteRequests,
      localRequests: this.localRequests,
      duplicates: this.duplicates,
      reconnects: Math.max(0, this.connections / 2 - 1),
      seconds: Number(process.hrtime.bigint() - this.t0) / 1e9,
    };
    const push = this.push;
    this.o.pager.finish();
    if (this.lostTimer) clearTimeout(this.lostTimer);
    const details = { waits: this.o.pager.waits(), remoteRequests: this.remoteRequests, localRequests: this.localRequests, duplicates: this.duplicates, pager: this.o.pager.stats() };
    void push.send({ kind: 'complete', memoryHash: this.o.table.total(), pages: this.pagesFromSource, details }).finally(() => {
      this.close();
      this.settle.resolve(this.result!);
    });
  }

  private armLostTimer(): void {
    if (this.lostTimer || this.o.recoverTimeoutMs <= 0) return;
    this.lostTimer = setTimeout(() => {
      this.lostTimer = null;
      if (this.push && this.preempt) return;
      this.fail(new MigrationLinkError(`post-copy: no source connection for ${this.o.recoverTimeoutMs} ms with ${this.o.pager.missingCount()} pages missing; the guest cannot finish here and the source holds the only copy of those pages`));
    }, this.o.recoverTimeoutMs);
    this.lostTimer.unref();
  }

  /** Give up (cancel, timeout): the guest stays here, waiting for pages that will not come. */
  fail(err: Error): void {
    if (this.result || this.failed) return;
    this.failed = err;
    this.close();
    this.settle.reject(err);
  }

  // After COMPLETE the connections end gracefully (FIN after COMPLETE, what still comes in is
  // read and dropped): destroying a socket with unread pages in it sends a reset, which can
  // reach the source before COMPLETE does and read as a drop to recover from. The source
  // closes its ends once it has COMPLETE; a source that does not is cut off after a while.
  private close(): void {
    if (this.lostTimer) clearTimeout(this.lostTimer);
    this.server.close();
    for (const rs of [this.push, this.preempt]) rs?.socket.end();
    setTimeout(() => {
      this.push?.destroy();
      this.preempt?.destroy();
    }, CLOSE_GRACE_MS).unref();
  }
}
