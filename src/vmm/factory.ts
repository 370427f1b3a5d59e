// The one place that names both engines. Everything else asks for an engine by kind.
// Engines are imported lazily so that a missing native addon never breaks the soft engine.
import { EngineUnavailableError, type Engine, type EngineKind } from './engine.ts';
import type { SoftEngineOptions } from '../soft/engine.ts';

export type EngineChoice = EngineKind | 'default';

/** Open the kvm engine, or throw EngineUnavailableError saying exactly what is missing. */
async function openKvm(): Promise<Engine> {
  const { KvmEngine } = await import('../kvm/engine.ts');
  return KvmEngine.open();
}

async function openSoft(soft: SoftEngineOptions = {}): Promise<Engine> {
  const { SoftEngine } = await import('../soft/engine.ts');
  return new SoftEngine(soft);
}

/**
 * `soft` and `kvm` open that engine (kvm throws EngineUnavailableError when it cannot run here);
 * `default` is kvm when /dev/kvm works, else soft (DESIGN.md). `onFallback` hears why kvm was
 * not used. `soft` configures the soft engine if that is what opens (e.g. --recover).
 */
export async function openEngine(choice: EngineChoice = 'default', onFallback?: (why: string) => void, soft?: SoftEngineOptions): Promise<Engine> {
  if (choice === 'soft') return openSoft(soft);
  if (choice === 'kvm') return openKvm();
  try {
    return await openKvm();
  } catch (e) {
    if (!(e instanceof EngineUnavailableError)) throw e;
    onFallback?.(e.message);
    return openSoft(soft);
  }
}

/** Every engine that can run on this host, with the reason for each one that cannot. */
export async function availableEngines(): Promise<{ engines: Engine[]; unavailable: EngineUnavailableError[] }> {
  const engines: Engine[] = [await openSoft()];
  const unavailable: EngineUnavailableError[] = [];
  try {
    engines.push(await openKvm());
  } catch (e) {
    if (!(e instanceof EngineUnavailableError)) throw e;
    unavailable.push(e);
  }
  return { engines, unavailable };
}
