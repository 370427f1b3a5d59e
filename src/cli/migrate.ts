// `stage2 migrate --to HOST:PORT | --local`: start a VM running the workload, let it run, then
// migrate it live (pre-copy) to a `stage2 receive` -- on another host, or with --local to a
// receiver process this command spawns on loopback. Prints the stats (QEMU query-migrate names;
// --json: one object on stdout). Exit status 0 only for a completed, verified migration.
//
// SIGINT, at any moment, ends the command within a second: before the migration starts it stops
// there; during it, it cancels (migrateVm: before GO the source resumes, after GO it stays paused
// and says so); a --local receiver is told to stop (SIGTERM) and, being tied to this process by
// its stdin (receive.ts), ends with it whatever happens. A second SIGINT exits at once.
import { HUGE_RECOVERY_STRATEGIES, type HugeRecoveryStrategy } from '../soft/huge/recovery.ts';
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { Command, InvalidArgumentError } from 'commander';
import { projectRoot } from '../util/worker.ts';
import { createSourceVm } from '../migration/source-vm.ts';
import { DEFAULT_VCPU_DIRTY_LIMIT, DIRTY_LIMIT_STALL_TARGET_MS, dirtyRingForLimit } from '../migration/dirty-limit.ts';
import { connectLink } from '../migration/wire-link.ts';
import { migrateVm, DEFAULT_DOWNTIME_LIMIT_MS, DEFAULT_MAX_ROUNDS, type PostcopyOptions } from '../migration/source.ts';
import { MigrationCancelledError } from '../migration/errors.ts';
import { DEFAULT_IDLE_TIMEOUT_MS } from '../migration/link.ts';
import { progressBar } from '../migration/progress-bar.ts';
import type { SourceLink } from '../migration/link.ts';
import { lazyLink } from '../migration/lazy-link.ts';
import type { MigrationStats } from '../migration/stats.ts';
import type { GuestView } from '../migration/guest-view/guest-view.ts';
import { MAX_CHANNELS } from '../migration/stream/format.ts';
import { addCommonOptions, parseDirtyRingEntries, parseIntInRange, parseNonNegativeInt, parseNonNegativeNumber, parsePeerAddress, parsePositiveInt, parseRecover, parseSize, workloadVmParams, type CommonOptions } from './options.ts';
import type { ReceiveReport } from './receive.ts';
import { checkMigrateOptions, engineForWorkload, openCheckedEngine, UsageError } from './validate.ts';
import { sleepUnless } from '../util/sleep.ts';
import { resumePausedMigration, waitForManualResume } from './postcopy-resume.ts';
import { addMigrateSecurityOptions, loadClientSecurity, localReceiverArgs, type SecurityOptions } from './security-options.ts';
import type { ClientSecurity } from '../migration/transport/admission.ts';
import { MigrationState } from '../migration/migration-state.ts';
import { addDashboardOption, startDashboard, type DashboardOptions } from './dashboard-options.ts';
import type { Dashboard } from '../dashboard/dashboard.ts';
import { Timeline } from '../dashboard/timeline.ts';
import { writeReport } from '../dashboard/report.ts';
import { ProgressWatch } from '../migration/guest-view/progress-watch.ts';
import { guestView } from '../migration/guest-view/guest-view.ts';
import { progressUnit, wallClockMs } from '../vmm/run/progress-clock.ts';

export interface MigrateOptions extends CommonOptions, SecurityOptions, DashboardOptions {
  /** migrate --report FILE.html: the charts and the JSON, in one offline file (dashboard/report.ts). */
  report?: string;
  to?: { host: string; port: number };
  local: boolean;
  maxBandwidth: number;
  downtimeLimit: number;
  channels: number;
  maxRounds: number;
  autoConverge: boolean;
  converge: 'auto-converge' | 'dirty-limit';
  /** --compress lz4: RAM records lz4-compressed where that saves 1/8 or more. */
  compress: 'none' | 'lz4';
  vcpuDirtyLimit: number;
  /** --converge dirty-limit: dirty-ring entries per vCPU (default dirtyRingForLimit(vcpuDirtyLimit)). */
  dirtyRing?: number;
  warmupMs: number;
  destRunMs: number;
  destPrealloc: boolean;
  timeoutMs: number;
  /** --postcopy [auto]: true = after the first round; false: --no-postcopy (pure pre-copy). */
  postcopy?: boolean | 'auto';
  postcopyAfter?: number;
  onNoConvergence?: 'postcopy' | 'fail' | 'force';
  postcopyRetry: number;
  /** How long a paused post-copy waits for `migrate --resume`, ms (0: fail at once). */
  postcopyResumeWait: number;
  /** migrate --resume PID: resume that paused migration instead of starting one. */
  resume?: number;
  destPostcopy: boolean;
  /** Soft engine: how the source re-forms huge mappings when logging stops (huge/recovery.ts). */
  recover: HugeRecoveryStrategy;
}


function parseCompress(v: string): 'none' | 'lz4' {
  if (v !== 'none' && v !== 'lz4') throw new InvalidArgumentError('must be one of none, lz4');
  return v;
}

function parseConverge(v: string): 'auto-converge' | 'dirty-limit' {
  if (v !== 'auto-converge' && v !== 'dirty-limit') throw new InvalidArgumentError('must be one of auto-converge, dirty-limit');
  return v;
}

function parsePostcopy(v: string): 'auto' {
  if (v !== 'auto') throw new InvalidArgumentError(`'${v}': --postcopy takes no value or 'auto'`);
  return 'auto';
}
function parseOnNoConvergence(v: string): 'postcopy' | 'fail' | 'force' {
  if (v !== 'postcopy' && v !== 'fail' && v !== 'force') throw new InvalidArgumentError(`'${v}': must be postcopy, fail or force`);
  return v;
}

/**
 * The post-copy policy the flags ask for (source.ts PostcopyOptions). Without any post-copy flag
 * it is `auto`: pre-copy while it can converge, post-copy once the guest re-dirties what the bulk
 * round sent or the rounds stop shrinking (iterating further would only resend). Pure pre-copy is
 * asked for with --no-postcopy (the rounds running out then fail, or --on-no-convergence force),
 * or with --on-no-convergence fail|force alone (post-copy is then never used).
 */
export function postcopyPolicy(opts: MigrateOptions): PostcopyOptions {
  const retries = opts.postcopyRetry ?? 0;
  if (opts.postcopy === false) {
    if (opts.postcopyAfter !== undefined) throw new UsageError('--no-postcopy and --postcopy-after exclude each other');
    if (opts.onNoConvergence === 'postcopy') throw new UsageError('--no-postcopy and --on-no-convergence postcopy exclude each other');
    return { switchAfter: null, onNoConvergence: opts.onNoConvergence ?? 'fail', retries };
  }
  const onNoConvergence = opts.onNoConvergence ?? 'postcopy';
  const preferred = opts.postcopy === 'auto' ? 'auto' : opts.postcopy === true ? 1 : onNoConvergence === 'postcopy' ? 'auto' : null;
  return { switchAfter: opts.postcopyAfter ?? preferred, onNoConvergence, retries };
}

export type MigrateResult = MigrationStats & { destination?: ReceiveReport | { error: string } };

/** `p`, or null after `ms` (the timer is cleared either way, so it never holds the process). */
function within<X>(p: Promise<X>, ms: number): Promise<X | null> {
  let t: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<null>((r) => (t = setTimeout(() => r(null), ms)))]).finally(() => clearTimeout(t));
}

function freePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, host, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/** Connect, retrying while the receiver is still starting (connection refused). */
async function connectWithRetry(host: string, port: number, channels: number, timeoutMs: number, idleTimeoutMs: number, signal: AbortSignal, child: ChildProcess | undefined, security: ClientSecurity | undefined, compress: boolean): Promise<SourceLink> {
  const t0 = Date.now();
  for (;;) {
    if (signal.aborted) throw new MigrationCancelledError();
    try {
      return await connectLink({ host, port, channels, timeoutMs: idleTimeoutMs, signal, security, compress });
    } catch (e) {
      if (child && child.exitCode !== null) throw new Error(`the receiver exited (status ${child.exitCode}) before accepting the migration`);
      if (Date.now() - t0 > timeoutMs || !/ECONNREFUSED|refused the connection|connection refused/.test((e as Error).message)) throw e;
      await sleepUnless(50, signal);
    }
  }
}

interface LocalReceiver {
  child: ChildProcess;
  port: number;
  /** The receiver's JSON report (or its failure), once it exits. */
  report: Promise<ReceiveReport | { error: string }>;
}

function spawnReceiver(host: string, port: number, opts: MigrateOptions, engineKind: string, log: (line: string) => void): LocalReceiver {
  const args = [
    join(projectRoot, 'bin', 'stage2.mjs'), 'receive', '--listen', `${host}:${port}`, '--engine', engineKind, '--json',
    '--run-ms', String(opts.destRunMs), opts.destPrealloc ? '--prealloc' : '--no-prealloc', '--timeout-ms', String(opts.timeoutMs), '--recover', opts.recover,
    opts.destPostcopy === false ? '--no-postcopy' : '--postcopy',
    ...localReceiverArgs(opts),
  ];
  // Detached: a terminal ^C reaches the source only, which cancels and tells the receiver. Its
  // stdin is a pipe from us that it watches (STAGE2_EXIT_WITH_STDIN): when this process ends,
  // however, the pipe closes and the receiver cancels too, so it never outlives us.
  const child = spawn(process.execPath, args, { stdio: ['pipe', 'pipe', 'pipe'], detached: true, env: { ...process.env, STAGE2_EXIT_WITH_STDIN: '1' } });
  child.stdin!.on('error', () => undefined);
  let out = '';
  let errTail = '';
  child.stdout!.on('data', (c: Buffer) => (out += c.toString()));
  let partial = '';
  child.stderr!.on('data', (c: Buffer) => {
    partial += c.toString();
    const lines = partial.split('\n');
    partial = lines.pop()!;
    for (const l of lines) {
      if (l.trim()) log(`[destination] ${l}`);
      errTail = l;
    }
  });
  const report = new Promise<ReceiveReport | { error: string }>((resolve) => {
    child.on('exit', (code, signal) => {
      try {
        if (code === 0) return resolve(JSON.parse(out.trim().split('\n').pop()!) as ReceiveReport);
      } catch {
        /* fall through */
      }
      resolve({ error: `receiver exited with ${code !== null ? `status ${code}` : `signal ${signal}`}${errTail ? `: ${errTail.trim()}` : ''}` });
    });
  });
  const kill = () => {
    if (child.exitCode === null) child.kill('SIGKILL');
  };
  process.once('exit', kill);
  child.on('exit', () => {
    process.off('exit', kill);
    child.stdin!.destroy();
  });
  return { child, port, report };
}

/**
 * The whole `migrate` command: source VM, (receiver), migration, stats. `log` gets human lines;
 * the caller prints the result.
 */
export async function runMigrate(opts: MigrateOptions, log: (line: string) => void): Promise<MigrateResult> {
  if (!opts.local && !opts.to) throw new Error('migrate needs --to HOST:PORT or --local');
  const security = loadClientSecurity(opts);
  const timeoutMs = opts.timeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS;
  // SIGINT from the very start (see the header). `receiver` is set once spawned.
  let receiver: LocalReceiver | null = null;
  const ac = new AbortController();
  let sigints = 0;
  const onSigint = () => {
    if (++sigints > 1) {
      log('SIGINT again: exiting now');
      process.exit(130);
    }
    log('SIGINT: cancelling the migration');
    ac.abort();
    if (receiver && receiver.child.exitCode === null) receiver.child.kill('SIGTERM');
    // Backstop: the cancel below ends well within this; if anything ever does not, exit anyway.
    setTimeout(() => {
      log('still running 1 s after SIGINT: exiting (the source VM ends with this process)');
      process.exit(130);
    }, 1000).unref();
  };
  process.on('SIGINT', onSigint);
  /** `p`, or a cancel error as soon as SIGINT comes (what `p` still does is dropped with the process). */
  const unlessCancelled = <X>(p: Promise<X>): Promise<X> => {
    p.catch(() => undefined);
    return Promise.race([p, new Promise<never>((_, reject) => ac.signal.addEventListener('abort', () => reject(new MigrationCancelledError('cancelled before the migration started')), { once: true }))]);
  };
  // --dashboard: listening (and its URL printed) before anything else starts.
  const dash = await startDashboard(opts, `${opts.local ? 'migrate --local' : 'migrate'}: source`, 'source', log);
  try {
    return await runMigrateSignalled(opts, timeoutMs, log, ac.signal, unlessCancelled, (r) => (receiver = r), security, dash);
  } finally {
    process.off('SIGINT', onSigint);
    await dash?.close();
  }
}

async function runMigrateSignalled(
  opts: MigrateOptions,
  timeoutMs: number,
  log: (line: string) => void,
  signal: AbortSignal,
  unlessCancelled: <X>(p: Promise<X>) => Promise<X>,
  spawned: (r: LocalReceiver) => void,
  security?: ClientSecurity,
  dash: Dashboard | null = null,
): Promise<MigrateResult> {
  const demand = { vcpuCounts: [opts.vcpus], vcpusFlag: '-v/--vcpus', bytesPerVcpu: opts.bytesPerVcpu, backing: opts.backing, copies: opts.local ? 2 : 1 } as const;
  const engine = await unlessCancelled(openCheckedEngine(engineForWorkload(opts), demand, (why) => log(`engine: ${why}; using soft`), { recover: opts.recover }));
  const ramMiB = (opts.vcpus * opts.bytesPerVcpu) / 2 ** 20;
  log(`source: starting a ${engine.kind} VM, ${opts.vcpus} vCPUs x ${opts.bytesPerVcpu / 2 ** 20} MiB (${ramMiB} MiB), workload ${opts.workload}`);
  const t0 = performance.now();
  const { vm, spec } = await unlessCancelled(
    createSourceVm(engine, {
      ...workloadVmParams(opts),
      // Dirty-limit is enforced at DIRTY_RING_FULL exits: the source logs to dirty rings then.
      ...(opts.converge === 'dirty-limit' ? { dirtyRingEntries: opts.dirtyRing ?? dirtyRingForLimit(opts.vcpuDirtyLimit) } : {}),
    }),
  );
  let receiver: LocalReceiver | null = null;
  dash?.attachVm(vm);
  const runningSinceMs = wallClockMs();
  let guestWatch: ProgressWatch | null = null;
  try {
    log(`source: memory populated in ${((performance.now() - t0) / 1000).toFixed(2)} s; guest running`);
    const host = opts.local ? '127.0.0.1' : opts.to!.host;
    if (opts.local) {
      const port = await freePort(host);
      receiver = spawnReceiver(host, port, opts, engine.kind, log);
      spawned(receiver);
      log(`destination: receiver process ${receiver.child.pid} on ${host}:${port}`);
    }
    const port = receiver ? receiver.port : opts.to!.port;
    // Connect while the guest warms up (a spawned receiver needs a second or two to start), but
    // let a failure surface inside migrateVm: an unreachable receiver is a failed migration with
    // stats, not a crash. A long warm-up connects only near its end: the receiver's idle timeout
    // runs from the connection to CONFIG.
    const connectAfterMs = Math.max(0, opts.warmupMs - Math.min(3000, timeoutMs / 2));
    const linkP = sleepUnless(connectAfterMs, signal).then(() => connectWithRetry(host, port, opts.channels, receiver ? 30_000 : 2_000, timeoutMs, signal, receiver?.child, security, opts.compress === 'lz4'));
    linkP.catch(() => undefined);
    await Promise.all([linkP.catch(() => undefined), sleepUnless(opts.warmupMs, signal)]);
    const link = lazyLink(opts.channels, () => linkP);
    log(`source: guest passes before migration [${vm.progress().map((p) => p.passesCompleted).join(', ')}]; migrating to ${host}:${port} over ${opts.channels} channel(s)`);
    const bar = progressBar();
    // The dashboard and the report watch the migration through its state and its harvests.
    const state = new MigrationState();
    const timeline = dash?.timeline ?? (opts.report ? new Timeline() : null);
    timeline?.watch(state);
    const watch = dash?.attachMigration(vm, state);
    let stats: MigrationStats;
    // The guest's view (migration/guest-view/): its progress clock from now until it runs on.
    const clock = vm.progressClock();
    guestWatch = clock ? new ProgressWatch(clock, wallClockMs(), runningSinceMs) : null;
    try {
      stats = await migrateVm(vm, link, {
        workload: spec,
        backing: opts.backing,
        maxBandwidth: opts.maxBandwidth,
        downtimeLimitMs: opts.downtimeLimit,
        maxRounds: opts.maxRounds,
        autoConverge: opts.autoConverge,
        converge: opts.converge,
        vcpuDirtyLimit: opts.vcpuDirtyLimit,
        onProgress: timeline ? (p) => (bar.update(p), timeline.progress(p)) : bar.update,
        state,
        ...(watch ? { onDirtyHarvest: watch.onDirtyHarvest } : {}),
        signal,
        timeoutMs,
        postcopy: { ...postcopyPolicy(opts), waitForResume: (why) => waitForManualResume(why, opts.postcopyResumeWait ?? 0, log, signal) },
        log,
        // This command destroys the source itself (finally below): kept until then, it stops
        // logging on completion too and reports the huge mappings it re-formed.
        destroyOnComplete: false,
      });
    } finally {
      bar.done();
    }
    const result: MigrateResult = stats;
    // Completed (or committed: GO sent), the guest goes on at the destination; else here, resumed.
    const onDestination = stats.status === 'completed' || stats.sourceRunning === false;
    guestWatch?.closeAt();
    if (!onDestination) await guestWatch?.settle(500);
    const sourceWindow = guestWatch?.stop();
    timeline?.finish(stats.rounds);
    if (stats.status !== 'completed') {
      const state = !stats.sourceIntact ? 'NOT intact' : stats.sourceRunning === false ? 'intact but PAUSED (it is destroyed when this command exits)' : 'intact and running';
      log(`migration ${stats.status}: ${stats.error}; source ${state}`);
    }
    if (stats.postcopy) log(`switched to post-copy ${stats.postcopy.switchedAtSeconds.toFixed(2)} s in, after round ${stats.postcopy.switchedAfterRound}: ${stats.postcopy.reason}`);
    if (stats.downtimeExceeded) log(`DOWNTIME LIMIT EXCEEDED: ${stats.downtimeExceeded}`);
    if (receiver) {
      // After a completed migration the receiver runs the guest for --dest-run-ms, then reports.
      // Otherwise it has seen the failure and discards, or (a failure before it was reached)
      // still waits for a connection: a moment to report its own reason, then it is told.
      let report: ReceiveReport | { error: string } | null;
      if (stats.status === 'completed') report = await within(receiver.report, opts.destRunMs + 2 * timeoutMs + 5000);
      else {
        report = await within(receiver.report, signal.aborted ? 0 : 500);
        if (!report && receiver.child.exitCode === null) receiver.child.kill('SIGTERM');
        report ??= await within(receiver.report, 1000);
      }
      result.destination = report ?? { error: 'the receiver did not end after the migration; killed' };
    }
    if (sourceWindow) {
      const d = result.destination && 'guestProgress' in result.destination ? (result.destination.guestProgress ?? null) : null;
      result.guest = guestView(progressUnit(vm.engine), sourceWindow, onDestination ? d : null, onDestination ? 'destination' : 'source');
      if (result.destination && 'guestProgress' in result.destination) delete result.destination.guestProgress;
    }
    if (opts.report) {
      await writeReport(opts.report, { result: result as MigrateResult & Record<string, unknown>, dirtyRate: timeline?.dirtyRate ?? [], command: ['stage2', ...process.argv.slice(2)].join(' ') });
      log(`report: ${opts.report}`);
    }
    return result;
  } finally {
    guestWatch?.stop();
    dash?.detachVm();
    await vm.destroy();
    if (receiver && receiver.child.exitCode === null) {
      if (!signal.aborted) await within(receiver.report, 2000);
      if (receiver.child.exitCode === null) receiver.child.kill('SIGKILL');
    }
  }
}

export function printStats(s: MigrateResult, out: (line: string) => void): void {
  const ms = (x: number) => `${(x * 1000).toFixed(2)} ms`;
  out(`status: ${s.status}${s.error ? ` (${s.error})` : ''}`);
  out(`verified: ${s.verified}${s.sourceHash ? ` (source ${s.sourceHash}, destination ${s.destinationHash})` : ''}`);
  out(`total time: ${s.totalSeconds.toFixed(3)} s (setup ${ms(s.setupSeconds)}), downtime ${ms(s.downtimeSeconds)} (limit ${s.params.downtimeLimitMs} ms)`);
  out(`transferred: ${(s.transferredBytes / 2 ** 20).toFixed(1)} MiB of ${(s.ramBytes / 2 ** 20).toFixed(0)} MiB RAM; ${s.throughputMBps.toFixed(0)} MB/s, ${s.pagesPerSecond} pages/s`);
  out(`pages: ${s.normalPages} normal, ${s.zeroPages} zero; dirty syncs ${s.dirtySyncCount}, dirty rate ${s.dirtyPagesRate} pages/s, throttle ${s.throttlePercent}%`);
  for (const r of s.rounds) out(`  round ${r.round} ${r.kind.padEnd(13)} ${String(r.normalPages + r.zeroPages).padStart(8)} pages ${(r.bytes / 2 ** 20).toFixed(1).padStart(8)} MiB ${(r.seconds * 1000).toFixed(1).padStart(8)} ms  throttle ${r.throttlePercent}%`);
  if (s.postcopy) {
    const p = s.postcopy;
    out(`post-copy: switched after round ${p.switchedAfterRound} at ${p.switchedAtSeconds.toFixed(2)} s (${p.reason}); ${p.pushedPages ?? 0} pages pushed, ${s.postcopyRequests} requests, ${p.recoveries ?? 0} recoveries`);
    for (const w of p.vcpuPageWaits ?? []) out(`  vCPU ${w.vcpu} waited for ${w.faults} pages: p50 ${ms(w.p50)}, p99 ${ms(w.p99)}, max ${ms(w.max)}`);
  }
  if (s.downtimeExceeded) out(`downtime limit exceeded: ${s.downtimeExceeded}`);
  if (s.guest) printGuestView(s.guest, out);
  if (s.hugePagesReformed !== undefined) out(`source: ${s.hugePagesReformed} huge (2 MiB) mappings re-formed after dirty logging stopped`);
  if (s.sourceIntact !== undefined) out(`source intact: ${s.sourceIntact}${s.sourceRunning === false ? ', paused (switchover outcome unknown)' : ''}`);
}

/** The guest's view of the migration (migration/guest-view/guest-view.ts), one line per vCPU. */
export function printGuestView(g: GuestView, out: (line: string) => void): void {
  const ms = (x: number | null) => (x === null ? '-' : `${x.toFixed(1)} ms`);
  const where = g.destinationObserved ? 'source, switchover and destination' : 'the source only (destination not watched: stalls across the switchover are lower bounds)';
  out(`guest view (progress clock, a unit = ${g.unit}; ${where}): max stall ${ms(g.maxStallMs)}, p99 ${ms(g.p99StallMs)}`);
  for (const v of g.perVcpu) {
    const dip = v.dipPercent === null ? '' : ` (dip ${v.dipPercent.toFixed(1)}%)`;
    const flags = `${v.lowerBound ? ', at least: no progress seen after the migration' : ''}${v.lostUnits ? `, ${v.lostUnits} units unread` : ''}`;
    out(`  vCPU ${v.vcpu}: max stall ${ms(v.maxStallMs)}${v.switchoverStallMs !== null ? ` (across the switchover ${ms(v.switchoverStallMs)})` : ''}, p99 ${ms(v.p99StallMs)}; ${v.unitsPerSecBefore} units/s before, ${v.unitsPerSecDuring} during${dip}${flags}`);
  }
}

// The spawned receiver runs the guest --dest-run-ms, then reports and exits; `receive --run-ms 0`
// would run it until a SIGINT that a detached child never gets, and the source would wait forever.
const parseDestRunMs = parseIntInRange(1, Number.MAX_SAFE_INTEGER, 'must be a whole number of ms, at least 1: the --local receiver runs the guest this long, then exits');

export function addMigrationOptions(cmd: Command): Command {
  return addDashboardOption(cmd)
    .option('--max-bandwidth <size>', 'bytes per second on the link (accepts 64M); 0 = unlimited', parseSize, 0)
    .option('--downtime-limit <ms>', 'largest acceptable downtime, ms (0: switch over only when nothing is left to copy, or at --max-rounds)', parseNonNegativeNumber, DEFAULT_DOWNTIME_LIMIT_MS)
    .option('--channels <n>', `TCP connections to spread pages over (1..${MAX_CHANNELS})`, parseIntInRange(1, MAX_CHANNELS), 1)
    .option('--max-rounds <n>', 'iterative rounds before stop-and-copy is forced', parsePositiveInt, DEFAULT_MAX_ROUNDS)
    .option('--auto-converge', 'throttle the vCPUs stepwise (20%, +10%, up to 99%) while rounds do not shrink', true)
    .option('--no-auto-converge', 'never throttle the vCPUs')
    .option('--compress <codec>', 'none | lz4: compress RAM records (pays on a link slower than lz4, ~1 GB/s per core here, for pages that compress)', parseCompress, 'none')
    .option('--converge <policy>', 'how a guest that outruns the link is made to converge: auto-converge (slow every vCPU) | dirty-limit (hold each vCPU to --vcpu-dirty-limit; only faster ones wait; logs to dirty rings)', parseConverge, 'auto-converge')
    .option('--vcpu-dirty-limit <size>', 'dirty-limit: bytes per second each vCPU may dirty (accepts 1M)', parseSize, DEFAULT_VCPU_DIRTY_LIMIT)
    .option('--dirty-ring <entries>', `dirty-limit: dirty-ring entries per vCPU (256..65536, a power of two; default: the largest that keeps a vCPU's sleep at its limit within ${DIRTY_LIMIT_STALL_TARGET_MS} ms, 256..4096): the limit is enforced once per ring, so a smaller ring means shorter, more frequent sleeps`, parseDirtyRingEntries)
    .option('--postcopy [auto]', 'switch to post-copy after the first round; `auto` (the default without post-copy flags): part-way through the bulk round when the guest re-dirties what was sent, or when the rounds stop shrinking', parsePostcopy)
    .option('--no-postcopy', 'pure pre-copy: never switch to post-copy (rounds that run out above --downtime-limit then fail, or --on-no-convergence force)')
    .option('--postcopy-after <n>', 'switch to post-copy after n pre-copy rounds (1 = the bulk round, 0 = before it: every page is fetched on demand or pushed)', parseNonNegativeInt)
    .option('--on-no-convergence <what>', 'when the rounds run out above --downtime-limit: postcopy (default; fails if the destination refuses it), fail, or force (stop-and-copy anyway, reported)', parseOnNoConvergence)
    .option('--postcopy-retry <n>', 'reconnect up to n times when a post-copy connection drops (the guest waits on the destination meanwhile)', parseNonNegativeInt, 3)
    .option('--postcopy-resume-wait <ms>', 'after the reconnections are used up, wait this long for `migrate --resume PID` before failing (0: fail at once)', parseNonNegativeInt, 60_000)
    .option('--no-dest-postcopy', '--local: the receiver refuses post-copy (receive --no-postcopy)')
    .option('--warmup-ms <ms>', 'let the guest run this long before migrating', parseNonNegativeInt, 200)
    .option('--dest-prealloc', '--local: the receiver preallocates guest RAM in setup (receive --prealloc)', true)
    .option('--no-dest-prealloc', '--local: the receiver faults guest RAM in as pages arrive (receive --no-prealloc)')
    .option('--dest-run-ms <ms>', '--local: how long the destination runs the guest after switchover (at least 1)', parseDestRunMs, 1000)
    // Default: see migration/transport/liveness.ts (fits a 1 Gbit/s link with a wide margin).
    .option('--recover <strategy>', `soft engine: how the source re-forms huge mappings when dirty logging stops (completed, failed or cancelled): ${HUGE_RECOVERY_STRATEGIES.join(' | ')}`, parseRecover, 'in-place')
    .option('--timeout-ms <ms>', 'fail when the destination makes no progress for this long while we wait on it (idle timeout per phase; also given to a --local receiver)', parsePositiveInt, DEFAULT_IDLE_TIMEOUT_MS)
    .option('--report <file.html>', 'write one self-contained HTML file at the end: summary, rounds and dirty-rate charts, and the JSON they came from');
}

/** Every option of `migrate` on `cmd`. */
function migrateCommand(cmd: Command): Command {
  return addMigrateSecurityOptions(addMigrationOptions(
    addCommonOptions(cmd.description('live-migrate a running VM (pre-copy) to a receiver: --to HOST:PORT or --local'), { bytesPerVcpu: '256M', vcpus: 1 })
      .option('--to <host:port>', 'a `stage2 receive` listening there', parsePeerAddress)
      .option('--local', 'spawn the receiver on loopback', false)
      .option('--resume <pid>', 'resume the paused post-copy migration of that `migrate` process (after its connection dropped and its reconnections were used up)', parsePositiveInt),
  ));
}

/**
 * The options `stage2 migrate ARGS` would run with, parsed by the same parsers and checked by the
 * same rules (for callers that run migrations in-process: bench migration). Throws on a bad one.
 */
export function migrateOptionsFrom(args: string[]): MigrateOptions {
  const cmd = migrateCommand(new Command('migrate')).exitOverride().configureOutput({ outputError: () => undefined });
  cmd.parse(args, { from: 'user' });
  const opts = cmd.opts<MigrateOptions>();
  checkMigrateOptions(opts, cmd);
  postcopyPolicy(opts);
  return opts;
}

export function registerMigrate(program: Command): void {
  migrateCommand(program.command('migrate')).action(async (opts: MigrateOptions, cmd: Command) => {
    if (opts.resume !== undefined) {
      process.stdout.write(resumePausedMigration(opts.resume) + '\n');
      return;
    }
    checkMigrateOptions(opts, cmd);
    loadClientSecurity(opts); // its rules and files, before any VM starts
    postcopyPolicy(opts); // refuses contradicting post-copy flags before anything starts
    const log = (line: string) => process.stderr.write(line + '\n');
    const result = await runMigrate(opts, log);
    if (opts.json) process.stdout.write(JSON.stringify(result) + '\n');
    else printStats(result, (l) => process.stdout.write(l + '\n'));
    if (result.status !== 'completed' || !result.verified) process.exitCode = 1;
  });
}
