// `stage2 receive --listen HOST:PORT`: the destination of a live migration. Waits for one
// migration, builds the VM from the source's CONFIG, takes the pages, starts the guest at
// switchover, then lets it run (--run-ms, or until SIGINT/SIGTERM), reports the vCPU pass
// counters before and after and whether memory is what the workload implies, and exits.
// Any failure before switchover discards everything and exits 1 with the reason.
import { Option, type Command } from 'commander';
import { openEngine, type EngineChoice } from '../vmm/factory.ts';
import { listenLink } from '../migration/wire-link.ts';
import { receiveMigration, DEFAULT_MAX_RAM_BYTES } from '../migration/destination.ts';
import { checkWorkloadMemory } from '../migration/workload-check.ts';
import { parseEngine, parseListenAddress, parseMemorySize, parseNonNegativeInt } from './options.ts';
import { machineRamAvailable, readMachineMemory } from './validate.ts';

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
}

interface ReceiveOptions {
  listen: { host: string; port: number };
  engine: EngineChoice;
  runMs: number;
  maxRam: number;
  verifyRescan: boolean;
  prealloc: boolean;
  json: boolean;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export function registerReceive(program: Command): void {
  program
    .command('receive')
    .description('receive a live migration: listen, build the VM, take the pages, run the guest')
    .addOption(new Option('--listen <host:port>', 'address to listen on').argParser(parseListenAddress).default(parseListenAddress('127.0.0.1:4444'), '127.0.0.1:4444'))
    .option('--engine <engine>', 'soft | kvm (default: the engine the source runs)', parseEngine, 'default')
    .option('--run-ms <ms>', 'after switchover run the guest this long, then report and exit (0: until SIGINT)', parseNonNegativeInt, 0)
    .option('--max-ram <size>', 'refuse guests with more RAM than this (a multiple of 4 KiB)', parseMemorySize, DEFAULT_MAX_RAM_BYTES)
    .option('--prealloc', 'touch all guest RAM before accepting pages (like QEMU -mem-prealloc): first-touch faults happen in setup, not while pages stream in', true)
    .option('--no-prealloc', 'fault guest RAM in as pages arrive (shorter setup, slower transfer)')
    .option('--verify-rescan', 're-read all guest memory before starting the guest and report its hash (adds downtime)', false)
    .option('--json', 'print one JSON object on stdout and nothing else there', false)
    .action(async (opts: ReceiveOptions) => {
      const log = (line: string) => process.stderr.write(`stage2 receive: ${line}\n`);
      const listener = await listenLink(opts.listen);
      log(`listening on ${listener.host}:${listener.port}`);
      const ac = new AbortController();
      const onSignal = () => ac.abort();
      process.on('SIGINT', onSignal);
      process.on('SIGTERM', onSignal);
      try {
        const link = await Promise.race([
          listener.accept(),
          new Promise<never>((_, reject) => ac.signal.addEventListener('abort', () => reject(new Error('receive cancelled before a source connected')))),
        ]);
        listener.close();
        const r = await receiveMigration(link, {
          openEngine: (kind) => openEngine(opts.engine === 'default' ? kind : opts.engine),
          limits: { maxRamBytes: opts.maxRam, availableRamBytes: () => machineRamAvailable(readMachineMemory()) },
          verifyRescan: opts.verifyRescan,
          preallocate: opts.prealloc,
          signal: ac.signal,
          log,
        });
        log(`switchover done: guest resumed from vCPU passes [${r.passesAtSwitchover.join(', ')}] in ${(r.resumeSeconds * 1000).toFixed(2)} ms`);
        const t0 = performance.now();
        if (opts.runMs > 0) await Promise.race([sleep(opts.runMs), new Promise((res) => ac.signal.addEventListener('abort', res))]);
        else await new Promise((res) => ac.signal.addEventListener('abort', res));
        const ranSeconds = (performance.now() - t0) / 1000;
        await r.vm.pause();
        const passesAfter = r.vm.progress().map((p) => p.passesCompleted);
        const memoryCheck = checkWorkloadMemory(r.vm, r.config.workload, passesAfter);
        log(`after ${ranSeconds.toFixed(2)} s on this host: vCPU passes [${passesAfter.join(', ')}]; memory ${memoryCheck ?? 'consistent with the workload'}`);
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
        };
        if (opts.json) process.stdout.write(JSON.stringify(report) + '\n');
        if (memoryCheck) throw new Error(`guest memory inconsistent after migration: ${memoryCheck}`);
      } finally {
        listener.close();
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
      }
    });
}
