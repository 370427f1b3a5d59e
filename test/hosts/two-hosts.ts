// The host-test harness: two network namespaces joined by a shaped veth (scripts/two-hosts.sh),
// stage2 commands run inside them (`ip netns exec`), and the delay/loss proxy (link-proxy.mjs).
// Names carry this process's pid, so two engineers (or two test files) never collide; every
// namespace and process made here is removed by cleanup(), which the tests call in afterAll and
// on failure.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { projectRoot } from '../../src/util/worker.ts';

export const BIN = join(projectRoot, 'bin', 'stage2.mjs');
const SCRIPT = join(projectRoot, 'scripts', 'two-hosts.sh');
const PROXY = join(projectRoot, 'test', 'hosts', 'link-proxy.mjs');

/** Null when namespaces can be made here; else why not (the tests skip, saying so). */
export function netnsUnavailable(): string | null {
  if (process.platform !== 'linux') return 'not Linux';
  if (process.getuid?.() !== 0) return 'not root (ip netns add needs CAP_SYS_ADMIN)';
  const probe = `s2probe${process.pid}`;
  const r = spawnSync('ip', ['netns', 'add', probe], { encoding: 'utf8' });
  if (r.error) return `no \`ip\` command (${r.error.message}); install iproute2`;
  if (r.status !== 0) return `\`ip netns add\` was refused: ${r.stderr.trim()}`;
  spawnSync('ip', ['netns', 'del', probe]);
  const tc = spawnSync('tc', ['-V']);
  if (tc.error) return 'no `tc` command; install iproute2';
  return null;
}

export interface Hosts {
  name: string;
  a: string;
  b: string;
  addrA: string;
  addrB: string;
}

const made = new Set<string>();
const children = new Set<ChildProcess>();

/** Two hosts joined by a link of `rate` (tc syntax, e.g. 1gbit; '' unshaped). */
export function up(tag: string, rate: string): Hosts {
  const name = `s2${tag}${process.pid % 100000}`;
  made.add(name);
  const r = spawnSync(SCRIPT, ['up', name], { encoding: 'utf8', env: { ...process.env, RATE: rate } });
  if (r.status !== 0) throw new Error(`two-hosts.sh up ${name} failed: ${r.stderr.trim()}`);
  const [a, addrA, b, addrB] = r.stdout.trim().split(/\s+/) as [string, string, string, string];
  return { name, a, b, addrA, addrB };
}

export function down(h: Hosts): void {
  spawnSync(SCRIPT, ['down', h.name]);
  made.delete(h.name);
}

export interface Proc {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  done: Promise<number | null>;
  /** Resolves with the first match of `re` in stderr+stdout (rejects if the process ends first). */
  waitFor(re: RegExp, timeoutMs?: number): Promise<RegExpExecArray>;
}

/** `argv` inside namespace `ns`. */
export function run(ns: string, argv: string[]): Proc {
  const child = spawn('ip', ['netns', 'exec', ns, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  let out = '';
  let err = '';
  const waiters: (() => void)[] = [];
  child.stdout!.on('data', (c: Buffer) => {
    out += c.toString();
    for (const w of waiters) w();
  });
  child.stderr!.on('data', (c: Buffer) => {
    err += c.toString();
    for (const w of waiters) w();
  });
  const done = new Promise<number | null>((resolve) => child.on('close', (code) => {
    children.delete(child);
    for (const w of waiters) w();
    resolve(code);
  }));
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    done,
    waitFor: (re, timeoutMs = 20_000) =>
      new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no ${re} within ${timeoutMs} ms; output:\n${err}${out}`)), timeoutMs);
        const check = () => {
          const m = re.exec(err + out);
          if (m) {
            clearTimeout(timer);
            resolve(m);
          } else if (child.exitCode !== null || child.signalCode !== null) {
            clearTimeout(timer);
            reject(new Error(`process ended (${child.exitCode ?? child.signalCode}) before ${re}; output:\n${err}${out}`));
          }
        };
        waiters.push(check);
        check();
      }),
  };
}

export const stage2 = (ns: string, args: string[]): Proc => run(ns, [process.execPath, BIN, ...args]);

/** The delay/loss proxy in namespace `ns`, listening on listen, forwarding to target. */
export async function proxy(ns: string, listen: string, target: string, delayMs: number, loss = 0, stallMs = 0): Promise<Proc> {
  const [lh, lp] = listen.split(':') as [string, string];
  const [th, tp] = target.split(':') as [string, string];
  const p = run(ns, [process.execPath, PROXY, lh, lp, th, tp, String(delayMs), String(loss), String(stallMs)]);
  await p.waitFor(/proxy listening/);
  return p;
}

/** Kill every process and remove every namespace this harness made. */
export function cleanup(): void {
  for (const c of children) c.kill('SIGKILL');
  children.clear();
  for (const name of made) spawnSync(SCRIPT, ['down', name]);
  made.clear();
}
process.once('exit', cleanup);
