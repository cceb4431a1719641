// The web dashboard in a real browser: Debian's chromium, driven by playwright-core, against
// real bm-server processes that each test starts (and restarts) itself (harness.mjs).
//
// Run by crates/bm-server/tests/it/dashboard.rs (`cargo xtask test` installs what it needs).
//   BM_SCREENSHOTS where the screenshots go (default: a temporary directory); the ones in
//                  docs/img/ were taken with BM_SCREENSHOTS=docs/img.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Server, WAIT, cleanUp, count, fleet, id, launch, newPage, waitCount, waitRows } from './harness.mjs';

const SHOTS = process.env.BM_SCREENSHOTS || mkdtempSync(join(tmpdir(), 'bm-shots-'));
mkdirSync(SHOTS, { recursive: true });

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await cleanUp();
  await browser?.close();
});

const page = () => newPage(browser);

test('the fleet page counts, filters and virtualises, and follows operations live', async () => {
  const server = await new Server(['--fake-timing', 'instant']).start();
  await fleet(server, 300);
  // m-000..009 in maintenance, of which m-000..004 back in service.
  await server.each('EnterMaintenance', Array.from({ length: 10 }, (_, i) => id(i)));
  await server.each('ExitMaintenance', Array.from({ length: 5 }, (_, i) => id(i)));

  const p = await page();
  await p.goto(`${server.base}/`);
  await waitCount(p, 'ALL', 300);
  assert.equal(await count(p, 'NEW'), 290);
  assert.equal(await count(p, 'IDLE'), 5);
  assert.equal(await count(p, 'MAINTENANCE_IDLE'), 5);
  assert.equal(await count(p, 'ATTENTION'), 0);
  // Virtualised: only the rows in view (and a few around) are in the page.
  const drawn = await p.locator('.fleet .row[data-id]').count();
  assert.ok(drawn > 10 && drawn < 100, `${drawn} rows drawn of 300`);
  await p.locator('#viewport').evaluate((v) => (v.scrollTop = v.scrollHeight));
  await p.locator('.row[data-id="m-299"]').waitFor({ timeout: WAIT });
  assert.equal(await p.locator('.row[data-id="m-000"]').count(), 0);

  // Live: an operation started elsewhere shows in its row, and the counts follow.
  await p.locator('#live[data-state="live"]').waitFor({ state: 'attached', timeout: WAIT });
  await p.locator('#viewport').evaluate((v) => (v.scrollTop = 0));
  await server.each('EnterMaintenance', [id(10)]);
  await waitCount(p, 'MAINTENANCE_IDLE', 6);
  assert.equal(await count(p, 'NEW'), 289);
  await p.locator('.row[data-id="m-010"] [data-state="MAINTENANCE_IDLE"]').waitFor({ timeout: WAIT });
  await p.screenshot({ path: join(SHOTS, 'fleet.png') });

  // The phase filter is ListMachines' own.
  await p.selectOption('select[name="phase"]', 'MAINTENANCE');
  await p.waitForURL(/phase=MAINTENANCE/);
  await waitCount(p, 'ALL', 6);
  await waitRows(p, ['m-005', 'm-006', 'm-007', 'm-008', 'm-009', 'm-010']);
  const phases = await p.locator('.fleet .row[data-id] span:nth-child(2)').allTextContents();
  assert.deepEqual([...new Set(phases)], ['MAINTENANCE']);

  // The label selector too, with the phase kept.
  await p.fill('input[name="selector"]', 'rack=r2');
  await p.click('.filters button');
  await p.waitForURL(/selector=rack%3Dr2/);
  await waitCount(p, 'ALL', 3);
  await waitRows(p, ['m-005', 'm-007', 'm-009']);

  // The state filter: a click on a count.
  await p.goto(`${server.base}/#/?selector=rack%3Dr1`);
  await waitCount(p, 'ALL', 150);
  await p.click('.count.s-IDLE');
  await p.waitForURL(/state=IDLE/);
  await waitRows(p, ['m-000', 'm-002', 'm-004']);
  assert.equal(await p.locator('#shown').textContent(), '3 shown');

  // A selector the server refuses is its error, said on the page.
  await p.goto(`${server.base}/#/?selector=${encodeURIComponent('rack in (')}`);
  await p.locator('main .error').waitFor({ timeout: WAIT });
  assert.match(await p.locator('main .error').textContent(), /INVALID_ARGUMENT/);
});

test('a reimage from the machine page: a retried confirmation is one operation, its stages and log live, then a cancel', async () => {
  // Slow fake timing: a reimage takes several seconds, so that its stages are seen one by
  // one and a cancel lands while it runs, even on a loaded machine.
  const server = await new Server(['--fake-timing', 'slow']).start();
  await fleet(server, 3);
  const fast = await server.call('MachineService', 'EnterMaintenance', { machineId: id(1), requestId: 'enter' });
  assert.equal((await server.ended(fast.id)).phase, 'OPERATION_PHASE_SUCCEEDED');

  const p = await page();
  await p.goto(`${server.base}/#/machines/${id(1)}`);
  await p.locator('h1 [data-state="MAINTENANCE_IDLE"]').waitFor({ timeout: WAIT });
  await p.locator('#operations tr[data-operation]').first().waitFor();
  await p.screenshot({ path: join(SHOTS, 'machine.png'), fullPage: true });

  // Reimage, behind a confirmation. The first answer is lost on its way back (the request
  // reached the server, which started the reimage); Confirm again resends the same request
  // id, and the server answers with the same operation.
  let lost = 0;
  await p.route('**/api/v1/MachineService/Reimage', async (route) => {
    const answer = await route.fetch();
    if (lost++ === 0) {
      assert.equal(answer.status(), 200);
      await route.fulfill({ status: 503, contentType: 'application/json', body: '{"code":"UNAVAILABLE","message":"the answer was lost"}' });
    } else {
      await route.fulfill({ response: answer });
    }
  });
  await p.click('button[data-action="Reimage"]');
  const requestId = await p.locator('#confirm-request').textContent();
  assert.match(requestId, /^ui-[0-9a-f]{32}$/);
  await p.locator('#confirm-yes').click();
  await p.locator('#confirm-error:not([hidden])', { hasText: 'the answer was lost' }).waitFor({ timeout: WAIT });
  await p.locator('#confirm-yes').click();
  await p.waitForURL(/#\/operations\//, { timeout: WAIT });
  assert.equal(lost, 2);
  await p.unroute('**/api/v1/MachineService/Reimage');
  const opId = decodeURIComponent(p.url().split('#/operations/')[1]);
  const ops = await server.call('OperationService', 'ListOperations', { machineId: id(1), type: 'OPERATION_TYPE_REIMAGE' });
  assert.equal(ops.operations.length, 1, 'one reimage for one confirmation');
  assert.equal(ops.operations[0].requestId, requestId);

  // Its stages run one after another, live: one seen running, then all succeeded.
  await p.locator('tr.stage[data-outcome="RUNNING"]').first().waitFor({ timeout: WAIT });
  await p.locator('span.log-line, #log div').first().waitFor({ timeout: WAIT });
  await p.screenshot({ path: join(SHOTS, 'operation-running.png'), fullPage: true });
  await p.locator('#op-phase', { hasText: 'SUCCEEDED' }).waitFor({ timeout: WAIT });
  await p.locator('#log-state[data-state="ended"]').waitFor({ timeout: WAIT });
  const stages = await p.locator('tr.stage').evaluateAll((r) => r.map((e) => e.dataset.outcome));
  const types = await server.call('OperationService', 'ListOperationTypes');
  const reimage = types.operationTypes.find((t) => t.type === 'OPERATION_TYPE_REIMAGE');
  assert.deepEqual(stages, reimage.stages.map(() => 'SUCCEEDED'));
  // Every log line, once, in order, as StreamLogs gives them.
  const seqs = await p.locator('#log div').evaluateAll((l) => l.map((e) => Number(e.dataset.seq)));
  const all = await fetch(`${server.base}/api/v1/logs?operation_id=${opId}`).then((r) => r.text());
  const expected = [...all.matchAll(/"sequence":"?(\d+)/g)].map((m) => Number(m[1]));
  assert.ok(expected.length > 0);
  assert.deepEqual(seqs, expected);
  await p.screenshot({ path: join(SHOTS, 'operation.png'), fullPage: true });

  // Another reimage, canceled from its page.
  await p.goto(`${server.base}/#/machines/${id(1)}`);
  await p.click('button[data-action="Reimage"]');
  await p.locator('#confirm-yes').click();
  await p.waitForURL((u) => u.hash.startsWith('#/operations/') && !u.hash.endsWith(encodeURIComponent(opId)), { timeout: WAIT });
  await p.locator('tr.stage[data-outcome="RUNNING"]').first().waitFor({ timeout: WAIT });
  await p.click('#cancel');
  await p.locator('#confirm-yes').click();
  await p.locator('#op-phase', { hasText: 'CANCELED' }).waitFor({ timeout: WAIT });
  const m = await server.call('MachineService', 'GetMachine', { machineId: id(1) });
  assert.ok(m.status.conditions.some((c) => c.type === 'OperationCanceled' && c.status), JSON.stringify(m.status.conditions));
  await p.click(`a[href="#/machines/${id(1)}"]`);
  await p.locator('#conditions tr[data-condition="OperationCanceled"]').waitFor({ timeout: WAIT });
});

test('the operation page resumes its log after the server restarts, with no line lost or twice', async () => {
  const server = await new Server(['--fake-timing', 'slow']).start();
  await fleet(server, 1);
  await server.each('EnterMaintenance', [id(0)]);
  const op = await server.call('MachineService', 'Reimage', { machineId: id(0), requestId: 'resume' });

  const p = await page();
  await p.goto(`${server.base}/#/operations/${op.id}`);
  await p.locator('#log div').first().waitFor({ timeout: WAIT });
  const before = await p.locator('#log div').count();

  // A restart mid-operation: the page's streams break, reconnect, and resume.
  const logged = server.log.length;
  await server.restart();
  await p.locator('#op-phase', { hasText: 'SUCCEEDED' }).waitFor({ timeout: WAIT });
  await p.locator('#log-state[data-state="ended"]').waitFor({ timeout: WAIT });
  const seqs = await p.locator('#log div').evaluateAll((l) => l.map((e) => Number(e.dataset.seq)));
  assert.ok(seqs.length > before, `lines after the restart (${before} before, ${seqs.length} in all)`);
  const all = await fetch(`${server.base}/api/v1/logs?operation_id=${op.id}`).then((r) => r.text());
  const expected = [...all.matchAll(/"sequence":"?(\d+)/g)].map((m) => Number(m[1]));
  assert.deepEqual(seqs, expected);
  assert.ok(
    server.log.slice(logged).some((l) => l.includes('resuming an interrupted stage')),
    'the restarted server resumed the operation',
  );
});

test('with tokens, the page asks for one; a viewer sees, an operator acts', async () => {
  const server = new Server(['--fake-timing', 'instant', '--tokens-file'], { secure: true });
  server.args.push(join(server.dir, 'tokens.toml'));
  server.token = server.tokenFor('admin-user', 'admin');
  const viewer = server.tokenFor('viewer-user', 'viewer');
  const operator = server.tokenFor('operator-user', 'operator');
  await server.start();
  await fleet(server, 2);

  const p = await page();
  await p.goto(`${server.base}/`);
  await p.locator('#signin').waitFor({ timeout: WAIT });
  await p.fill('#signin input[name="token"]', viewer);
  await p.click('#signin button');
  await waitCount(p, 'ALL', 2);

  // A viewer sees, and is told why an action is refused; nothing starts.
  await p.goto(`${server.base}/#/machines/${id(0)}`);
  await p.click('button[data-action="EnterMaintenance"]');
  await p.locator('#confirm-yes').click();
  await p.locator('#confirm-error:not([hidden])').waitFor({ timeout: WAIT });
  assert.match(await p.locator('#confirm-error').textContent(), /PERMISSION_DENIED/);
  const none = await server.call('OperationService', 'ListOperations', { machineId: id(0) });
  assert.deepEqual(none.operations || [], []);
  await p.click('#confirm-no');

  // An operator acts, and the audit trail names them. Signing in again stays on the page.
  await p.click('#signout');
  await p.locator('#signin').waitFor({ timeout: WAIT });
  await p.fill('#signin input[name="token"]', operator);
  await p.click('#signin button');
  await p.click('button[data-action="EnterMaintenance"]');
  await p.locator('#confirm-yes').click();
  await p.waitForURL(/#\/operations\//, { timeout: WAIT });
  await p.locator('#op-phase', { hasText: 'SUCCEEDED' }).waitFor({ timeout: WAIT });
  const ops = await server.call('OperationService', 'ListOperations', { machineId: id(0) });
  assert.equal(ops.operations.length, 1);
  assert.equal(ops.operations[0].requestedBy.name, 'operator-user');
});
