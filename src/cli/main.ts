// stage2's command line: parse, call, print. Each command lives in its own file.
import { Command, CommanderError } from 'commander';
import { registerBench } from './bench.ts';
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

export async function main(argv: string[]): Promise<void> {
  const program = new Command('stage2')
    .description('a virtual-machine memory system with live migration (soft second-stage MMU and real /dev/kvm)')
    // Errors are printed by the catch below, as one line; help (asked for, or for a command
    // given without its subcommand) is still printed by commander.
    .configureOutput({ outputError: () => undefined })
    .exitOverride();
  registerDemo(program);
  registerBench(program);
  registerMigrate(program);
  registerReceive(program);
  try {
    await program.parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.exitCode !== 0 && e.code !== 'commander.help' && e.code !== 'commander.helpDisplayed') {
        process.stderr.write(`stage2: ${commanderErrorLine(e.message)}\n`);
      }
      process.exit(e.exitCode);
    }
    const err = e as Error;
    process.stderr.write(`stage2: ${err.message}\n`);
    if (process.env.STAGE2_DEBUG) process.stderr.write(`${err.stack}\n`);
    process.exit(1);
  }
}
