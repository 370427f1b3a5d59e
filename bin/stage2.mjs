#!/usr/bin/env node
// The stage2 CLI. Runs the TypeScript sources through tsx's loader (worker threads are bundled
// separately, see src/util/worker.ts).
//
// Commands that migrate compile every function when its module loads (V8's --no-lazy), set
// before any of them is imported. A switchover runs most of its code exactly once, in the
// downtime, and lazily each function was parsed and compiled there on its first call: idle
// `migrate --local --engine soft -v 2 -b 512M` measured 2.79 ms downtime lazily against 1.83 ms
// eagerly (medians of 5, alternating; the build before the VMM-core wave: 1.77-1.96 ms), for
// ~0.1 s more start-up.
import { setFlagsFromString } from 'node:v8';
const MIGRATING = new Set(['migrate', 'receive', 'demo']);
if (MIGRATING.has(process.argv[2]) || (process.argv[2] === 'bench' && process.argv[3] === 'migration')) setFlagsFromString('--no-lazy');
import { register } from 'tsx/esm/api';
register();
const { main } = await import('../src/cli/main.ts');
await main(process.argv);
