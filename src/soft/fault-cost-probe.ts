// Measures what one dirty pass costs per 4 KiB page in CPU time, not wall time: on a shared,
// oversubscribed machine wall time mostly measures the scheduler. Two ways:
//   inline  the vCPU runner on this thread (no worker): pure fault-path cost, single thread;
//   worker  the whole engine (one vCPU worker); process CPU time during a pass is the worker's,
//           since the VMM thread sleeps in Atomics.waitAsync meanwhile.
// Prints an Atomics.add calibration next to the numbers (about 7-10 ns on an idle machine).
//
//   npx tsx src/soft/fault-cost-probe.ts [inline|worker] [global-write|global|parallel] [MiB] [passes] [backing]
//
// Not used by the engine; a measuring tool kept next to what it measures.
import { fileURLToPath } from 'node:url';
import { workload } from '../guest/workload.ts';
import { KVM_MEM_LOG_DIRTY_PAGES, type Backing, type MmuLockMode } from '../vmm/engine.ts';
import { SoftEngine } from './engine.ts';
import { VcpuStage2 } from './mmu/vcpu-mmu.ts';
import { VcpuRunner } from './vcpu/runner.ts';
import { VcpuStats } from './vcpu/stats.ts';

export interface FaultCost {
  populateCpuNsPerPage: number;
  /** One entry per pass without logging (TLB miss and walk per page, no fault). */
  noLoggingCpuNsPerPage: number[];
  /** One entry per pass with logging (one write-protect fault per page). */
  dirtyCpuNsPerPage: number[];
  atomicsAddCpuNs: number;
}

function cpuSeconds(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

function atomicsCalibration(): number {
  const a = new Int32Array(new SharedArrayBuffer(64));
  const n = 2_000_000;
  const c0 = cpuSeconds();
  for (let i = 0; i < n; i++) Atomics.add(a, 0, 1);
  return ((cpuSeconds() - c0) / n) * 1e9;
}

export async function measureFaultCost(mode: 'inline' | 'worker', lock: MmuLockMode, bytes: number, passes: number, backing: Backing): Promise<FaultCost> {
  const pages = bytes / 4096;
  const vm = new SoftEngine({ hostRamBytes: 2 * bytes + 2 ** 27 }).createSoftVm({ lock });
  try {
    const spec = workload('sequential', bytes);
    const h = vm.mapHostMemory(bytes, backing);
    const region = { slot: 0, flags: 0, guestPhysAddr: spec.gpaBase, memorySize: bytes, userspaceAddr: h.hva };
    vm.setUserMemoryRegion(region);
    let runPass: (n: number) => Promise<void>;
    if (mode === 'inline') {
      const runner = new VcpuRunner(vm.ctl, 0, spec, vm.hostMemory.windows, new VcpuStage2(vm.stage2, vm.mainThreadFaultHandler()), new VcpuStats(vm.statsSab, 0));
      runPass = async () => {
        runner.enterGuest();
        runner.interp.runPass();
        runner.exitGuest();
      };
    } else {
      await vm.createVcpus(1, spec);
      runPass = async (n) => {
        vm.allowPasses(n);
        await vm.waitForPasses(n);
      };
    }
    let pass = 0;
    const timed = async (): Promise<number> => {
      const c0 = cpuSeconds();
      await runPass(++pass);
      return Math.round(((cpuSeconds() - c0) / pages) * 1e9);
    };
    const populateCpuNsPerPage = await timed();
    const noLoggingCpuNsPerPage: number[] = [];
    for (let i = 0; i < Math.min(3, passes); i++) noLoggingCpuNsPerPage.push(await timed());
    vm.setUserMemoryRegion({ ...region, flags: KVM_MEM_LOG_DIRTY_PAGES });
    const dirtyCpuNsPerPage: number[] = [];
    for (let i = 0; i < passes; i++) {
      dirtyCpuNsPerPage.push(await timed());
      const bm = vm.getDirtyLog(0);
      vm.clearDirtyLog(0, 0, pages, bm);
    }
    return { populateCpuNsPerPage, noLoggingCpuNsPerPage, dirtyCpuNsPerPage, atomicsAddCpuNs: Math.round(atomicsCalibration() * 10) / 10 };
  } finally {
    await vm.destroy();
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const [mode = 'inline', lock = 'parallel', mib = '256', passes = '10', backing = 'anonymous'] = process.argv.slice(2);
  const r = await measureFaultCost(mode as 'inline' | 'worker', lock as MmuLockMode, Number(mib) * 2 ** 20, Number(passes), backing as Backing);
  console.log(JSON.stringify({ mode, lock, mib: Number(mib), backing, ...r }));
}
