// The dashboard's client of bm-server's HTTP API (docs/http-api.md): unary calls as JSON,
// and Server-Sent Events read with fetch, so that they carry the bearer token and resume
// after a break with Last-Event-ID.

const TOKEN = 'bm-token';

/** The bearer token of this tab, or ''. */
export function token() {
  return sessionStorage.getItem(TOKEN) || '';
}

/** Keeps `t` as this tab's token ('' forgets it). */
export function setToken(t) {
  if (t) sessionStorage.setItem(TOKEN, t);
  else sessionStorage.removeItem(TOKEN);
}

/** An answer of the API that is not a success: its gRPC code's name and its message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(`${code}: ${message}`);
    this.status = status;
    this.code = code;
    this.detail = message;
  }
}

function headers(extra) {
  const h = { ...extra };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

async function failure(r) {
  const text = await r.text().catch(() => '');
  try {
    const j = JSON.parse(text);
    return new ApiError(r.status, j.code || 'UNKNOWN', j.message || r.statusText);
  } catch {
    return new ApiError(r.status, 'UNKNOWN', text || r.statusText);
  }
}

/** Calls `service`/`method` with the request `body`; the response message. */
export async function call(service, method, body = {}) {
  const r = await fetch(`/api/v1/${service}/${method}`, {
    method: 'POST',
    headers: headers({ 'Content-Type': 'application/json' }),
    body: JSON.stringify(body),
  });
  if (!r.ok) throw await failure(r);
  return r.json();
}

/** Every machine that ListMachines gives for `filter`, page after page. */
export async function listMachines(filter) {
  const all = [];
  let pageToken = '';
  do {
    const page = await call('MachineService', 'ListMachines', { ...filter, pageSize: 1000, pageToken });
    all.push(...(page.machines || []));
    pageToken = page.nextPageToken || '';
  } while (pageToken);
  return all;
}

/** A new request id: random, made when a dialog opens, sent with every try of its action. */
export function newRequestId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return 'ui-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

// Codes after which a stream is not worth opening again: the request itself is wrong.
const FINAL = new Set(['INVALID_ARGUMENT', 'NOT_FOUND', 'PERMISSION_DENIED', 'UNAUTHENTICATED']);

/**
 * Follows the event stream at `url`: `onEvent(kind, data, id)` for each event,
 * `onState(state, error)` as it goes ('live', 'reconnecting', 'reset', 'ended', 'failed').
 * After a break it reconnects with the last event id, so nothing is lost or repeated; it
 * waits 0.5 s before the first try and doubles that, up to 10 s, until an event comes
 * again. When the server no longer has what followed the last event (OUT_OF_RANGE: its
 * store was restored, say), the stream starts again from `url`'s own position and
 * `onState('reset')` tells the page to read everything again. When the server ends the
 * stream and `endsWhenDone` is set (a stream of one operation), it is over; else it
 * reconnects. `close()` stops it.
 */
export function follow(url, { onEvent, onState = () => {}, endsWhenDone = false }) {
  let last = null;
  let closed = false;
  let abort = null;
  let delay = 500;
  (async () => {
    while (!closed) {
      abort = new AbortController();
      let broke = null;
      try {
        const h = headers({ Accept: 'text/event-stream' });
        if (last !== null) h['Last-Event-ID'] = last;
        const r = await fetch(url, { headers: h, signal: abort.signal, cache: 'no-store' });
        if (!r.ok) throw await failure(r);
        onState('live');
        await readEvents(r.body, (ev) => {
          if (ev.event === 'error') {
            const j = JSON.parse(ev.data);
            broke = new ApiError(0, j.code, j.message);
            return;
          }
          delay = 500;
          if (ev.id !== undefined) last = ev.id;
          onEvent(ev.event, JSON.parse(ev.data), ev.id);
        });
      } catch (e) {
        if (closed) return;
        broke = e;
      }
      if (closed) return;
      if (broke instanceof ApiError && broke.code === 'OUT_OF_RANGE' && last !== null) {
        last = null;
        onState('reset', broke);
        continue;
      }
      if (broke instanceof ApiError && FINAL.has(broke.code)) {
        onState('failed', broke);
        return;
      }
      if (!broke && endsWhenDone) {
        onState('ended');
        return;
      }
      onState('reconnecting', broke);
      await new Promise((done) => setTimeout(done, delay));
      delay = Math.min(delay * 2, 10000);
    }
  })();
  return {
    close() {
      closed = true;
      if (abort) abort.abort();
    },
  };
}

/** Reads a text/event-stream body, calling `onEvent({event, id, data})` per event. */
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let ev = { data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf('\n')) >= 0) {
      let line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      if (line.endsWith('\r')) line = line.slice(0, -1);
      if (line === '') {
        if (ev.data.length) onEvent({ event: ev.event || 'message', id: ev.id, data: ev.data.join('\n') });
        ev = { data: [] };
      } else if (!line.startsWith(':')) {
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let v = colon < 0 ? '' : line.slice(colon + 1);
        if (v.startsWith(' ')) v = v.slice(1);
        if (field === 'data') ev.data.push(v);
        else if (field === 'event') ev.event = v;
        else if (field === 'id') ev.id = v;
      }
    }
  }
}
