// OBS overlay: read-only join, one gift alert at a time for the sticker's alert_secs,
// each gift shown exactly once (dedupe by gift_id; reconnects resume with `since`).
// Options: ?debug=1 shows the connection state, ?test=1 plays a sample alert.
import { $, el, fetchCatalog, indexCatalog, sticker, RoomSocket, describeStatus, exposeHooks } from './common.js';

const params = new URLSearchParams(location.search);
let fromPath = '';
try {
  fromPath = decodeURIComponent(location.pathname.replace(/\/+$/, '').split('/').pop() || '');
} catch { /* malformed escape: fall back to ?stream= */ }
const stream = (location.pathname.startsWith('/overlay/') && fromPath) || params.get('stream') || 'demo';
const debug = params.has('debug');

let catalog = new Map();
const seen = new Set(); // gift ids queued or shown
const shown = []; // gift ids in the order they were shown
const queue = [];
let busy = false;

function enqueue(f) {
  if (!f.gift_id || seen.has(f.gift_id)) return;
  seen.add(f.gift_id);
  if (seen.size > 5000) seen.delete(seen.values().next().value);
  // Gifts of one sender and sticker still waiting in the queue become one alert (a gift
  // storm would otherwise keep the overlay busy for minutes); questions get their own alert.
  const same = !f.message && queue.find((q) => !q.message && q.sticker === f.sticker && q.from && f.from && q.from.id === f.from.id);
  if (same) {
    same.count = (Number(same.count) || 1) + (Number(f.count) || 1);
    same.combo = Math.max(Number(same.combo) || 1, Number(f.combo) || 1);
    same.ids.push(f.gift_id);
    return;
  }
  queue.push({ ...f, ids: [f.gift_id] });
  if (queue.length > 200) queue.shift();
  if (!busy) next();
}

function next() {
  const f = queue.shift();
  if (!f) {
    busy = false;
    document.body.dataset.alert = '';
    return;
  }
  busy = true;
  const s = sticker(catalog, f.sticker);
  const cnt = Number(f.count) || 1;
  const alert = el('div', { class: `alert t${s.tier}`, style: `--tier:${s.tier}`, dataset: { giftId: f.gift_id } },
    el('div', { class: 'emoji' }, s.emoji),
    el('div', { class: 'who' }, (f.from && f.from.name) || 'Someone'),
    el('div', { class: 'what' }, `sent ${cnt > 1 ? `${cnt}× ` : 'a '}${s.name}`,
      Number(f.combo) > 1 ? el('span', { class: 'combo' }, `x${f.combo} combo`) : null),
    f.message ? el('div', { class: 'msg' }, f.message) : null);
  if (!f._sample) shown.push(...f.ids);
  document.body.dataset.alert = f.gift_id;
  $('#stage').replaceChildren(alert);
  setTimeout(() => {
    alert.classList.add('leaving');
    setTimeout(() => {
      alert.remove();
      next();
    }, 450);
  }, s.alert_secs * 1000);
}

const socket = new RoomSocket({
  stream,
  onFrame(f) {
    if (f.type === 'joined' && f.catalog) catalog = indexCatalog(f.catalog);
    else if (f.type === 'shoutout') enqueue(f);
  },
  onStatus(s) {
    document.body.dataset.conn = s.state;
    const st = $('#status');
    st.textContent = `${stream}: ${describeStatus(s).text}`;
    st.hidden = !debug;
  },
});

exposeHooks({
  socket,
  shown,
  dropSocket: (o) => socket.drop(o),
  reconnect: () => socket.reconnectNow(),
  state: () => ({ shown: [...shown], queued: queue.length, lastSeq: socket.lastSeq, conn: socket.state }),
});

fetchCatalog().then((c) => {
  if (!catalog.size) catalog = c;
  if (params.has('test')) {
    const first = [...catalog.values()].sort((a, b) => b.price - a.price)[0];
    enqueue({ gift_id: `sample-${Date.now()}`, _sample: true, from: { id: 'x', name: 'Test alert' }, sticker: first ? first.id : 'gift', count: 1, amount: 0, combo: 1, message: 'This is how alerts look on stream.' });
  }
}).catch(() => {});
socket.start();
