// Manual post-copy recovery (QEMU's `migrate -r` after postcopy-paused): a `migrate` whose
// post-copy connection dropped and whose automatic reconnections (--postcopy-retry) are used up
// stays paused, keeps its pages, and waits. It leaves a note in the temp directory naming its pid
// and why it waits; `stage2 migrate --resume PID` (once the path to the destination works again)
// finds the note and signals the waiting process (SIGUSR2), which reconnects. The destination
// keeps listening meanwhile (receive's post-copy recover timeout).
//
// Concurrency: the CLI's main thread; the signal handler only resolves a promise.
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { UsageError } from './validate.ts';

export const RESUME_SIGNAL = 'SIGUSR2';

export function pausedNotePath(pid: number): string {
  return join(tmpdir(), `stage2-postcopy-paused-${pid}`);
}

/**
 * The waiting side: note, instructions, then true on `migrate --resume`, false after `waitMs`
 * (0: do not wait) or a cancel.
 */
export function waitForManualResume(why: string, waitMs: number, log: (line: string) => void, signal: AbortSignal): Promise<boolean> {
  if (waitMs <= 0 || signal.aborted) return Promise.resolve(false);
  const note = pausedNotePath(process.pid);
  writeFileSync(note, `${why}\n`);
  log(`${why}. Paused: this source keeps the guest's pages. Once the destination is reachable again run \`stage2 migrate --resume ${process.pid}\` (waiting ${Math.round(waitMs / 1000)} s)`);
  return new Promise<boolean>((resolve) => {
    const done = (ok: boolean) => {
      clearTimeout(timer);
      process.off(RESUME_SIGNAL, onResume);
      signal.removeEventListener('abort', onAbort);
      rmSync(note, { force: true });
      resolve(ok);
    };
    const onResume = () => done(true);
    const onAbort = () => done(false);
    const timer = setTimeout(() => done(false), waitMs);
    process.on(RESUME_SIGNAL, onResume);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

/** `migrate --resume PID`: tell the paused migration to reconnect. Returns what to print. */
export function resumePausedMigration(pid: number): string {
  const note = pausedNotePath(pid);
  if (!existsSync(note)) throw new UsageError(`no post-copy migration of process ${pid} is waiting to resume (no ${note}): only a \`migrate\` whose post-copy connection dropped after its reconnections were used up waits for --resume`);
  const why = readFileSync(note, 'utf8').trim();
  try {
    process.kill(pid, RESUME_SIGNAL);
  } catch (e) {
    rmSync(note, { force: true });
    throw new UsageError(`process ${pid} is gone (${(e as NodeJS.ErrnoException).code}): its post-copy migration cannot resume; the destination's guest waits for pages only that source had`);
  }
  return `resuming the post-copy migration of process ${pid} (paused: ${why})`;
}
