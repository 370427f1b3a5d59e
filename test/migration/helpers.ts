// Shared by the migration tests: run a source and a destination in this process over real
// loopback TCP, and check guest memory against the workload spec.
import type { FaultPath } from '../../src/vmm/demand-paging.ts';
import { PAGE_SIZE, type Engine, type Vm } from '../../src/vmm/engine.ts';
import { pagesPerVcpu, type WorkloadSpec } from '../../src/guest/workload.ts';
import { connectLink, listenLink } from '../../src/migration/wire-link.ts';
import { migrateVm, type PrecopyOptions } from '../../src/migration/source.ts';
import { receiveMigration, type ReceiveResult } from '../../src/migration/destination.ts';
import type { DestLink, SourceLink } from '../../src/migration/link.ts';
import type { MigrationStats } from '../../src/migration/stats.ts';

export interface PairResult {
  stats: MigrationStats;
  dest: ReceiveResult | null;
  destError: Error | null;
}

/** Migrate `vm` to a fresh VM of `destEngine` in this process, over loopback TCP. */
export async function migrateInProcess(
  vm: Vm,
  destEngine: Engine,
  opts: Omit<PrecopyOptions, 'backing'> & {
    channels?: number;
    preallocate?: boolean;
    wrapLink?: (l: SourceLink) => SourceLink;
    wrapDestLink?: (l: DestLink) => DestLink;
    /** Post-copy: how long the destination waits for the source to reconnect (default 60 s). */
    postcopyRecoverTimeoutMs?: number;
    /** Post-copy: the destination's fault path (default: the engine's, postcopy/paging.ts). */
    postcopyFaultPath?: FaultPath;
  },
): Promise<PairResult> {
  const listener = await listenLink({ host: '127.0.0.1', port: 0 });
  try {
    const accepted = listener.accept().then((link) =>
      receiveMigration(opts.wrapDestLink ? opts.wrapDestLink(link) : link, { openEngine: async () => destEngine, verifyRescan: true, preallocate: opts.preallocate ?? false, postcopyRecoverTimeoutMs: opts.postcopyRecoverTimeoutMs, postcopyFaultPath: opts.postcopyFaultPath }),
    );
    const destP = accepted.then(
      (d) => ({ dest: d, destError: null }),
      (e: Error) => ({ dest: null, destError: e }),
    );
    const raw = await connectLink({ host: '127.0.0.1', port: listener.port, channels: opts.channels ?? 1 });
    const link = opts.wrapLink ? opts.wrapLink(raw) : raw;
    const stats = await migrateVm(vm, link, { ...opts, backing: 'anonymous' });
    const { dest, destError } = await destP;
    return { stats, dest, destError };
  } finally {
    listener.close();
  }
}

/**
 * Check a paused (or consistent) VM's test memory against the sequential/idle workload: in vCPU
 * v's slice, each page's first word is (v+1, pass) with pass non-increasing along the slice and
 * at most one step between passes `passes` and `passes + 1` (the pass in progress).
 * Returns a description of the first violation, or null.
 */
export function checkSequentialMemory(vm: Vm, spec: WorkloadSpec, vcpus: number, passes: number[]): string | null {
  const pages = pagesPerVcpu(spec);
  const word = new Uint8Array(PAGE_SIZE);
  const dv = new DataView(word.buffer);
  for (let v = 0; v < vcpus; v++) {
    let prev = Infinity;
    for (let p = 0; p < pages; p++) {
      vm.readGuest(spec.gpaBase + v * spec.bytesPerVcpu + p * PAGE_SIZE, word);
      const lo = dv.getUint32(0, true);
      const hi = dv.getUint32(4, true);
      if (hi !== v + 1) return `vcpu ${v} page ${p}: owner word ${hi}, expected ${v + 1}`;
      const n = passes[v]!;
      if (lo !== n && lo !== n + 1) return `vcpu ${v} page ${p}: pass ${lo}, expected ${n} or ${n + 1}`;
      if (lo > prev) return `vcpu ${v} page ${p}: pass ${lo} after ${prev} (not sequential)`;
      prev = lo;
    }
  }
  return null;
}

/** A SourceLink that forwards to `link`, with `send` replaced (failure and corruption injection). */
export function interceptSend(link: SourceLink, send: SourceLink['send']): SourceLink {
  return {
    get channels() {
      return link.channels;
    },
    acksRounds: link.acksRounds,
    send,
    receive: () => link.receive(),
    flush: () => link.flush(),
    bytesSent: () => link.bytesSent(),
    close: () => link.close(),
    destroy: (e) => link.destroy(e),
    setPhase: (p) => link.setPhase?.(p),
  };
}

/** What a rejection must never read like: a JavaScript error leaking through. */
export const JS_INTERNALS = /TypeError|ReferenceError|SyntaxError: Unexpected|Cannot read prop|is not a function|is not iterable|of undefined|of null|\bNaN\b|\[object /;
