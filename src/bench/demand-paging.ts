// `stage2 bench demand-paging`: KVM's demand_paging_test over the engine interface, plus the
// fault path (seed 002: userfaultfd vs memory-fault exits) and a list of vCPU counts.
//
// Same procedure and printed lines as tools/testing/selftests/kvm/demand_paging_test.c: one
// test memslot (memstress layout, one slice per vCPU), guest RAM registered for demand paging
// before the vCPUs first run, a source buffer every resolving thread reads (the selftest's
// guest_data_prototype) with -d microseconds of delay per fetch, every vCPU touching each page
// of its slice once; the rate is pages per vCPU over the wall time until the last vCPU is done.
// Each vCPU count is its own VM, run one after another.

import { DemandPagingError, type FaultPath, type UffdMode, type VcpuPageWaits } from '../vmm/demand-paging.ts';
import { PAGE_SIZE, type Backing, type Engine } from '../vmm/engine.ts';
import { createWorkloadVm } from '../vmm/workload-vm.ts';
import { formatSeconds, now, secondsSince } from './timing.ts';
import { renderLinePlotSvg } from './plot.ts';

export interface DemandPagingParams {
  vcpuCounts: number[];
  bytesPerVcpu: number;
  backing: Backing;
  /** The fault path (--mode). */
  path: FaultPath;
  /** -u MISSING | MINOR. */
  uffdMode: UffdMode;
  /** -a: one uffd for every vCPU. */
  sharedUffd: boolean;
  /** -r: reader threads per uffd. */
  readers: number;
  /** -d: delay per fetch, microseconds. */
  delayUs: number;
}

/** What `--host-uffd` adds to a row (src/bench/host-uffd.ts's runHostUffdBench). */
export interface HostUffdFigures {
  vcpus: number;
  pages: number;
  seconds: number;
  perVcpuPagesPerSec: number[];
  overallPagesPerSec: number;
  handler: string;
}

export interface DemandPagingRow {
  /** The fault path, as --mode names it. */
  mode: FaultPath;
  uffdMode: UffdMode;
  vcpus: number;
  pages: number;
  /** "Total guest execution time": allowing the pass until the last vCPU finished it. */
  seconds: number;
  /** The selftest's "Per-vcpu demand paging rate": pages per vCPU / seconds. */
  perVcpuPagesPerSec: number;
  /** The selftest's "Overall demand paging rate": perVcpuPagesPerSec * vCPUs. */
  overallPagesPerSec: number;
  /** Each vCPU's own rate: its pages / the time until it finished (polled, ~1 ms). */
  vcpuPagesPerSec: number[];
  /** Page waits (fault -> re-entry), over every vCPU: median of p50s, worst p99 and max. */
  waitP50: number;
  waitP99: number;
  waitMax: number;
  waits: VcpuPageWaits[];
  /** The pager's counters (faults, requests, installed, duplicates, missing, ...). */
  pager: Record<string, number>;
  /** Exits and other engine counters of interest. */
  exitsMemoryFault: number;
  hostUffd?: HostUffdFigures;
}

export interface DemandPagingResult {
  params: DemandPagingParams & { engine: string };
  rows: DemandPagingRow[];
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Run one VM per vCPU count; `log` gets the selftest's lines as they happen. */
export async function runDemandPagingBench(engine: Engine, p: DemandPagingParams, log: (line: string) => void): Promise<DemandPagingResult> {
  const rows: DemandPagingRow[] = [];
  for (const vcpus of p.vcpuCounts) rows.push(await runOne(engine, p, vcpus, log));
  return { params: { engine: engine.kind, ...p }, rows };
}

async function runOne(engine: Engine, p: DemandPagingParams, vcpus: number, log: (line: string) => void): Promise<DemandPagingRow> {
  const { vm, testRegion } = await createWorkloadVm(engine, { vcpus, bytesPerVcpu: p.bytesPerVcpu, backing: p.backing, workload: 'sequential' });
  try {
    if (!vm.startDemandPaging) throw new DemandPagingError(`the ${engine.kind} engine cannot page guest memory on demand in this build`);
    const { guestPhysAddr: gpa, memorySize: bytes } = testRegion;
    log(`Testing guest mode: PA-bits:ANY, VA-bits:48, 4K pages (engine ${engine.kind}, ${vcpus} vCPU${vcpus > 1 ? 's' : ''}, --mode ${p.path}, -u ${p.uffdMode.toUpperCase()}${p.sharedUffd ? ', -a' : ''}, -r ${p.readers}, -d ${p.delayUs})`);
    log(`guest physical test memory: [0x${gpa.toString(16)}, 0x${(gpa + bytes).toString(16)})`);
    // guest_data_prototype: one non-zero pattern, so a page that was never fetched reads as zeros.
    const source = new SharedArrayBuffer(bytes);
    new Uint8Array(source).fill(0x5a);
    const pager = vm.startDemandPaging({ path: p.path, mode: p.uffdMode, sharedUffd: p.sharedUffd, readers: p.readers, localSource: { buffer: source, delayUs: p.delayUs } });
    // The soft pager's reader threads start asynchronously; the selftest's are running by now.
    await (pager as { ready?: () => Promise<void> }).ready?.();
    log('Finished creating vCPUs and starting uffd threads');
    const pagesPerVcpu = p.bytesPerVcpu / PAGE_SIZE;
    const t0 = now();
    vm.allowPasses(1);
    log('Started all vCPUs');
    const doneAt: number[] = new Array(vcpus).fill(0);
    let settled = false;
    const all = vm.waitForPasses(1).finally(() => (settled = true));
    while (!settled) {
      const prog = vm.progress();
      const t = secondsSince(t0);
      for (const q of prog) if (q.passesCompleted >= 1 && doneAt[q.vcpu] === 0) doneAt[q.vcpu] = t;
      await Promise.race([all, sleep(1)]);
    }
    await all;
    const seconds = secondsSince(t0);
    for (let v = 0; v < vcpus; v++) if (doneAt[v] === 0) doneAt[v] = seconds;
    log('All vCPU threads joined');
    const missing = pager.missingCount();
    if (missing !== 0) throw new DemandPagingError(`${missing} pages still missing after every vCPU touched its slice`);
    const waits = pager.waits();
    const stats = { ...pager.stats() } as unknown as Record<string, number>;
    pager.finish();
    const perVcpuPagesPerSec = pagesPerVcpu / seconds;
    log(`Total guest execution time:\t${formatSeconds(seconds)}`);
    log(`Per-vcpu demand paging rate:\t${perVcpuPagesPerSec.toFixed(6)} pgs/sec/vcpu`);
    log(`Overall demand paging rate:\t${(perVcpuPagesPerSec * vcpus).toFixed(6)} pgs/sec`);
    const p50s = waits.map((w) => w.p50).sort((a, b) => a - b);
    return {
      mode: p.path,
      uffdMode: p.uffdMode,
      vcpus,
      pages: pagesPerVcpu * vcpus,
      seconds,
      perVcpuPagesPerSec,
      overallPagesPerSec: perVcpuPagesPerSec * vcpus,
      vcpuPagesPerSec: doneAt.map((t) => pagesPerVcpu / t),
      waitP50: p50s[p50s.length >> 1] ?? 0,
      waitP99: Math.max(...waits.map((w) => w.p99)),
      waitMax: Math.max(...waits.map((w) => w.max)),
      waits,
      pager: stats,
      exitsMemoryFault: vm.stats().exitsMemoryFault ?? 0,
    };
  } finally {
    await vm.destroy();
  }
}

function rate(x: number | undefined): string {
  return x === undefined ? '-' : x >= 1e6 ? `${(x / 1e6).toFixed(2)}M` : x >= 1e3 ? `${(x / 1e3).toFixed(1)}k` : x.toFixed(0);
}

function micros(s: number): string {
  return s >= 1e-3 ? `${(s * 1e3).toFixed(2)}ms` : `${(s * 1e6).toFixed(1)}us`;
}

/** One table: a row per vCPU count, rates in pages/s and page waits (and the host uffd beside). */
export function demandPagingTable(result: DemandPagingResult): string {
  const p = result.params;
  const host = result.rows.some((r) => r.hostUffd);
  const cols = ['per-vCPU pgs/s', 'overall pgs/s', 'wait p50', 'wait p99', 'wait max', ...(host ? ['host per-vCPU', 'host overall'] : [])];
  const widths = cols.map((c) => Math.max(10, c.length));
  const rule = `+-------+${widths.map((w) => `${'-'.repeat(w + 2)}+`).join('')}`;
  const lines = [
    `Demand paging, ${p.engine} engine, --mode ${p.path}, -u ${p.uffdMode.toUpperCase()}${p.path === 'uffd' ? (p.sharedUffd ? ', one uffd (-a)' : ', a uffd per vCPU') + `, ${p.readers} reader${p.readers > 1 ? 's' : ''} per uffd` : ''}, -d ${p.delayUs} us, ${Math.round(p.bytesPerVcpu / 2 ** 20)} MiB per vCPU:`,
    rule,
    `| vCPUs |${cols.map((c, i) => ` ${c.padStart(widths[i]!)} |`).join('')}`,
    rule,
  ];
  for (const r of result.rows) {
    const cells = [
      rate(r.perVcpuPagesPerSec),
      rate(r.overallPagesPerSec),
      micros(r.waitP50),
      micros(r.waitP99),
      micros(r.waitMax),
      ...(host ? [rate(r.hostUffd ? r.hostUffd.overallPagesPerSec / r.hostUffd.vcpus : undefined), rate(r.hostUffd?.overallPagesPerSec)] : []),
    ];
    lines.push(`| ${String(r.vcpus).padStart(5)} |${cells.map((c, i) => ` ${c.padStart(widths[i]!)} |`).join('')}`);
  }
  lines.push(rule);
  return lines.join('\n');
}

export function demandPagingSvg(result: DemandPagingResult): Promise<string> {
  const p = result.params;
  const series = `${p.path}${p.path === 'uffd' ? (p.sharedUffd ? ' -a' : ' per-vCPU uffd') : ''} ${p.uffdMode}`;
  return renderLinePlotSvg({
    title: `stage2 ${p.engine} engine demand paging, ${Math.round(p.bytesPerVcpu / 2 ** 20)} MiB per vCPU, -d ${p.delayUs} us`,
    xTitle: 'vCPUs',
    yTitle: 'pages / second',
    points: result.rows.flatMap((r) => [
      { x: r.vcpus, y: r.perVcpuPagesPerSec, series, panel: 'per-vCPU demand paging rate' },
      { x: r.vcpus, y: r.overallPagesPerSec, series, panel: 'overall demand paging rate' },
      ...(r.hostUffd
        ? [
            { x: r.vcpus, y: r.hostUffd.overallPagesPerSec / r.hostUffd.vcpus, series: `host uffd (${r.hostUffd.handler})`, panel: 'per-vCPU demand paging rate' },
            { x: r.vcpus, y: r.hostUffd.overallPagesPerSec, series: `host uffd (${r.hostUffd.handler})`, panel: 'overall demand paging rate' },
          ]
        : []),
    ]),
  });
}
