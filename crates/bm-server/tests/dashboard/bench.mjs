// The dashboard with 10,000 machines (`cargo xtask bench --scenario dashboard`): how long the
// fleet page takes to show them, how smooth it stays while every machine runs an operation
// and while it is scrolled, and what it asks of the server meanwhile. Prints one table.
//   BM_BENCH_MACHINES  the fleet's size (default 10000)

import assert from 'node:assert/strict';
import { Server, cleanUp, fleet, id, launch, newPage, waitCount } from './harness.mjs';

const N = Number(process.env.BM_BENCH_MACHINES || 10000);

/** Runs `fn` on each of `items`, `width` at a time. */
async function pool(items, width, fn) {
  let next = 0;
  await Promise.all(
    Array.from({ length: width }, async () => {
      while (next < items.length) await fn(items[next++]);
    }),
  );
}

/** Starts recording the page's frames: each gap between two animation frames. */
const watchFrames = (p) =>
  p.evaluate(() => {
    window.__frames = [];
    let last = performance.now();
    const tick = (t) => {
      window.__frames.push(t - last);
      last = t;
      window.__frameLoop = requestAnimationFrame(tick);
    };
    window.__frameLoop = requestAnimationFrame(tick);
  });

/** The frames recorded since `watchFrames`: how many, the slowest, and those over 50 ms. */
const frames = (p) =>
  p.evaluate(() => {
    cancelAnimationFrame(window.__frameLoop);
    const f = window.__frames.slice(1);
    const sorted = [...f].sort((a, b) => a - b);
    return {
      count: f.length,
      p50: sorted[Math.floor(sorted.length / 2)] || 0,
      max: sorted[sorted.length - 1] || 0,
      long: f.filter((d) => d > 50).length,
    };
  });

const rows = [];
const row = (what, value) => rows.push([what, value]);
const ms = (x) => `${Math.round(x)} ms`;

const browser = await launch();
try {
  // One anonymous principal makes every call: its limits against abuse are lifted, as in
  // bm-bench, or they would be what is measured.
  const lifted = ['--max-concurrent-operations', '4096', '--op-rate-per-principal', '1000000000', '--op-burst-per-principal', '1000000000'];
  const server = await new Server(['--fake-timing', 'instant', ...lifted]).start();
  const chunk = 1000;
  for (let from = 0; from < N; from += chunk) await fleet(server, Math.min(chunk, N - from), from);

  const p = await newPage(browser);
  const calls = new Map();
  p.on('request', (r) => {
    const m = /\/api\/v1\/(.+?)(\?|$)/.exec(r.url());
    if (m) calls.set(m[1], (calls.get(m[1]) || 0) + 1);
  });
  const t0 = performance.now();
  await p.goto(`${server.base}/`);
  await waitCount(p, 'ALL', N);
  await p.locator('.fleet .row[data-id]').first().waitFor();
  row(`fleet page loaded (${N} machines listed, counted, first rows drawn)`, ms(performance.now() - t0));
  const heap = await p.evaluate(() => performance.memory?.usedJSHeapSize || 0);
  row('page JS heap after the load', `${(heap / 2 ** 20).toFixed(1)} MiB`);
  row('rows in the page (virtualised)', String(await p.locator('.fleet .row[data-id]').count()));

  // Scrolling from top to bottom in 100 steps, one per frame.
  await watchFrames(p);
  await p.evaluate(
    () =>
      new Promise((done) => {
        const v = document.getElementById('viewport');
        let i = 0;
        const step = () => {
          v.scrollTop = (v.scrollHeight * i) / 100;
          if (++i <= 100) requestAnimationFrame(step);
          else done();
        };
        step();
      }),
  );
  const scroll = await frames(p);
  row('scroll through the table: frames, median, slowest, over 50 ms', `${scroll.count}, ${ms(scroll.p50)}, ${ms(scroll.max)}, ${scroll.long}`);
  await p.locator('#viewport').evaluate((v) => (v.scrollTop = 0));

  // Every machine enters maintenance, 64 calls at a time, while the page follows.
  calls.clear();
  await watchFrames(p);
  const t1 = performance.now();
  const ops = [];
  await pool(
    Array.from({ length: N }, (_, i) => id(i)),
    64,
    async (machineId) => ops.push(await server.call('MachineService', 'EnterMaintenance', { machineId, requestId: `bench-${machineId}` })),
  );
  const admitted = performance.now();
  row(`${N} operations admitted through the HTTP API`, ms(admitted - t1));
  await waitCount(p, 'MAINTENANCE_IDLE', N);
  const shown = performance.now();
  row('page shows all of them in maintenance, after the last admission', ms(shown - admitted));
  const burst = await frames(p);
  row('during the burst: frames, median, slowest, over 50 ms', `${burst.count}, ${ms(burst.p50)}, ${ms(burst.max)}, ${burst.long}`);
  const asked = [...calls.entries()].sort().map(([k, v]) => `${k} ${v}`).join(', ');
  row('what the page asked of the server during the burst', asked || 'nothing');
  assert.equal(await p.locator('[data-count="NEW"]').textContent(), '0');
  await cleanUp();
} finally {
  await browser.close();
}

const width = Math.max(...rows.map(([w]) => w.length));
console.log(`\nThe dashboard with ${N} machines (instant fake provider, headless chromium)\n`);
for (const [what, value] of rows) console.log(`${what.padEnd(width)}  ${value}`);
