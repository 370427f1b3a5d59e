// Which engines the conformance suite runs against: every engine availableEngines() opens here,
// and a printed reason for each one it cannot.
import { availableEngines } from '../../src/vmm/factory.ts';
import type { Engine, EngineKind } from '../../src/vmm/engine.ts';

export interface EngineSet {
  engines: Engine[];
  unavailable: { engine: EngineKind; missing: string }[];
}

export async function enginesUnderTest(suite: string): Promise<EngineSet> {
  let res: Awaited<ReturnType<typeof availableEngines>>;
  try {
    res = await availableEngines();
  } catch (e) {
    // The soft engine may not load (it is developed separately); run kvm alone then.
    const { KvmEngine } = await import('../../src/kvm/engine.ts');
    const engines: Engine[] = [];
    const unavailable = [{ engine: 'soft' as EngineKind, missing: `soft engine failed to open: ${(e as Error).message}` }];
    try {
      engines.push(await KvmEngine.open());
    } catch (k) {
      unavailable.push({ engine: 'kvm', missing: (k as Error).message });
    }
    return report(suite, { engines, unavailable });
  }
  return report(suite, { engines: res.engines, unavailable: res.unavailable.map((u) => ({ engine: u.engine, missing: u.missing })) });
}

function report(suite: string, s: EngineSet): EngineSet {
  const ran = s.engines.map((e) => e.kind).join(', ') || 'none';
  const skipped = s.unavailable.map((u) => `${u.engine} (${u.missing})`).join('; ');
  console.log(`[${suite}] engines: ${ran}${skipped ? `; skipped: ${skipped}` : ''}`);
  return s;
}
