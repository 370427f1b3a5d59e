// Starting worker threads that run this project's TypeScript sources.
//
// Node 20's tsx loader does not reach worker_threads, and booting tsx inside each worker costs
// ~130 ms per worker here. Instead each worker entry point is bundled once per process with
// esbuild (~15 ms) into a plain .mjs under the OS temp dir, and workers start from that file
// (~25 ms each). Bundles are keyed by the entry path and the process id and removed when the
// process exits. Native addons (*.node) stay external: worker code finds the project root in
// workerData.__stage2Root (never from import.meta.url, which points into the temp dir).
import { buildSync } from 'esbuild';
import { createHash } from 'node:crypto';
import { mkdirSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker, type WorkerOptions } from 'node:worker_threads';

export const projectRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

const bundles = new Map<string, string>();

/** Bundle a worker entry (absolute path of a .ts file) once per process; return the .mjs path. */
export function bundleWorkerEntry(entryPath: string): string {
  const cached = bundles.get(entryPath);
  if (cached) return cached;
  const key = createHash('sha1').update(entryPath).update(String(process.pid)).digest('hex').slice(0, 16);
  const dir = join(tmpdir(), 'stage2-workers');
  mkdirSync(dir, { recursive: true });
  const outfile = join(dir, `${key}.mjs`);
  buildSync({
    entryPoints: [entryPath],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    outfile,
    external: ['*.node'],
    // Bundled CommonJS dependencies call require(); give the ESM bundle one.
    banner: { js: "import { createRequire as __s2cr } from 'node:module'; const require = __s2cr(import.meta.url);" },
    logLevel: 'error',
  });
  if (!existsSync(outfile)) throw new Error(`worker bundle for ${entryPath} was not written`);
  bundles.set(entryPath, outfile);
  // Workers have loaded the bundle by the time this process exits; leave no file behind.
  process.once('exit', () => rmSync(outfile, { force: true }));
  return outfile;
}

/**
 * Start a worker running the TypeScript module at `entry` (a file URL or absolute path).
 * workerData gets `__stage2Root` added.
 */
export function startWorker(entry: URL | string, workerData: Record<string, unknown>, options: WorkerOptions = {}): Worker {
  const entryPath = entry instanceof URL ? fileURLToPath(entry) : entry;
  const file = bundleWorkerEntry(entryPath);
  return new Worker(file, { ...options, workerData: { ...workerData, __stage2Root: projectRoot } });
}
