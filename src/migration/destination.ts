// The destination side of pre-copy (QEMU's process_incoming_migration / ram_load): build the VM
// from CONFIG, apply RAM and ZERO records as they stream in, and at END (once every channel has
// delivered its final SYNC) check the digest of the memory it holds against END's and answer
// COMPLETE; the guest starts only when the source answers GO (it has then committed never to run
// the guest again), and STARTED tells the source it runs here (stream/format.ts: the commit).
//
// Pages may arrive out of round order across channels (link.ts): `lastRound[page]` keeps the
// newest round applied, and an older copy that arrives late is dropped.
//
// Any failure before the guest starts destroys the VM (nothing of the source's guest is kept),
// tells the source with an ERROR record when the link still works, and rejects. That includes a
// connection lost after COMPLETE but before GO: the source may still resume the guest there.
// Every wait on the source (the next record, GO) is bounded by the link's idle timeout
// (opts.timeoutMs, transport/liveness.ts), and a cancel (opts.signal: SIGINT) ends any wait at
// once; both count as such failures.
//
// Concurrency: the VMM's main thread owns the Vm and the tables; records are delivered one at a
// time by the link.
import { MMU_LOCK_MODES, PAGE_SIZE, type Engine, type EngineKind, type VcpuState, type Vm } from '../vmm/engine.ts';
import { checkVcpuStateEnvelope, VcpuStateError } from '../vmm/vcpu-state.ts';
import { ErrorCode, errorCodeFor } from './stream/format.ts';
import { buildDestinationVm, checkConfig, type HostLimits, type MigrationConfig } from './config.ts';
import { validateConfig } from './config-validate.ts';
import { MigrationCancelledError, VerificationError } from './errors.ts';
import { createStateDigester, formatDigest } from './state-digest.ts';
import { MigrationLinkError, type DestLink, type SourceRecord } from './link.ts';
import { createMemoryHasher, formatMemoryHash, hashVmMemory, PageHashTable } from './hash.ts';
import { SlotMap } from './slot-map.ts';
import { wallClockMs } from '../vmm/run/progress-clock.ts';
import { postcopyFaultPath, startPostcopyPaging } from './postcopy/paging.ts';
import { PostcopyDestination, type PostcopyDestinationResult } from './postcopy/destination-postcopy.ts';
import { DiscardIntake } from './postcopy/discard-intake.ts';
import type { DemandPager, FaultPath, VcpuPageWaits } from '../vmm/demand-paging.ts';
import { randomBytes } from 'node:crypto';
import type { Server } from 'node:net';

export interface ReceiveOptions {
  openEngine: (kind: EngineKind) => Promise<Engine>;
  limits?: HostLimits;
  /** Re-read all guest memory before starting the guest and report its digest too (tests). */
  verifyRescan?: boolean;
  /**
   * Touch all guest RAM before answering READY (QEMU's -mem-prealloc): first-touch page faults
   * then happen in setup instead of while pages stream in.
   */
  preallocate?: boolean;
  signal?: AbortSignal;
  log?: (line: string) => void;
  /** Idle timeout of every wait on the source, ms (default: the link's, DEFAULT_IDLE_TIMEOUT_MS). */
  timeoutMs?: number;
  /** Post-copy: where the post-copy listener binds (default 127.0.0.1 / the listen host). */
  postcopyHost?: string;
  /** Post-copy: the fault path to page on (default: 'exit' where the engine has it, else 'uffd'; postcopy/paging.ts). */
  postcopyFaultPath?: FaultPath;
  /** Post-copy: how long to wait for the source to reconnect after a drop, ms (default 60 s). */
  postcopyRecoverTimeoutMs?: number;
  /**
   * Called on GO once the guest runs here and STARTED is on its way, with the wall-clock time
   * (progress-clock.ts) it was resumed at (e.g. to watch its progress clock from its first unit).
   */
  onGuestStart?: (vm: Vm, resumedAtMs: number) => void;
}

/** The post-copy phase as the destination saw it. */
export interface DestinationPostcopyReport {
  faultPath: FaultPath;
  /** Pages missing when the guest started. */
  missingAtStart: number;
  waits: VcpuPageWaits[];
  result?: PostcopyDestinationResult;
  error?: string;
}

export interface ReceiveResult {
  /** The migrated VM, running. The caller owns it. */
  vm: Vm;
  config: MigrationConfig;
  /** memoryHash (hash.ts) of the memory held at switchover, from the per-page table. */
  hash: string;
  /** memoryHash of a full re-read before the guest started (verifyRescan only). */
  rescanHash?: string;
  pagesReceived: number;
  /** Pass counters loaded from the source's vCPU state. */
  passesAtSwitchover: number[];
  /** The vCPU states loaded, as received (END's digest vouched for them), in arrival order. */
  vcpuStates: VcpuState[];
  /** END received -> guest started (after GO), seconds (the destination's share of downtime). */
  resumeSeconds: number;
  /** First vCPU-state record received -> guest started, seconds. */
  switchoverSeconds: number;
  /** Present when the guest started by post-copy (hash is then the one at the end of it). */
  postcopy?: DestinationPostcopyReport;
}

export const DEFAULT_MAX_RAM_BYTES = 64 * 2 ** 30;

const PREALLOC_CHUNK = 1 << 20;
/** Bytes preallocated between two yields to the event loop (~0.1 s at the ~3 s/GiB measured). */
const PREALLOC_YIELD_BYTES = 32 << 20;

/**
 * Write zeros over every guest RAM memslot (not the engine's own): faults every page in. Yields
 * to the event loop every PREALLOC_YIELD_BYTES, so a signal (SIGINT) is handled within a fraction
 * of a second even for a large guest, and stops with a cancel error once `signal` is aborted.
 */
async function preallocate(vm: Vm, cfg: MigrationConfig, signal?: AbortSignal): Promise<void> {
  const zeros = new Uint8Array(PREALLOC_CHUNK);
  let sinceYield = 0;
  for (const s of cfg.memslots) {
    if (s.internal) continue;
    for (let off = 0; off < s.memorySize; off += PREALLOC_CHUNK) {
      vm.writeGuest(s.guestPhysAddr + off, zeros.subarray(0, Math.min(PREALLOC_CHUNK, s.memorySize - off)));
      if ((sinceYield += PREALLOC_CHUNK) >= PREALLOC_YIELD_BYTES) {
        sinceYield = 0;
        await new Promise<void>((r) => setImmediate(r));
        if (signal?.aborted) throw new MigrationCancelledError('receive cancelled');
      }
    }
  }
}

type Phase = 'setup' | 'receiving' | 'switchover' | 'committing' | 'running';

export async function receiveMigration(link: DestLink, opts: ReceiveOptions): Promise<ReceiveResult> {
  const hasher = await createMemoryHasher();
  const digester = await createStateDigester();
  let configDigest = 0n;
  let vcpuDigest = 0n;
  const log = opts.log ?? (() => undefined);
  let phase: Phase = 'setup';
  let vm: Vm | null = null;
  let cfg: MigrationConfig | null = null;
  let table: PageHashTable | null = null;
  let slotMap: SlotMap | null = null;
  let lastRound = new Uint32Array(0);
  let internalPage = new Uint8Array(0);
  const syncs: number[] = new Array(link.channels).fill(0);
  const vcpuStates: VcpuState[] = [];
  let end: Extract<SourceRecord, { type: 'end' }> | null = null;
  let pagesReceived = 0;
  let ackedRound = 0;
  let tFirstVcpu: bigint | null = null;
  let result: ReceiveResult | null = null;
  const zeroPage = new Uint8Array(PAGE_SIZE);
  // Post-copy (only when the handshake accepted it): POSTCOPY_DISCARD lists go to `discards`
  // (postcopy/discard-intake.ts). The pager starts at the first list when every channel has had
  // its final SYNC (no page can land through writeGuest any more), else at POSTCOPY_RUN. Guest
  // RAM pages received at least once are counted as they come, so the switchover needs no pass
  // over every page.
  let discards: DiscardIntake | null = null;
  let pager: DemandPager | null = null;
  let faultPath: FaultPath | null = null;
  let ramPages = 0;
  let ramReceived = 0;
  let pcServer: Server | null = null;
  let pc: PostcopyDestination | null = null;
  let pcReport: DestinationPostcopyReport | null = null;

  /** The engine CONFIG asked for, opened once in setup (the switchover asks it which fault path to page by). */
  let destEngine: Engine | null = null;

  const protocol = (msg: string) => new MigrationLinkError(`protocol error during ${phase}: ${msg}`, ErrorCode.BAD_STREAM);

  // CONFIG arrives as parsed JSON: every field is checked (config-validate.ts) before anything
  // is built, and its digest is kept for END's check.
  const onConfig = async (raw: unknown) => {
    let c: MigrationConfig;
    let engine: Engine;
    try {
      c = validateConfig(raw, MMU_LOCK_MODES);
      engine = destEngine = await opts.openEngine(c.engine);
      checkConfig(c, engine, opts.limits ?? { maxRamBytes: DEFAULT_MAX_RAM_BYTES });
    } catch (e) {
      throw new MigrationLinkError((e as Error).message, ErrorCode.BAD_CONFIG);
    }
    configDigest = digester.config(raw);
    log(`receiving a ${c.engine} VM: ${c.vcpus} vCPUs, ${c.ramBytes} bytes in ${c.memslots.length} memslots, workload ${c.workload.kind}`);
    // Preallocation overlaps the vCPU threads' start-up. Not with post-copy negotiated (QEMU's
    // postcopy discards all of RAM when it starts listening, for the same reason): every page the
    // source never sent would have to be dropped again at the switch, on the downtime path.
    const prealloc = opts.preallocate && !link.postcopyAllowed;
    if (opts.preallocate && !prealloc) log('not preallocating guest RAM: post-copy is negotiated, and pages never sent must stay missing');
    vm = await buildDestinationVm(c, engine, prealloc ? (v) => preallocate(v, c, opts.signal) : undefined);
    // The post-copy listener now, off the downtime path (it serves only after POSTCOPY_RUN).
    if (link.postcopyAllowed) pcServer = await PostcopyDestination.openServer(opts.postcopyHost ?? '127.0.0.1');
    // Paused before it ever ran: loadVcpuState is then allowed for every vCPU in any order, and
    // the pause costs nothing on the downtime path.
    await vm.pause();
    // Start the vCPU threads now, paused with no passes allowed: thread start-up (hundreds of
    // ms on kvm) is then spent in setup instead of in the downtime.
    vm.allowPasses(0);
    cfg = c;
    slotMap = new SlotMap(c.memslots);
    table = new PageHashTable(slotMap.layout);
    lastRound = new Uint32Array(slotMap.totalPages);
    internalPage = new Uint8Array(slotMap.totalPages);
    for (const s of c.memslots) {
      if (!s.internal) {
        ramPages += s.pages;
        continue;
      }
      const { index } = slotMap.locatePages(s.slot, 0, s.pages)!;
      internalPage.fill(1, index, index + s.pages);
    }
    discards = new DiscardIntake(lastRound, internalPage, table, protocol);
    phase = 'receiving';
    await link.send({ type: 'ready' });
  };

  /** Where pages [page, +pages) of memslot `slot` lie; they must be inside it. */
  const locate = (slot: number, page: number, pages: number) => {
    const at = slotMap!.locatePages(slot, page, pages);
    if (!at) throw protocol(`pages [${page}, +${pages}) of memslot ${slot} are not guest RAM of this VM`);
    return at;
  };

  // Guest RAM is shared with the vCPU threads, and V8 copies into shared memory word by word
  // only when source and destination are 8-byte aligned alike, else byte by byte (3x slower,
  // measured). A RAM record's data sits in the read slab wherever the stream put it (after a
  // CONFIG or VCPU_STATE of any length, a 20-byte ZERO, a 12-byte SYNC), so misaligned runs
  // are first copied into an aligned scratch buffer by a plain memcpy.
  let alignScratch = new Uint8Array(0);
  const aligned = (data: Uint8Array): Uint8Array => {
    if ((data.byteOffset & 7) === 0) return data;
    if (alignScratch.length < data.length) alignScratch = new Uint8Array(data.length);
    const copy = alignScratch.subarray(0, data.length);
    copy.set(data);
    return copy;
  };

  const onRam = (round: number, slotId: number, firstPage: number, raw: Uint8Array) => {
    const data = aligned(raw);
    const pages = data.length / PAGE_SIZE;
    const { slot, page: first, index: idx, gpa } = locate(slotId, firstPage, pages);
    if (discards!.any) checkNotDiscarded(slotId, firstPage, idx, pages);
    pagesReceived += pages;
    let all = true;
    let fresh = 0;
    for (let i = 0; i < pages; i++) {
      const prev = lastRound[idx + i]!;
      if (prev > round) all = false;
      else if (prev === 0) fresh++;
    }
    if (!internalPage[idx]) ramReceived += fresh;
    if (all) {
      vm!.writeGuest(gpa, data);
      lastRound.fill(round, idx, idx + pages);
      hasher.hashInto(table!, slot, first, pages, data);
      return;
    }
    for (let i = 0; i < pages; i++) {
      if (lastRound[idx + i]! > round) continue;
      lastRound[idx + i] = round;
      const page = data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
      vm!.writeGuest(gpa + i * PAGE_SIZE, page);
      table!.set(slot, first + i, hasher.hashPage(slot, first + i, page));
    }
  };

  // Pages arriving once POSTCOPY_DISCARD lists came: none of them listed (the source sends none:
  // they would be dropped), and once the pager runs (it starts at the first list, or later) only
  // engine-internal memory (never paged on demand, all of it here): guest RAM written here would
  // wait on itself (writeGuest faults it in).
  const checkNotDiscarded = (slotId: number, firstPage: number, idx: number, pages: number) => {
    for (let i = 0; i < pages; i++) if (discards!.discarded[idx + i]) throw protocol(`page ${firstPage + i} of memslot ${slotId} arrived after POSTCOPY_DISCARD listed it`);
    if (pager && !internalPage[idx]) throw protocol(`guest RAM pages [${firstPage}, +${pages}) of memslot ${slotId} after POSTCOPY_DISCARD`);
  };

  const onZero = (round: number, slotId: number, firstPage: number, pages: number) => {
    const { slot, page: first, index: idx, gpa } = locate(slotId, firstPage, pages);
    if (discards!.any) checkNotDiscarded(slotId, firstPage, idx, pages);
    pagesReceived += pages;
    for (let i = 0; i < pages; i++) {
      const prev = lastRound[idx + i]!;
      if (prev > round) continue;
      if (prev === 0 && !internalPage[idx + i]) ramReceived++;
      // Fresh guest RAM is already zero; only a page written before (or engine-internal memory
      // that createVcpus filled) needs clearing.
      if (prev > 0 || internalPage[idx + i]) vm!.writeGuest(gpa + i * PAGE_SIZE, zeroPage);
      lastRound[idx + i] = round;
      table!.setZero(slot, first + i, 1);
    }
  };

  // A vCPU state is checked whole (envelope here, registers by the engine) before it is loaded.
  // Loaded now, not at switchover: the VM is paused and stays so until END checks out (or is
  // destroyed), and the load overlaps the source sending SYNC and END.
  const onVcpuState = (raw: unknown) => {
    let state: VcpuState;
    try {
      state = checkVcpuStateEnvelope(raw, cfg!.engine, cfg!.vcpus);
      if (vcpuStates.some((s) => s.vcpu === state.vcpu)) throw new Error(`a second state for vCPU ${state.vcpu}`);
      vm!.loadVcpuState(state);
    } catch (e) {
      throw new MigrationLinkError(`VCPU_STATE record ${vcpuStates.length + 1}: ${(e as Error).message}`, e instanceof VcpuStateError ? ErrorCode.BAD_VCPU_STATE : ErrorCode.BAD_STREAM);
    }
    vcpuStates.push(state);
    // The last one in: its digest now, while the source still harvests and sends (END's check
    // then only compares).
    if (vcpuStates.length === cfg!.vcpus) vcpuDigest = digester.vcpuStates(vcpuStates);
  };

  let tEnd = 0n;
  let held = '';
  let rescanHash: string | undefined;

  // END checked out on every channel: answer COMPLETE and wait for GO, the guest still paused.
  const switchover = async () => {
    phase = 'switchover';
    tEnd = process.hrtime.bigint();
    // END binds everything the guest will run on here: CONFIG, every vCPU state, memory.
    const e = end!;
    if (vcpuStates.length !== cfg!.vcpus || e.vcpuStates !== cfg!.vcpus) throw protocol(`END after ${vcpuStates.length} vCPU states, the source sent ${e.vcpuStates}, CONFIG has ${cfg!.vcpus} vCPUs`);
    if (e.configDigest !== configDigest) throw new VerificationError(`CONFIG differs from what the source sent (digest ${formatDigest(configDigest)} here, ${formatDigest(e.configDigest)} in END); the guest is not started`);
    if (e.vcpuStateDigest !== vcpuDigest) throw new VerificationError(`vCPU state differs from what the source sent (digest ${formatDigest(vcpuDigest)} here, ${formatDigest(e.vcpuStateDigest)} in END); the guest is not started`);
    held = formatMemoryHash(table!.total());
    if (held !== e.hash) throw new VerificationError(`memory hash mismatch at END: the source sent ${e.hash}, this side holds ${held}; the guest is not started`);
    rescanHash = opts.verifyRescan ? hashVmMemory(hasher, vm!, slotMap!) : undefined;
    // The allowance now, while the VM stays paused: GO then only has to lift the pause.
    vm!.allowPasses(Infinity);
    phase = 'committing';
    await link.send({ type: 'complete', hash: held, pagesReceived });
  };

  // Demand paging on this VM (once): the VM is paused and no page arrives through writeGuest
  // any more, so what is populated now is what the pager counts as present.
  const startPager = (): DemandPager => {
    if (pager) return pager;
    try {
      faultPath = postcopyFaultPath(destEngine!, opts.postcopyFaultPath);
      pager = startPostcopyPaging(vm!, faultPath);
    } catch (err) {
      throw new MigrationLinkError(`post-copy cannot start here: ${(err as Error).message}`, ErrorCode.BAD_CONFIG);
    }
    return pager;
  };

  // POSTCOPY_DISCARD: these pages are stale here (or were never sent).
  const onDiscard = (slotId: number, firstPage: number, count: number, bitmap: Uint8Array) => {
    if (!link.postcopyAllowed) throw protocol('POSTCOPY_DISCARD, but post-copy was not negotiated');
    const { index } = locate(slotId, firstPage, count);
    if (!discards!.any && syncs.every((r) => r >= syncs[0]!)) startPager();
    discards!.take(slotId, firstPage, index, count, bitmap, pager);
  };

  // END{postcopy} (POSTCOPY_RUN): check what we keep, start demand paging, answer COMPLETE with
  // where the post-copy connections go; the guest starts on GO, as after END.
  const postcopySwitchover = async (missingPages: number) => {
    phase = 'switchover';
    tEnd = process.hrtime.bigint();
    const e = end!;
    if (!link.postcopyAllowed) throw protocol('POSTCOPY_RUN, but post-copy was not negotiated');
    if (vcpuStates.length !== cfg!.vcpus || e.vcpuStates !== cfg!.vcpus) throw protocol(`POSTCOPY_RUN after ${vcpuStates.length} vCPU states, the source sent ${e.vcpuStates}, CONFIG has ${cfg!.vcpus} vCPUs`);
    if (e.configDigest !== configDigest) throw new VerificationError(`CONFIG differs from what the source sent (digest ${formatDigest(configDigest)} here, ${formatDigest(e.configDigest)} in POSTCOPY_RUN); the guest is not started`);
    if (e.vcpuStateDigest !== vcpuDigest) throw new VerificationError(`vCPU state differs from what the source sent (digest ${formatDigest(vcpuDigest)} here, ${formatDigest(e.vcpuStateDigest)} in POSTCOPY_RUN); the guest is not started`);
    const sm = slotMap!;
    const ramSlots = cfg!.memslots.filter((s) => !s.internal).map((s) => ({ slot: s.slot, pages: s.pages }));
    // Missing: never received, or received and discarded. Everything else this side holds is the
    // source's page at switchover; missing pages come from the source, hashed as they land.
    const missing = ramPages - ramReceived + discards!.staleCount;
    held = formatMemoryHash(table!.total());
    if (held !== e.hash) throw new VerificationError(`memory hash mismatch at POSTCOPY_RUN: the source kept ${e.hash}, this side holds ${held}; the guest is not started`);
    if (missing !== missingPages) throw protocol(`POSTCOPY_RUN says ${missingPages} pages are missing here, this side misses ${missing}`);
    const pager = startPager();
    for (const s of ramSlots) discards!.dropAtSwitch(pager, s.slot, sm.locatePages(s.slot, 0, s.pages)!.index, s.pages);
    // A held page the pager still calls missing was received as ZERO and never written (fresh
    // RAM is zero): installed from here, no request to the source.
    const heldPage = (slot: number, page: number): Uint8Array | null => {
      const at = sm.locatePages(slot, page, 1);
      return at && lastRound[at.index]! > 0 && !discards!.discarded[at.index] ? zeroPage : null;
    };
    const token = randomBytes(8).readBigUInt64LE();
    pc = new PostcopyDestination({ pager, slotMap: sm, table: table!, hasher, ramSlots, heldPage, token, log, recoverTimeoutMs: opts.postcopyRecoverTimeoutMs ?? 60_000 }, pcServer!);
    pcServer = null;
    pcReport = { faultPath: faultPath!, missingAtStart: missing, waits: [] };
    const pcDone = pc.done;
    pcDone.then(
      (r) => {
        pcReport!.result = r;
        pcReport!.waits = pager.waits();
      },
      (err: Error) => {
        pcReport!.error = err.message;
        pcReport!.waits = pager.waits();
      },
    );
    vm!.allowPasses(Infinity);
    phase = 'committing';
    await link.send({ type: 'complete', hash: held, pagesReceived, details: { postcopyPort: pc.port, token: token.toString(16) } });
  };

  // GO: the source will never run the guest again; run it here.
  // STARTED goes out right after the resume and everything else here waits until it is written:
  // the source counts downtime until it reads STARTED, and on this path every function runs for
  // the first time, uncompiled (a quarter of a millisecond for the progress watch alone; the
  // socket write itself would wait behind it).
  const start = async () => {
    const v = vm!;
    const resumedAtMs = wallClockMs();
    v.resume();
    phase = 'running';
    const t = process.hrtime.bigint();
    // The guest runs whether or not STARTED reaches the source: a source that loses the link
    // after GO stays paused, so the guest never runs twice.
    await link.send({ type: 'started' }).catch(() => undefined);
    opts.onGuestStart?.(v, resumedAtMs);
    pcServer?.close(); // pre-copy completed: no post-copy connection will come
    pcServer = null;
    if (pc) {
      pc.startBackground();
      log(`guest running here on demand paging (${pcReport!.faultPath} path), ${pcReport!.missingAtStart} pages missing`);
    }
    const resumeSeconds = Number(t - tEnd) / 1e9;
    const switchoverSeconds = Number(t - (tFirstVcpu ?? tEnd)) / 1e9;
    result = { vm: v, config: cfg!, hash: held, rescanHash, pagesReceived, passesAtSwitchover: vcpuStates.map((s) => s.progress.passesCompleted), vcpuStates, resumeSeconds, switchoverSeconds };
    log(`guest running here after round ${end!.finalRound}; ${pagesReceived} pages received`);
    if (pc) {
      const r = await pc.done.catch(() => null);
      result.postcopy = pcReport!;
      if (r) {
        result.hash = r.hash;
        log(`post-copy complete: ${r.pagesFromSource} pages from the source, ${r.remoteRequests} requested, ${r.duplicates} duplicates, memory hash ${r.hash}`);
      } else log(`post-copy FAILED: ${pcReport!.error}`);
    }
    switched();
  };

  const maybeSwitchover = (): Promise<void> | void => {
    if (end && syncs.every((r) => r >= end!.finalRound)) return end.postcopy ? postcopySwitchover(end.postcopy.missingPages) : switchover();
  };

  const onRecord = (r: SourceRecord, channel: number): void | Promise<void> => {
    if (phase === 'setup') {
      if (r.type !== 'config') throw protocol(`expected CONFIG, got ${r.type.toUpperCase()}`);
      return onConfig(r.config);
    }
    if (phase === 'committing') {
      if (r.type !== 'go') throw protocol(`expected GO after COMPLETE, got ${r.type.toUpperCase()}`);
      return start();
    }
    if (phase !== 'receiving') throw protocol(`${r.type.toUpperCase()} after END`);
    switch (r.type) {
      case 'ram':
        return onRam(r.round, r.slot, r.page, r.data);
      case 'zero':
        return onZero(r.round, r.slot, r.page, r.pages);
      case 'sync':
        syncs[channel] = r.round;
        if (r.round > ackedRound && syncs.every((x) => x >= r.round)) {
          ackedRound = r.round;
          // After the records already read: the final round's SYNC is followed by END, whose
          // COMPLETE should not queue behind an ack nobody waits for.
          const round = r.round;
          setImmediate(() => link.send({ type: 'synced', round }).catch(() => undefined));
        }
        return maybeSwitchover();
      case 'vcpu':
        tFirstVcpu ??= process.hrtime.bigint();
        return onVcpuState(r.state);
      case 'end':
        if (channel !== 0) throw protocol('END on a data channel');
        end = r;
        return maybeSwitchover();
      case 'discard':
        return onDiscard(r.slot, r.firstPage, r.count, r.bitmap);
      case 'config':
        throw protocol('a second CONFIG');
      case 'go':
        throw protocol('GO before END');
    }
  };

  let switched: () => void = () => undefined;
  const whenSwitched = new Promise<void>((r) => (switched = r));
  // A cancel fails the link at once (an ERROR to the source, every wait in run() ends); close()
  // would wait for the source to close its side first.
  const onAbort = () => void link.send({ type: 'error', message: 'receive cancelled' }).catch(() => undefined);
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  if (opts.timeoutMs !== undefined) link.setIdleTimeout?.(opts.timeoutMs);
  if (opts.signal?.aborted) onAbort();
  try {
    const running = link.run(onRecord).then(() => {
      if (opts.signal?.aborted) throw new MigrationCancelledError('receive cancelled');
      if (!result) {
        throw new MigrationLinkError(
          phase === 'committing'
            ? 'the source closed the stream after COMPLETE without GO: the guest was not started here'
            : `the source closed the stream during ${phase}, before END`,
        );
      }
    });
    running.catch(() => undefined);
    await Promise.race([running, whenSwitched]);
    link.close();
    return result!;
  } catch (e) {
    // The run may reject after a successful switchover only if the source drops while closing.
    if (result) return result;
    const err = opts.signal?.aborted ? new MigrationCancelledError('receive cancelled') : (e as Error);
    await link.send({ type: 'error', message: err.message, code: rejectionCode(err) }).catch(() => undefined);
    link.close();
    const v = vm as Vm | null;
    (pcServer as Server | null)?.close();
    if (v) await v.destroy();
    throw new MigrationLinkError(`incoming migration failed during ${phase}: ${err.message}; nothing was kept`);
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
  }
}

/** The ERROR code that tells the source what kind of failure ended the migration here. */
function rejectionCode(err: Error): number {
  if (err instanceof MigrationCancelledError) return ErrorCode.CANCELLED;
  return errorCodeFor(err);
}
