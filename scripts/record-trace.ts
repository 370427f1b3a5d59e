// Records a page-level write trace (src/guest/trace-format.ts) of a real program:
//
//   scripts/record-trace -o OUT.s2trace [--epoch 100000] [--reads] [--stdin FILE] [--runs 5]
//                        -- PROG ARGS...
//
// 1. Runs PROG natively --runs times (stdin from FILE, output discarded) and keeps the median
//    wall time: replay defaults to this real time (valgrind's slowdown is not the program's).
// 2. Runs it once under `valgrind --tool=lackey --trace-mem=yes --log-fd=3` and reduces lackey's
//    stream as it arrives (src/guest/lackey-reducer.ts): epochs of --epoch instructions, the
//    pages each wrote (and read, with --reads).
// Lackey is slow (about 1.5 M lines a second here) and verbose: keep recordings to inputs of
// tens to hundreds of KB, well under a minute. Only the main process is traced (no children).
import { spawn, spawnSync } from 'node:child_process';
import { openSync, closeSync, readSync, writeFileSync, accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';
import { LackeyReducer } from '../src/guest/lackey-reducer.ts';
import { encodeTrace } from '../src/guest/trace-format.ts';

function usage(msg: string): never {
  process.stderr.write(`record-trace: ${msg}\nusage: scripts/record-trace -o OUT [--epoch N] [--reads] [--stdin FILE] [--runs N] -- PROG ARGS...\n`);
  process.exit(1);
}

const argv = process.argv.slice(2);
let out = '';
let epoch = 100_000;
let reads = false;
let stdinFile: string | null = null;
let runs = 5;
let i = 0;
const num = (s: string | undefined, flag: string) => {
  const n = Number(s);
  if (!Number.isSafeInteger(n) || n < 1) usage(`${flag} needs a positive integer, got ${s}`);
  return n;
};
for (; i < argv.length && argv[i] !== '--'; i++) {
  const a = argv[i]!;
  if (a === '-o') out = argv[++i] ?? usage('-o needs a file');
  else if (a === '--epoch') epoch = num(argv[++i], '--epoch');
  else if (a === '--reads') reads = true;
  else if (a === '--stdin') stdinFile = argv[++i] ?? usage('--stdin needs a file');
  else if (a === '--runs') runs = num(argv[++i], '--runs');
  else usage(`unknown option ${a}`);
}
const cmd = argv.slice(i + 1);
if (out === '' || cmd.length === 0) usage('need -o OUT and -- PROG ARGS...');

/** PROG's path as exec finds it (PATH search), or null. */
function resolveProgram(prog: string): string | null {
  const dirs = prog.includes('/') ? [''] : (process.env.PATH ?? '').split(delimiter);
  for (const d of dirs) {
    const p = d === '' ? prog : join(d, prog);
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      // not here
    }
  }
  return null;
}

// valgrind does not follow exec (no --trace-children): a #! wrapper (a pyenv shim, say) would
// be traced instead of the program it starts, giving a trace of a shell. Refuse it.
const progPath = resolveProgram(cmd[0]!) ?? usage(`${cmd[0]}: not found or not executable`);
{
  const head = Buffer.alloc(2);
  const pfd = openSync(progPath, 'r');
  readSync(pfd, head, 0, 2, 0);
  closeSync(pfd);
  if (head.toString('latin1') === '#!') usage(`${progPath} is a script (#!): valgrind would trace its interpreter, not the program it starts; name the binary`);
}

function stdinFd(): number | 'ignore' {
  return stdinFile === null ? 'ignore' : openSync(stdinFile, 'r');
}

// Native run time: the median of `runs` runs.
const times: number[] = [];
for (let r = 0; r < runs; r++) {
  const fd = stdinFd();
  const t0 = process.hrtime.bigint();
  const res = spawnSync(cmd[0]!, cmd.slice(1), { stdio: [fd, 'ignore', 'ignore'] });
  const ns = Number(process.hrtime.bigint() - t0);
  if (typeof fd === 'number') closeSync(fd);
  if (res.error) usage(`cannot run ${cmd[0]}: ${res.error.message}`);
  if (res.status !== 0) usage(`${cmd.join(' ')} exited with ${res.status ?? res.signal}`);
  times.push(ns);
}
times.sort((a, b) => a - b);
const nativeRunNs = times[Math.floor(times.length / 2)]!;

const reducer = new LackeyReducer({ epochLength: epoch, reads });
const fd = stdinFd();
const t0 = Date.now();
const vg = spawn('valgrind', ['--tool=lackey', '--trace-mem=yes', '--log-fd=3', ...cmd], { stdio: [fd, 'ignore', 'inherit', 'pipe'] });
const pipe = vg.stdio[3] as NodeJS.ReadableStream;
pipe.on('data', (chunk: Buffer) => reducer.push(chunk));
const code: number | null = await new Promise((resolve) => {
  let closed = 0;
  let status: number | null = null;
  const done = () => ++closed === 2 && resolve(status);
  pipe.on('end', done);
  vg.on('exit', (c) => {
    status = c;
    done();
  });
});
if (typeof fd === 'number') closeSync(fd);
if (code !== 0) usage(`valgrind ${cmd.join(' ')} exited with ${code}`);
const trace = reducer.finish(cmd.join(' ') + (stdinFile === null ? '' : ` < ${stdinFile.replace(/.*\//, '')}`), nativeRunNs);
const bytes = encodeTrace(trace);
writeFileSync(out, bytes);
const pagesWritten = trace.writes.reduce((s, e) => s + e.length, 0);
process.stdout.write(
  `${out}: ${trace.program}\n  ${trace.totalUnits} instructions, ${trace.writes.length} epochs of ${epoch}, ${trace.distinctPages} distinct pages, ` +
    `${(pagesWritten / trace.writes.length).toFixed(1)} pages written per epoch, native run ${(nativeRunNs / 1e6).toFixed(2)} ms, ` +
    `${bytes.length} bytes, recorded in ${((Date.now() - t0) / 1000).toFixed(1)} s${reducer.unparsed ? `, ${reducer.unparsed} unparsed lines` : ''}\n`,
);
