// OBS overlay: read-only join, one gift alert at a time for the sticker's alert_secs,
// each gift shown exactly once (dedupe by gift_id; reconnects resume with `since`).
// Red packets get their own alert, once each (dedupe by packet_id).
// Options: ?debug=1 shows the connection state, ?test=1 plays a sample alert.
import { $, el, fetchCatalog, indexCatalog, sticker, RoomSocket, describeStatus, formatCoins, exposeHooks } from './common.js';

const params = new URLSearchParams(location.search);
let fromPath = '';
try {
  fromPath = decodeURIComponent(location.pathname.replace(/\/+$/, '').split('/').pop() || '');
} catch { /* malformed escape: fall back to ?stream= */ }
const stream = (location.pathname.startsWith('/overlay/') && fromPath) || params.get('stream') || 'demo';
const debug = params.has('debug');

let catalog = new Map();
const PACKET_ALERT_SECS = 6;
const seen = new Set(); // gift ids queued or shown
const shown = []; // gift ids in the order they were shown
const seenPackets = new Set(); // red packet ids queued or shown
const shownPackets = []; // red packet ids in the order they were shown
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

function enqueuePacket(f) {
  if (!f.packet_id || seenPackets.has(f.packet_id)) return;
  seenPackets.add(f.packet_id);
  if (seenPackets.size > 5000) seenPackets.delete(seenPackets.values().next().value);
  queue.push({ ...f, kind: 'packet' });
  if (queue.length > 200) queue.shift();
  if (!busy) next();
}

function packetAlert(f) {
  const shares = Number(f.shares) || 1;
  return el('div', { class: 'alert packet', dataset: { packetId: f.packet_id } },
    el('div', { class: 'emoji' }, '🧧'),
    el('div', { class: 'who' }, (f.from && f.from.name) || 'Someone'),
    el('div', { class: 'what' }, 'dropped a red packet: ',
      el('span', { class: 'coins' }, `🪙 ${formatCoins(f.coins)}`),
      ` for ${shares} ${shares === 1 ? 'viewer' : 'viewers'}`),
    el('div', { class: 'cta' }, 'Grab it in the chat!'),
    f.message ? el('div', { class: 'msg' }, f.message) : null);
}

function show(alert, ms) {
  $('#stage').replaceChildren(alert);
  setTimeout(() => {
    alert.classList.add('leaving');
    setTimeout(() => {
      alert.remove();
      next();
    }, 450);
  }, ms);
}

function next() {
  const f = queue.shift();
  if (!f) {
    busy = false;
    document.body.dataset.alert = '';
    return;
  }
  busy = true;
  if (f.kind === 'packet') {
    shownPackets.push(f.packet_id);
    document.body.dataset.alert = `packet:${f.packet_id}`;
    show(packetAlert(f), PACKET_ALERT_SECS * 1000);
    return;
  }
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
  show(alert, s.alert_secs * 1000);
}

const socket = new RoomSocket({
  stream,
  onFrame(f) {
    if (f.type === 'joined' && f.catalog) catalog = indexCatalog(f.catalog);
    else if (f.type === 'shoutout') enqueue(f);
    else if (f.type === 'red_packet') enqueuePacket(f);
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
  shownPackets,
  dropSocket: (o) => socket.drop(o),
  reconnect: () => socket.reconnectNow(),
  state: () => ({ shown: [...shown], shownPackets: [...shownPackets], queuedPackets: queue.filter((q) => q.kind === 'packet').map((q) => q.packet_id), queued: queue.length, lastSeq: socket.lastSeq, conn: socket.state }),
});

fetchCatalog().then((c) => {
  if (!catalog.size) catalog = c;
  if (params.has('test')) {
    const first = [...catalog.values()].sort((a, b) => b.price - a.price)[0];
    enqueue({ gift_id: `sample-${Date.now()}`, _sample: true, from: { id: 'x', name: 'Test alert' }, sticker: first ? first.id : 'gift', count: 1, amount: 0, combo: 1, message: 'This is how alerts look on stream.' });
  }
}).catch(() => {});
socket.start();
