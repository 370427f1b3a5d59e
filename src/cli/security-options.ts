// The options that secure a migration (transport/admission.ts): TLS and the shared auth token,
// for `receive` and `migrate`, their rules, and the files they name read into what the transport
// takes. Everything here runs before any VM, listener or connection exists; a broken rule or an
// unreadable file is a UsageError (one line, exit 1).
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import type { Command } from 'commander';
import type { ClientSecurity, ServerSecurity } from '../migration/transport/admission.ts';
import { MIN_TOKEN_BYTES } from '../migration/transport/auth.ts';
import { checkServerConfig } from '../migration/transport/tls.ts';
import { UsageError } from './validate.ts';

export interface SecurityOptions {
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  authTokenFile?: string;
}

export function addReceiveSecurityOptions(cmd: Command): Command {
  return cmd
    .option('--tls-cert <file>', 'TLS: this receiver\'s certificate (PEM); with --tls-key')
    .option('--tls-key <file>', 'TLS: the private key of --tls-cert (PEM)')
    .option('--tls-ca <file>', 'TLS: require a client certificate signed by this CA (PEM): mutual TLS')
    .option('--auth-token-file <file>', `accept only a source that proves it holds this file's secret (at least ${MIN_TOKEN_BYTES} bytes; never sent)`);
}

export function addMigrateSecurityOptions(cmd: Command): Command {
  return cmd
    .option('--tls-ca <file>', 'TLS: the CA (PEM) that signed the receiver\'s certificate (which must name the --to address)')
    .option('--tls-cert <file>', 'TLS: our client certificate (PEM), for a receiver that requires one; with --tls-key. --local: the spawned receiver uses it too')
    .option('--tls-key <file>', 'TLS: the private key of --tls-cert (PEM)')
    .option('--auth-token-file <file>', `prove to the receiver that we hold this file's secret (the same file as receive's; never sent)`);
}

function readOption(flag: string, file: string): Buffer {
  try {
    return readFileSync(file);
  } catch (e) {
    throw new UsageError(`${flag} ${file}: cannot read it (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
}

function readToken(file: string): Buffer {
  // A trailing newline (echo, an editor) is not part of the secret.
  const token = Buffer.from(readOption('--auth-token-file', file).toString('latin1').replace(/[\r\n]+$/, ''), 'latin1');
  if (token.length < MIN_TOKEN_BYTES) {
    throw new UsageError(`--auth-token-file ${file}: ${token.length} bytes; use at least ${MIN_TOKEN_BYTES} (e.g. openssl rand -hex 32 > ${file})`);
  }
  return token;
}

function pairRule(o: SecurityOptions): void {
  if ((o.tlsCert === undefined) !== (o.tlsKey === undefined)) throw new UsageError('--tls-cert and --tls-key go together: give both (the certificate and its private key) or neither');
}

/** `receive`: what every connection must pass; undefined when nothing is asked. */
export function loadServerSecurity(o: SecurityOptions): ServerSecurity | undefined {
  pairRule(o);
  if (o.tlsCa !== undefined && o.tlsCert === undefined) throw new UsageError('--tls-ca (require client certificates) needs TLS on: give --tls-cert and --tls-key too');
  const security: ServerSecurity = {};
  if (o.tlsCert !== undefined) {
    security.tls = { cert: readOption('--tls-cert', o.tlsCert), key: readOption('--tls-key', o.tlsKey!), ...(o.tlsCa !== undefined ? { ca: readOption('--tls-ca', o.tlsCa) } : {}) };
    try {
      checkServerConfig(security.tls);
    } catch (e) {
      throw new UsageError(`--tls-cert ${o.tlsCert} / --tls-key ${o.tlsKey}: not a usable certificate and key (${(e as Error).message})`);
    }
  }
  if (o.authTokenFile !== undefined) security.token = readToken(o.authTokenFile);
  return security.tls || security.token ? security : undefined;
}

/** `migrate`: what we bring to every connection; undefined when nothing. */
export function loadClientSecurity(o: SecurityOptions & { local?: boolean }): ClientSecurity | undefined {
  pairRule(o);
  if (o.tlsCert !== undefined && o.tlsCa === undefined) throw new UsageError('--tls-cert needs --tls-ca: TLS checks the receiver\'s certificate against that CA');
  if (o.local && o.tlsCa !== undefined && o.tlsCert === undefined) {
    throw new UsageError('--local with --tls-ca needs --tls-cert and --tls-key too: the receiver it spawns serves that certificate (signed by --tls-ca, valid for 127.0.0.1)');
  }
  const security: ClientSecurity = {};
  if (o.tlsCa !== undefined) {
    security.tls = { ca: readOption('--tls-ca', o.tlsCa), ...(o.tlsCert !== undefined ? { cert: readOption('--tls-cert', o.tlsCert), key: readOption('--tls-key', o.tlsKey!) } : {}) };
  }
  if (o.authTokenFile !== undefined) security.token = readToken(o.authTokenFile);
  return security.tls || security.token ? security : undefined;
}

/** The same security for the receiver `migrate --local` spawns (mutual TLS with one certificate). */
export function localReceiverArgs(o: SecurityOptions): string[] {
  const args: string[] = [];
  if (o.tlsCert !== undefined) args.push('--tls-cert', o.tlsCert, '--tls-key', o.tlsKey!, '--tls-ca', o.tlsCa!);
  if (o.authTokenFile !== undefined) args.push('--auth-token-file', o.authTokenFile);
  return args;
}

export function isLoopback(host: string): boolean {
  if (host === 'localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  return host === '::1' || host === '0:0:0:0:0:0:0:1';
}

/**
 * `receive`: an unauthenticated receiver writes whatever arrives into guest memory, so without
 * TLS or a token it may listen on loopback only.
 */
export function checkListenAddress(host: string, port: number, security: ServerSecurity | undefined): void {
  if (!security && !isLoopback(host)) {
    throw new UsageError(`--listen ${host}:${port}: without --auth-token-file or --tls-cert/--tls-key the receiver listens on loopback only (127.0.0.1): add --auth-token-file FILE (and TLS) to listen on ${host}`);
  }
}

/** How the receiver describes what it demands, after "listening on HOST:PORT". */
export function describeServerSecurity(security: ServerSecurity | undefined): string {
  if (!security) return 'loopback only: no TLS, no auth token';
  const parts: string[] = [];
  if (security.tls) parts.push(security.tls.ca ? 'mutual TLS' : 'TLS');
  if (security.token) parts.push('auth token');
  return parts.join(' + ');
}
