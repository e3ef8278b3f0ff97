// Streamer dashboard: live gifts, the thanks queue (open paid questions first-class),
// exact revenue split, a revenue chart, top gifters, viewer count.
import {
  $, el, fill, api, ApiError, fetchCatalog, indexCatalog, sticker, RoomSocket, describeStatus,
  formatCoins, formatUnits, toBig, userColor, timeOf, tsMs, loadSession, sessionFromToken, store,
  exposeHooks,
} from './common.js';

const SESSION_KEY = 'giftcast.streamer';
const EXACT = ['gross', 'store', 'streamer', 'platform', 'unit', 'gifts', 'amount', 'coins', 'total'];
const SVG = 'http://www.w3.org/2000/svg';

let session = loadSession(SESSION_KEY);
let socket = null;
let catalog = new Map();
let tab = 'all';
const queue = new Map(); // gift_id → queue item, oldest first
const thanked = new Set(); // gift ids thanked (so a late queue fetch can't resurrect them)
const sendingThanks = new Set();
const queueNodes = new Map(); // gift_id → its <li> in the queue
// Revenue, all BigInt: whole coins for gross, 1/unit coin for the shares.
let rev = { gifts: 0n, gross: 0n, store: 0n, streamer: 0n, platform: 0n, unit: 10000n };
let bps = null; // {store, streamer, platform} per coin, learned from the server's own totals
let gifters = new Map(); // user id → {id, name, amount: BigInt}
let giftsLog = []; // chart: every gift seen this session (history replay + live), {t, amount}
const loadedAt = Date.now();
let refetchTimer = null;
let refetchTries = 0;

// ---------- helpers ----------

function toast(text, kind = '', ms = 3500) {
  const t = el('div', { class: `toast ${kind}`, role: 'status' }, text);
  $('#toasts').append(t);
  setTimeout(() => t.remove(), ms);
}

function notice(kind, text) {
  const n = $('#notice');
  n.className = `notice ${kind} area-stats`;
  n.textContent = text;
  n.hidden = !text;
}

function streamId() {
  return session && (session.stream || session.user_id);
}

/** Coalesce re-renders to one per frame: a gift storm must not rebuild the page per gift. */
const dirty = new Set();
function later(fn) {
  if (!dirty.size) {
    requestAnimationFrame(() => {
      const fns = [...dirty];
      dirty.clear();
      for (const f of fns) f();
    });
  }
  dirty.add(fn);
}

// ---------- revenue ----------

function renderRevenue() {
  const unit = rev.unit;
  for (const k of ['store', 'streamer', 'platform']) {
    const node = $(`#rev-${k}`);
    node.textContent = formatUnits(rev[k], unit);
    node.dataset.units = rev[k].toString();
  }
  $('#rev-gross').textContent = formatCoins(rev.gross);
  $('#rev-gross').dataset.coins = rev.gross.toString();
  $('#rev-gifts').textContent = formatCoins(rev.gifts);
  if (bps) {
    const pct = (b) => `${formatUnits(b * 100n, unit).replace(/\.?0+$/, '')}%`;
    $('#split-note').textContent = `split ${pct(bps.streamer)} / ${pct(bps.store)} / ${pct(bps.platform)}`;
  }
  renderGifters();
  renderChart();
}

function applyRevenue(r) {
  rev = {
    gifts: toBig(r.gifts),
    gross: toBig(r.gross),
    store: toBig(r.store),
    streamer: toBig(r.streamer),
    platform: toBig(r.platform),
    unit: toBig(r.unit) || 10000n,
  };
  if (rev.gross > 0n && rev.store + rev.streamer + rev.platform === rev.gross * rev.unit) {
    bps = { store: rev.store / rev.gross, streamer: rev.streamer / rev.gross, platform: rev.platform / rev.gross };
  }
  if (Array.isArray(r.top_gifters)) {
    gifters = new Map();
    for (const g of r.top_gifters) {
      const id = g.user_id ?? g.id ?? (g.from && g.from.id) ?? g.name;
      gifters.set(id, { id, name: g.name ?? (g.from && g.from.name) ?? id, amount: toBig(g.gross ?? g.amount ?? g.coins ?? g.total) });
    }
  }
  document.body.dataset.revenue = 'loaded';
  renderRevenue();
}

async function loadRevenue() {
  const id = streamId();
  try {
    const r = await api(`/api/streams/${encodeURIComponent(id)}/revenue`, { token: session.token, exactInts: EXACT });
    return r;
  } catch (e) {
    if (e instanceof ApiError && (e.status === 401 || e.status === 403)) signOut(`Not allowed to see this stream's revenue (${e.code}). Sign in again.`);
    else notice('bad', `Could not load revenue: ${e.message}`);
    return null;
  }
}

/** Server totals are the truth; refetch (debounced) after live gifts until they include them. */
function scheduleRefetch(delay = 400) {
  clearTimeout(refetchTimer);
  refetchTimer = setTimeout(async () => {
    const r = await loadRevenue();
    if (!r) return;
    if (toBig(r.gifts) >= rev.gifts) {
      refetchTries = 0;
      applyRevenue(r);
    } else if (refetchTries++ < 10) {
      scheduleRefetch(1000);
    }
  }, delay);
}

function countGift(f) {
  const amount = toBig(f.amount);
  rev.gifts += 1n;
  rev.gross += amount;
  if (bps) {
    rev.store += amount * bps.store;
    rev.streamer += amount * bps.streamer;
    rev.platform += amount * bps.platform;
  }
  const id = f.from && f.from.id;
  const g = gifters.get(id) || { id, name: (f.from && f.from.name) || id, amount: 0n };
  g.amount += amount;
  g.name = (f.from && f.from.name) || g.name;
  gifters.set(id, g);
  later(renderRevenue);
  scheduleRefetch();
}

function renderGifters() {
  const list = [...gifters.values()].sort((a, b) => (b.amount > a.amount ? 1 : b.amount < a.amount ? -1 : 0)).slice(0, 10);
  fill($('#gifters'), list.length ? list.map((g, i) => el('li', {},
    el('span', { class: 'rank' }, String(i + 1)),
    el('span', { class: 'nm', style: `color:${userColor(g.id)}` }, g.name),
    el('span', { class: 'amt' }, `🪙 ${formatCoins(g.amount)}`))) : el('li', { class: 'empty' }, 'No gifts yet.'));
}

// ---------- chart (inline SVG, step line of cumulative gross) ----------

function svg(tag, attrs = {}, text) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
  if (text != null) n.textContent = text;
  return n;
}

function renderChart() {
  const node = $('#chart');
  const W = Math.max(300, node.clientWidth || 600);
  const H = Math.max(160, node.clientHeight || 220);
  node.setAttribute('viewBox', `0 0 ${W} ${H}`);
  const pad = { l: 48, r: 12, t: 12, b: 24 };
  const now = Date.now();
  // Cumulative gross: gifts before the room's history are the base, so the line ends at the total.
  const log = [...giftsLog].sort((a, b) => a.t - b.t);
  const known = log.reduce((sum, g) => sum + g.amount, 0);
  let v = Math.max(0, Number(rev.gross) - known);
  const pts = [{ t: Math.min(loadedAt, log.length ? log[0].t : loadedAt), v }];
  for (const g of log) {
    v += g.amount;
    pts.push({ t: g.t, v });
  }
  const dots = pts.slice(1);
  pts.push({ t: Math.max(now, pts[pts.length - 1].t), v });
  const t0 = pts[0].t;
  const t1 = Math.max(pts[pts.length - 1].t, t0 + 60_000);
  const vmax = Math.max(10, ...pts.map((p) => p.v)) * 1.15;
  const x = (t) => pad.l + ((t - t0) / (t1 - t0)) * (W - pad.l - pad.r);
  const y = (v) => H - pad.b - (v / vmax) * (H - pad.t - pad.b);
  const defs = svg('defs');
  const stroke = svg('linearGradient', { id: 'chart-stroke', x1: 0, x2: 1, y1: 0, y2: 0 });
  stroke.append(svg('stop', { offset: '0%', 'stop-color': '#8b5cf6' }), svg('stop', { offset: '100%', 'stop-color': '#ff4d8d' }));
  const area = svg('linearGradient', { id: 'chart-fill', x1: 0, x2: 0, y1: 0, y2: 1 });
  area.append(svg('stop', { offset: '0%', 'stop-color': '#ff4d8d', 'stop-opacity': 0.35 }), svg('stop', { offset: '100%', 'stop-color': '#8b5cf6', 'stop-opacity': 0 }));
  defs.append(stroke, area);
  const parts = [defs];
  for (let i = 0; i <= 3; i++) {
    const v = (vmax / 1.15) * (i / 3);
    const yy = y(v);
    parts.push(svg('line', { class: 'grid', x1: pad.l, x2: W - pad.r, y1: yy, y2: yy }));
    parts.push(svg('text', { class: 'axis', x: pad.l - 6, y: yy + 4, 'text-anchor': 'end' }, formatCoins(Math.round(v))));
  }
  const fmt = (t) => new Date(t).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  parts.push(svg('text', { class: 'axis', x: pad.l, y: H - 6 }, fmt(t0)));
  parts.push(svg('text', { class: 'axis', x: W - pad.r, y: H - 6, 'text-anchor': 'end' }, fmt(t1)));
  let d = `M${x(pts[0].t).toFixed(1)},${y(pts[0].v).toFixed(1)}`;
  for (let i = 1; i < pts.length; i++) {
    d += ` H${x(pts[i].t).toFixed(1)} V${y(pts[i].v).toFixed(1)}`;
  }
  const base = y(0).toFixed(1);
  parts.push(svg('path', { class: 'area', d: `${d} V${base} H${x(pts[0].t).toFixed(1)} Z` }));
  parts.push(svg('path', { class: 'line', d }));
  if (dots.length <= 80) for (const p of dots) parts.push(svg('circle', { class: 'dot', cx: x(p.t), cy: y(p.v), r: 3 }));
  node.replaceChildren(...parts);
  $('#chart-note').textContent = `${formatCoins(rev.gross)} coins gross`;
}

// ---------- thanks queue ----------

function addToQueue(g) {
  if (!g || !g.gift_id || thanked.has(g.gift_id) || queue.has(g.gift_id)) return;
  queue.set(g.gift_id, g);
}

function renderQueue() {
  const items = [...queue.values()];
  const questions = items.filter((g) => g.message);
  $('#queue-count').textContent = String(items.length);
  $('#question-count').textContent = String(questions.length);
  for (const b of document.querySelectorAll('.tabs button')) b.setAttribute('aria-selected', String(b.dataset.tab === tab));
  const shown = tab === 'questions' ? questions : items;
  // Update in place: a reply being typed keeps its text and focus when new gifts arrive.
  const list = $('#queue');
  const want = new Set(shown.map((g) => g.gift_id));
  for (const li of [...list.children]) if (!want.has(li.dataset.giftId)) li.remove();
  for (const id of [...queueNodes.keys()]) if (!queue.has(id)) queueNodes.delete(id);
  let prev = null;
  for (const g of shown) {
    let li = queueNodes.get(g.gift_id);
    if (!li) {
      li = queueItem(g);
      queueNodes.set(g.gift_id, li);
    }
    const sending = sendingThanks.has(g.gift_id);
    li.classList.toggle('sending', sending);
    li.querySelector('button').disabled = sending;
    const at = prev ? prev.nextElementSibling : list.firstElementChild;
    if (at !== li) list.insertBefore(li, at);
    prev = li;
  }
  if (!shown.length) list.append(el('li', { class: 'empty' }, tab === 'questions' ? 'No open questions.' : 'All caught up. 🎉'));
}

function queueItem(g) {
  const s = sticker(catalog, g.sticker);
  const cnt = Number(g.count) || 1;
  const input = el('input', { maxlength: 200, placeholder: g.message ? 'Answer (optional)' : 'Thanks message (optional)', 'aria-label': 'thanks text' });
  const form = el('form', {
    onsubmit: (e) => {
      e.preventDefault();
      sendThanks(g.gift_id, input.value.trim());
    },
  }, input, el('button', { class: 'primary', type: 'submit' }, 'Thank'));
  return el('li', { class: `qitem${g.message ? ' question' : ''}`, dataset: { giftId: g.gift_id } },
    el('span', { class: 'emoji' }, s.emoji),
    el('div', {},
      el('span', { class: 'who', style: `color:${userColor(g.from && g.from.id)}` }, (g.from && g.from.name) || 'someone'),
      ` sent ${cnt > 1 ? `${cnt}× ` : ''}${s.name} `,
      el('span', { class: 'amt' }, `🪙 ${formatCoins(g.amount)}`),
      el('span', { class: 'muted small' }, ` · ${timeOf(g.ts)}`)),
    g.message ? el('div', { class: 'msg' }, g.message) : null,
    form);
}

function sendThanks(giftId, text) {
  const frame = { type: 'thanks', gift_id: giftId };
  if (text) frame.text = text;
  if (!socket || !socket.send(frame)) {
    toast('Not connected: try again in a moment.', 'warn');
    return;
  }
  sendingThanks.add(giftId);
  renderQueue();
  setTimeout(() => {
    if (sendingThanks.delete(giftId) && queue.has(giftId)) renderQueue();
  }, 8000);
}

async function loadQueue() {
  try {
    const r = await api(`/api/streams/${encodeURIComponent(streamId())}/queue`, { token: session.token });
    for (const g of (r && r.gifts) || []) addToQueue(g);
    // Keep oldest first, as the server does.
    const sorted = [...queue.values()].sort((a, b) => (tsMs(a.ts) - tsMs(b.ts)) || ((Number(a.seq) || 0) - (Number(b.seq) || 0)));
    queue.clear();
    for (const g of sorted) queue.set(g.gift_id, g);
    renderQueue();
  } catch (e) {
    if (e instanceof ApiError && (e.status === 401 || e.status === 403)) signOut(`Not allowed to see this stream's queue (${e.code}). Sign in again.`);
    else notice('bad', `Could not load the thanks queue: ${e.message}`);
  }
}

// ---------- live feed ----------

function feed(node) {
  const list = $('#feed');
  list.prepend(node);
  while (list.childElementCount > 100) list.lastElementChild.remove();
}

// Moderation (docs/protocol.md, "Moderation"): the streamer deletes a chat line or bans its author.
function modButton(label, frame) {
  const b = el('button', { type: 'button', class: 'mod-btn small', title: `${label} (moderation)` }, label);
  b.addEventListener('click', () => {
    if (!socket || !socket.send(frame)) toast('Not connected: try again in a moment.', 'warn');
  });
  return b;
}

function hideChat(li) {
  li.classList.add('deleted');
  const t = li.querySelector('.text');
  if (t) t.textContent = '(deleted)';
  for (const b of li.querySelectorAll('.mod-btn')) b.remove();
}

function who(from) {
  return el('span', { class: 'name', style: `color:${userColor(from && from.id)}` }, (from && from.name) || 'someone');
}

function onFrame(f) {
  switch (f.type) {
    case 'joined': {
      if (f.catalog) catalog = indexCatalog(f.catalog);
      if (f.viewers != null) $('#viewers').textContent = formatCoins(f.viewers);
      const r = f._resume;
      notice('', '');
      // The server's queue and totals are the truth at every (re)join; replayed events
      // fill the feed, chart and queue but are not counted again.
      if (r.first || !r.resumed) loadQueue();
      loadRevenue().then((rv) => {
        if (rv && toBig(rv.gifts) >= rev.gifts) applyRevenue(rv);
        else if (rv) scheduleRefetch(1000);
      });
      if (r.reconnect) toast('Reconnected.', 'ok', 2000);
      return;
    }
    case 'shoutout': {
      const s = sticker(catalog, f.sticker);
      const cnt = Number(f.count) || 1;
      feed(el('li', { class: 'gift', dataset: { seq: f.seq, giftId: f.gift_id } },
        el('span', { class: 'emoji' }, s.emoji), who(f.from),
        `sent ${cnt > 1 ? `${cnt}× ` : ''}${s.name}`,
        el('span', { class: 'amt' }, `🪙 ${formatCoins(f.amount)}`),
        Number(f.combo) > 1 ? el('span', { class: 'combo' }, `x${f.combo} combo`) : null,
        f.message ? el('div', { class: 'muted' }, `❝ ${f.message}`) : null));
      addToQueue({ gift_id: f.gift_id, from: f.from, sticker: f.sticker, count: f.count, amount: f.amount, message: f.message, seq: f.seq, ts: f.ts });
      later(renderQueue);
      giftsLog.push({ t: tsMs(f.ts), amount: Number(f.amount) || 0 });
      if (giftsLog.length > 5000) giftsLog.shift();
      // Replayed gifts are in the totals fetched at join; live ones are counted until the refetch.
      if (f._replay) later(renderChart);
      else countGift(f);
      return;
    }
    case 'thanks': {
      thanked.add(f.gift_id);
      queue.delete(f.gift_id);
      sendingThanks.delete(f.gift_id);
      later(renderQueue);
      feed(el('li', { class: 'thanks', dataset: { seq: f.seq, giftId: f.gift_id } },
        '🙏 You thanked ', who(f.to), f.text ? el('span', { class: 'muted' }, `: “${f.text}”`) : null));
      return;
    }
    case 'red_packet': {
      const shares = Number(f.shares) || 1;
      const cut = toBig(f.host_cut);
      feed(el('li', { class: 'packet', dataset: { seq: f.seq, type: 'red_packet', packetId: f.packet_id } },
        el('span', { class: 'emoji' }, '🧧'), who(f.from),
        'dropped a red packet',
        el('span', { class: 'amt' }, `🪙 ${formatCoins(f.coins)}`),
        el('span', { class: 'muted' }, ` · ${shares} ${shares === 1 ? 'share' : 'shares'}, ${f.split === 'equal' ? 'equal' : 'random'}`),
        cut > 0n ? el('span', { class: 'cut' }, ` · your cut 🪙 ${formatCoins(cut)}`) : null,
        f.message ? el('div', { class: 'muted' }, `❝ ${f.message}`) : null));
      // The host cut is revenue (sticker "red_packet" in the report): chart it, refetch the totals.
      if (cut > 0n) {
        giftsLog.push({ t: tsMs(f.ts), amount: Number(cut) });
        if (giftsLog.length > 5000) giftsLog.shift();
        if (f._replay) later(renderChart);
        else scheduleRefetch();
      }
      return;
    }
    case 'grabbed': {
      const left = Number(f.left);
      feed(el('li', { class: 'packet-grab', dataset: { seq: f.seq, type: 'grabbed', packetId: f.packet_id } },
        '🧧 ', who(f.to), 'grabbed', el('span', { class: 'amt' }, `🪙 ${formatCoins(f.coins)}`),
        el('span', { class: 'muted' }, left > 0 ? ` · ${left} left` : ' · all grabbed')));
      return;
    }
    case 'red_packet_closed':
      feed(el('li', { class: 'packet-closed muted', dataset: { seq: f.seq, type: 'red_packet_closed', packetId: f.packet_id } },
        `🧧 A red packet expired${toBig(f.refunded) > 0n ? `: 🪙 ${formatCoins(f.refunded)} went back to its sender` : ''}`));
      return;
    case 'chat':
      feed(el('li', { class: 'chat', dataset: { seq: f.seq, type: 'chat', user: f.from?.id ?? '' } }, who(f.from), el('span', { class: 'text' }, f.text ?? ''),
        modButton('Delete', { type: 'delete', seq: f.seq }), modButton('Ban', { type: 'ban', user_id: f.from?.id })));
      return;
    case 'deleted':
      for (const n of document.querySelectorAll(`#feed li.chat[data-seq="${Number(f.target_seq)}"]`)) hideChat(n);
      return;
    case 'mod_action':
      if (f.action === 'ban' || (f.action === 'timeout' && Number(f.secs) > 0)) {
        for (const n of document.querySelectorAll('#feed li.chat')) if (n.dataset.user === f.user_id) hideChat(n);
      }
      feed(el('li', { class: 'muted', dataset: { seq: f.seq, type: 'mod_action' } }, `🛡 ${f.action} ${f.user_id}${f.action === 'timeout' ? ` (${f.secs}s)` : ''}`));
      return;
    case 'room_settings':
      feed(el('li', { class: 'muted', dataset: { seq: f.seq, type: 'room_settings' } }, `🛡 slow mode ${Number(f.slow_mode) ? `${f.slow_mode}s` : 'off'} · ${f.blocked_words} blocked words`));
      return;
    case 'viewers':
      $('#viewers').textContent = formatCoins(f.count);
      return;
    case 'error':
      if (f.code === 'not_found' || f.code === 'forbidden') {
        // The error names no gift: settle every thanks in flight. For not_found the server
        // has no such un-thanked gift, so it leaves the queue (a successful one in flight
        // is removed by its own thanks event anyway).
        for (const id of sendingThanks) {
          sendingThanks.delete(id);
          if (f.code === 'not_found') {
            queue.delete(id);
            thanked.add(id);
          }
        }
        renderQueue();
        toast(f.code === 'forbidden' ? 'Only this stream\'s streamer can thank gifts.' : 'That gift was already thanked (or is no longer in the queue).', 'bad');
      } else if (f.code === 'lagged') {
        toast('Connection fell behind; catching up…', 'warn');
      } else {
        toast(f.message || `Error: ${f.code}`, 'bad');
      }
      return;
    default:
  }
}

// ---------- session ----------

function start() {
  const id = streamId();
  document.body.dataset.auth = 'signed-in';
  $('#signin').hidden = true;
  $('#dash').hidden = false;
  $('#conn').hidden = false;
  $('#signout-btn').hidden = false;
  $('#stream-id').textContent = `${session.name} · ${id}`;
  const overlay = $('#overlay-link');
  overlay.href = `/overlay/${encodeURIComponent(id)}`;
  overlay.hidden = false;
  const viewer = $('#viewer-link');
  viewer.href = `/?stream=${encodeURIComponent(id)}`;
  viewer.hidden = false;
  document.title = `${id} · giftcast dashboard`;
  renderQueue();
  renderRevenue();
  socket = new RoomSocket({
    stream: id,
    token: session.token,
    since: 0, // the whole room history the server still has: recent feed, chart, queue
    onFrame,
    onStatus(s) {
      const d = describeStatus(s);
      const pill = $('#conn');
      pill.className = `pill ${d.kind}`;
      pill.textContent = d.text;
      document.body.dataset.conn = s.state;
      if (s.state === 'reconnecting') notice('warn', `Disconnected. Reconnecting (attempt ${s.attempt})…`);
    },
    onClose(ev) {
      if (ev.code === 4003) signOut('Your streamer session expired. Sign in again.');
    },
  }).start();
  exposeHooks({ socket, dropSocket: (o) => socket.drop(o), reconnect: () => socket.reconnectNow() });
}

function signOut(reason) {
  if (socket) socket.stop();
  socket = null;
  session = null;
  store.del(SESSION_KEY);
  queue.clear();
  queueNodes.clear();
  thanked.clear();
  gifters.clear();
  giftsLog = [];
  rev = { gifts: 0n, gross: 0n, store: 0n, streamer: 0n, platform: 0n, unit: 10000n };
  document.body.dataset.auth = 'signed-out';
  document.body.dataset.conn = 'idle';
  $('#signin').hidden = false;
  $('#dash').hidden = true;
  for (const id of ['#conn', '#signout-btn', '#overlay-link', '#viewer-link']) $(id).hidden = true;
  $('#stream-id').textContent = '';
  $('#feed').replaceChildren();
  $('#signin-error').textContent = reason || '';
}

async function signIn(name, streamWanted) {
  $('#signin-error').textContent = '';
  $('#signin-btn').disabled = true;
  try {
    const body = { name, role: 'streamer' };
    if (streamWanted) body.stream = streamWanted;
    const r = await api('/api/guest', { method: 'POST', body });
    session = sessionFromToken(r.token, { user_id: r.user_id, name: r.name ?? name, role: r.role, stream: r.stream ?? r.user_id });
    store.set(SESSION_KEY, session);
    start();
  } catch (e) {
    $('#signin-error').textContent = e instanceof ApiError && e.status === 409
      ? 'That stream is already claimed.'
      : e instanceof ApiError && (e.status === 403 || e.status === 404)
        ? `Guest streamers are not allowed here (${e.message}). Use a token.`
        : `Could not sign in: ${e.message}`;
  } finally {
    $('#signin-btn').disabled = false;
  }
}

$('#signin-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const name = $('#name-input').value.trim();
  if (name) signIn(name, $('#stream-input').value.trim());
});
$('#token-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const token = $('#token-input').value.trim();
  const s = sessionFromToken(token);
  if (!s.user_id || s.role !== 'streamer') {
    $('#signin-error').textContent = 'That is not a streamer token.';
    return;
  }
  session = s;
  store.set(SESSION_KEY, session);
  start();
});
$('#signout-btn').addEventListener('click', () => signOut());
for (const b of document.querySelectorAll('.tabs button')) {
  b.addEventListener('click', () => { tab = b.dataset.tab; renderQueue(); });
}
addEventListener('resize', () => renderChart());
setInterval(() => { if (session) renderChart(); }, 15_000);

fetchCatalog().then((c) => { if (!catalog.size) { catalog = c; renderQueue(); } }).catch(() => {});
exposeHooks({ state: () => ({ rev: Object.fromEntries(Object.entries(rev).map(([k, v]) => [k, v.toString()])), queue: [...queue.keys()] }) });
if (session) start();
