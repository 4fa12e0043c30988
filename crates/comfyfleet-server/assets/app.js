// comfyfleet dashboard: plain JS, same-origin only. Reads the JSON API under /v1 and the live
// SSE stream /v1/events (through fetch(), so that the bearer token can be sent).
'use strict';

const TOKEN_KEY = 'comfyfleet.token';
const MAX_ROWS = 200;
const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
const STATES = ['pending', 'running', 'retry_wait', 'succeeded', 'failed', 'cancelled'];

const $ = (sel, root = document) => root.querySelector(sel);
const jobs = new Map(); // id -> job view {id, state, created_at, updated_at, attempts, backend, labels, progress, ...}
const dirty = new Set();
let renderTimer = null;
let filter = null; // a state shown alone, or null
let openJob = null; // id of the job in the detail panel
let lastEventId = null;
let streamCtl = null;
let authWanted = false;

// ---------------------------------------------------------------- helpers

const present = (c) => c !== null && c !== undefined && c !== false;
const fill = (box, ...children) => box.replaceChildren(...children.flat(3).filter(present));

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (!present(v)) continue;
    if (k === 'class') e.className = v;
    else if (k === 'style') Object.assign(e.style, v); // CSSOM: allowed by the server's CSP
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  e.append(...children.flat(3).filter(present).map((c) => (c instanceof Node ? c : String(c))));
  return e;
}

const shortId = (id) => String(id).slice(-8);
const pad = (n) => String(n).padStart(2, '0');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function fmtTime(ms) {
  if (!present(ms)) return '';
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function fmtDur(ms) {
  if (!present(ms) || !isFinite(ms)) return '';
  ms = Math.max(0, ms);
  const s = ms / 1000;
  const m = Math.floor(s / 60);
  const h = Math.floor(m / 60);
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (s < 60) return `${s < 10 ? s.toFixed(1) : Math.round(s)} s`;
  if (m < 60) return `${m}m ${pad(Math.floor(s % 60))}s`;
  return h < 48 ? `${h}h ${pad(m % 60)}m` : `${Math.floor(h / 24)}d ${h % 24}h`;
}

function fmtAge(ms) {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${Math.floor(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  return s < 172800 ? `${Math.floor(s / 3600)}h` : `${Math.floor(s / 86400)}d`;
}

function toast(msg, kind = 'error') {
  const t = $('#toast');
  Object.assign(t, { textContent: msg, hidden: false });
  t.dataset.kind = kind;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, kind === 'error' ? 8000 : 3000);
}

// Runs `fn` once, `ms` after the first of a burst of calls.
function debounce(fn, ms) {
  let t = null;
  return () => { if (!t) t = setTimeout(() => { t = null; fn(); }, ms); };
}

// ---------------------------------------------------------------- API and auth

function authHeaders(extra = {}) {
  const token = localStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : { ...extra };
}

// Calls the API; throws an Error with `status` and `code`, and the API's message.
async function api(path, method = 'GET') {
  const res = await fetch(path, { method, headers: authHeaders({ Accept: 'application/json' }), cache: 'no-store' });
  if (res.status === 401) askToken(localStorage.getItem(TOKEN_KEY) ? 'the token was refused' : '');
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!res.ok) {
    const e = new Error(data && data.message ? data.message : `${res.status} ${res.statusText}`);
    Object.assign(e, { status: res.status, code: data && data.code });
    throw e;
  }
  return data;
}

function askToken(why) {
  if (authWanted) return;
  authWanted = true;
  setConn('auth', 'token needed');
  $('#token-form').hidden = false;
  $('#token-error').textContent = why || '';
  $('#token-input').focus();
}

function saveToken(ev) {
  ev.preventDefault();
  const v = $('#token-input').value.trim();
  if (!v) return;
  localStorage.setItem(TOKEN_KEY, v);
  $('#token-input').value = '';
  $('#token-form').hidden = true;
  authWanted = false;
  $('#logout').hidden = false;
  start();
}

// ---------------------------------------------------------------- jobs table

// The row's view of a job, from a JobSummary (list) or a JobRecord (detail).
function view(id, fields) {
  return { ...(jobs.get(id) || {}), id, ...fields };
}

const fromSummary = (s) => view(s.id, {
  state: s.state, created_at: s.created_at, updated_at: s.updated_at, attempts: s.attempts,
  backend: s.backend || null, labels: s.labels || {}, error: s.error || null, wait_reason: s.wait_reason || null,
  progress: (jobs.get(s.id) || {}).progress || (present(s.percent) ? { percent: s.percent } : null),
});

// A record read while events were arriving may be older than what they told: `seq` (the last
// event applied) decides, so a slow read never rolls a row back.
function mergeRecord(r) {
  const old = jobs.get(r.id);
  const labels = (r.spec && r.spec.labels) || {};
  if (old && (old.seq || 0) > r.last_seq) return upsert({ ...old, labels, created_at: r.created_at });
  upsert(view(r.id, {
    seq: r.last_seq, state: r.state, created_at: r.created_at, updated_at: r.updated_at,
    attempts: (r.attempts || []).length, labels, error: r.error ? r.error.message : null,
    backend: r.attempts && r.attempts.length ? r.attempts[r.attempts.length - 1].backend : null,
    wait_reason: r.wait_reason || null, progress: r.progress || null,
  }));
}

function upsert(job) {
  jobs.set(job.id, job);
  markDirty(job.id);
}

function markDirty(id) {
  dirty.add(id);
  if (!renderTimer) renderTimer = setTimeout(flush, 40);
}

function flush() {
  renderTimer = null;
  const tbody = $('#job-rows');
  for (const id of dirty) {
    const job = jobs.get(id);
    let tr = tbody.querySelector(`tr[data-job-id="${CSS.escape(id)}"]`);
    if (!job) { if (tr) tr.remove(); continue; }
    if (!tr) {
      tr = buildRow(job);
      // newest first: ids are UUIDv7 (time-ordered), created_at breaks nothing
      let before = null;
      for (const other of tbody.children) {
        const o = jobs.get(other.dataset.jobId);
        if (o && (o.created_at < job.created_at || (o.created_at === job.created_at && o.id < job.id))) {
          before = other;
          break;
        }
      }
      tbody.insertBefore(tr, before);
    }
    updateRow(tr, job);
  }
  dirty.clear();
  // keep the table bounded: drop the oldest finished rows
  while (tbody.children.length > MAX_ROWS) {
    const last = tbody.lastElementChild;
    jobs.delete(last.dataset.jobId);
    last.remove();
  }
  $('#jobs-empty').hidden = tbody.children.length > 0;
}

function buildRow(job) {
  const tr = el('tr', { 'data-job-id': job.id, class: 'job-row', onclick: (e) => {
    if (e.target.closest('button, a')) return;
    openDetail(job.id);
  } });
  tr.append(
    el('td', { class: 'mono id', title: job.id, text: shortId(job.id) }),
    el('td', {}, el('span', { class: 'badge job-state' })),
    el('td', { class: 'labels' }),
    el('td', { class: 'mono job-backend' }),
    el('td', { class: 'num job-attempts' }),
    el('td', { class: 'col-progress' },
      el('div', { class: 'progress-line' },
        el('div', { class: 'job-progress bar', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100,
          'data-percent': '0' }, el('div', { class: 'fill' })),
        el('span', { class: 'job-pct num' })),
      el('div', { class: 'progress-meta' },
        el('span', { class: 'job-node mono' }), el('span', { class: 'job-eta' }))),
    el('td', { class: 'job-age num' }),
    el('td', { class: 'actions' },
      el('button', { class: 'btn btn-small btn-cancel', type: 'button', text: 'Cancel',
        onclick: () => cancelJob(job.id, false, tr) }),
      el('button', { class: 'btn btn-small btn-danger btn-force-cancel', type: 'button', text: 'Force cancel',
        onclick: () => cancelJob(job.id, true, tr) }),
      el('div', { class: 'row-msg error' })),
  );
  return tr;
}

function updateRow(tr, job) {
  tr.dataset.state = job.state;
  tr.hidden = filter !== null && job.state !== filter;
  tr.classList.toggle('selected', openJob === job.id);
  const badge = $('.job-state', tr);
  badge.textContent = job.state.replace('_', ' ');
  badge.dataset.state = job.state;
  badge.title = job.error || job.wait_reason || '';
  const labels = $('.labels', tr);
  labels.replaceChildren(...Object.entries(job.labels || {}).map(([k, v]) => el('span', { class: 'label', text: `${k}=${v}` })));
  $('.job-backend', tr).textContent = job.backend || '';
  $('.job-attempts', tr).textContent = job.attempts || 0;
  const p = job.progress || {};
  const pct = typeof p.percent === 'number' ? p.percent : (job.state === 'succeeded' ? 100 : 0);
  const bar = $('.job-progress', tr);
  const rounded = Math.round(pct * 10) / 10;
  bar.dataset.percent = String(rounded);
  bar.setAttribute('aria-valuenow', String(rounded));
  bar.dataset.state = job.state;
  $('.fill', bar).style.width = `${Math.min(100, Math.max(0, pct))}%`;
  const running = !TERMINAL.has(job.state);
  const known = typeof p.percent === 'number' || running || job.state === 'succeeded';
  $('.job-pct', tr).textContent = known ? `${rounded.toFixed(rounded < 10 ? 1 : 0)}%` : '';
  let node = '';
  if (running) {
    node = p.current_class || job.node_class || p.current_node || job.node || '';
    const nodeId = p.current_node || job.node;
    if (node && nodeId && node !== nodeId) node = `${node} #${nodeId}`;
    if (typeof p.node_value === 'number' && typeof p.node_max === 'number' && p.node_max > 0) {
      node += ` ${Math.round(p.node_value)}/${Math.round(p.node_max)}`;
    }
  } else if (job.state === 'failed' && job.error) {
    node = job.error;
  }
  if (running && job.cancelling) node = node ? `cancelling · ${node}` : 'cancelling…';
  const nodeEl = $('.job-node', tr);
  nodeEl.textContent = node || (job.state === 'pending' && job.wait_reason ? job.wait_reason : '');
  nodeEl.title = nodeEl.textContent;
  $('.job-eta', tr).textContent = running && typeof p.eta_ms === 'number' ? `ETA ${fmtDur(p.eta_ms)}` : '';
  const age = $('.job-age', tr);
  age.textContent = fmtAge(job.created_at);
  age.title = new Date(job.created_at).toLocaleString();
  for (const b of tr.querySelectorAll('.btn-cancel, .btn-force-cancel')) b.hidden = !running;
}

async function cancelJob(id, force, tr) {
  const msg = $('.row-msg', tr);
  msg.textContent = '';
  try {
    const res = await api(`/v1/jobs/${encodeURIComponent(id)}/cancel${force ? '?force=true' : ''}`, 'POST');
    const outcome = res && res.outcome;
    toast(`${shortId(id)}: ${typeof outcome === 'string' ? outcome.replace(/_/g, ' ') : JSON.stringify(outcome)}`, 'info');
  } catch (e) {
    msg.textContent = e.message;
    clearTimeout(msg.timer);
    msg.timer = setTimeout(() => { msg.textContent = ''; }, 10000);
  }
}

async function loadJobs() {
  const page = await api('/v1/jobs?limit=100');
  for (const s of page.jobs || []) {
    const old = jobs.get(s.id);
    // events that arrived before the list are at least as new as it
    if (old && old.seq && old.updated_at >= s.updated_at) continue;
    upsert(fromSummary(s));
  }
}

const fetching = new Map(); // id -> read again when this read is done
async function fetchJob(id) {
  if (fetching.has(id)) { fetching.set(id, true); return; }
  fetching.set(id, false);
  try {
    mergeRecord(await api(`/v1/jobs/${encodeURIComponent(id)}`));
  } catch (e) {
    if (e.status === 404) { jobs.delete(id); markDirty(id); }
  } finally {
    const again = fetching.get(id);
    fetching.delete(id);
    if (again) fetchJob(id);
  }
}

// ---------------------------------------------------------------- counts and backends

async function loadCounts() {
  const c = await api('/v1/jobs/counts');
  const nav = $('#counts');
  const counts = c.counts || {};
  const chip = (state, n, label) => el('button', {
    class: `chip${filter !== null && filter === state ? ' active' : ''}`, type: 'button', 'data-count': state || 'total',
    title: state ? `show only ${label}` : 'show all', onclick: () => setFilter(state),
  }, el('span', { class: 'chip-n', text: n }), ` ${label}`);
  nav.replaceChildren(chip(null, c.total ?? 0, 'total'),
    ...STATES.map((s) => chip(s, counts[s] || 0, s.replace('_', ' '))));
}

function setFilter(state) {
  filter = filter === state ? null : state;
  $('#filter-note').textContent = filter ? `showing ${filter.replace('_', ' ')} only` : '';
  for (const id of jobs.keys()) markDirty(id);
  for (const b of document.querySelectorAll('#counts .chip')) {
    b.classList.toggle('active', b.dataset.count === (filter || 'total') && filter !== null);
  }
}

async function loadBackends() {
  const list = await api('/v1/backends');
  const box = $('#backends');
  if (!list || !list.length) { box.replaceChildren(el('p', { class: 'muted', text: 'no backends configured' })); return; }
  box.replaceChildren(...list.map(backendCard));
}

function backendCard(b) {
  const health = b.health || {};
  const avail = b.availability || { state: 'active' };
  const cap = b.capacity ?? 1;
  const inFlight = b.in_flight ?? 0;
  const blocks = b.blocks || [];
  const classes = b.node_classes;
  const drained = avail.state !== 'active';
  const action = drained
    ? el('button', { class: 'btn btn-small btn-enable', type: 'button', text: 'Enable', onclick: () => backendAction(b.id, 'enable') })
    : el('button', { class: 'btn btn-small btn-drain', type: 'button', text: 'Drain', onclick: () => backendAction(b.id, 'drain') });
  return el('article', { class: 'backend', 'data-backend-id': b.id, 'data-availability': avail.state, 'data-healthy': String(!!health.healthy) },
    el('header', {},
      el('span', { class: `dot ${health.healthy ? 'ok' : 'down'}`, title: health.healthy ? 'healthy' : 'unhealthy' }),
      el('strong', { class: 'mono', text: b.id }),
      el('span', { class: 'muted small', text: b.kind || '' }),
      el('span', { class: 'badge avail', 'data-state': avail.state, text: avail.state })),
    el('div', { class: 'slots', title: 'in flight / capacity' },
      el('div', { class: 'bar slim' }, el('div', { class: 'fill', style: { width: `${Math.min(100, (100 * inFlight) / Math.max(1, cap))}%` } })),
      el('span', { class: 'num', text: `${inFlight}/${cap}` })),
    el('div', { class: 'small muted' },
      health.healthy ? 'healthy' : 'unhealthy',
      health.detail ? ` · ${health.detail}` : '',
      typeof health.queue_depth === 'number' ? ` · queue ${health.queue_depth}` : '',
      typeof classes === 'number' ? ` · ${classes} node classes` : '',
      typeof b.models === 'number' ? ` · ${b.models} models` : ''),
    avail.reason ? el('div', { class: 'small error', text: avail.reason }) : null,
    blocks.length ? el('ul', { class: 'blocks small' }, blocks.map((k) => el('li', {},
      el('span', { class: 'badge', 'data-state': 'failed', text: k.kind || 'blocked' }), ' ',
      k.structure ? el('span', { class: 'mono', title: k.structure, text: String(k.structure).slice(0, 8) }) : 'all workflows',
      k.until ? ` until ${fmtTime(k.until)} (${fmtDur(k.until - Date.now())})` : '',
      k.reason ? el('div', { class: 'muted', text: k.reason }) : null))) : null,
    el('footer', {}, action));
}

async function backendAction(id, what) {
  try {
    await api(`/v1/backends/${encodeURIComponent(id)}/${what}`, 'POST');
    toast(`${id}: ${what === 'drain' ? 'draining' : 'enabled'}`, 'info');
  } catch (e) {
    toast(`${id}: ${e.message}`);
  }
  refreshBackends();
}

const refreshBackends = debounce(() => loadBackends().catch(() => {}), 300);
const refreshCounts = debounce(() => loadCounts().catch(() => {}), 200);

// ---------------------------------------------------------------- live events

const RUNNING_KINDS = new Set(['dispatched', 'reattached', 'accepted', 'queued', 'started', 'node_started',
  'node_finished', 'progress', 'output']);

function applyJobEvent(ev) {
  const id = ev.job;
  let job = jobs.get(id);
  if (!job) {
    job = { id, state: 'pending', created_at: ev.at, updated_at: ev.at, attempts: 0, labels: {}, progress: null };
    fetchJob(id);
  } else if (job.seq && ev.seq <= job.seq) {
    return; // already reflected (a replay, or a record read after it)
  } else {
    job = { ...job };
  }
  job.seq = ev.seq;
  job.updated_at = Math.max(job.updated_at || 0, ev.at);
  const t = ev.type;
  if (RUNNING_KINDS.has(t) && !TERMINAL.has(job.state)) job.state = 'running';
  switch (t) {
    case 'submitted': job.state = 'pending'; break;
    case 'waiting': job.wait_reason = ev.reason; if (job.state !== 'retry_wait') job.state = 'pending'; break;
    case 'dispatched':
      job.attempts = (job.attempts || 0) + 1;
      job.backend = ev.backend;
      job.cancelling = false;
      job.progress = null;
      job.node = null; job.node_class = null;
      job.wait_reason = null;
      break;
    case 'reattached': job.backend = ev.backend; break;
    case 'cancel_requested': job.cancelling = true; break;
    case 'node_started': job.node = ev.node; job.node_class = ev.class_type || null; break;
    case 'progress': job.progress = ev.progress; break;
    case 'attempt_failed': if (ev.retry_at) job.state = 'retry_wait'; job.error = ev.error && ev.error.message; break;
    case 'requeued': job.state = 'pending'; break;
    case 'succeeded': job.state = 'succeeded'; job.progress = { ...(job.progress || {}), percent: 100 }; break;
    case 'failed': job.state = 'failed'; job.error = ev.error && ev.error.message; break;
    case 'cancelled': job.state = 'cancelled'; job.error = ev.reason; break;
    default: break;
  }
  upsert(job);
  if (TERMINAL.has(t)) fetchJob(id); // reconcile with the stored record
  if (['submitted', 'dispatched', 'attempt_failed', 'requeued', 'succeeded', 'failed', 'cancelled'].includes(t)) {
    refreshCounts();
    refreshBackends();
  }
  if (openJob === id) refreshDetail();
}

function onSse(type, data, id) {
  if (id) lastEventId = id;
  if (type === 'lagged') {
    loadJobs().catch(() => {});
    refreshCounts();
    return;
  }
  let payload;
  try { payload = JSON.parse(data); } catch { return; }
  if (type === 'job') applyJobEvent(payload);
  else if (type === 'fleet') {
    if (payload.type === 'lagged') { loadJobs().catch(() => {}); return; }
    refreshBackends();
  }
}

function setConn(state, text) {
  const c = $('#conn');
  c.dataset.state = state;
  c.textContent = text;
}

// Reads the text/event-stream format: `field: value` lines, a blank line ends an event, lines
// starting with `:` are comments (keep-alives).
async function readStream(res, signal, handler = onSse) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  signal.addEventListener('abort', () => reader.cancel().catch(() => {}));
  let buf = '';
  let type = '';
  let data = [];
  let id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let m;
    while ((m = /\r\n|\r|\n/.exec(buf)) !== null) {
      if (m[0] === '\r' && m.index === buf.length - 1) break; // maybe half of \r\n
      const line = buf.slice(0, m.index);
      buf = buf.slice(m.index + m[0].length);
      if (line === '') {
        if (data.length || type) handler(type || 'message', data.join('\n'), id);
        type = ''; data = []; id = null;
        continue;
      }
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? '' : line.slice(colon + 1);
      if (val.startsWith(' ')) val = val.slice(1);
      if (field === 'event') type = val;
      else if (field === 'data') data.push(val);
      else if (field === 'id' && !val.includes('\0')) id = val;
    }
  }
}

async function streamLoop() {
  if (streamCtl) streamCtl.abort();
  const ctl = new AbortController();
  streamCtl = ctl;
  let backoff = 500;
  while (!ctl.signal.aborted) {
    try {
      const headers = authHeaders({ Accept: 'text/event-stream' });
      if (lastEventId) headers['Last-Event-ID'] = lastEventId;
      const res = await fetch('/v1/events', { headers, signal: ctl.signal, cache: 'no-store' });
      if (res.status === 401) { askToken('the token was refused'); return; }
      if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
      setConn('live', 'live');
      backoff = 500;
      await readStream(res, ctl.signal);
    } catch {
      // dropped or refused: retry below
    }
    if (ctl.signal.aborted) return;
    setConn('down', `reconnecting in ${Math.round(backoff / 100) / 10} s`);
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 10000);
  }
}

// ---------------------------------------------------------------- detail panel

// Opens the panel on a job (null: closes it).
function openDetail(id) {
  openJob = id;
  $('#detail').hidden = !id;
  document.body.classList.toggle('with-detail', !!id);
  for (const tr of document.querySelectorAll('#job-rows tr')) tr.classList.toggle('selected', tr.dataset.jobId === id);
  if (!id) return;
  $('#detail-title').textContent = `Job ${shortId(id)}`;
  loadDetail(id);
}

const refreshDetail = debounce(() => { if (openJob) loadDetail(openJob); }, 1000);

async function loadDetail(id) {
  let rec;
  let events = [];
  try {
    [rec, events] = await Promise.all([
      api(`/v1/jobs/${encodeURIComponent(id)}`),
      api(`/v1/jobs/${encodeURIComponent(id)}/events?limit=1000`).catch(() => []),
    ]);
  } catch (e) {
    $('#detail-summary').replaceChildren(el('p', { class: 'error', text: e.message }));
    return;
  }
  if (openJob !== id) return;
  mergeRecord(rec);
  if (!Array.isArray(events)) events = (events && events.events) || [];
  renderDetail(rec, events);
}

function kv(k, v) { return v === null || v === undefined || v === '' ? null : el('div', { class: 'kv' }, el('span', { class: 'k', text: k }), el('span', { class: 'v', text: v })); }

function renderDetail(rec, events) {
  const spec = rec.spec || {};
  const labels = Object.entries(spec.labels || {}).map(([k, v]) => `${k}=${v}`).join(' ');
  fill($('#detail-summary'),
    el('div', { class: 'kv' }, el('span', { class: 'k', text: 'id' }), el('span', { class: 'v mono', text: rec.id })),
    el('div', { class: 'kv' }, el('span', { class: 'k', text: 'state' }),
      el('span', { class: 'v' }, el('span', { class: 'badge', 'data-state': rec.state, text: rec.state.replace('_', ' ') }))),
    kv('created', new Date(rec.created_at).toLocaleString()),
    kv('finished', rec.finished_at ? `${new Date(rec.finished_at).toLocaleString()} (${fmtDur(rec.finished_at - rec.created_at)})` : null),
    kv('priority', String(spec.priority ?? 0)),
    kv('labels', labels),
    kv('progress', rec.progress ? `${Math.round(rec.progress.percent * 10) / 10}% · ${rec.progress.nodes_done}/${rec.progress.nodes_total} nodes` : null),
    kv('waiting', rec.wait_reason),
    rec.error ? el('div', { class: 'kv' }, el('span', { class: 'k', text: 'error' }),
      el('span', { class: 'v error', text: `${rec.error.kind}: ${rec.error.message}${rec.error.node ? ` (node ${rec.error.node})` : ''}` })) : null,
  );

  const attempts = rec.attempts || [];
  const extra = (a) => (!a.error && !(a.cancel_steps || []).length ? null : el('tr', { class: 'attempt-extra' },
    el('td', {}), el('td', { colspan: 5, class: 'small' },
      a.error ? el('div', { class: 'error', text: `${a.error.kind}: ${a.error.message}${a.error.node ? ` (node ${a.error.node})` : ''}` }) : null,
      (a.cancel_steps || []).map((c) => el('div', { class: 'muted', text: `${fmtTime(c.at)} ${c.action}: ${c.result}` })))));
  fill($('#detail-attempts'), attempts.length ? el('table', { class: 'mini' },
    el('thead', {}, el('tr', {}, ['#', 'backend', 'outcome', 'dispatched', 'started', 'ended'].map((h) => el('th', { text: h })))),
    el('tbody', {}, attempts.map((a) => [el('tr', { class: 'attempt', 'data-backend': a.backend },
      el('td', { class: 'num', text: `${a.number}${a.reattached ? ' ↺' : ''}` }),
      el('td', { class: 'mono attempt-backend', text: a.backend }),
      el('td', {}, el('span', { class: 'badge', 'data-state': outcomeState(a.outcome), text: (a.outcome || 'running').replace('_', ' ') })),
      el('td', { text: fmtTime(a.dispatched_at) }),
      el('td', { text: a.started_at ? `${fmtTime(a.started_at)} +${fmtDur(a.started_at - a.dispatched_at)}` : '' }),
      el('td', { text: a.ended_at ? `${fmtTime(a.ended_at)} · ${fmtDur(a.ended_at - a.dispatched_at)}` : '' })), extra(a)]))) :
    el('p', { class: 'muted', text: 'no attempts yet' }));

  renderTimeline(attempts);

  const arts = rec.artifacts || [];
  $('#detail-artifacts').replaceChildren(arts.length ? el('ul', {}, arts.map((a, i) => {
    const href = `/v1/jobs/${encodeURIComponent(rec.id)}/outputs/${i}`;
    return el('li', {},
      el('a', { href, download: a.filename, class: 'mono', text: a.filename, onclick: (e) => download(e, href, a.filename) }),
      el('span', { class: 'muted small', text: ` ${a.kind}${a.size ? ` · ${fmtBytes(a.size)}` : ''} · node ${a.node}` }));
  })) : el('p', { class: 'muted', text: 'none' }));

  const showProgress = $('#show-progress').checked;
  const shown = events.filter((e) => showProgress || e.type !== 'progress');
  $('#detail-events').replaceChildren(shown.length ? el('table', { class: 'mini' },
    el('tbody', {}, shown.map((e) => el('tr', {},
      el('td', { class: 'num muted', text: e.seq }),
      el('td', { class: 'num', text: fmtTime(e.at) }),
      el('td', {}, el('span', { class: 'etype', 'data-type': e.type, text: e.type })),
      el('td', { class: 'small mono', text: eventText(e) }))))) :
    el('p', { class: 'muted', text: 'no events' }));
}

function outcomeState(o) {
  if (!o) return 'running';
  if (o === 'succeeded' || o === 'cancelled') return o;
  if (o === 'detached' || o === 'lease_expired') return 'retry_wait';
  return 'failed';
}

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1048576).toFixed(1)} MiB`;
}

function eventText(e) {
  const skip = new Set(['id', 'job', 'seq', 'at', 'type']);
  switch (e.type) {
    case 'progress': {
      const p = e.progress || {};
      return `${Math.round(p.percent * 10) / 10}% ${p.current_class || p.current_node || ''}${p.eta_ms !== undefined ? ` eta ${fmtDur(p.eta_ms)}` : ''}`;
    }
    case 'dispatched': return `attempt ${e.attempt} → ${e.backend}${(e.skipped || []).map((k) => ` · skipped ${k.backend}: ${k.reason}`).join('')}`;
    case 'output': return `node ${e.node}: ${(e.artifacts || []).map((x) => x.filename).join(', ')}`;
    case 'node_started': return `node ${e.node}${e.class_type ? ` (${e.class_type})` : ''}`;
    case 'node_finished': return `node ${e.node}${e.cached ? ' (cached)' : ''}`;
    case 'attempt_failed': return `${e.backend}: ${e.error ? `${e.error.kind}: ${e.error.message}` : ''}${e.retry_at ? ` · retry at ${fmtTime(e.retry_at)}` : ''}`;
    case 'failed': return e.error ? `${e.error.kind}: ${e.error.message}` : '';
    case 'succeeded': return `${e.backend ? `on ${e.backend} · ` : ''}${(e.artifacts || []).length} artifact(s)`;
    case 'cancel_step_taken': return e.step ? `${e.step.action}: ${e.step.result}` : '';
    default: {
      const rest = Object.fromEntries(Object.entries(e).filter(([k]) => !skip.has(k)));
      const s = JSON.stringify(rest);
      return s === '{}' ? '' : s.length > 160 ? `${s.slice(0, 160)}…` : s;
    }
  }
}

function renderTimeline(attempts) {
  const box = $('#detail-timeline');
  const withNodes = attempts.filter((a) => (a.nodes || []).length);
  if (!withNodes.length) { box.replaceChildren(el('p', { class: 'muted', text: 'no node timings yet' })); return; }
  const now = Date.now();
  let t0 = Infinity;
  let t1 = -Infinity;
  for (const a of withNodes) {
    for (const n of a.nodes) {
      t0 = Math.min(t0, n.started_at);
      t1 = Math.max(t1, n.ended_at ?? a.ended_at ?? now);
    }
  }
  const span = Math.max(1, t1 - t0);
  const pct = (t) => `${(100 * (t - t0)) / span}%`;
  const rows = [];
  for (const a of withNodes) {
    rows.push(el('div', { class: 'tl-attempt muted small', text: `attempt ${a.number} · ${a.backend}` }));
    for (const n of a.nodes) {
      const end = n.ended_at ?? a.ended_at ?? now;
      rows.push(el('div', { class: 'tl-row' },
        el('span', { class: 'tl-label mono', title: `node ${n.node}`, text: `${n.class_type || 'node'} #${n.node}` }),
        el('div', { class: 'tl-track' },
          el('div', { class: `tl-bar${n.cached ? ' cached' : ''}${n.ended_at ? '' : ' open'}`,
            style: { left: pct(n.started_at), width: `max(2px, calc(${pct(end)} - ${pct(n.started_at)}))` },
            title: `${fmtTime(n.started_at)} → ${n.ended_at ? fmtTime(n.ended_at) : '…'}${n.cached ? ' (cached)' : ''}` })),
        el('span', { class: 'tl-dur num', text: n.cached ? 'cached' : fmtDur(end - n.started_at) })));
    }
  }
  rows.push(el('div', { class: 'tl-axis small muted' },
    el('span', { text: fmtTime(t0) }), el('span', { text: fmtDur(span / 2) }), el('span', { text: `${fmtTime(t1)} · ${fmtDur(span)}` })));
  box.replaceChildren(...rows);
}

async function download(e, href, filename) {
  if (!localStorage.getItem(TOKEN_KEY)) return; // a plain link works without auth
  e.preventDefault();
  try {
    const res = await fetch(href, { headers: authHeaders() });
    if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
    const url = URL.createObjectURL(await res.blob());
    el('a', { href: url, download: filename }).click();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    toast(`download failed: ${err.message}`);
  }
}

// ---------------------------------------------------------------- installs

// Custom-node installs on SSH instances: the list is polled (installs have no global stream);
// each active install is followed live through its own SSE stream.
const installs = new Map(); // id -> InstallView (record fields + counts) + {seq}
const following = new Map(); // id -> AbortController
const expanded = new Set(); // ids whose detail row is open
const MAX_INSTALLS = 50;

async function loadInstalls() {
  const page = await api(`/v1/installs?limit=${MAX_INSTALLS}`);
  const list = (page && page.installs) || [];
  for (const v of list) {
    const old = installs.get(v.id);
    // what the live stream applied may be newer than this read
    if (old && old.seq && !TERMINAL.has(v.state) && (old.updated_at || 0) > v.updated_at) continue;
    installs.set(v.id, { ...(old || {}), ...v });
    if (!TERMINAL.has(v.state)) followInstall(v.id);
  }
  const keep = new Set(list.map((v) => v.id));
  for (const id of installs.keys()) if (!keep.has(id) && !following.has(id)) installs.delete(id);
  renderInstalls();
}

const refreshInstalls = debounce(() => loadInstalls().catch(() => {}), 300);

async function fetchInstall(id) {
  try {
    const v = await api(`/v1/installs/${encodeURIComponent(id)}`);
    installs.set(id, { ...(installs.get(id) || {}), ...v });
    renderInstalls();
  } catch (e) {
    if (e.status === 404) { installs.delete(id); renderInstalls(); }
  }
}

function countsOf(v) {
  const nodes = v.nodes || [];
  const done = new Set(['installed', 'succeeded', 'failed', 'cancelled']);
  return {
    total: nodes.length,
    processed: nodes.filter((n) => done.has(n.status)).length,
    succeeded: nodes.filter((n) => n.status === 'succeeded').length,
    failed: nodes.filter((n) => n.status === 'failed').length,
  };
}

// Applies one install event to the view (the record is re-read when the install ends).
function applyInstallEvent(ev) {
  const v = installs.get(ev.install);
  if (!v) { refreshInstalls(); return; }
  if (v.seq && ev.seq <= v.seq) return;
  v.seq = ev.seq;
  v.updated_at = Math.max(v.updated_at || 0, ev.at);
  switch (ev.type) {
    case 'phase':
      v.phase = ev.phase;
      if (v.state === 'queued') v.state = 'running';
      break;
    case 'node':
      if (v.nodes && v.nodes[ev.index]) v.nodes[ev.index] = ev.node;
      if (['fetching', 'requirements'].includes(ev.node.status)) v.current = ev.index;
      if (v.state === 'queued') v.state = 'running';
      break;
    case 'model':
      if (v.models && v.models[ev.index]) v.models[ev.index] = ev.model;
      break;
    case 'output':
      v.log_tail = [...(v.log_tail || []), ev.line].slice(-50);
      break;
    case 'finished':
      v.state = ev.state;
      v.error = ev.error || null;
      v.current = null;
      break;
    default: break;
  }
  v.counts = countsOf(v);
  renderInstalls();
  if (ev.type === 'finished') fetchInstall(ev.install);
}

// Follows an install's SSE stream until its `finished` event (reconnecting with Last-Event-ID).
async function followInstall(id) {
  if (following.has(id)) return;
  const ctl = new AbortController();
  following.set(id, ctl);
  let last = null;
  let backoff = 500;
  try {
    while (!ctl.signal.aborted) {
      try {
        const headers = authHeaders({ Accept: 'text/event-stream' });
        if (last) headers['Last-Event-ID'] = last;
        const res = await fetch(`/v1/installs/${encodeURIComponent(id)}/events`, { headers, signal: ctl.signal, cache: 'no-store' });
        if (res.status === 204 || res.status === 404 || res.status === 401) break;
        if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
        backoff = 500;
        await readStream(res, ctl.signal, (type, data, eid) => {
          if (eid) last = eid;
          if (type === 'lagged') { fetchInstall(id); return; }
          if (type !== 'install') return;
          try { applyInstallEvent(JSON.parse(data)); } catch { /* not JSON: ignore */ }
        });
        const v = installs.get(id);
        if (!v || TERMINAL.has(v.state)) break;
      } catch {
        // dropped: retry below
      }
      if (ctl.signal.aborted) break;
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 10000);
    }
  } finally {
    following.delete(id);
    fetchInstall(id);
  }
}

async function cancelInstall(id, tr) {
  const msg = $('.row-msg', tr);
  msg.textContent = '';
  try {
    const v = await api(`/v1/installs/${encodeURIComponent(id)}/cancel`, 'POST');
    installs.set(id, { ...(installs.get(id) || {}), ...v });
    renderInstalls();
    toast(`install ${shortId(id)}: ${v.state}`, 'info');
  } catch (e) {
    msg.textContent = e.message;
    clearTimeout(msg.timer);
    msg.timer = setTimeout(() => { msg.textContent = ''; }, 10000);
  }
}

function renderInstalls() {
  const tbody = $('#install-rows');
  const list = [...installs.values()].sort((a, b) => (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
  const rows = [];
  for (const v of list) {
    let tr = tbody.querySelector(`tr.install-row[data-install-id="${CSS.escape(v.id)}"]`);
    if (!tr) tr = buildInstallRow(v.id);
    updateInstallRow(tr, v);
    rows.push(tr);
    if (expanded.has(v.id)) rows.push(installDetailRow(v));
  }
  tbody.replaceChildren(...rows);
  $('#installs-empty').hidden = rows.length > 0;
  // A fleet without SSH instances has no installs: no panel.
  if (installs.size) $('#installs-panel').hidden = false;
}

function buildInstallRow(id) {
  const tr = el('tr', { 'data-install-id': id, class: 'install-row', onclick: (e) => {
    if (e.target.closest('button, a')) return;
    if (expanded.has(id)) expanded.delete(id); else expanded.add(id);
    renderInstalls();
  } });
  tr.append(
    el('td', { class: 'mono id', title: id, text: shortId(id) }),
    el('td', { class: 'mono install-instance' }),
    el('td', {}, el('span', { class: 'badge install-state' })),
    el('td', { class: 'col-progress' },
      el('div', { class: 'progress-line' },
        el('div', { class: 'install-progress bar' }, el('div', { class: 'fill' })),
        el('span', { class: 'install-counts num' }))),
    el('td', { class: 'install-current mono' }),
    el('td', { class: 'install-age num' }),
    el('td', { class: 'actions' },
      el('button', { class: 'btn btn-small btn-danger btn-install-cancel', type: 'button', text: 'Cancel',
        onclick: () => cancelInstall(id, tr) }),
      el('div', { class: 'row-msg error' })),
  );
  return tr;
}

function updateInstallRow(tr, v) {
  const c = v.counts || countsOf(v);
  tr.dataset.state = v.state;
  tr.classList.toggle('selected', expanded.has(v.id));
  $('.install-instance', tr).textContent = (v.spec && v.spec.instance) || '';
  const badge = $('.install-state', tr);
  badge.textContent = v.state;
  badge.dataset.state = installBadge(v.state);
  badge.title = v.error || v.phase || '';
  const bar = $('.install-progress', tr);
  bar.dataset.state = installBadge(v.state);
  $('.fill', bar).style.width = `${c.total ? (100 * c.processed) / c.total : (TERMINAL.has(v.state) ? 100 : 0)}%`;
  $('.install-counts', tr).textContent = `${c.processed}/${c.total}${c.failed ? `, ${c.failed} failed` : ''}`;
  const running = !TERMINAL.has(v.state);
  let current = '';
  if (running) {
    const n = present(v.current) && v.nodes ? v.nodes[v.current] : null;
    current = n ? `${n.name} · ${n.status}` : (v.phase || '');
  } else if (v.error) {
    current = v.error;
  }
  const cur = $('.install-current', tr);
  cur.textContent = current;
  cur.title = current;
  const age = $('.install-age', tr);
  age.textContent = fmtAge(v.created_at);
  age.title = new Date(v.created_at).toLocaleString();
  $('.btn-install-cancel', tr).hidden = !running;
}

// Install states mapped onto the badge colours of job states.
const installBadge = (s) => (s === 'queued' ? 'pending' : s);

function installDetailRow(v) {
  const nodes = v.nodes || [];
  const models = v.models || [];
  const log = v.log_tail || [];
  return el('tr', { class: 'install-detail', 'data-install-id': v.id },
    el('td', { colspan: 7 },
      el('div', { class: 'small muted' }, `phase ${v.phase || ''}`, v.resumed ? ` · resumed ${v.resumed}×` : '',
        v.error ? el('span', { class: 'error', text: ` · ${v.error}` }) : null),
      nodes.length ? el('table', { class: 'mini install-nodes' },
        el('thead', {}, el('tr', {}, ['pack', 'status', 'requirements', 'commit', 'classes', 'error'].map((h) => el('th', { text: h })))),
        el('tbody', {}, nodes.map((n, i) => el('tr', { class: 'install-node', 'data-index': i, 'data-status': n.status },
          el('td', { class: 'mono', title: n.git, text: `${n.name}${n.rev ? `@${n.rev}` : ''}` }),
          el('td', {}, el('span', { class: 'badge', 'data-state': nodeBadge(n.status), text: n.status })),
          el('td', { text: n.requirements || '' }),
          el('td', { class: 'mono', title: n.commit || '', text: n.commit ? n.commit.slice(0, 8) : '' }),
          el('td', { class: 'small', text: (n.classes && n.classes.length ? n.classes : n.expected_classes || []).join(', ') }),
          el('td', { class: 'small error', text: n.error || '' }))))) : null,
      models.length ? el('table', { class: 'mini install-models' },
        el('tbody', {}, models.map((m) => el('tr', {},
          el('td', { class: 'mono', title: m.url, text: m.path }),
          el('td', {}, el('span', { class: 'badge', 'data-state': nodeBadge(m.status), text: m.status })),
          el('td', { class: 'small error', text: m.error || '' }))))) : null,
      el('pre', { class: 'install-log', text: log.length ? log.join('\n') : '(no output yet)' })));
}

const nodeBadge = (s) => ({ pending: 'pending', fetching: 'running', requirements: 'running', downloading: 'running', installed: 'retry_wait' }[s] || s);

// ---------------------------------------------------------------- start-up

async function start() {
  try {
    await Promise.all([loadBackends(), loadCounts()]);
  } catch (e) {
    if (e.status === 401) return;
    toast(e.message);
  }
  streamLoop();
  loadInstalls().catch(() => {});
  try {
    await loadJobs();
  } catch (e) {
    if (e.status !== 401) toast(e.message);
  }
}

function init() {
  $('#token-form').addEventListener('submit', saveToken);
  $('#detail-close').addEventListener('click', () => openDetail(null));
  $('#show-progress').addEventListener('change', () => { if (openJob) loadDetail(openJob); });
  $('#logout').hidden = !localStorage.getItem(TOKEN_KEY);
  $('#logout').addEventListener('click', () => {
    localStorage.removeItem(TOKEN_KEY);
    $('#logout').hidden = true;
    if (streamCtl) streamCtl.abort();
    askToken('');
  });
  document.addEventListener('keydown', (e) => { if (e.key === 'Escape' && openJob) openDetail(null); });
  setInterval(() => { if (!authWanted) { refreshBackends(); refreshCounts(); } }, 5000);
  setInterval(() => { if (!authWanted) refreshInstalls(); }, 3000);
  setInterval(() => {
    for (const tr of document.querySelectorAll('#job-rows tr')) {
      const job = jobs.get(tr.dataset.jobId);
      if (job) $('.job-age', tr).textContent = fmtAge(job.created_at);
    }
  }, 1000);
  start();
}

init();
