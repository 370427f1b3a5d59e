// A one-line progress bar for a migration on stderr (only when stderr is a TTY): percentage of
// RAM sent in the current pass over memory, round, remaining bytes, throughput, throttle.
import type { MigrationProgress } from './stats.ts';

export function progressBar(stream: NodeJS.WriteStream = process.stderr): { update: (p: MigrationProgress) => void; done: () => void } {
  if (!stream.isTTY) return { update: () => undefined, done: () => undefined };
  let drawn = false;
  return {
    update(p) {
      const width = 30;
      const frac = Math.min(1, p.roundSentPages / Math.max(1, p.roundTotalPages));
      const filled = Math.round(frac * width);
      const bar = '#'.repeat(filled) + '-'.repeat(width - filled);
      const mib = (p.remainingBytes / 2 ** 20).toFixed(1);
      const line = `[${bar}] ${(frac * 100).toFixed(0).padStart(3)}% ${p.status} round ${p.round} remaining ${mib} MiB ${p.throughputMBps.toFixed(0)} MB/s${p.throttlePercent ? ` throttle ${p.throttlePercent}%` : ''}`;
      stream.write(`\r${line.padEnd(100)}`);
      drawn = true;
    },
    done() {
      if (drawn) stream.write('\r' + ' '.repeat(100) + '\r');
      drawn = false;
    },
  };
}
