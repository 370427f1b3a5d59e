// `stage2 receive --listen HOST:PORT`: the destination of a live migration. Waits for one
// migration, builds the VM from the source's CONFIG, takes the pages, starts the guest at
// switchover, then lets it run (--run-ms, or until SIGINT/SIGTERM), reports the vCPU pass
// counters before and after and whether memory is what the workload implies, and exits.
// Any failure before switchover discards everything and exits 1 with the reason.
//
// Liveness: --timeout-ms bounds every wait on the source (the next record, GO: transport/
// liveness.ts). SIGINT or SIGTERM ends the command within a second at every phase: waiting for a
// connection, during the migration (discards, exits 1), after COMPLETE waiting for GO (discards),
// or running the guest after switchover (reports and exits). With STAGE2_EXIT_WITH_STDIN=1 (how
// `migrate --local` starts us) the end of stdin counts as SIGTERM: the parent is gone.
import { HUGE_RECOVERY_STRATEGIES, type HugeRecoveryStrategy } from '../soft/huge/recovery.ts';
import { Option, type Command } from 'commander';
import { openEngine, type EngineChoice } from '../vmm/factory.ts';
import { listenLink } from '../migration/wire-link.ts';
import { receiveMigration, DEFAULT_MAX_RAM_BYTES } from '../migration/destination.ts';
import { checkWorkloadMemory } from '../migration/workload-check.ts';
import { parseEngine, parseListenAddress, parseMemorySize, parseNonNegativeInt, parsePositiveInt, parseRecover } from './options.ts';
import { machineRamAvailable, readMachineMemory } from './validate.ts';
import { DEFAULT_IDLE_TIMEOUT_MS } from '../migration/link.ts';
import { sleepUnless } from '../util/sleep.ts';
import { addReceiveSecurityOptions, checkListenAddress, describeServerSecurity, loadServerSecurity, type SecurityOptions } from './security-options.ts';
import { addDashboardOption, startDashboard, type DashboardOptions } from './dashboard-options.ts';
import { ProgressWatch, type ProgressWindow } from '../migration/guest-view/progress-watch.ts';

export interface ReceiveReport {
  status: 'completed';
  engine: string;
  hash: string;
  rescanHash?: string;
  pagesReceived: number;
  resumeSeconds: number;
  switchoverSeconds: number;
  passesAtSwitchover: number[];
  passesAfter: number[];
  ranSeconds: number;
  /** Null when guest memory matched the workload after running; else the first mismatch. */
  memoryCheck: string | null;
  /** The post-copy phase, when the guest started by post-copy. */
  postcopy?: import('../migration/destination.ts').DestinationPostcopyReport;
  /**
   * The guest's progress clock here, from its start until each vCPU's first unit after the
   * migration ended (migration/guest-view/progress-watch.ts): `migrate --local` joins it with
   * the source's into the guest-perceived stall.
   */
  guestProgress?: ProgressWindow;
}

interface ReceiveOptions extends SecurityOptions, DashboardOptions {
  listen: { host: string; port: number };
  engine: EngineChoice;
  runMs: number;
  maxRam: number;
  verifyRescan: boolean;
  prealloc: boolean;
  json: boolean;
  timeoutMs: number;
  postcopy: boolean;
  /** Soft engine: how huge mappings come back when dirty logging stops on this VM. */
  recover: HugeRecoveryStrategy;
}


export function registerReceive(program: Command): void {
  const cmd = program
    .command('receive')
    .description('receive a live migration: listen, build the VM, take the pages, run the guest')
    .addOption(new Option('--listen <host:port>', 'address to listen on').argParser(parseListenAddress).default(parseListenAddress('127.0.0.1:4444'), '127.0.0.1:4444'))
    .option('--engine <engine>', 'soft | kvm (default: the engine the source runs)', parseEngine, 'default')
    .option('--run-ms <ms>', 'after switchover run the guest this long, then report and exit (0: until SIGINT)', parseNonNegativeInt, 0)
    .option('--max-ram <size>', 'refuse guests with more RAM than this (a multiple of 4 KiB)', parseMemorySize, DEFAULT_MAX_RAM_BYTES)
    .option('--prealloc', 'touch all guest RAM before accepting pages (like QEMU -mem-prealloc): first-touch faults happen in setup, not while pages stream in', true)
    .option('--no-prealloc', 'fault guest RAM in as pages arrive (shorter setup, slower transfer)')
    .option('--verify-rescan', 're-read all guest memory before starting the guest and report its hash (adds downtime)', false)
    .option('--recover <strategy>', `soft engine: how huge mappings are re-formed when dirty logging stops on this VM: ${HUGE_RECOVERY_STRATEGIES.join(' | ')}`, parseRecover, 'in-place')
    .option('--json', 'print one JSON object on stdout and nothing else there', false)
    .option('--postcopy', 'accept post-copy: the guest may start here before every page arrived, pages are then fetched on demand (default)', true)
    .option('--no-postcopy', 'refuse post-copy (the source then fails when pre-copy does not converge, or forces the downtime with --on-no-convergence force)')
    .option('--timeout-ms <ms>', 'fail when the source makes no progress for this long while we wait on it (idle timeout)', parsePositiveInt, DEFAULT_IDLE_TIMEOUT_MS);
  addDashboardOption(addReceiveSecurityOptions(cmd))
    .action(async (opts: ReceiveOptions) => {
      const security = loadServerSecurity(opts);
      checkListenAddress(opts.listen.host, opts.listen.port, security);
      const log = (line: string) => process.stderr.write(`stage2 receive: ${line}\n`);
      const ac = new AbortController();
      const onSignal = (why: string) => {
        if (ac.signal.aborted) return;
        log(`${why}: stopping`);
        ac.abort();
        // Backstop: every wait ends at once on abort; if anything ever does not, exit anyway
        // (nothing of an unfinished migration is kept by a process that is gone).
        setTimeout(() => {
          log(`still running 1 s after ${why}: exiting`);
          process.exit(1);
        }, 1000).unref();
      };
      const onSigint = () => onSignal('SIGINT');
      const onSigterm = () => onSignal('SIGTERM');
      const onStdinEnd = () => onSignal('parent gone (stdin closed)');
      process.on('SIGINT', onSigint);
      process.on('SIGTERM', onSigterm);
      const lifeline = process.env.STAGE2_EXIT_WITH_STDIN === '1';
      if (lifeline) {
        process.stdin.on('end', onStdinEnd);
        process.stdin.on('close', onStdinEnd);
        process.stdin.on('error', onStdinEnd);
        process.stdin.resume();
      }
      // Listening (and saying so) only once the signals are ours: a signal right after the line
      // must cancel, not kill.
      // The post-copy connections are plain TCP (postcopy/record-socket.ts): with TLS or an auth
      // token asked for, post-copy would open a path around them, so it is refused.
      const securePath = security !== undefined && (security.tls !== undefined || security.token !== undefined);
      if (securePath && opts.postcopy) log('refusing post-copy: its connections are not covered by --tls-cert / --auth-token-file yet');
      const listener = await listenLink({
        ...opts.listen,
        timeoutMs: opts.timeoutMs,
        security,
        postcopy: opts.postcopy && !securePath,
        // A refused connection never reaches the stream (admission.ts): say why, keep waiting.
        onRefused: (peer, reason) => log(`refused ${peer}: ${reason}; still waiting for the source`),
      }).catch((e: Error) => {
        process.off('SIGINT', onSigint);
        process.off('SIGTERM', onSigterm);
        if (lifeline) process.stdin.destroy();
        throw e;
      });
      log(`listening on ${listener.host}:${listener.port} (${describeServerSecurity(security)})`);
      // --dashboard: the VM appears once CONFIG has built it (the engine reports it).
      const dash = await startDashboard(opts, `receive on ${listener.host}:${listener.port}: destination`, 'destination', log);
      let watch: ProgressWatch | null = null;
      try {
        const link = await Promise.race([
          listener.accept(),
          new Promise<never>((_, reject) => ac.signal.addEventListener('abort', () => reject(new Error('receive cancelled before a source connected')))),
        ]);
        listener.close();
        const r = await receiveMigration(link, {
          onGuestStart: (vm, resumedAtMs) => {
            const clock = vm.progressClock();
            if (clock) watch = new ProgressWatch(clock, resumedAtMs);
          },
          openEngine: async (kind) => {
            const engine = await openEngine(opts.engine === 'default' ? kind : opts.engine, undefined, { recover: opts.recover });
            return dash ? dash.observe(engine) : engine;
          },
          limits: { maxRamBytes: opts.maxRam, availableRamBytes: () => machineRamAvailable(readMachineMemory()) },
          verifyRescan: opts.verifyRescan,
          preallocate: opts.prealloc,
          signal: ac.signal,
          timeoutMs: opts.timeoutMs,
          postcopyHost: opts.listen.host === '0.0.0.0' ? undefined : opts.listen.host,
          log,
        });
        if (r.postcopy?.error) throw new Error(`post-copy failed: ${r.postcopy.error}`);
        log(`switchover done: guest resumed from vCPU passes [${r.passesAtSwitchover.join(', ')}] in ${(r.resumeSeconds * 1000).toFixed(2)} ms`);
        // The migration is over here (post-copy: every page arrived): each vCPU's window ends at
        // its next unit of progress.
        (watch as ProgressWatch | null)?.closeAt();
        const t0 = performance.now();
        if (opts.runMs > 0) await sleepUnless(opts.runMs, ac.signal);
        else await new Promise((res) => ac.signal.addEventListener('abort', res));
        const ranSeconds = (performance.now() - t0) / 1000;
        const guestProgress = (watch as ProgressWatch | null)?.stop();
        await r.vm.pause();
        const passesAfter = r.vm.progress().map((p) => p.passesCompleted);
        const memoryCheck = checkWorkloadMemory(r.vm, r.config.workload, passesAfter);
        log(`after ${ranSeconds.toFixed(2)} s on this host: vCPU passes [${passesAfter.join(', ')}]; memory ${memoryCheck ?? 'consistent with the workload'}`);
        dash?.detachVm();
        await r.vm.destroy();
        const report: ReceiveReport = {
          status: 'completed',
          engine: r.config.engine,
          hash: r.hash,
          ...(r.rescanHash ? { rescanHash: r.rescanHash } : {}),
          pagesReceived: r.pagesReceived,
          resumeSeconds: r.resumeSeconds,
          switchoverSeconds: r.switchoverSeconds,
          passesAtSwitchover: r.passesAtSwitchover,
          passesAfter,
          ranSeconds,
          memoryCheck,
          ...(r.postcopy ? { postcopy: r.postcopy } : {}),
          ...(guestProgress ? { guestProgress } : {}),
        };
        if (opts.json) process.stdout.write(JSON.stringify(report) + '\n');
        if (memoryCheck) throw new Error(`guest memory inconsistent after migration: ${memoryCheck}`);
      } finally {
        (watch as ProgressWatch | null)?.stop();
        dash?.detachVm();
        await dash?.close();
        listener.close();
        process.off('SIGINT', onSigint);
        process.off('SIGTERM', onSigterm);
        if (lifeline) {
          process.stdin.off('end', onStdinEnd);
          process.stdin.off('close', onStdinEnd);
          process.stdin.off('error', onStdinEnd);
          process.stdin.destroy();
        }
      }
    });
}
