// stage2's command line: parse, call, print. Each command lives in its own file.
import { Command, CommanderError } from 'commander';
import { registerBench } from './bench.ts';
import { registerCalcDirtyRate } from './calc-dirty-rate.ts';
import { registerDemo } from './demo.ts';
import { registerMigrate } from './migrate.ts';
import { registerReceive } from './receive.ts';

/**
 * Commander's error as one line: "option '-b, --bytes-per-vcpu <size>' argument '1000' is
 * invalid. must be ..." -> "-b/--bytes-per-vcpu 1000: must be ..."; a suggestion that commander
 * puts on a second line ("(Did you mean --json?)") joins the first.
 */
export function commanderErrorLine(message: string): string {
  const m = message.replace(/^error: /, '').replace(/\s*\n\s*/g, ' ').trim();
  const invalid = /^option '([^']+)' argument '(.*)' is invalid\. (.*)$/s.exec(m);
  if (!invalid) return m;
  const flags = invalid[1]!.replace(/\s*<[^>]*>|\s*\[[^\]]*\]/g, '').replace(/,\s*/g, '/');
  return `${flags} ${invalid[2]}: ${invalid[3]}`;
}

/** The whole command line, ready to parse; it throws instead of exiting (see `main`). */
export function buildProgram(): Command {
  const program = new Command('stage2')
    .description('a virtual-machine memory system with live migration (soft second-stage MMU and real /dev/kvm)')
    // Errors are printed by `main`, as one line; help (asked for, or for a command given
    // without its subcommand) is still printed by commander.
    .configureOutput({ outputError: () => undefined })
    .exitOverride();
  registerDemo(program);
  registerBench(program);
  registerMigrate(program);
  registerReceive(program);
  registerCalcDirtyRate(program);
  return program;
}

/**
 * What `main` prints for an error that ended a command, and the exit status: one line, or none
 * for help that commander has already printed.
 */
export function errorExit(e: unknown): { line: string | null; exitCode: number } {
  if (e instanceof CommanderError) {
    const printed = e.exitCode === 0 || e.code === 'commander.help' || e.code === 'commander.helpDisplayed' || e.code === 'commander.version';
    return { line: printed ? null : `stage2: ${commanderErrorLine(e.message)}`, exitCode: e.exitCode };
  }
  return { line: `stage2: ${(e as Error).message}`, exitCode: 1 };
}

export async function main(argv: string[]): Promise<void> {
  try {
    await buildProgram().parseAsync(argv);
  } catch (e) {
    const { line, exitCode } = errorExit(e);
    if (line !== null) process.stderr.write(`${line}\n`);
    if (process.env.STAGE2_DEBUG && !(e instanceof CommanderError)) process.stderr.write(`${(e as Error).stack}\n`);
    process.exit(exitCode);
  }
}
