// Is guest memory what the workload implies? For sequential and idle workloads every page of
// vCPU v's slice holds (v+1, pass) in its first word, with pass equal to the vCPU's completed
// passes n or n + 1 (the pass in progress), non-increasing along the slice. Used to show that a
// migrated guest continues with consistent memory, and that a failed migration left the source
// intact. Call it only while the VM is paused.
import { PAGE_SIZE, type Vm } from '../vmm/engine.ts';
import { pagesPerVcpu, type WorkloadSpec } from '../guest/workload.ts';

const CHUNK_PAGES = 256;

/** Null when consistent; else a description of the first page that is not. */
export function checkWorkloadMemory(vm: Vm, spec: WorkloadSpec, passes: readonly number[]): string | null {
  if (spec.kind !== 'sequential' && spec.kind !== 'idle') return null;
  const pages = pagesPerVcpu(spec);
  const buf = new Uint8Array(CHUNK_PAGES * PAGE_SIZE);
  const dv = new DataView(buf.buffer);
  for (let v = 0; v < passes.length; v++) {
    const n = passes[v]!;
    let prev = Infinity;
    for (let p0 = 0; p0 < pages; p0 += CHUNK_PAGES) {
      const k = Math.min(CHUNK_PAGES, pages - p0);
      vm.readGuest(spec.gpaBase + v * spec.bytesPerVcpu + p0 * PAGE_SIZE, buf.subarray(0, k * PAGE_SIZE));
      for (let i = 0; i < k; i++) {
        const lo = dv.getUint32(i * PAGE_SIZE, true);
        const hi = dv.getUint32(i * PAGE_SIZE + 4, true);
        const p = p0 + i;
        if (hi !== v + 1) return `vCPU ${v} page ${p}: owner word ${hi}, expected ${v + 1}`;
        if (lo !== n && lo !== n + 1) return `vCPU ${v} page ${p}: pass ${lo}, expected ${n} or ${n + 1}`;
        if (lo > prev) return `vCPU ${v} page ${p}: pass ${lo} after ${prev} (not sequential)`;
        prev = lo;
      }
    }
  }
  return null;
}
