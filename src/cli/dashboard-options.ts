// --dashboard [HOST:]PORT (demo, migrate, receive, bench ...) and migrate's --report FILE.html.
// A bad value is one line and exit 1, like every other option (options.ts).
import { InvalidArgumentError, type Command } from 'commander';
import { DashboardAddressError, parseDashboardAddress } from '../dashboard/address.ts';
import { Dashboard } from '../dashboard/dashboard.ts';
import type { ListenAddress } from '../dashboard/guard.ts';
import type { DashboardMessage } from '../dashboard/sampler.ts';
import type { Engine } from '../vmm/engine.ts';

export interface DashboardOptions {
  /** `true`: the flag alone (loopback, a free port). */
  dashboard?: ListenAddress | true;
}

function parseDashboard(value: string): ListenAddress {
  try {
    return parseDashboardAddress(value);
  } catch (e) {
    if (e instanceof DashboardAddressError) throw new InvalidArgumentError(e.why);
    throw e;
  }
}

export function addDashboardOption(cmd: Command): Command {
  return cmd.option(
    '--dashboard [host:port]',
    'serve a live dashboard in the browser (read-only): [HOST:]PORT, default 127.0.0.1 and a free port, printed on start',
    (v: string) => parseDashboard(v),
  );
}

/** The flag alone gives `true`: loopback, a free port. */
export function dashboardAddress(options: object): ListenAddress | undefined {
  const opts = options as DashboardOptions;
  return opts.dashboard === true ? parseDashboardAddress(true) : opts.dashboard;
}

/** Start the dashboard the options ask for, or none. */
export async function startDashboard(opts: object, title: string, role: DashboardMessage['role'], log: (line: string) => void): Promise<Dashboard | null> {
  const addr = dashboardAddress(opts);
  return addr ? Dashboard.start(addr, title, role, log) : null;
}

/**
 * For a benchmark: the dashboard watches every VM the engine creates, does not keep the process
 * alive, and sends its final message when the command's work is done (beforeExit).
 */
export async function benchDashboard<E extends Engine>(opts: object, title: string, engine: E, log: (line: string) => void): Promise<Engine> {
  const dash = await startDashboard(opts, title, 'bench', log);
  if (!dash) return engine;
  dash.server.unref();
  process.once('beforeExit', () => void dash.close());
  return dash.observe(engine);
}
