// `stage2 migrate --to HOST:PORT | --local`: start a VM running the workload, let it run, then
// migrate it live (pre-copy) to a `stage2 receive` -- on another host, or with --local to a
// receiver process this command spawns on loopback. Prints the stats (QEMU query-migrate names;
// --json: one object on stdout). Exit status 0 only for a completed, verified migration.
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import { join } from 'node:path';
import type { Command } from 'commander';
import { projectRoot } from '../util/worker.ts';
import { createSourceVm } from '../migration/source-vm.ts';
import { connectLink } from '../migration/wire-link.ts';
import { migrateVm, DEFAULT_DOWNTIME_LIMIT_MS, DEFAULT_MAX_ROUNDS } from '../migration/source.ts';
import { progressBar } from '../migration/progress-bar.ts';
import type { SourceLink } from '../migration/link.ts';
import { lazyLink } from '../migration/lazy-link.ts';
import type { MigrationStats } from '../migration/stats.ts';
import { MAX_CHANNELS } from '../migration/stream/format.ts';
import { addCommonOptions, parseIntInRange, parseNonNegativeInt, parseNonNegativeNumber, parsePeerAddress, parsePositiveInt, parseSize, type CommonOptions } from './options.ts';
import type { ReceiveReport } from './receive.ts';
import { checkMigrateOptions, openCheckedEngine } from './validate.ts';

export interface MigrateOptions extends CommonOptions {
  to?: { host: string; port: number };
  local: boolean;
  maxBandwidth: number;
  downtimeLimit: number;
  channels: number;
  maxRounds: number;
  autoConverge: boolean;
  warmupMs: number;
  destRunMs: number;
  destPrealloc: boolean;
}

export type MigrateResult = MigrationStats & { destination?: ReceiveReport | { error: string } };

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

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
async function connectWithRetry(host: string, port: number, channels: number, timeoutMs: number, child?: ChildProcess): Promise<SourceLink> {
  const t0 = Date.now();
  for (;;) {
    try {
      return await connectLink({ host, port, channels });
    } catch (e) {
      if (child && child.exitCode !== null) throw new Error(`the receiver exited (status ${child.exitCode}) before accepting the migration`);
      if (Date.now() - t0 > timeoutMs || !/ECONNREFUSED|refused the connection|connection refused/.test((e as Error).message)) throw e;
      await sleep(50);
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
  const args = [join(projectRoot, 'bin', 'stage2.mjs'), 'receive', '--listen', `${host}:${port}`, '--engine', engineKind, '--json', '--run-ms', String(opts.destRunMs), opts.destPrealloc ? '--prealloc' : '--no-prealloc'];
  // Detached: a terminal ^C reaches the source only, which cancels; the receiver then sees the
  // connection drop and discards everything itself.
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
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
  child.on('exit', () => process.off('exit', kill));
  return { child, port, report };
}

/**
 * The whole `migrate` command: source VM, (receiver), migration, stats. `log` gets human lines;
 * the caller prints the result.
 */
export async function runMigrate(opts: MigrateOptions, log: (line: string) => void): Promise<MigrateResult> {
  if (!opts.local && !opts.to) throw new Error('migrate needs --to HOST:PORT or --local');
  const demand = { vcpuCounts: [opts.vcpus], vcpusFlag: '-v/--vcpus', bytesPerVcpu: opts.bytesPerVcpu, backing: opts.backing, copies: opts.local ? 2 : 1 } as const;
  const engine = await openCheckedEngine(opts.engine, demand, (why) => log(`engine: ${why}; using soft`));
  const ramMiB = (opts.vcpus * opts.bytesPerVcpu) / 2 ** 20;
  log(`source: starting a ${engine.kind} VM, ${opts.vcpus} vCPUs x ${opts.bytesPerVcpu / 2 ** 20} MiB (${ramMiB} MiB), workload ${opts.workload}`);
  const t0 = performance.now();
  const { vm, spec } = await createSourceVm(engine, { vcpus: opts.vcpus, bytesPerVcpu: opts.bytesPerVcpu, backing: opts.backing, workload: opts.workload, lock: opts.lock, guestPageSize: opts.guestPageSize });
  let receiver: LocalReceiver | null = null;
  // A spawned receiver that the source never connected to (the connection failed, or the
  // migration ended before it was made) would wait for a source forever, and this command for its
  // report: the `--channels 1000` hang. SIGTERM makes it give up and exit 1 at once.
  let linkUp = false;
  const stopUnconnectedReceiver = () => {
    if (receiver && !linkUp && receiver.child.exitCode === null) receiver.child.kill('SIGTERM');
  };
  try {
    log(`source: memory populated in ${((performance.now() - t0) / 1000).toFixed(2)} s; guest running`);
    const host = opts.local ? '127.0.0.1' : opts.to!.host;
    if (opts.local) {
      const port = await freePort(host);
      receiver = spawnReceiver(host, port, opts, engine.kind, log);
      log(`destination: receiver process ${receiver.child.pid} on ${host}:${port}`);
    }
    const port = receiver ? receiver.port : opts.to!.port;
    // Connect while the guest warms up (a spawned receiver needs a second or two to start), but
    // let a failure surface inside migrateVm: an unreachable receiver is a failed migration with
    // stats, not a crash.
    const linkP = connectWithRetry(host, port, opts.channels, receiver ? 30_000 : 2_000, receiver?.child);
    linkP.then(() => (linkUp = true), () => undefined);
    await Promise.all([linkP.catch(() => undefined), sleep(opts.warmupMs)]);
    const link = lazyLink(opts.channels, () => linkP);
    log(`source: guest passes before migration [${vm.progress().map((p) => p.passesCompleted).join(', ')}]; migrating to ${host}:${port} over ${opts.channels} channel(s)`);
    const ac = new AbortController();
    const onSigint = () => {
      log('SIGINT: cancelling the migration');
      ac.abort();
    };
    process.on('SIGINT', onSigint);
    const bar = progressBar();
    let stats: MigrationStats;
    try {
      stats = await migrateVm(vm, link, {
        workload: spec,
        backing: opts.backing,
        maxBandwidth: opts.maxBandwidth,
        downtimeLimitMs: opts.downtimeLimit,
        maxRounds: opts.maxRounds,
        autoConverge: opts.autoConverge,
        signal: ac.signal,
        onProgress: bar.update,
      });
    } finally {
      bar.done();
      process.off('SIGINT', onSigint);
    }
    const result: MigrateResult = stats;
    if (stats.status !== 'completed') {
      const state = !stats.sourceIntact ? 'NOT intact' : stats.sourceRunning === false ? 'intact but PAUSED (it is destroyed when this command exits)' : 'intact and running';
      log(`migration ${stats.status}: ${stats.error}; source ${state}`);
    }
    stopUnconnectedReceiver();
    if (receiver) result.destination = await receiver.report;
    return result;
  } finally {
    await vm.destroy();
    stopUnconnectedReceiver();
    if (receiver && receiver.child.exitCode === null) {
      await Promise.race([receiver.report, sleep(30_000)]);
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
  if (s.sourceIntact !== undefined) out(`source intact: ${s.sourceIntact}${s.sourceRunning === false ? ', paused (switchover outcome unknown)' : ''}`);
}

// The spawned receiver runs the guest --dest-run-ms, then reports and exits; `receive --run-ms 0`
// would run it until a SIGINT that a detached child never gets, and the source would wait forever.
const parseDestRunMs = parseIntInRange(1, Number.MAX_SAFE_INTEGER, 'must be a whole number of ms, at least 1: the --local receiver runs the guest this long, then exits');

export function addMigrationOptions(cmd: Command): Command {
  return cmd
    .option('--max-bandwidth <size>', 'bytes per second on the link (accepts 64M); 0 = unlimited', parseSize, 0)
    .option('--downtime-limit <ms>', 'largest acceptable downtime, ms (0: switch over only when nothing is left to copy, or at --max-rounds)', parseNonNegativeNumber, DEFAULT_DOWNTIME_LIMIT_MS)
    .option('--channels <n>', `TCP connections to spread pages over (1..${MAX_CHANNELS})`, parseIntInRange(1, MAX_CHANNELS), 1)
    .option('--max-rounds <n>', 'iterative rounds before stop-and-copy is forced', parsePositiveInt, DEFAULT_MAX_ROUNDS)
    .option('--auto-converge', 'throttle the vCPUs stepwise (20%, +10%, up to 99%) while rounds do not shrink', true)
    .option('--no-auto-converge', 'never throttle the vCPUs')
    .option('--warmup-ms <ms>', 'let the guest run this long before migrating', parseNonNegativeInt, 200)
    .option('--dest-prealloc', '--local: the receiver preallocates guest RAM in setup (receive --prealloc)', true)
    .option('--no-dest-prealloc', '--local: the receiver faults guest RAM in as pages arrive (receive --no-prealloc)')
    .option('--dest-run-ms <ms>', '--local: how long the destination runs the guest after switchover (at least 1)', parseDestRunMs, 1000);
}

export function registerMigrate(program: Command): void {
  addMigrationOptions(
    addCommonOptions(program.command('migrate').description('live-migrate a running VM (pre-copy) to a receiver: --to HOST:PORT or --local'), { bytesPerVcpu: '256M', vcpus: 1 })
      .option('--to <host:port>', 'a `stage2 receive` listening there', parsePeerAddress)
      .option('--local', 'spawn the receiver on loopback', false),
  ).action(async (opts: MigrateOptions, cmd: Command) => {
    checkMigrateOptions(opts, cmd);
    const log = (line: string) => process.stderr.write(line + '\n');
    const result = await runMigrate(opts, log);
    if (opts.json) process.stdout.write(JSON.stringify(result) + '\n');
    else printStats(result, (l) => process.stdout.write(l + '\n'));
    if (result.status !== 'completed' || !result.verified) process.exitCode = 1;
  });
}
