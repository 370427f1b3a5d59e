// Prints the host uffd demand-paging rates (src/bench/host-uffd.ts) for vcpus 1, 2, 4, with one
// shared uffd (-a) and one per vCPU, so the figures can be quoted. Usage:
//   npx tsx scripts/host-uffd-rates.ts [bytesPerVcpuMiB=64] [readers=1] [mode=missing|minor] [delayUs=0]
import { runHostUffdBench } from '../src/bench/host-uffd.ts';

const [mib = '64', readers = '1', mode = 'missing', delayUs = '0'] = process.argv.slice(2);
if (mode !== 'missing' && mode !== 'minor') throw new Error(`mode must be missing or minor, not ${mode}`);
for (const sharedUffd of [true, false]) {
  for (const vcpus of [1, 2, 4]) {
    const r = await runHostUffdBench({ vcpus, bytesPerVcpu: Number(mib) * 2 ** 20, mode, sharedUffd, readers: Number(readers), delayUs: Number(delayUs) });
    const per = r.perVcpuPagesPerSec.map((x) => (x / 1000).toFixed(1)).join(' ');
    console.log(`${mode} ${sharedUffd ? '-a  ' : 'perV'} -r ${readers} vcpus ${vcpus}: ${r.pages} pages in ${r.seconds.toFixed(3)} s; per-vCPU k pages/s [${per}]; overall ${(r.overallPagesPerSec / 1000).toFixed(1)}k pages/s (${r.handler})`);
  }
}
