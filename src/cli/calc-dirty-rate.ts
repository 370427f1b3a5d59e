// `stage2 calc-dirty-rate`: QEMU's calc-dirty-rate for a VM of the given workload, started here
// and left running freely: how fast does this guest dirty memory? (Will it converge?)
import type { Command } from 'commander';
import { InvalidArgumentError } from 'commander';
import { addCommonOptions, humanOut, parseIntInRange, parseNonNegativeNumber, workloadVmParams, type CommonOptions } from './options.ts';
import { engineForWorkload, openCheckedEngine } from './validate.ts';
import { createWorkloadVm } from '../vmm/workload-vm.ts';
import { calcDirtyRate, DIRTY_RATE_MODES, type DirtyRateMode } from '../vmm/dirty-rate.ts';

const MiB = 2 ** 20;
/** Ring size for --mode dirty-ring: room for ~16 MiB of writes per vCPU between ring-full exits. */
const RING_ENTRIES = 4096;

interface CalcOptions extends CommonOptions {
  calcTime: number;
  mode: DirtyRateMode;
  samplePages: number;
}

function parseDirtyRateMode(text: string): DirtyRateMode {
  if (!(DIRTY_RATE_MODES as readonly string[]).includes(text)) throw new InvalidArgumentError(`must be one of ${DIRTY_RATE_MODES.join(', ')}`);
  return text as DirtyRateMode;
}

function parseCalcTime(text: string): number {
  const s = parseNonNegativeNumber(text);
  if (s < 0.1 || s > 3600) throw new InvalidArgumentError('must be from 0.1 to 3600 seconds');
  return s;
}

export function registerCalcDirtyRate(program: Command): void {
  addCommonOptions(program.command('calc-dirty-rate').description("like QEMU's calc-dirty-rate: run a guest of the given workload and measure how fast it dirties memory"), {
    bytesPerVcpu: '512M',
    vcpus: 1,
  })
    .option('--calc-time <seconds>', 'measuring interval', parseCalcTime, 1)
    .option('--mode <mode>', DIRTY_RATE_MODES.join(' | '), parseDirtyRateMode, 'page-sampling' as DirtyRateMode)
    .option('--sample-pages <n>', 'page-sampling: pages sampled per GiB of guest RAM', parseIntInRange(1, 262144), 512)
    .action(async (opts: CalcOptions) => {
      const out = humanOut(opts.json);
      const demand = { vcpuCounts: [opts.vcpus], vcpusFlag: '-v/--vcpus', bytesPerVcpu: opts.bytesPerVcpu, backing: opts.backing, copies: 1 } as const;
      const engine = await openCheckedEngine(engineForWorkload(opts), demand, (why) => out(`engine: ${why}; using soft`));
      const { vm, testRegion } = await createWorkloadVm(engine, { ...workloadVmParams(opts), dirtyRingEntries: opts.mode === 'dirty-ring' ? RING_ENTRIES : 0 });
      try {
        // The first pass populates memory; measure the guest in its steady state after it.
        vm.allowPasses(Infinity);
        await vm.waitForPasses(1);
        const s0 = vm.stats();
        const t0 = performance.now();
        const r = await calcDirtyRate(vm, { mode: opts.mode, calcTimeSeconds: opts.calcTime, samplePagesPerGiB: opts.samplePages, region: { ...testRegion, flags: 0 } });
        const seconds = (performance.now() - t0) / 1000;
        const s1 = vm.stats();
        // The dirty-rate guest counts its own writes (soft engine): the rate it achieved.
        const guestPages = s1.guestPagesWritten !== undefined && s0.guestPagesWritten !== undefined ? s1.guestPagesWritten - s0.guestPagesWritten : null;
        const guestWriteRateMBps = guestPages !== null && opts.workload === 'dirty-rate' ? (guestPages * 4096) / MiB / seconds : null;
        out(`Dirty rate: ${r.dirtyRateMBps.toFixed(1)} MB/s (${opts.mode}, ${r.calcTimeSeconds.toFixed(3)} s${r.sampledPages !== null ? `, ${r.dirtyPages} of ${r.sampledPages} sampled pages changed` : `, ${r.dirtyPages} pages`})`);
        if (r.vcpuDirtyRateMBps) r.vcpuDirtyRateMBps.forEach((mb, v) => out(`  vCPU ${v}: ${mb.toFixed(1)} MB/s`));
        if (guestWriteRateMBps !== null) out(`Guest-measured write rate: ${guestWriteRateMBps.toFixed(1)} MB/s (asked: ${((opts.dirtyRate ?? 0) / MiB).toFixed(1)} MB/s)`);
        if (opts.json) {
          process.stdout.write(
            JSON.stringify({
              params: { engine: engine.kind, vcpus: opts.vcpus, bytesPerVcpu: opts.bytesPerVcpu, workload: opts.workload, dirtyRate: opts.dirtyRate ?? null, workingSet: opts.workingSet ?? null, pattern: opts.pattern, mode: opts.mode, calcTime: opts.calcTime, samplePages: opts.samplePages },
              ...r,
              guestWriteRateMBps,
            }) + '\n',
          );
        }
      } finally {
        await vm.destroy();
      }
    });
}
