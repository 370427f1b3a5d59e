#!/usr/bin/env node
// The stage2 CLI. Runs the TypeScript sources through tsx's loader (worker threads are bundled
// separately, see src/util/worker.ts).
import { register } from 'tsx/esm/api';
register();
const { main } = await import('../src/cli/main.ts');
await main(process.argv);
