// Trace replay on the soft engine (guest/workload.ts 'trace'): for every shipped trace, the
// dirty pages harvested each round are exactly the pages the trace says were written in the
// epochs that round covered (mapped into the vCPU's slice), through wrap-around, with a shift
// and with two vCPUs on different traces; memory holds the model's values. Computed here from
// the decoded file, not from the workload's model, so a wrong epoch or mapping in either fails.
import { afterEach, describe, expect, it } from 'vitest';
import { copyFileSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { decodeTrace, type Trace } from '../../../src/guest/trace-format.ts';
import { loadTrace, traceRef, TraceFileError } from '../../../src/guest/trace-replay.ts';
import { workload } from '../../../src/guest/workload.ts';
import { bitmapPages, harvest, makeTestVm, snapshotWords, WorkloadModel, type TestVm } from './harness.ts';

const DIR = join(import.meta.dirname, '../../data/traces');
const SHIPPED = readdirSync(DIR).filter((f) => f.endsWith('.s2trace')).sort();

let t: TestVm | null = null;
afterEach(async () => {
  await t?.vm.destroy();
  t = null;
});

/** Slot pages vCPU v writes in passes from..to (1-based, inclusive), straight from the trace. */
function expectedPages(trace: Trace, v: number, slicePages: number, shift: number, from: number, to: number): Set<number> {
  const out = new Set<number>();
  const n = trace.writes.length;
  for (let pass = from; pass <= to; pass++) {
    const epoch = (v * shift + pass - 1) % n;
    for (const p of trace.writes[epoch]!) out.add(v * slicePages + (p % slicePages));
  }
  return out;
}

const sorted = (s: Set<number>) => [...s].sort((a, b) => a - b);

/** Run the rounds (passes per round) and check every harvest and, after each, memory. */
async function replayRounds(tv: TestVm, traces: Trace[], slicePages: number, shift: number, rounds: number[]): Promise<void> {
  const vcpus = traces.length;
  const model = new WorkloadModel(tv.spec, vcpus);
  tv.setLogging(true);
  let done = 0;
  for (const k of rounds) {
    const from = done + 1;
    done += k;
    tv.vm.allowPasses(done);
    await tv.vm.waitForPasses(done);
    const want = new Set<number>();
    traces.forEach((tr, v) => expectedPages(tr, v, slicePages, shift, from, done).forEach((p) => want.add(p)));
    for (let i = 0; i < k; i++) model.step();
    const got = bitmapPages(harvest(tv), tv.pages);
    expect(sorted(got), `passes ${from}..${done}`).toEqual(sorted(want));
    const words = snapshotWords(tv);
    for (let p = 0; p < tv.pages; p++) if (words[p] !== model.expected(p)) expect.fail(`after pass ${done}: page ${p} holds ${words[p]}, the model says ${model.expected(p)}`);
  }
}

describe('trace replay (soft engine)', () => {
  it('ships at least four traces', () => {
    expect(SHIPPED.length).toBeGreaterThanOrEqual(4);
  });

  it.each(SHIPPED)('%s: each round harvests the pages of the epochs it covered, through wrap-around', async (file) => {
    const path = join(DIR, file);
    const trace = decodeTrace(readFileSync(path));
    const epochs = trace.writes.length;
    // A slice smaller than the trace's pages folds them (index mod slice); one larger keeps them apart.
    const slicePages = Math.max(16, Math.min(512, Math.ceil(trace.distinctPages / 2)));
    t = await makeTestVm({ vcpus: 1, bytesPerVcpu: slicePages * 4096, kind: 'trace', workloadOptions: { traces: [traceRef(path)], traceRate: 0 } });
    // Rounds of 1, 2 and 7 epochs, then one that runs past the end and wraps around.
    await replayRounds(t, [trace], slicePages, 0, [1, 2, 7, epochs]);
  });

  it('two vCPUs on different traces, the second shifted, each in its own slice', async () => {
    const files = SHIPPED.slice(0, 2).map((f) => join(DIR, f));
    const traces = files.map((f) => decodeTrace(readFileSync(f)));
    const slicePages = 128;
    // A shift beyond the second trace's length exercises its modulo too.
    const shift = traces[1]!.writes.length + 37;
    t = await makeTestVm({ vcpus: 2, bytesPerVcpu: slicePages * 4096, kind: 'trace', workloadOptions: { traces: files.map((f) => traceRef(f)), traceRate: 0, traceShift: shift } });
    await replayRounds(t, traces, slicePages, shift, [1, 3, 5, 11]);
  });

  it('paces itself to --trace-rate epochs per second', async () => {
    const path = join(DIR, SHIPPED[0]!);
    t = await makeTestVm({ vcpus: 1, bytesPerVcpu: 64 * 4096, kind: 'trace', workloadOptions: { traces: [traceRef(path)], traceRate: 200 } });
    t.vm.allowPasses(Infinity);
    await t.vm.waitForPasses(1);
    const p0 = t.vm.progress()[0]!.passesCompleted;
    const t0 = performance.now();
    await new Promise((r) => setTimeout(r, 1000));
    const rate = (t.vm.progress()[0]!.passesCompleted - p0) / ((performance.now() - t0) / 1000);
    // The clock only holds the vCPU back; a starved CPU may make it slower, so only gross misses fail.
    expect(rate).toBeLessThan(200 * 1.1);
    expect(rate).toBeGreaterThan(200 * 0.5);
  });

  it('refuses a trace file that is missing or differs from the one the spec names', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'stage2-trace-'));
    const copy = join(dir, 'copy.s2trace');
    copyFileSync(join(DIR, SHIPPED[0]!), copy);
    const ref = traceRef(copy);
    const other = { path: copy, digest: '0'.repeat(64) };
    expect(() => loadTrace(other)).toThrow(TraceFileError);
    expect(() => loadTrace(other)).toThrow(/its sha256 is [0-9a-f]{64}, the workload replays 0{64}/);
    expect(() => loadTrace({ ...ref, path: join(dir, 'gone.s2trace') })).toThrow(/no such file/);
    writeFileSync(join(dir, 'junk.s2trace'), 'junk');
    expect(() => traceRef(join(dir, 'junk.s2trace'))).toThrow(/not a gzip-compressed trace/);
    // The VM refuses before any vCPU thread starts.
    t = await makeTestVm({ vcpus: 1, bytesPerVcpu: 64 * 4096, kind: 'trace', vcpusNow: false, workloadOptions: { traces: [other], traceRate: 0 } });
    await expect(t.vm.createVcpus(1, workload('trace', 64 * 4096, { traces: [other] }))).rejects.toThrow(TraceFileError);
  });
});
