#!/usr/bin/env node
// Builds the kvm engine's native addon (native/) with node-gyp against the local Node headers.
// Nothing can be downloaded here, so node-gyp is pointed at /usr (Node's headers) explicitly.
// --optional: a failed build is reported but does not fail `npm install` (the soft engine
// still works; the kvm engine then says the addon is missing).
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const optional = process.argv.includes('--optional');
if (!existsSync(join(root, 'native', 'binding.gyp'))) {
  console.error('stage2: no native/binding.gyp, skipping the kvm addon build');
  process.exit(0);
}
const nodeGyp = join(root, 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
const nodedir = existsSync('/usr/include/node/node_api.h') ? '/usr' : dirname(dirname(process.execPath));
const r = spawnSync(process.execPath, [nodeGyp, 'rebuild', `--nodedir=${nodedir}`], {
  cwd: join(root, 'native'),
  stdio: 'inherit',
});
if (r.status !== 0) {
  console.error(`stage2: the kvm addon failed to build (node-gyp exit ${r.status})`);
  process.exit(optional ? 0 : 1);
}
