// Running the real stage2 CLI as a child process, for the CLI tests.
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { availableEngines } from '../../src/vmm/factory.ts';
import { projectRoot } from '../../src/util/worker.ts';

export const BIN = join(projectRoot, 'bin', 'stage2.mjs');
export const { engines } = await availableEngines();

export interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Run `stage2 ...args`. `timeoutMs` is a hang guard: past it the child is killed (SIGKILL) and
 * the run resolves with `code: null`.
 */
export function stage2(args: string[], opts: { onStderr?: (text: string, child: ReturnType<typeof spawn>) => void; timeoutMs?: number } = {}): Promise<Run> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    const guard = opts.timeoutMs === undefined ? null : setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => {
      stderr += c.toString();
      opts.onStderr?.(stderr, child);
    });
    child.on('close', (code) => {
      if (guard) clearTimeout(guard);
      resolve({ code, stdout, stderr });
    });
  });
}

