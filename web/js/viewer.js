// Viewer page: chat, balance, sticker gifts with an optional public question,
// shout-out animations by tier, pinned paid messages, combos, the streamer's thanks,
// red packets (drop one, grab a share).
import {
  $, el, fill, api, ApiError, fetchCatalog, indexCatalog, sticker, newGiftId, RoomSocket,
  describeStatus, rejectionText, packetRejectionText, grabRejectionText, formatCoins, userColor,
  timeOf, tsMs, loadSession, store, exposeHooks,
} from './common.js';

const SESSION_KEY = 'giftcast.viewer';
const PENDING_KEY = 'giftcast.pending';
const PENDING_PACKETS_KEY = 'giftcast.pending_packets';
const PACKET_COINS_MAX = 10_000_000;
const PACKET_SHARES_MAX = 100;
const PACKET_CARDS_MAX = 4; // red packet cards shown at once
const PACKET_LINGER_MS = 8000; // a closed card stays this long with its final state
const HISTORY_ON_LOAD = 50; // room events shown on arrival
const CHAT_MAX = 200; // chat lines kept on the page
const params = new URLSearchParams(location.search);
const stream = (params.get('stream') || 'demo').trim().slice(0, 64) || 'demo';

let session = loadSession(SESSION_KEY);
let catalog = new Map();
let balance = null;
let viewers = 0;
let selected = null; // sticker id
let count = 1;
let currentGift = null; // gift_id being sent from the sheet
let lastChat = '';
const pending = new Map(Object.entries(store.get(PENDING_KEY) || {})); // gift_id → {frame, stream}
let noticeTimer = null;
// Red packets: packet_id → {frame, stream, tries}, retried with the same id after a reconnect.
const pendingPackets = new Map(Object.entries(store.get(PENDING_PACKETS_KEY) || {}));
let currentPacket = null; // packet_id being dropped from the sheet
let packetSplit = 'random';
const packets = new Map(); // packet_id → card state (see onRedPacket)
const grabbing = new Map(); // packet_id → grab frame waiting for its answer
let clockSkew = 0; // server clock − ours, from live events' ts (for the countdowns)
let packetTicker = null;

// ---------- small UI helpers ----------

function toast(text, kind = '', ms = 3500) {
  const t = el('div', { class: `toast ${kind}`, role: 'status' }, text);
  $('#toasts').append(t);
  setTimeout(() => t.remove(), ms);
}

/** One notice line above the chat; `code` lets tests and later updates find it. */
function notice(code, kind, text, ms = 0) {
  const n = $('#notice');
  clearTimeout(noticeTimer);
  n.className = `notice ${kind}`;
  n.dataset.code = code;
  n.textContent = text;
  n.hidden = false;
  if (ms) noticeTimer = setTimeout(() => clearNotice(code), ms);
}

function clearNotice(code) {
  const n = $('#notice');
  if (!code || n.dataset.code === code) {
    n.hidden = true;
    n.dataset.code = '';
  }
}

function savePending() {
  store.set(PENDING_KEY, Object.fromEntries(pending));
}

function savePendingPackets() {
  store.set(PENDING_PACKETS_KEY, Object.fromEntries(pendingPackets));
}

function setBalance(b) {
  if (b == null) return;
  balance = Number(b);
  $('#balance-value').textContent = formatCoins(balance);
  $('#sheet-balance').textContent = formatCoins(balance);
  $('#account-balance').textContent = formatCoins(balance);
  $('#packet-balance').textContent = formatCoins(balance);
  $('#balance').dataset.value = String(balance);
  $('#balance').hidden = !session;
  renderStickers();
  updateGiftSummary();
  updatePacketSummary();
}

function setViewers(n) {
  viewers = Number(n) || 0;
  $('#viewer-count').textContent = formatCoins(viewers);
  $('#stage-viewers').textContent = formatCoins(viewers);
}

function setAuth() {
  const signedIn = !!session;
  document.body.dataset.auth = signedIn ? 'signed-in' : 'signed-out';
  $('#signin-bar').hidden = signedIn;
  $('#composer').hidden = !signedIn;
  $('#balance').hidden = !signedIn || balance == null;
  $('#account-btn').textContent = signedIn ? session.name : 'Sign in';
  $('#account-name').textContent = signedIn ? session.name : '';
}

// ---------- connection ----------

const socket = new RoomSocket({
  stream,
  since: null, // set from the room's seq before start, to show recent chat
  token: session ? session.token : null,
  onFrame,
  onStatus(s) {
    const d = describeStatus(s);
    const pill = $('#conn');
    pill.className = `pill ${d.kind}`;
    pill.textContent = d.text;
    document.body.dataset.conn = s.state;
    pill.dataset.attempt = String(s.attempt || 0);
    if (s.state === 'reconnecting') {
      const why = s.code === 4029 ? ' (too many connections)' : '';
      notice('reconnecting', 'warn', `Disconnected${why}. Reconnecting, attempt ${s.attempt}… Messages you miss will be caught up.`);
    }
  },
  onClose(ev) {
    if (ev.code === 4003 && session) {
      // Bad or expired token: fall back to read-only and ask for a new name.
      signOut('Your session expired. Pick a name to sign in again.');
    }
  },
});

function onFrame(f) {
  switch (f.type) {
    case 'joined': return onJoined(f);
    case 'chat': return addChat(f);
    case 'shoutout': return addShoutout(f);
    case 'thanks': return addThanks(f);
    case 'viewers': return setViewers(f.count);
    case 'gift_ok': return onGiftOk(f);
    case 'gift_rejected': return onGiftRejected(f);
    case 'red_packet': return onRedPacket(f);
    case 'grabbed': return onGrabbed(f);
    case 'red_packet_closed': return onPacketClosed(f);
    case 'red_packet_ok': return onPacketOk(f);
    case 'red_packet_rejected': return onPacketRejected(f);
    case 'grab_ok': return onGrabOk(f);
    case 'grab_rejected': return onGrabRejected(f);
    case 'error': return onError(f);
    case 'deleted': // a moderator deleted a chat message
      for (const n of document.querySelectorAll(`li[data-type="chat"][data-seq="${Number(f.target_seq)}"]`)) n.remove();
      return undefined;
    default: return undefined;
  }
}

function onJoined(f) {
  if (f.catalog) {
    catalog = indexCatalog(f.catalog);
    renderStickers();
  }
  if (f.viewers != null) setViewers(f.viewers);
  if (f.balance != null) setBalance(f.balance);
  setAuth();
  const r = f._resume;
  if (r.first) sys(`Welcome to ${stream}'s chat! Be kind; gifts with a message get pinned.`);
  if (r.reconnect) {
    if ($('#notice').dataset.code === 'reconnecting') notice('reconnected', 'ok', 'Reconnected.', 2500);
  } else {
    clearNotice('reconnecting');
  }
  if (r.reconnect) api(`/api/streams/${encodeURIComponent(stream)}`).then((i) => setLive(i && i.live)).catch(() => {});
  if (r.sent && !r.resumed && !r.first) {
    sys(r.epochChanged ? 'The stream restarted while you were away.' : 'You were away for a while; some older messages were skipped.');
  }
  // Retry gifts the socket dropped before their gift_ok, with the same ids.
  for (const [, p] of pending) {
    if (p.stream === stream && session) socket.send(p.frame);
  }
  // Same for red packets and grabs (a retry answers the same red_packet_ok / grab_ok).
  for (const [, p] of pendingPackets) {
    if (p.stream === stream && session) socket.send(p.frame);
  }
  for (const [, frame] of grabbing) {
    if (session) socket.send(frame);
  }
}

// ---------- chat rendering ----------

/** Append to the chat (at most CHAT_MAX lines); a MutationObserver keeps it scrolled. */
function chatAppend(node) {
  const chat = $('#chat');
  chat.append(node);
  while (chat.childElementCount > CHAT_MAX) chat.firstElementChild.remove();
}

function nameEl(from) {
  const id = from && from.id;
  return el('span', { class: 'name', style: `color:${userColor(id)}` }, (from && from.name) || 'someone');
}

function sys(text) {
  chatAppend(el('li', { class: 'sys' }, text));
}

function addChat(f) {
  const li = el('li', { class: 'msg', dataset: { seq: f.seq, type: 'chat' } },
    el('span', { class: 'time' }, timeOf(f.ts)), nameEl(f.from), el('span', { class: 'text' }, f.text ?? ''));
  if (session && f.from && f.from.id === session.user_id) li.classList.add('me');
  chatAppend(li);
}

function comboEl(combo) {
  return Number(combo) > 1 ? el('span', { class: 'combo' }, `x${combo} combo`) : null;
}

function addShoutout(f) {
  const s = sticker(catalog, f.sticker);
  const cnt = Number(f.count) || 1;
  const li = el('li', { class: `gift t${s.tier}`, dataset: { seq: f.seq, type: 'shoutout', giftId: f.gift_id } },
    el('span', { class: 'emoji' }, s.emoji),
    nameEl(f.from),
    el('span', { class: 'what' }, `sent ${cnt > 1 ? `${cnt}× ` : ''}${s.name}`),
    el('span', { class: 'amt' }, `🪙 ${formatCoins(f.amount)}`),
    comboEl(f.combo),
    el('span', { class: 'thanked-badge' }, '✓ thanked'),
    f.message ? el('span', { class: 'question' }, f.message) : null);
  chatAppend(li);
  const age = Date.now() - tsMs(f.ts);
  if (!f._replay || age < 15_000) animate(f, s);
  if (f.message && s.pin_secs > 0) {
    const left = f._replay ? s.pin_secs * 1000 - age : s.pin_secs * 1000;
    if (left > 500) pin(f, s, left);
  }
}

function addThanks(f) {
  const li = el('li', { class: 'thanks', dataset: { seq: f.seq, type: 'thanks', giftId: f.gift_id } },
    el('span', { class: 'emoji' }, '🙏'),
    el('strong', {}, `@${stream}`), ' thanked ', nameEl(f.to),
    f.text ? el('span', { class: 'quote' }, `“${f.text}”`) : null);
  if (session && f.to && f.to.id === session.user_id) {
    li.classList.add('me');
    if (!f._replay) toast(`🙏 ${stream} thanked you${f.text ? `: “${f.text}”` : '!'}`, 'ok', 5000);
  }
  chatAppend(li);
  for (const n of document.querySelectorAll('[data-gift-id]')) {
    if (n.dataset.giftId === f.gift_id && n.dataset.type !== 'thanks') n.classList.add('thanked');
  }
}

// ---------- shout-out animations (size and drama grow with the tier) ----------

function animate(f, s) {
  const fx = $('#fx');
  while (fx.childElementCount > 8) fx.firstElementChild.remove();
  const cnt = Number(f.count) || 1;
  const item = el('div', { class: `fx-item t${s.tier}` },
    el('span', { class: 'emoji' }, s.emoji),
    el('span', { class: 'line' }, `${(f.from && f.from.name) || 'someone'}${cnt > 1 ? ` ×${cnt}` : ''}`),
    comboEl(f.combo));
  // A combo streak replaces its previous bubble in place instead of piling up.
  const key = `${f.from && f.from.id}|${f.sticker}`;
  item.dataset.key = key;
  const prev = [...fx.children].find((n) => n.dataset.key === key);
  if (prev) {
    item.style.left = prev.style.left;
    item.style.top = prev.style.top;
    prev.remove();
  } else if (s.tier <= 2) {
    item.style.left = `${25 + Math.random() * 50}%`;
    item.style.top = `${40 + Math.random() * 30}%`;
  }
  item.addEventListener('animationend', () => item.remove());
  setTimeout(() => item.remove(), 8000);
  fx.append(item);
  const particles = s.tier >= 5 ? 28 : s.tier === 4 ? 14 : s.tier === 3 ? 6 : 0;
  for (let i = 0; i < particles; i++) {
    const a = Math.random() * Math.PI * 2;
    const r = 90 + Math.random() * (s.tier >= 5 ? 260 : 160);
    const p = el('span', {
      class: 'particle emoji',
      style: `--dx:${Math.cos(a) * r}px;--dy:${Math.sin(a) * r}px;--rot:${Math.round(Math.random() * 720 - 360)}deg;animation-delay:${Math.random() * 0.4}s`,
    }, i % 3 === 0 ? '✨' : s.emoji);
    p.addEventListener('animationend', () => p.remove());
    fx.append(p);
  }
}

// ---------- pinned paid messages (Super Chat rule: pinned for the sticker's pin_secs) ----------

function pin(f, s, ms) {
  const pins = $('#pins');
  const card = el('div', { class: `pin t${s.tier}`, dataset: { giftId: f.gift_id }, title: `pinned for ${s.pin_secs}s` },
    el('span', { class: 'emoji' }, s.emoji),
    el('span', { class: 'who' }, (f.from && f.from.name) || 'someone'),
    el('span', { class: 'amt' }, `🪙 ${formatCoins(f.amount)}`),
    el('span', { class: 'msg' }, f.message),
    el('span', { class: 'bar' }));
  pins.prepend(card);
  while (pins.childElementCount > 3) pins.lastElementChild.remove();
  pins.scrollLeft = 0; // the newest paid message first
  const bar = card.querySelector('.bar');
  bar.animate([{ transform: 'scaleX(1)' }, { transform: 'scaleX(0)' }], { duration: ms, easing: 'linear', fill: 'forwards' });
  setTimeout(() => card.remove(), ms);
}

// ---------- gifts ----------

function renderStickers() {
  const grid = $('#sticker-grid');
  const list = [...catalog.values()].sort((a, b) => a.price - b.price);
  if (!selected && list.length) selected = list[0].id;
  fill(grid, list.map((raw) => {
    const s = sticker(catalog, raw.id);
    const cant = balance != null && s.price > balance;
    return el('button', {
      type: 'button',
      class: `sticker${cant ? ' cant' : ''}`,
      'aria-pressed': String(s.id === selected),
      dataset: { sticker: s.id },
      title: `${s.name}: ${s.price} coins`,
      onclick: () => { selected = s.id; renderStickers(); updateGiftSummary(); },
    }, el('span', { class: 'emoji' }, s.emoji), el('span', { class: 'nm' }, s.name), el('span', { class: 'pr' }, `🪙 ${formatCoins(s.price)}`));
  }));
}

function readCount() {
  const n = Number($('#count-input').value);
  return Number.isInteger(n) && n >= 1 && n <= 99 ? n : null;
}

function updateGiftSummary() {
  count = readCount();
  for (const c of document.querySelectorAll('#count-row .chip')) c.setAttribute('aria-pressed', String(Number(c.dataset.count) === count));
  const msg = $('#gift-message').value;
  $('#msg-counter').textContent = `${[...msg].length}/200`;
  const btn = $('#gift-send');
  const err = $('#gift-error');
  if (!selected || !catalog.has(selected)) {
    btn.disabled = true;
    btn.textContent = 'Pick a sticker';
    return;
  }
  const s = sticker(catalog, selected);
  $('#pin-hint').textContent = s.pin_secs > 0
    ? (msg.trim() ? `📌 Your message stays pinned for ${s.pin_secs}s` : `Add a message to pin it for ${s.pin_secs}s`)
    : '';
  if (count == null) {
    btn.disabled = true;
    btn.textContent = 'Count must be 1–99';
    $('#gift-total').textContent = '–';
    return;
  }
  const total = s.price * count;
  $('#gift-total').textContent = formatCoins(total);
  if (currentGift && pending.has(currentGift)) {
    btn.disabled = true;
    btn.textContent = 'Sending…';
  } else if (balance != null && total > balance) {
    btn.disabled = true;
    btn.textContent = 'Not enough coins';
    showGiftError('insufficient_funds', `Not enough coins: this costs 🪙 ${formatCoins(total)}, you have 🪙 ${formatCoins(balance)}.`);
  } else {
    btn.disabled = false;
    btn.textContent = `Send ${s.emoji} ×${count}`;
    if (err.dataset.code === 'insufficient_funds' && err.dataset.source === 'local') err.hidden = true;
  }
}

function showGiftError(code, text, source = 'local') {
  const err = $('#gift-error');
  err.dataset.code = code;
  err.dataset.source = source;
  err.textContent = text;
  err.hidden = false;
}

/** Queue and send a gift; it is retried with the same id until gift_ok or a rejection. */
function sendGift(stickerId, cnt, message) {
  if (!session) {
    notice('read_only', 'warn', 'Sign in to send gifts.', 4000);
    return null;
  }
  const frame = { type: 'gift', gift_id: newGiftId(), sticker: stickerId, count: cnt };
  const m = (message || '').trim();
  if (m) frame.message = m;
  pending.set(frame.gift_id, { frame, stream });
  savePending();
  if (!socket.send(frame)) toast('Not connected: the gift will be sent when we reconnect.', 'warn');
  return frame.gift_id;
}

function onSendClick() {
  const msg = $('#gift-message').value;
  if ([...msg.trim()].length > 200) {
    showGiftError('invalid', 'Your message is over 200 characters.');
    return;
  }
  $('#gift-error').hidden = true;
  currentGift = sendGift(selected, readCount(), msg);
  updateGiftSummary();
}

function onGiftOk(f) {
  const p = pending.get(f.gift_id);
  pending.delete(f.gift_id);
  savePending();
  setBalance(f.balance);
  if (f.gift_id === currentGift) {
    currentGift = null;
    $('#gift-message').value = '';
    closeSheet('#gift-sheet');
    const s = sticker(catalog, p ? p.frame.sticker : selected);
    toast(`${s.emoji} Gift sent!`, 'ok', 2500);
  }
  updateGiftSummary();
}

function onGiftRejected(f) {
  const p = pending.get(f.gift_id);
  if (f.code === 'unavailable' && p) {
    // Nothing was debited; retry the same id shortly.
    setTimeout(() => { if (pending.has(f.gift_id)) socket.send(p.frame); }, 2000 + Math.random() * 2000);
    notice('unavailable', 'warn', rejectionText('unavailable'), 4000);
    return;
  }
  pending.delete(f.gift_id);
  savePending();
  if (f.balance != null) setBalance(f.balance);
  const text = rejectionText(f.code, f.balance);
  if (f.gift_id === currentGift) currentGift = null;
  showGiftError(f.code, text, 'server');
  notice(f.code, f.code === 'rate_limited' || f.code === 'insufficient_funds' ? 'warn' : 'bad', text, 8000);
  if (f.code === 'unauthorized') signOut(text);
  updateGiftSummary();
}

function onError(f) {
  switch (f.code) {
    case 'rate_limited':
      notice('rate_limited', 'warn', 'You are sending messages too fast. Wait a moment and try again.', 6000);
      if (!$('#chat-input').value) $('#chat-input').value = lastChat;
      break;
    case 'read_only':
      notice('read_only', 'warn', 'You are watching read-only. Pick a name to chat and send gifts.', 5000);
      break;
    case 'invalid':
      toast(f.message || 'That message was not valid.', 'bad');
      break;
    case 'lagged':
      notice('lagged', 'warn', 'Your connection fell behind; catching up…', 4000);
      break;
    case 'unauthorized':
      break; // the socket closes with 4003 next; onClose signs out
    default:
      toast(f.message || `Error: ${f.code}`, 'bad');
  }
}

// ---------- red packets ----------

function me() {
  return session ? session.user_id : null;
}

function serverNow() {
  return Date.now() + clockSkew;
}

function noteClock(f) {
  // Live events only: a replayed event's ts is old. Includes network latency (small).
  if (!f._replay && f.ts != null) clockSkew = tsMs(f.ts) - Date.now();
}

function countdownText(ms) {
  const s = Math.max(0, Math.ceil(ms / 1000));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

function packetChatLine(f, cls, ...children) {
  const li = el('li', { class: `packet-line ${cls}`, dataset: { seq: f.seq, type: f.type, packetId: f.packet_id } },
    el('span', { class: 'emoji' }, '🧧'), ...children);
  chatAppend(li);
  return li;
}

function onRedPacket(f) {
  noteClock(f);
  const shares = Number(f.shares) || 1;
  const li = packetChatLine(f, 'dropped', nameEl(f.from), 'dropped a red packet',
    el('span', { class: 'amt' }, `🪙 ${formatCoins(f.coins)}`),
    el('span', { class: 'small muted' }, ` · ${shares} ${shares === 1 ? 'share' : 'shares'}, ${f.split === 'equal' ? 'equal' : 'random'}`),
    f.message ? el('span', { class: 'question' }, f.message) : null);
  if (f.from && f.from.id === me()) li.classList.add('me');
  if (packets.has(f.packet_id)) return;
  const expiresAt = Number(f.expires_at) || 0;
  const p = {
    id: f.packet_id, from: f.from || {}, coins: f.coins, shares, split: f.split, message: f.message || '',
    expiresAt, left: shares, mine: null, state: 'open', note: '', card: null, closeTimer: null,
  };
  packets.set(p.id, p);
  if (expiresAt && expiresAt <= serverNow()) p.state = 'expired'; // replayed, already over
  if (p.state !== 'open' && f._replay) {
    packets.delete(p.id);
    return;
  }
  renderPacket(p);
  if (p.state !== 'open') lingerThenRemove(p);
  tickPackets();
}

function onGrabbed(f) {
  noteClock(f);
  const p = packets.get(f.packet_id);
  const mine = f.to && f.to.id === me();
  const li = packetChatLine(f, 'grab', nameEl(f.to), 'grabbed',
    el('span', { class: 'amt' }, `🪙 ${formatCoins(f.coins)}`),
    p ? el('span', { class: 'small muted' }, ` from ${p.from.name || 'someone'}'s red packet`) : ' from a red packet');
  if (mine) li.classList.add('me');
  if (!p) return;
  const left = Number(f.left);
  if (Number.isInteger(left)) p.left = Math.min(p.left, left);
  if (mine) p.mine = Number(f.coins); // also when our grab_ok was lost with a socket
  if (p.left <= 0 && p.state === 'open') {
    p.state = 'gone';
    lingerThenRemove(p, f._replay && p.mine == null ? 0 : PACKET_LINGER_MS); // history: over already
  }
  renderPacket(p);
}

function onPacketClosed(f) {
  const p = packets.get(f.packet_id);
  const refunded = Number(f.refunded) || 0;
  const owner = p ? p.from : null;
  packetChatLine(f, 'closed', owner ? nameEl(owner) : null,
    `${owner ? '’s red packet' : 'A red packet'} expired`,
    refunded > 0 ? el('span', { class: 'small muted' }, ` · 🪙 ${formatCoins(refunded)} went back to the sender`) : null);
  if (!p) return;
  if (p.state === 'open') p.state = 'expired';
  p.refunded = refunded;
  renderPacket(p);
  lingerThenRemove(p, f._replay ? 0 : PACKET_LINGER_MS);
  if (owner && owner.id === me() && !f._replay) refreshMe(); // our refund
}

function lingerThenRemove(p, ms = PACKET_LINGER_MS) {
  clearTimeout(p.closeTimer);
  p.closeTimer = setTimeout(() => {
    if (p.card) p.card.remove();
    p.card = null;
    if (packets.get(p.id) === p) packets.delete(p.id);
    grabbing.delete(p.id);
  }, ms);
}

/** (Re)build one packet's card in place: text only, never markup. */
function renderPacket(p) {
  const box = $('#packets');
  const now = serverNow();
  if (p.state === 'open' && p.expiresAt && p.expiresAt <= now) p.state = 'expired';
  const waiting = grabbing.has(p.id);
  let status = '';
  let statusKind = '';
  if (p.mine != null) {
    status = `You got ${formatCoins(p.mine)} ${p.mine === 1 ? 'coin' : 'coins'}!`;
    statusKind = 'ok';
  } else if (p.state === 'gone') {
    status = 'All shares are gone.';
    statusKind = 'bad';
  } else if (p.state === 'expired') {
    status = p.refunded ? `Expired: 🪙 ${formatCoins(p.refunded)} went back to ${p.from.name || 'the sender'}.` : 'Expired.';
    statusKind = 'bad';
  } else if (p.state === 'closed') {
    status = 'No longer available.';
    statusKind = 'bad';
  } else if (p.note) {
    status = p.note;
    statusKind = 'warn';
  }
  const canGrab = p.state === 'open' && p.mine == null;
  const button = canGrab
    ? el('button', {
      type: 'button', class: 'grab primary', disabled: waiting, 'aria-label': `grab ${p.from.name || 'someone'}'s red packet`,
      onclick: () => grab(p.id),
    }, waiting ? 'Grabbing…' : 'Grab')
    : null;
  const card = el('div', {
    class: `packet-card ${p.state}${p.mine != null ? ' won' : ''}`,
    dataset: { packetId: p.id, state: p.state, left: String(p.left), ...(p.mine != null ? { mine: String(p.mine) } : {}) },
  },
  el('span', { class: 'emoji env' }, '🧧'),
  el('div', { class: 'info' },
    el('div', { class: 'head' },
      el('span', { class: 'who', style: `color:${userColor(p.from.id)}` }, p.from.name || 'someone'),
      el('span', { class: 'muted' }, '’s red packet')),
    p.message ? el('div', { class: 'pmsg' }, p.message) : null,
    el('div', { class: 'meta' },
      el('span', { class: 'coins' }, `🪙 ${formatCoins(p.coins)}`),
      el('span', { class: 'left' }, `${p.left}/${p.shares} left`),
      p.state === 'open' && p.expiresAt ? el('span', { class: 'countdown', title: 'time left' }, `⏱ ${countdownText(p.expiresAt - now)}`) : null)),
  // Right column: the Grab button while it can be grabbed, else the outcome.
  button || el('div', { class: `pstatus ${statusKind}`, role: 'status' }, status),
  button && status ? el('div', { class: `pnote ${statusKind}`, role: 'status' }, status) : null);
  if (p.card && p.card.isConnected) {
    // A packet that is over (and not won by us) makes way for the ones still open.
    const over = p.state !== 'open' && p.mine == null && p.card.dataset.state === 'open';
    p.card.replaceWith(card);
    if (over) box.append(card);
  } else {
    box.prepend(card);
    // Too many: drop the oldest closed cards first, then the oldest.
    while (box.childElementCount > PACKET_CARDS_MAX) {
      const cards = [...box.children];
      const victim = cards.reverse().find((c) => c.dataset.state !== 'open') || box.lastElementChild;
      const old = packets.get(victim.dataset.packetId);
      if (old) old.card = null;
      victim.remove();
    }
    box.scrollLeft = 0;
  }
  p.card = card;
}

/** One timer for every countdown; it stops when no card is open. */
function tickPackets() {
  if (packetTicker) return;
  packetTicker = setInterval(() => {
    let open = 0;
    const now = serverNow();
    for (const p of packets.values()) {
      if (p.state !== 'open' || !p.card) continue;
      if (p.expiresAt && p.expiresAt <= now) {
        p.state = 'expired'; // the server's red_packet_closed follows with the refund
        renderPacket(p);
        lingerThenRemove(p);
        continue;
      }
      open += 1;
      const c = p.card.querySelector('.countdown');
      if (c) c.textContent = `⏱ ${countdownText(p.expiresAt - now)}`;
    }
    if (!open) {
      clearInterval(packetTicker);
      packetTicker = null;
    }
  }, 1000);
}

function grab(packetId) {
  if (!session) {
    notice('read_only', 'warn', 'Sign in to grab red packets.', 4000);
    $('#name-input').focus();
    return;
  }
  const p = packets.get(packetId);
  const frame = { type: 'grab', packet_id: packetId };
  grabbing.set(packetId, frame);
  if (p) {
    p.note = '';
    renderPacket(p);
  }
  if (!socket.send(frame)) toast('Not connected: we will grab it when we reconnect.', 'warn');
}

function onGrabOk(f) {
  grabbing.delete(f.packet_id);
  setBalance(f.balance);
  const p = packets.get(f.packet_id);
  const coins = Number(f.coins) || 0;
  if (p) {
    p.mine = coins;
    renderPacket(p);
  }
  toast(`🧧 You got ${formatCoins(coins)} ${coins === 1 ? 'coin' : 'coins'}!`, 'ok', 4000);
}

function onGrabRejected(f) {
  grabbing.delete(f.packet_id);
  const text = grabRejectionText(f.code);
  if (f.code === 'unauthorized') {
    if (session) signOut('Your session expired. Pick a name to sign in again.');
    return;
  }
  const p = packets.get(f.packet_id);
  if (p) {
    if (f.code === 'gone') p.state = 'gone';
    else if (f.code === 'expired') p.state = 'expired';
    else if (f.code === 'not_found' || f.code === 'invalid') p.state = 'closed';
    else p.note = text; // rate_limited, unavailable: may try again
    if (p.state !== 'open') lingerThenRemove(p);
    renderPacket(p);
  } else {
    toast(text, 'bad');
  }
}

function readInt(sel, min, max) {
  const raw = $(sel).value.trim();
  if (!/^\d+$/.test(raw)) return null;
  const n = Number(raw);
  return Number.isSafeInteger(n) && n >= min && n <= max ? n : null;
}

function showPacketError(code, text, source = 'local') {
  const err = $('#packet-error');
  err.dataset.code = code;
  err.dataset.source = source;
  err.textContent = text;
  err.hidden = false;
}

function updatePacketSummary() {
  const coins = readInt('#packet-coins', 1, PACKET_COINS_MAX);
  const shares = readInt('#packet-shares', 1, PACKET_SHARES_MAX);
  const msg = $('#packet-message').value;
  $('#packet-counter').textContent = `${[...msg].length}/200`;
  for (const c of document.querySelectorAll('#split-row .chip')) {
    const on = String(c.dataset.split === packetSplit);
    c.setAttribute('aria-pressed', on);
    c.setAttribute('aria-checked', on);
  }
  $('#packet-total').textContent = coins == null ? '–' : formatCoins(coins);
  const btn = $('#packet-send');
  const err = $('#packet-error');
  const hint = $('#packet-hint');
  hint.textContent = '';
  let why = null;
  if (currentPacket && pendingPackets.has(currentPacket)) why = 'Dropping…';
  else if (coins == null) why = `Coins must be 1–${formatCoins(PACKET_COINS_MAX)}`;
  else if (shares == null) why = `Shares must be 1–${PACKET_SHARES_MAX}`;
  else if (shares > coins) why = 'Each share needs a coin';
  else if (balance != null && coins > balance) {
    why = 'Not enough coins';
    showPacketError('insufficient_funds', `Not enough coins: this packet holds 🪙 ${formatCoins(coins)}, you have 🪙 ${formatCoins(balance)}.`);
  }
  if (coins != null && shares != null && shares <= coins) {
    const each = Math.floor(coins / shares);
    // Shares split what is left after the stream's cut (if the server takes one): "about".
    hint.textContent = packetSplit === 'equal'
      ? `about 🪙 ${formatCoins(each)} each`
      : `by luck, about 🪙 ${formatCoins(each)} on average`;
  }
  btn.disabled = why != null;
  btn.textContent = why ?? `Drop 🧧 ${formatCoins(coins)}`;
  if (why !== 'Not enough coins' && err.dataset.code === 'insufficient_funds' && err.dataset.source === 'local') err.hidden = true;
}

/** Queue and send a red packet; retried with the same id until red_packet_ok or a rejection. */
function sendRedPacket(coins, shares, split = 'random', message = '') {
  if (!session) {
    notice('read_only', 'warn', 'Sign in to drop red packets.', 4000);
    return null;
  }
  const frame = { type: 'red_packet', packet_id: newGiftId(), coins, shares, split: split === 'equal' ? 'equal' : 'random' };
  const m = (message || '').trim();
  if (m) frame.message = m;
  pendingPackets.set(frame.packet_id, { frame, stream, tries: 0 });
  savePendingPackets();
  if (!socket.send(frame)) toast('Not connected: the red packet will be sent when we reconnect.', 'warn');
  return frame.packet_id;
}

function onPacketSubmit(e) {
  e.preventDefault();
  updatePacketSummary();
  if ($('#packet-send').disabled) return;
  const msg = $('#packet-message').value;
  if ([...msg.trim()].length > 200) {
    showPacketError('invalid', 'Your message is over 200 characters.');
    return;
  }
  $('#packet-error').hidden = true;
  currentPacket = sendRedPacket(readInt('#packet-coins', 1, PACKET_COINS_MAX), readInt('#packet-shares', 1, PACKET_SHARES_MAX), packetSplit, msg);
  updatePacketSummary();
}

function onPacketOk(f) {
  pendingPackets.delete(f.packet_id);
  savePendingPackets();
  setBalance(f.balance);
  if (f.packet_id === currentPacket) {
    currentPacket = null;
    $('#packet-message').value = '';
    closeSheet('#packet-sheet');
    toast('🧧 Red packet dropped!', 'ok', 2500);
  }
  updatePacketSummary();
}

function onPacketRejected(f) {
  const p = pendingPackets.get(f.packet_id);
  if (f.code === 'unavailable' && p && p.tries < 3) {
    // Nothing was debited; retry the same id shortly (a few times: in cluster mode it stays off).
    p.tries += 1;
    savePendingPackets();
    setTimeout(() => { if (pendingPackets.has(f.packet_id)) socket.send(p.frame); }, 2000 + Math.random() * 2000);
    return;
  }
  pendingPackets.delete(f.packet_id);
  savePendingPackets();
  if (f.balance != null) setBalance(f.balance);
  const text = packetRejectionText(f.code, f.balance);
  if (f.packet_id === currentPacket) currentPacket = null;
  showPacketError(f.code, text, 'server');
  notice(`packet_${f.code}`, f.code === 'rate_limited' || f.code === 'insufficient_funds' ? 'warn' : 'bad', text, 8000);
  if (f.code === 'unauthorized') signOut(text);
  updatePacketSummary();
}

// ---------- sheets ----------

function openSheet(id) {
  $(id).hidden = false;
}
function closeSheet(id) {
  $(id).hidden = true;
}

// ---------- sign in / out ----------

async function signIn(name) {
  const btn = $('#signin-btn');
  btn.disabled = true;
  try {
    const r = await api('/api/guest', { method: 'POST', body: { name } });
    session = { token: r.token, user_id: r.user_id, name: r.name ?? name, role: r.role ?? 'viewer' };
    store.set(SESSION_KEY, session);
    setAuth();
    clearNotice('read_only');
    socket.setToken(session.token);
    refreshMe();
  } catch (e) {
    const msg = e instanceof ApiError && (e.status === 403 || e.status === 404)
      ? 'Guest sign-up is off on this server.'
      : e.status === 429 ? 'Too many sign-ups right now; try again in a minute.' : `Could not sign in: ${e.message}`;
    notice('signin_failed', 'bad', msg, 6000);
  } finally {
    btn.disabled = false;
  }
}

async function refreshMe() {
  if (!session) return;
  try {
    const me = await api('/api/me', { token: session.token });
    if (me && me.balance != null) setBalance(me.balance);
    setAuth();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) signOut('Your session expired. Pick a name to sign in again.');
  }
}

function signOut(reason) {
  session = null;
  balance = null;
  currentGift = null;
  currentPacket = null;
  store.del(SESSION_KEY);
  pending.clear();
  savePending();
  pendingPackets.clear();
  savePendingPackets();
  grabbing.clear();
  for (const p of packets.values()) if (p.card) renderPacket(p);
  setAuth();
  closeSheet('#gift-sheet');
  closeSheet('#packet-sheet');
  closeSheet('#account-sheet');
  if (socket.token) socket.setToken(null);
  if (reason) notice('signed_out', 'warn', reason, 8000);
}

// ---------- wiring ----------

function wire() {
  // Keep the chat pinned to its newest line when pins or the keyboard change its height.
  // `stick` follows the reader: scrolled up to read, we leave them there.
  const chat = $('#chat');
  let stick = true;
  let autoAt = 0;
  chat.addEventListener('scroll', () => {
    stick = chat.scrollHeight - chat.scrollTop - chat.clientHeight < 80 || Date.now() - autoAt < 150;
  });
  const toBottom = () => {
    if (!stick) return;
    autoAt = Date.now();
    chat.scrollTop = chat.scrollHeight;
  };
  new ResizeObserver(toBottom).observe(chat);
  new MutationObserver(toBottom).observe(chat, { childList: true });
  if (document.fonts) document.fonts.addEventListener('loadingdone', toBottom);

  $('#stream-name').textContent = stream;
  $('#stage-title').textContent = stream;
  document.title = `${stream} · giftcast`;
  $('#stream-input').value = stream;

  $('#signin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const name = $('#name-input').value.trim();
    if (name) signIn(name);
  });
  $('#account-btn').addEventListener('click', () => {
    if (session) openSheet('#account-sheet');
    else $('#name-input').focus();
  });
  $('#account-close').addEventListener('click', () => closeSheet('#account-sheet'));
  $('#signout-btn').addEventListener('click', () => signOut());
  $('#stream-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const s = $('#stream-input').value.trim();
    if (s) location.search = `?stream=${encodeURIComponent(s)}`;
  });

  $('#composer').addEventListener('submit', (e) => {
    e.preventDefault();
    const input = $('#chat-input');
    const text = input.value.trim();
    if (!text) return;
    if ([...text].length > 500) {
      toast('Messages are at most 500 characters.', 'bad');
      return;
    }
    if (!socket.send({ type: 'chat', text })) {
      toast('Not connected: your message was not sent.', 'warn');
      return;
    }
    lastChat = text;
    input.value = '';
  });

  $('#gift-btn').addEventListener('click', () => {
    if (!session) return;
    $('#gift-error').hidden = true;
    renderStickers();
    updateGiftSummary();
    openSheet('#gift-sheet');
  });
  $('#gift-close').addEventListener('click', () => closeSheet('#gift-sheet'));
  for (const id of ['#gift-sheet', '#account-sheet', '#packet-sheet']) {
    $(id).addEventListener('click', (e) => { if (e.target === $(id)) closeSheet(id); });
  }
  addEventListener('keydown', (e) => {
    if (e.key === 'Escape') { closeSheet('#gift-sheet'); closeSheet('#account-sheet'); closeSheet('#packet-sheet'); }
  });

  $('#packet-btn').addEventListener('click', () => {
    if (!session) return;
    $('#packet-error').hidden = true;
    updatePacketSummary();
    openSheet('#packet-sheet');
  });
  $('#packet-close').addEventListener('click', () => closeSheet('#packet-sheet'));
  for (const c of document.querySelectorAll('#split-row .chip')) {
    c.addEventListener('click', () => { packetSplit = c.dataset.split; updatePacketSummary(); });
  }
  for (const id of ['#packet-coins', '#packet-shares', '#packet-message']) $(id).addEventListener('input', updatePacketSummary);
  $('#packet-form').addEventListener('submit', onPacketSubmit);
  for (const c of document.querySelectorAll('#count-row .chip')) {
    c.addEventListener('click', () => { $('#count-input').value = c.dataset.count; updateGiftSummary(); });
  }
  $('#count-input').addEventListener('input', updateGiftSummary);
  $('#gift-message').addEventListener('input', updateGiftSummary);
  $('#gift-send').addEventListener('click', onSendClick);
}

exposeHooks({
  socket,
  dropSocket: (opts) => socket.drop(opts),
  reconnect: () => socket.reconnectNow(),
  sendGift: (stickerId, cnt = 1, message) => sendGift(stickerId, cnt, message),
  sendRedPacket: (coins, shares, split, message) => sendRedPacket(coins, shares, split, message),
  grab: (packetId) => grab(packetId),
  state: () => ({
    balance, viewers, lastSeq: socket.lastSeq, pending: [...pending.keys()], conn: socket.state,
    pendingPackets: [...pendingPackets.keys()], grabbing: [...grabbing.keys()],
    packets: [...packets.values()].map((p) => ({ id: p.id, left: p.left, state: p.state, mine: p.mine })),
  }),
});

wire();
setAuth();
if (!session) $('#balance').hidden = true;
fetchCatalog().then((c) => {
  if (!catalog.size) {
    catalog = c;
    renderStickers();
  }
}).catch(() => {});
refreshMe();
/** Offline streams show it; while offline we look again now and then. */
let liveTimer = null;
function setLive(live) {
  document.body.dataset.live = String(live !== false);
  clearTimeout(liveTimer);
  if (live === false) {
    liveTimer = setTimeout(() => api(`/api/streams/${encodeURIComponent(stream)}`).then((i) => setLive(i && i.live)).catch(() => setLive(false)), 30_000);
  }
}

// Show the room's last few events on arrival, like a chat's scroll-back.
api(`/api/streams/${encodeURIComponent(stream)}`)
  .then((info) => {
    setLive(info && info.live);
    const seq = Number(info && info.seq);
    if (Number.isInteger(seq) && seq > 0) socket.firstSince = Math.max(0, seq - HISTORY_ON_LOAD);
  })
  .catch((e) => {
    if (e instanceof ApiError && e.status === 404) notice('not_found', 'bad', `There is no stream called “${stream}”.`);
  })
  .finally(() => socket.start());
