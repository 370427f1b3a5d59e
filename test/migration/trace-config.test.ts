// A migration of the trace workload: the CONFIG record's trace fields are validated like every
// other field, and the destination refuses a guest whose trace file it lacks or has in another
// version (guest/trace-replay.ts), before building anything.
import { describe, expect, it } from 'vitest';
import { copyFileSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { checkConfig, CONFIG_VERSION, IncompatibleConfigError, type MigrationConfig } from '../../src/migration/config.ts';
import { ConfigFieldError, validateConfig } from '../../src/migration/config-validate.ts';
import { traceRef } from '../../src/guest/trace-replay.ts';
import { workload, type WorkloadSpec } from '../../src/guest/workload.ts';
import { SoftEngine } from '../../src/soft/engine.ts';
import { MMU_LOCK_MODES } from '../../src/vmm/engine.ts';

const SHIPPED = join(import.meta.dirname, '../data/traces/gzip.s2trace');

function config(spec: WorkloadSpec): MigrationConfig {
  const bytes = spec.bytesPerVcpu;
  return {
    version: CONFIG_VERSION,
    engine: 'soft',
    vmConfig: { manualDirtyLogProtect: true, dirtyRingEntries: 0, lock: 'parallel', guestPageSize: 4096 },
    vcpus: 1,
    workload: spec,
    memslots: [{ slot: 0, flags: 0, guestPhysAddr: spec.gpaBase, memorySize: bytes, pages: bytes / 4096, internal: false, backing: 'anonymous' }],
    ramBytes: bytes,
  };
}

describe('trace workload in the CONFIG record', () => {
  it('validates the trace fields', () => {
    const good = config(workload('trace', 2 ** 20, { traces: [traceRef(SHIPPED)], traceShift: 3 }));
    expect(validateConfig(JSON.parse(JSON.stringify(good)), MMU_LOCK_MODES).workload).toEqual(good.workload);
    const bad = (w: Record<string, unknown>) => () => validateConfig(JSON.parse(JSON.stringify({ ...good, workload: { ...good.workload, ...w } })), MMU_LOCK_MODES);
    expect(bad({ traces: [] })).toThrow(/workload.traces: the trace workload needs at least one trace/);
    expect(bad({ traces: [{ path: 'rel/x', digest: '0'.repeat(64) }] })).toThrow(/traces\[0\].path: must be an absolute path/);
    expect(bad({ traces: [{ path: '/x', digest: 'abc' }] })).toThrow(ConfigFieldError);
    expect(bad({ traceRate: -2 })).toThrow(/workload.traceRate/);
    expect(bad({ traceShift: -1 })).toThrow(/workload.traceShift/);
  });

  it('the destination refuses a missing or different trace file', () => {
    const dir = mkdtempSync(join(tmpdir(), 'stage2-trace-cfg-'));
    const path = join(dir, 'gzip.s2trace');
    copyFileSync(SHIPPED, path);
    const spec = workload('trace', 2 ** 20, { traces: [traceRef(path)] });
    const engine = new SoftEngine({ hostRamBytes: 16 * 2 ** 20 });
    const limits = { maxRamBytes: 2 ** 30 };
    expect(() => checkConfig(config(spec), engine, limits)).not.toThrow();
    // Another file at the same path (a fresh thread would read it: the digest is what decides).
    writeFileSync(path, Buffer.from('different'));
    const moved = { ...spec, traces: [{ path: join(dir, 'absent.s2trace'), digest: spec.traces[0]!.digest }] };
    expect(() => checkConfig(config(moved), engine, limits)).toThrow(IncompatibleConfigError);
    expect(() => checkConfig(config(moved), engine, limits)).toThrow(/absent.s2trace: no such file; copy the source's trace file/);
    const changed = { ...spec, traces: [{ path, digest: 'f'.repeat(64) }] };
    expect(() => checkConfig(config(changed), engine, limits)).toThrow(/its sha256 is [0-9a-f]{64}, the workload replays f{64}/);
  });
});
