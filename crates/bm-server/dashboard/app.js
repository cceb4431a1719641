// The web dashboard of bm-server: the fleet, a machine, an operation, live.
// Plain ES modules, no build step (see src/dashboard.rs); every read and action is a call of
// the HTTP API with the user's token, so the server's roles decide what a user may do.

import { ApiError, call, follow, listMachines, newRequestId, setToken, token } from './api.js';

const main = document.getElementById('main');

// ---------------------------------------------------------------------------------------
// Small helpers

const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ESC[c]);
const short = (v, prefix) => (v || '').replace(prefix, '') || '-';

const PHASES = ['FACTORY_READY', 'READY', 'MAINTENANCE'];
const STATES = ['BLOCKED', 'ATTENTION', 'BUSY', 'MAINTENANCE_IDLE', 'NEW', 'IDLE'];
// The markers of bmctl (spec 000).
const MARKERS = {
  BLOCKED: '⛔BLOCK',
  ATTENTION: '⚠ATTN',
  BUSY: 'BUSY',
  MAINTENANCE_IDLE: 'MAINT',
  NEW: 'NEW',
  IDLE: 'IDLE',
};
const TERMINAL = new Set(['OPERATION_PHASE_SUCCEEDED', 'OPERATION_PHASE_FAILED', 'OPERATION_PHASE_CANCELED']);

const stateOf = (m) => short(m.effectiveState, 'EFFECTIVE_STATE_');
const marker = (state) =>
  `<span class="state s-${esc(state)}" data-state="${esc(state)}">${esc(MARKERS[state] || state)}</span>`;
const phaseOf = (m) => short(m.status?.phase, 'PHASE_');
const opType = (t) => short(t, 'OPERATION_TYPE_');
const opPhase = (p) => short(p, 'OPERATION_PHASE_');

/** What holds, as bmctl shows it: true conditions, and Reachable/PoweredOn when false. */
function conditions(m) {
  const shown = (m.status?.conditions || [])
    .filter((c) => (c.status ? !['PoweredOn', 'Reachable'].includes(c.type) : ['Reachable', 'PoweredOn'].includes(c.type)))
    .map((c) => `${c.type}=${c.status ? '✓' : '✗'}`);
  return shown.length ? shown.join(', ') : '-';
}

const labels = (m) =>
  Object.entries(m.labels || {})
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([k, v]) => `${k}=${v}`)
    .join(', ');

function when(ts) {
  return ts ? new Date(ts).toLocaleString() : '-';
}

function took(from, to) {
  if (!from) return '-';
  const ms = (to ? Date.parse(to) : Date.now()) - Date.parse(from);
  if (ms < 1000) return `${Math.max(0, ms)} ms`;
  const s = ms / 1000;
  if (s < 120) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return m < 120 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function age(ts) {
  return ts ? took(ts, null) : '-';
}

/** Runs `fn` at most once per `ms`, after the last request within that time. */
function coalesce(ms, fn) {
  let timer = null;
  return () => {
    if (timer === null) timer = setTimeout(() => {
      timer = null;
      fn();
    }, ms);
  };
}

function showLive(state) {
  document.getElementById('live').dataset.state = state;
}

/** A failure as a page shows it; an unauthenticated one asks for a token. */
function failed(e) {
  if (e instanceof ApiError && e.code === 'UNAUTHENTICATED') {
    signIn(e.detail);
    return;
  }
  main.innerHTML = `<p class="error">${esc(e.message)}</p>`;
}

function signIn(why) {
  main.innerHTML = `
    <form class="signin" id="signin">
      <h1>Sign in</h1>
      <p class="muted">${esc(why)}</p>
      <p>This server needs a bearer token: one from <code>bmctl</code>'s token file, or one an
      admin issued (docs/security.md). It is kept in this tab only.</p>
      <label>Token <input name="token" type="password" autocomplete="off" required></label>
      <button>Sign in</button>
    </form>`;
  document.getElementById('signin').addEventListener('submit', (ev) => {
    ev.preventDefault();
    setToken(new FormData(ev.target).get('token').trim());
    route();
  });
}

// ---------------------------------------------------------------------------------------
// Actions, behind a confirmation

const dialog = document.getElementById('confirm');

/**
 * Asks before `run(requestId, note)`. The request id is made when the dialog opens and
 * sent with every try, so a double click or a retry starts one operation. `done(result)`
 * follows a success.
 */
function confirmAction(title, text, run, done) {
  const requestId = newRequestId();
  document.getElementById('confirm-title').textContent = title;
  document.getElementById('confirm-text').textContent = text;
  document.getElementById('confirm-request').textContent = requestId;
  document.getElementById('confirm-note').value = '';
  const error = document.getElementById('confirm-error');
  error.hidden = true;
  const yes = document.getElementById('confirm-yes');
  yes.disabled = false;
  yes.onclick = async (ev) => {
    ev.preventDefault();
    yes.disabled = true;
    try {
      const result = await run(requestId, document.getElementById('confirm-note').value);
      dialog.close();
      done(result);
    } catch (e) {
      error.textContent = e.message;
      error.hidden = false;
      yes.disabled = false;
    }
  };
  dialog.showModal();
}

const MACHINE_ACTIONS = [
  { name: 'EnterMaintenance', label: 'Enter maintenance', text: 'takes it out of service for work on it' },
  { name: 'ExitMaintenance', label: 'Exit maintenance', text: 'puts it back in service' },
  { name: 'Reimage', label: 'Reimage', text: 'erases its disk and installs its image again' },
  { name: 'Reboot', label: 'Reboot', text: 'power-cycles it' },
];

function machineAction(id, action) {
  confirmAction(
    `${action.label} ${id}?`,
    `${action.label} ${action.text}.`,
    (requestId, note) => call('MachineService', action.name, { machineId: id, requestId, note }),
    (op) => (location.hash = `#/operations/${encodeURIComponent(op.id)}`),
  );
}

function cancelAction(opId, then) {
  confirmAction(
    `Cancel ${opId}?`,
    'The operation stops at its current stage and ends CANCELED; the machine keeps its phase and gets OperationCanceled.',
    () => call('OperationService', 'CancelOperation', { operationId: opId }),
    then,
  );
}

// ---------------------------------------------------------------------------------------
// The fleet

const ROW = 30; // px, the height of a row of the fleet table
const OVERSCAN = 10; // rows drawn above and below the visible ones

/**
 * The fleet table: every machine that the phase and label selector give (ListMachines
 * does that filter), counts per effective state of those, and the state filter over them.
 * Rows are virtualised: only those in view are in the page. Live: one watch of all
 * operation events; an event updates its machine's row at once, and changed machines are
 * read again (GetMachine), coalesced; past 200 at once, the list is read again instead,
 * at most every 5 s. Nothing is polled.
 */
function fleetPage(params) {
  const filter = {
    phase: params.get('phase') || '',
    state: params.get('state') || '',
    selector: params.get('selector') || '',
  };
  main.innerHTML = `
    <section class="counts" id="counts"></section>
    <form class="filters" id="filters">
      <label>Phase <select name="phase"><option value="">any</option>${PHASES.map(
        (p) => `<option${p === filter.phase ? ' selected' : ''}>${p}</option>`,
      ).join('')}</select></label>
      <label>State <select name="state"><option value="">any</option>${STATES.map(
        (s) => `<option${s === filter.state ? ' selected' : ''}>${s}</option>`,
      ).join('')}</select></label>
      <label class="grow">Labels <input name="selector" value="${esc(filter.selector)}"
        placeholder="rack in (r1,r2),!decommission"></label>
      <button>Filter</button>
      <span class="muted" id="shown"></span>
    </form>
    <div class="fleet" role="table" aria-label="machines">
      <div class="row head" role="row"><span>Machine</span><span>Phase</span><span>State</span>
        <span>Conditions</span><span>Operation</span><span>Labels</span></div>
      <div class="viewport" id="viewport"><div class="spacer" id="spacer"><div id="rows"></div></div></div>
    </div>`;
  const form = document.getElementById('filters');
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) q.set(k, v);
    location.hash = `#/?${q}`;
  });
  form.state.addEventListener('change', () => form.requestSubmit());
  form.phase.addEventListener('change', () => form.requestSubmit());

  let gone = false; // the page was left: late answers are dropped
  const machines = new Map(); // id -> Machine
  const running = new Map(); // machine id -> the last event of its operation
  let ids = []; // shown, sorted
  const viewport = document.getElementById('viewport');
  const spacer = document.getElementById('spacer');
  const rowsEl = document.getElementById('rows');

  const listFilter = {
    phase: filter.phase ? `PHASE_${filter.phase}` : undefined,
    labelSelector: filter.selector || undefined,
  };

  function operation(m) {
    const ev = running.get(m.id);
    if (ev && !TERMINAL.has(ev.phase)) {
      return `<a href="#/operations/${encodeURIComponent(ev.operationId)}">${esc(opType(ev.operationType))}</a> ${esc(ev.stage || opPhase(ev.phase))}`;
    }
    const active = m.status?.activeOperationId;
    return active ? `<a href="#/operations/${encodeURIComponent(active)}">${esc(active)}</a>` : '-';
  }

  function rowHtml(m) {
    const id = encodeURIComponent(m.id);
    return `<div class="row" role="row" data-id="${esc(m.id)}">
      <span><a href="#/machines/${id}">${esc(m.id)}</a></span><span>${esc(phaseOf(m))}</span>
      <span>${marker(stateOf(m))}</span><span>${esc(conditions(m))}</span>
      <span class="op">${operation(m)}</span><span class="muted">${esc(labels(m))}</span></div>`;
  }

  let drawQueued = false;
  function draw() {
    if (drawQueued) return;
    drawQueued = true;
    requestAnimationFrame(() => {
      drawQueued = false;
      spacer.style.height = `${ids.length * ROW}px`;
      const first = Math.max(0, Math.floor(viewport.scrollTop / ROW) - OVERSCAN);
      const last = Math.min(ids.length, Math.ceil((viewport.scrollTop + viewport.clientHeight) / ROW) + OVERSCAN);
      let html = '';
      for (let i = first; i < last; i++) html += rowHtml(machines.get(ids[i]));
      rowsEl.style.transform = `translateY(${first * ROW}px)`;
      rowsEl.innerHTML = html;
    });
  }
  viewport.addEventListener('scroll', draw, { passive: true });
  window.addEventListener('resize', draw);

  function refresh() {
    if (gone) return;
    const counts = Object.fromEntries(STATES.map((s) => [s, 0]));
    for (const m of machines.values()) counts[stateOf(m)] = (counts[stateOf(m)] || 0) + 1;
    ids = [...machines.values()]
      .filter((m) => !filter.state || stateOf(m) === filter.state)
      .map((m) => m.id)
      .sort();
    document.getElementById('counts').innerHTML =
      `<a class="count${filter.state ? '' : ' on'}" href="${link({ ...filter, state: '' })}"><b data-count="ALL">${machines.size}</b> machines</a>` +
      STATES.map(
        (s) => `<a class="count s-${s}${filter.state === s ? ' on' : ''}" href="${link({ ...filter, state: s })}">
          <b data-count="${s}">${counts[s]}</b> ${esc(MARKERS[s])}</a>`,
      ).join('');
    document.getElementById('shown').textContent = `${ids.length} shown`;
    draw();
  }

  // A failure the page cannot get past ends it: it says so, and stops following.
  let watch = null;
  function fail(e) {
    if (gone) return;
    gone = true;
    watch?.close();
    failed(e);
  }

  let lastList = 0;
  let listing = null;
  let listed = false;
  function list() {
    if (listing) return listing;
    lastList = Date.now();
    listing = listMachines(listFilter)
      .then((all) => {
        if (gone) return;
        listed = true;
        machines.clear();
        for (const m of all) machines.set(m.id, m);
        refresh();
      })
      .catch(fail)
      .finally(() => (listing = null));
    return listing;
  }

  const dirty = new Set();
  const reread = coalesce(300, async () => {
    // Machines are read after a list in progress, so that the list never overwrites them
    // with what it read before their change.
    if (listing) await listing;
    if (gone) return;
    if (dirty.size > 200) {
      const wait = 5000 - (Date.now() - lastList);
      if (wait > 0) return setTimeout(reread, wait);
      dirty.clear();
      return list();
    }
    const batch = [...dirty];
    dirty.clear();
    const phase = listFilter.phase;
    for (let i = 0; i < batch.length; i += 8) {
      await Promise.all(
        batch.slice(i, i + 8).map((id) =>
          call('MachineService', 'GetMachine', { machineId: id }).then(
            (m) => {
              // A machine that left the phase filter leaves the table; one that entered
              // it joins, unless a label selector is set (only ListMachines applies it).
              if (phase && m.status?.phase !== phase) machines.delete(id);
              else if (machines.has(id) || !listFilter.labelSelector) machines.set(id, m);
            },
            (e) => {
              // Gone: out of the table. Anything else: its next event reads it again.
              if (e instanceof ApiError && e.code === 'NOT_FOUND') machines.delete(id);
            },
          ),
        ),
      );
    }
    refresh();
  });

  // The list is read once the watch is live, so that no change falls between the two (or
  // at once if the watch cannot start, so that the page shows the fleet all the same);
  // again after a break, since events may have been missed.
  let broken = false;
  watch = follow('/api/v1/watch', {
    onEvent(_kind, data) {
      let changed = false;
      for (const ev of data.events || []) {
        running.set(ev.machineId, ev);
        changed ||= machines.has(ev.machineId);
        // Created and ended operations change the machine's state; stages do not.
        if (ev.type === 'EVENT_TYPE_CREATED' || ev.type === 'EVENT_TYPE_PHASE_CHANGED' || ev.type === 'EVENT_TYPE_STAGE_FAILED') {
          dirty.add(ev.machineId);
        }
      }
      if (changed) draw();
      if (dirty.size) reread();
    },
    onState(state, e) {
      showLive(state);
      if (state === 'reconnecting' || state === 'reset') broken = true;
      if (state === 'reconnecting' && !listed) list();
      if (state === 'live' && (broken || !listed)) {
        broken = false;
        list();
      }
      if (state === 'failed') fail(e);
    },
  });
  return () => {
    gone = true;
    watch.close();
    window.removeEventListener('resize', draw);
  };
}

function link(filter) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(filter)) if (v) q.set(k, v);
  return `#/?${q}`;
}

// ---------------------------------------------------------------------------------------
// A machine

function machinePage(id) {
  main.innerHTML = `<p class="muted">Loading ${esc(id)}…</p>`;
  let gone = false; // the page was left: late answers are dropped
  let machine = null;
  const render = (m, ops) => {
    machine = m;
    const active = m.status?.activeOperationId;
    const spec = m.spec || {};
    main.innerHTML = `
      <h1>${esc(m.id)} ${marker(stateOf(m))} <span class="muted">${esc(phaseOf(m))}</span></h1>
      <p class="muted">In this state since ${esc(when(m.status?.stateTime))} (${esc(age(m.status?.stateTime))})</p>
      <div class="actions">
        ${MACHINE_ACTIONS.map((a) => `<button data-action="${a.name}">${esc(a.label)}</button>`).join('')}
        ${active ? `<button class="danger" data-cancel="${esc(active)}">Cancel ${esc(active)}</button>` : ''}
      </div>
      <h2>Conditions</h2>
      <table class="grid" id="conditions"><thead><tr><th>Condition</th><th>Status</th><th>Reason</th><th>Message</th><th>Since</th></tr></thead>
      <tbody>${(m.status?.conditions || [])
        .map(
          (c) => `<tr data-condition="${esc(c.type)}"><td>${esc(c.type)}</td><td>${c.status ? '✓' : '✗'}</td>
            <td>${esc(c.reason)}</td><td>${esc(c.message)}</td><td>${esc(when(c.lastTransitionTime))}</td></tr>`,
        )
        .join('') || '<tr><td colspan="5" class="muted">none recorded yet (the status poll and operations set them)</td></tr>'}</tbody></table>
      <h2>Operations</h2>
      <table class="grid" id="operations"><thead><tr><th>Operation</th><th>Type</th><th>Phase</th><th>Stage</th><th>Created</th><th>Took</th><th>Error</th></tr></thead>
      <tbody>${ops
        .map(
          (o) => `<tr data-operation="${esc(o.id)}"><td><a href="#/operations/${encodeURIComponent(o.id)}">${esc(o.id)}</a></td>
            <td>${esc(opType(o.type))}</td><td class="p-${esc(opPhase(o.phase))}">${esc(opPhase(o.phase))}</td>
            <td>${esc(o.currentStage || '-')}</td><td>${esc(when(o.createTime))}</td>
            <td>${esc(took(o.startTime, o.endTime))}</td><td>${esc(o.error || '')}</td></tr>`,
        )
        .join('') || '<tr><td colspan="7" class="muted">none yet</td></tr>'}</tbody></table>
      <h2>Machine</h2>
      <dl class="spec">
        <dt>Provider</dt><dd>${esc(spec.provider)}</dd>
        <dt>Image</dt><dd>${esc(spec.image)}</dd>
        <dt>Cluster</dt><dd>${esc(spec.targetCluster)}</dd>
        <dt>BMC</dt><dd>${esc(spec.bmcEndpoint || '-')}</dd>
        <dt>SSH</dt><dd>${esc(spec.sshEndpoint || '-')}</dd>
        <dt>MACs</dt><dd>${esc((spec.macAddresses || []).join(', '))}</dd>
        <dt>Labels</dt><dd>${esc(labels(m) || '-')}</dd>
        <dt>Updated</dt><dd>${esc(when(m.updateTime))} by ${esc(m.updatedBy?.name || '-')}</dd>
      </dl>`;
  };
  main.onclick = (ev) => {
    const b = ev.target.closest('button');
    if (!b || !machine) return;
    if (b.dataset.action) machineAction(machine.id, MACHINE_ACTIONS.find((a) => a.name === b.dataset.action));
    if (b.dataset.cancel) cancelAction(b.dataset.cancel, load);
  };
  // Reads overlap (an event, an action's end): only the latest one asked for is shown.
  let asked = 0;
  async function load() {
    const mine = ++asked;
    try {
      const [m, ops] = await Promise.all([
        call('MachineService', 'GetMachine', { machineId: id }),
        call('OperationService', 'ListOperations', { machineId: id, pageSize: 50 }),
      ]);
      if (!gone && mine === asked) render(m, ops.operations || []);
    } catch (e) {
      if (!gone && mine === asked) fail(e);
    }
  }
  const again = coalesce(250, load);
  let watch = null;
  function fail(e) {
    gone = true;
    watch?.close();
    failed(e);
  }
  watch = follow(`/api/v1/watch?machine_id=${encodeURIComponent(id)}`, {
    onEvent: again,
    onState(state, e) {
      showLive(state);
      // Read again when the stream (re)starts: changes may have come meanwhile.
      if (state === 'live') again();
      if (state === 'failed') fail(e);
    },
  });
  load();
  return () => {
    gone = true;
    watch.close();
    main.onclick = null;
  };
}

// ---------------------------------------------------------------------------------------
// An operation

function operationPage(id) {
  main.innerHTML = `
    <div id="op"><p class="muted">Loading ${esc(id)}…</p></div>
    <h2>Provider log <span class="muted small" id="log-state"></span></h2>
    <pre class="log" id="log"></pre>`;
  const opEl = document.getElementById('op');
  const logEl = document.getElementById('log');
  let gone = false; // the page was left: late answers are dropped
  let op = null;

  function timeline(o) {
    const start = Date.parse(o.startTime || o.createTime);
    const end = o.endTime ? Date.parse(o.endTime) : Date.now();
    const span = Math.max(1, end - start);
    return (o.stages || [])
      .map((s) => {
        const from = s.startTime ? Date.parse(s.startTime) : null;
        const to = s.endTime ? Date.parse(s.endTime) : from === null ? null : Date.now();
        const left = from === null ? 0 : ((from - start) / span) * 100;
        const width = from === null ? 0 : Math.max(0.5, ((to - from) / span) * 100);
        const outcome = short(s.outcome, 'STAGE_OUTCOME_');
        return `<tr class="stage o-${esc(outcome)}" data-stage="${esc(s.name)}" data-outcome="${esc(outcome)}">
          <td>${esc(s.name)}</td><td>${esc(outcome === '-' ? 'PENDING' : outcome)}</td>
          <td>${esc(s.attempts || 0)}${s.interruptions ? ` (${esc(s.interruptions)} interrupted)` : ''}</td>
          <td>${esc(s.startTime ? took(s.startTime, s.endTime) : '-')}</td>
          <td class="bar"><span data-left="${left.toFixed(2)}" data-width="${width.toFixed(2)}"></span></td>
          <td class="error">${esc(s.lastError || '')}</td></tr>`;
      })
      .join('');
  }

  // Set through the CSSOM: the content security policy forbids inline styles.
  function placeBars() {
    for (const bar of opEl.querySelectorAll('.bar span')) {
      bar.style.marginLeft = `${bar.dataset.left}%`;
      bar.style.width = `${bar.dataset.width}%`;
    }
  }

  function render(o) {
    op = o;
    const phase = opPhase(o.phase);
    const ended = TERMINAL.has(o.phase);
    opEl.innerHTML = `
      <h1>${esc(opType(o.type))} of <a href="#/machines/${encodeURIComponent(o.machineId)}">${esc(o.machineId)}</a>
        <span class="phase p-${esc(phase)}" id="op-phase">${esc(phase)}</span></h1>
      <p class="muted">${esc(o.id)} · requested by ${esc(o.requestedBy?.name || '-')} · created ${esc(when(o.createTime))}
        · took ${esc(took(o.startTime, o.endTime))}${o.traceId ? ` · trace ${esc(o.traceId)}` : ''}</p>
      ${o.note ? `<p>Note: ${esc(o.note)}</p>` : ''}
      ${o.error ? `<p class="error">${esc(o.error)}</p>` : ''}
      ${o.cancelRequested && !ended ? '<p class="muted">Cancel requested…</p>' : ''}
      <div class="actions">${ended ? '' : '<button class="danger" id="cancel">Cancel</button>'}</div>
      <table class="grid timeline"><thead><tr><th>Stage</th><th>Outcome</th><th>Attempts</th><th>Took</th><th class="bar">Timeline</th><th>Last error</th></tr></thead>
      <tbody>${timeline(o)}</tbody></table>`;
    placeBars();
    const cancel = document.getElementById('cancel');
    if (cancel) cancel.onclick = () => cancelAction(o.id, load);
  }

  // Reads overlap (events, the end of a cancel): only the latest one asked for is shown.
  let asked = 0;
  async function load() {
    const mine = ++asked;
    try {
      const o = await call('OperationService', 'GetOperation', { operationId: id });
      if (!gone && mine === asked) render(o);
    } catch (e) {
      if (!gone && mine === asked) fail(e);
    }
  }
  const again = coalesce(200, load);
  // The running stage's bar grows while nothing else happens: only the timeline is drawn
  // again, so that a click on Cancel is never lost to a redraw.
  const tick = setInterval(() => {
    const body = opEl.querySelector('.timeline tbody');
    if (op && !TERMINAL.has(op.phase) && body) {
      body.innerHTML = timeline(op);
      placeBars();
    }
  }, 1000);

  let watch = null;
  let logs = null;
  function fail(e) {
    gone = true;
    watch?.close();
    logs?.close();
    clearInterval(tick);
    failed(e);
  }
  watch = follow(`/api/v1/watch?operation_id=${encodeURIComponent(id)}&after_revision=0`, {
    endsWhenDone: true,
    onEvent: again,
    onState(state, e) {
      showLive(state);
      if (state === 'ended') again();
      if (state === 'failed') fail(e);
    },
  });
  load();
  const logState = document.getElementById('log-state');
  logs = follow(`/api/v1/logs?operation_id=${encodeURIComponent(id)}`, {
    endsWhenDone: true,
    onEvent(_kind, data) {
      const atBottom = logEl.scrollTop + logEl.clientHeight >= logEl.scrollHeight - 4;
      const frag = document.createDocumentFragment();
      for (const l of data.lines || []) {
        const line = document.createElement('div');
        line.dataset.seq = l.sequence;
        line.textContent = `${new Date(l.time).toLocaleTimeString()} [${l.stage}] ${l.tag ? `${l.tag}: ` : ''}${l.message}`;
        frag.appendChild(line);
      }
      logEl.appendChild(frag);
      if (atBottom) logEl.scrollTop = logEl.scrollHeight;
    },
    onState(state, e) {
      logState.textContent = { live: 'live', reconnecting: 'reconnecting…', ended: 'complete', failed: e?.message }[state] || '';
      logState.dataset.state = state;
    },
  });
  return () => {
    gone = true;
    watch.close();
    logs.close();
    clearInterval(tick);
  };
}

// ---------------------------------------------------------------------------------------
// Routes: #/?filters, #/machines/ID, #/operations/ID

let leave = () => {};

function route() {
  leave();
  leave = () => {};
  dialog.open && dialog.close();
  showLive('idle');
  document.getElementById('signout').hidden = !token();
  const hash = location.hash.replace(/^#/, '') || '/';
  const [path, query] = hash.split('?');
  let parts;
  try {
    parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  } catch {
    parts = []; // a malformed address: the fleet
  }
  if (parts[0] === 'machines' && parts[1]) {
    document.title = `bm · ${parts[1]}`;
    leave = machinePage(parts[1]);
  } else if (parts[0] === 'operations' && parts[1]) {
    document.title = `bm · ${parts[1]}`;
    leave = operationPage(parts[1]);
  } else {
    document.title = 'bm · fleet';
    leave = fleetPage(new URLSearchParams(query || ''));
  }
}

document.getElementById('signout').addEventListener('click', () => {
  setToken('');
  route();
});
window.addEventListener('hashchange', route);
route();
