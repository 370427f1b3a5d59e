// The kernel's loopback TCP ceiling on this host: a small C pump (native/loopback-pump.c: one
// connection, a writer and a reader process, 1 MiB write()s and read()s, nothing else) compiled
// with cc at first use into the OS temp dir. No Node code can move bytes over one loopback
// connection faster than this; `bench transport` and the fastlink comparison print it beside the
// Node figures. Returns null (with the reason) where no C compiler is available.
//
// Concurrency: none (a child process; this module only spawns it and reads its one line).
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface KernelCeiling {
  bytes: number;
  seconds: number;
  GBps: number;
}

const SOURCE = join(dirname(fileURLToPath(import.meta.url)), 'native', 'loopback-pump.c');

/** Compile the pump once (rebuilt when the source is newer); the binary's path or an Error. */
function pumpBinary(): string | Error {
  const dir = join(tmpdir(), 'stage2-bench');
  const bin = join(dir, 'loopback-pump');
  try {
    if (existsSync(bin) && statSync(bin).mtimeMs >= statSync(SOURCE).mtimeMs) return bin;
    mkdirSync(dir, { recursive: true });
    execFileSync(process.env.CC ?? 'cc', ['-O2', '-o', bin, SOURCE], { stdio: ['ignore', 'ignore', 'pipe'] });
    return bin;
  } catch (e) {
    return new Error(`cannot build the loopback pump with ${process.env.CC ?? 'cc'}: ${(e as Error).message.split('\n')[0]}`);
  }
}

/** Move `bytes` (default 4 GiB) over one loopback connection with the C pump; best of `runs`. */
export function measureKernelCeiling(bytes = 4 * 2 ** 30, runs = 1): KernelCeiling | { error: string } {
  const bin = pumpBinary();
  if (bin instanceof Error) return { error: bin.message };
  let best: KernelCeiling | null = null;
  for (let i = 0; i < runs; i++) {
    try {
      const r = JSON.parse(execFileSync(bin, [String(bytes)], { encoding: 'utf8', timeout: 120_000 }).trim()) as KernelCeiling;
      if (!best || r.GBps > best.GBps) best = r;
    } catch (e) {
      return { error: `loopback pump failed: ${(e as Error).message.split('\n')[0]}` };
    }
  }
  return best!;
}

/** One human line: "kernel loopback ceiling (C pump, 1 connection, 1 MiB writes): 3.02 GB/s". */
export function describeKernelCeiling(c: KernelCeiling | { error: string }): string {
  if ('error' in c) return `kernel loopback ceiling: not measured (${c.error})`;
  return `kernel loopback ceiling (C pump, 1 connection, 1 MiB writes, ${(c.bytes / 2 ** 30).toFixed(0)} GiB): ${c.GBps.toFixed(2)} GB/s`;
}
