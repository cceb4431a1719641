// What the dashboard's browser tests (dashboard.test.mjs) and its benchmark (bench.mjs)
// share: bm-server processes started (and restarted) here, Debian's chromium through
// playwright-core, and waits for what the page shows.
//   BM_SERVER_BIN  the bm-server binary
//   BM_CHROMIUM    the browser (default /usr/bin/chromium)

import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const SERVER = process.env.BM_SERVER_BIN;
assert.ok(SERVER, 'BM_SERVER_BIN must name the bm-server binary');
// Long enough for a loaded 2-core CI machine; every wait is for an event, never a fixed time.
export const WAIT = 60_000;

const cleanups = [];

/** Debian's chromium (or BM_CHROMIUM), headless. */
export function launch() {
  return chromium.launch({
    executablePath: process.env.BM_CHROMIUM || '/usr/bin/chromium',
    // The machine's network is closed: no background connections, no first-run work.
    // (Playwright gives the browser a new, empty profile of its own.)
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    headless: true,
  });
}

/** Stops the servers and closes the pages made so far, last first; every one of them, even
 * when one fails (its error is thrown at the end). */
export async function cleanUp() {
  const errors = [];
  while (cleanups.length) {
    try {
      await cleanups.pop()();
    } catch (e) {
      errors.push(e);
    }
  }
  if (errors.length) throw errors[0];
}

/** A bm-server process on a data directory of its own; `restart()` keeps its ports. */
export class Server {
  /** `args`: bm-server's; without `secure`, every caller is an admin (--insecure). */
  constructor(args, { secure = false } = {}) {
    this.args = secure ? args : ['--insecure', ...args];
    this.token = '';
    this.dir = mkdtempSync(join(tmpdir(), 'bm-dash-'));
    this.http = '127.0.0.1:0';
    this.grpc = '127.0.0.1:0';
    this.log = [];
    cleanups.push(() => this.stop().then(() => rmSync(this.dir, { recursive: true, force: true })));
  }

  async start() {
    const child = spawn(
      SERVER,
      ['--listen', this.grpc, '--http-listen', this.http, '--data-dir', join(this.dir, 'data'), ...this.args],
      { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1' } },
    );
    this.child = child;
    this.exited = new Promise((done) => child.once('exit', done));
    createInterface({ input: child.stdout }).on('line', (l) => {
      const m = /^bm-server listening on (\S+)/.exec(l);
      if (m) this.grpc = m[1];
    });
    const http = await new Promise((resolve, reject) => {
      createInterface({ input: child.stderr }).on('line', (l) => {
        this.log.push(l);
        const m = /HTTP API on http:\/\/([^/\s]+)\/api\/v1/.exec(l);
        if (m) resolve(m[1]);
      });
      child.once('exit', (code) => reject(new Error(`bm-server exited (${code}):\n${this.log.join('\n')}`)));
    });
    this.http = http;
    this.base = `http://${http}`;
    return this;
  }

  /** SIGTERM, and waits for the exit. */
  async stop() {
    if (!this.child || this.child.exitCode !== null) return;
    this.child.kill('SIGTERM');
    await this.exited;
  }

  async restart() {
    await this.stop();
    await this.start();
  }

  /** A new token of `role` in the server's tokens file (before it starts); the token. */
  tokenFor(name, role) {
    const out = execFileSync(SERVER, ['token', 'create', name, '--role', role, '--tokens-file', join(this.dir, 'tokens.toml')], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    return out.toString().trim();
  }

  get headers() {
    return this.token ? { Authorization: `Bearer ${this.token}` } : {};
  }

  /** A call of the JSON API (with `this.token`); throws with the API's message when it fails. */
  async call(service, method, body = {}) {
    const r = await fetch(`${this.base}/api/v1/${service}/${method}`, { method: 'POST', headers: this.headers, body: JSON.stringify(body) });
    const j = await r.json();
    if (!r.ok) throw new Error(`${service}/${method}: ${j.code}: ${j.message}`);
    return j;
  }

  /** Waits for operation `id` to end (its watch stream ends after its last event). */
  async ended(id) {
    const r = await fetch(`${this.base}/api/v1/watch?operation_id=${id}&after_revision=0`, { headers: this.headers });
    assert.equal(r.status, 200);
    await r.text();
    return this.call('OperationService', 'GetOperation', { operationId: id });
  }

  /** Runs `method` on each machine, then waits until every operation ended. */
  async each(method, ids) {
    const ops = [];
    for (const machineId of ids) ops.push(await this.call('MachineService', method, { machineId, requestId: `${method}-${machineId}` }));
    for (const op of ops) assert.equal((await this.ended(op.id)).phase, 'OPERATION_PHASE_SUCCEEDED', `${method} of ${op.machineId}`);
  }
}

export const id = (i) => `m-${String(i).padStart(3, '0')}`;

/** Machines `from`..`from + n` of the fake provider, the even ones in rack r1, the odd in r2. */
export async function fleet(server, n, from = 0) {
  const machines = Array.from({ length: n }, (_, k) => {
    const i = from + k;
    return {
      id: id(i),
      labels: { rack: i % 2 ? 'r2' : 'r1', role: 'worker' },
      spec: {
        provider: 'fake',
        macAddresses: [`02:00:00:00:${((i >> 8) & 0xff).toString(16).padStart(2, '0')}:${(i & 0xff).toString(16).padStart(2, '0')}`],
        sshEndpoint: `root@10.0.${i >> 8}.${i & 0xff}:22`,
        image: 'ubuntu-24.04',
        targetCluster: 'prod',
      },
    };
  });
  const r = await server.call('MachineService', 'ImportMachines', { machines, source: 'dashboard test' });
  assert.equal(r.createdCount, n, JSON.stringify(r.results?.filter((x) => x.errorMessage)));
}

/** A new page in a context of its own; it fails the test at clean-up if a script failed. */
export async function newPage(browser) {
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const p = await context.newPage();
  const errors = [];
  p.on('pageerror', (e) => errors.push(e.message));
  p.on('console', (m) => m.type() === 'error' && !/Failed to load resource|ERR_/.test(m.text()) && errors.push(m.text()));
  cleanups.push(async () => {
    await context.close();
    assert.deepEqual(errors, [], 'the page had script errors');
  });
  return p;
}

/** Waits until the fleet table's drawn rows are the machines `ids`, in that order. */
export async function waitRows(p, ids) {
  await p.waitForFunction(
    (want) => [...document.querySelectorAll('.fleet .row[data-id]')].map((e) => e.dataset.id).join() === want,
    ids.join(),
    { timeout: WAIT },
  );
}

export const count = (p, state) => p.locator(`[data-count="${state}"]`).textContent().then(Number);

export async function waitCount(p, state, n) {
  await p.waitForFunction(
    ([s, n]) => document.querySelector(`[data-count="${s}"]`)?.textContent === String(n),
    [state, n],
    { timeout: WAIT },
  );
}

