// Shared code of the giftcast pages: DOM helpers (text only, never innerHTML),
// HTTP API calls, the room WebSocket with reconnect + `since` resume, formatting.

// ---------- DOM ----------

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

/**
 * Build an element. Children that are strings become text nodes, so user text
 * can never turn into markup. Attributes: class, text, dataset, style, on<event>.
 */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = String(v);
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k === 'style') e.style.cssText = v;
    else if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

/** Replace all children of `node` (text-safe). */
export function fill(node, ...children) {
  node.replaceChildren();
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

/** A stable, pleasant colour for a user id (chat names). */
export function userColor(id) {
  let h = 0;
  for (const ch of String(id ?? '')) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return `hsl(${h % 360} 75% 70%)`;
}

/** Keep a scrolling list pinned to the bottom if the user was already there. */
export function appendScrolled(list, node, max = 200) {
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  list.append(node);
  while (list.childElementCount > max) list.firstElementChild.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

// ---------- storage ----------

export const store = {
  get(key) {
    try { return JSON.parse(localStorage.getItem(key)); } catch { return null; }
  },
  set(key, value) {
    try { localStorage.setItem(key, JSON.stringify(value)); } catch { /* private mode */ }
  },
  del(key) {
    try { localStorage.removeItem(key); } catch { /* ignore */ }
  },
};

/** Claims of a JWT, without verifying it (the server does that). */
export function decodeJwt(token) {
  try {
    const part = String(token).split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const bin = atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return null;
  }
}

/** A stored session {token, user_id, name, role, stream}, or null when missing/expired. */
export function loadSession(key) {
  const s = store.get(key);
  if (!s || typeof s.token !== 'string') return null;
  const claims = decodeJwt(s.token);
  if (claims && typeof claims.exp === 'number' && claims.exp * 1000 < Date.now() + 30_000) {
    store.del(key);
    return null;
  }
  return s;
}

export function sessionFromToken(token, extra = {}) {
  const c = decodeJwt(token) || {};
  return {
    token,
    user_id: extra.user_id ?? c.sub,
    name: extra.name ?? c.name ?? c.sub,
    role: extra.role ?? c.role ?? 'viewer',
    stream: extra.stream ?? (c.role === 'streamer' ? c.sub : undefined),
  };
}

// ---------- HTTP API ----------

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * Call the JSON API. `exactInts`: keys whose integer values are kept as decimal
 * strings (parsed before JSON.parse could round them through a float).
 */
export async function api(path, { method = 'GET', token, body, exactInts } = {}) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (token) headers.Authorization = `Bearer ${token}`;
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
  } catch {
    throw new ApiError(0, 'network', 'Cannot reach the server');
  }
  const text = await res.text();
  let data = null;
  if (text) {
    let src = text;
    if (exactInts && exactInts.length) {
      const re = new RegExp(`"(${exactInts.join('|')})"\\s*:\\s*(-?\\d+)(?=\\s*[,}\\]])`, 'g');
      src = text.replace(re, '"$1":"$2"');
    }
    try { data = JSON.parse(src); } catch { data = null; }
  }
  if (!res.ok) {
    const e = data && data.error;
    throw new ApiError(res.status, (e && e.code) || `http_${res.status}`, (e && e.message) || res.statusText || 'Request failed');
  }
  return data;
}

let catalogPromise = null;
/** The sticker catalog as a Map id → sticker (fetched once per page). */
export function fetchCatalog() {
  catalogPromise ??= api('/api/catalog').then((c) => indexCatalog(c));
  return catalogPromise;
}

export function indexCatalog(catalog) {
  // Accepts {"stickers":[…]} (GET /api/catalog) or a bare array of stickers.
  const list = Array.isArray(catalog) ? catalog : (catalog && Array.isArray(catalog.stickers)) ? catalog.stickers : [];
  return new Map(list.map((s) => [s.id, s]));
}

/** Sticker by id, with sane defaults for fields a catalog may lack. */
export function sticker(catalog, id) {
  const s = (catalog && catalog.get(id)) || {};
  // A shout-out may carry its own tier; the catalog decides when both are present.
  return {
    id,
    name: s.name ?? id,
    emoji: s.emoji ?? '🎁',
    price: Number(s.price ?? 0),
    tier: Math.min(5, Math.max(1, Number(s.tier ?? 1) || 1)),
    pin_secs: Math.max(0, Number(s.pin_secs ?? 0) || 0),
    alert_secs: Math.max(1, Number(s.alert_secs ?? 5) || 5),
  };
}

// ---------- ids, time, numbers ----------

const GIFT_ID_RE = /^[A-Za-z0-9_-]{1,64}$/;

/** A fresh client gift id: a UUID without braces (or 32 random hex digits). */
export function newGiftId() {
  let id;
  if (globalThis.crypto && typeof crypto.randomUUID === 'function') {
    id = crypto.randomUUID();
  } else {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    id = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  }
  if (!GIFT_ID_RE.test(id)) throw new Error('bad gift id');
  return id;
}

/** Event `ts` in milliseconds (accepts seconds or milliseconds). */
export function tsMs(ts) {
  const n = Number(ts);
  if (!Number.isFinite(n) || n <= 0) return Date.now();
  return n < 1e11 ? n * 1000 : n;
}

export function timeOf(ts) {
  return new Date(tsMs(ts)).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

export function toBig(v) {
  if (typeof v === 'bigint') return v;
  if (v == null || v === '') return 0n;
  if (typeof v === 'number') return BigInt(Math.trunc(v));
  const s = String(v).trim();
  return /^-?\d+$/.test(s) ? BigInt(s) : 0n;
}

function groupDigits(s) {
  return s.replace(/\B(?=(\d{3})+(?!\d))/g, ',');
}

/** Whole coins, grouped: 1234567 → "1,234,567". Exact for any integer. */
export function formatCoins(v) {
  const b = toBig(v);
  return (b < 0n ? '-' : '') + groupDigits((b < 0n ? -b : b).toString());
}

/**
 * An amount in units of 1/unit coin as coins with exactly log10(unit) decimals,
 * by integer math only: (30000, 10000) → "3.0000", (5, 10000) → "0.0005".
 */
export function formatUnits(units, unit = 10000) {
  const u = toBig(units);
  const d = toBig(unit);
  if (d <= 0n) return u.toString();
  const decimals = d.toString().length - 1;
  const neg = u < 0n;
  const a = neg ? -u : u;
  const whole = a / d;
  let frac = a % d;
  // A unit that is not a power of ten still gets `decimals` digits, truncated.
  if (d !== 10n ** BigInt(decimals)) frac = (frac * 10n ** BigInt(decimals)) / d;
  const fracStr = decimals ? '.' + frac.toString().padStart(decimals, '0') : '';
  return (neg ? '-' : '') + groupDigits(whole.toString()) + fracStr;
}

// ---------- WebSocket room client ----------

// Answers to one connection (some carry the room seq of their event, e.g. red_packet_ok):
// never deduplicated by seq nor counted as room events.
const NON_ROOM = new Set(['joined', 'gift_ok', 'gift_rejected', 'red_packet_ok', 'red_packet_rejected',
  'grab_ok', 'grab_rejected', 'error', 'pong', 'viewers', 'batch']);

/**
 * One room connection that never gives up: reconnects with backoff and rejoins
 * with `since` = the last room seq it delivered, so no event is missed or
 * delivered twice (room events are deduplicated by seq). Accepts single frames
 * and {"type":"batch","events":[…]}.
 *
 * Callbacks: onFrame(frame) for every frame after dedupe (joined included),
 * onStatus({state, attempt, code, reason}), onClose(closeEvent).
 */
export class RoomSocket {
  constructor({ stream, token = null, since = null, onFrame, onStatus, onClose }) {
    this.stream = stream;
    this.token = token;
    this.onFrame = onFrame || (() => {});
    this.onStatus = onStatus || (() => {});
    this.onClose = onClose || (() => {});
    this.ws = null;
    this.lastSeq = 0; // last room seq delivered to the page
    this.epoch = null;
    this.attempt = 0;
    this.state = 'idle';
    this.hold = false;
    this.stopped = false;
    this.retryTimer = null;
    this.pingTimer = null;
    this.joinTimer = null;
    this.lastHeard = 0;
    this.joins = 0;
    this.gaps = 0;
    this.replayUntil = 0;
    // Optional `since` for the very first join (to show recent history on load).
    this.firstSince = Number.isInteger(since) && since >= 0 ? since : null;
    this.started = false;
    addEventListener('online', () => {
      if (this.state === 'reconnecting' && !this.hold) this.reconnectNow();
    });
    // The browser knows the network is gone: say so now rather than after a timeout.
    addEventListener('offline', () => {
      if (this.ws && !this.stopped) this.drop({ hold: this.hold });
    });
    // A phone that slept may hold a dead socket: check it when the page is back.
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState !== 'visible' || !this.ws) return;
      if (this.state === 'live' && Date.now() - this.lastHeard > 45_000) this.drop();
      else if (this.state === 'live') this.send({ type: 'ping', t: Date.now() });
    });
  }

  get live() {
    return this.state === 'live';
  }

  start() {
    if (this.started) return this;
    this.started = true;
    this.stopped = false;
    this._connect();
    return this;
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this._closeWs(1000, 'bye');
    this._status('closed');
  }

  /** Switch identity: reconnect with the new token, resuming where we were. */
  setToken(token) {
    this.token = token || null;
    if (this.stopped || !this.started) return;
    this._closeWs(1000, 'switching identity');
    clearTimeout(this.retryTimer);
    this._connect();
  }

  /** Send a frame if the room is joined; returns whether it was sent. */
  send(frame) {
    if (!this.ws || this.state !== 'live' || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /**
   * Test/debug hook: drop the connection as a network failure would.
   * hold: stay disconnected until reconnectNow(); rewindTo: pretend we last saw
   * this seq (forces a replay, to exercise the pages' own deduplication).
   */
  drop({ hold = false, rewindTo } = {}) {
    this.hold = !!hold;
    if (typeof rewindTo === 'number') this.lastSeq = rewindTo;
    const ws = this.ws;
    if (ws) {
      this.ws = null;
      this._teardown(ws);
      try { ws.close(4000, 'dropped'); } catch { /* ignore */ }
      this._afterClose({ code: 1006, reason: 'dropped', wasClean: false });
    }
  }

  reconnectNow() {
    this.hold = false;
    clearTimeout(this.retryTimer);
    if (!this.ws && !this.stopped) this._connect();
  }

  _status(state, extra = {}) {
    this.state = state;
    this.onStatus({ state, attempt: this.attempt, ...extra });
  }

  _connect() {
    clearTimeout(this.retryTimer);
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let ws;
    try {
      ws = new WebSocket(`${proto}//${location.host}/ws`);
    } catch {
      this._afterClose({ code: 1006, reason: 'cannot connect' });
      return;
    }
    this.ws = ws;
    this._status(this.attempt ? 'reconnecting' : 'connecting');
    ws.onopen = () => {
      if (this.ws !== ws) return;
      const join = { type: 'join', stream: this.stream };
      if (this.token) join.token = this.token;
      this.sentSince = this.joins > 0 || this.firstSince != null;
      if (this.joins === 0 && this.firstSince != null) this.lastSeq = this.firstSince;
      if (this.sentSince) join.since = this.lastSeq;
      ws.send(JSON.stringify(join));
      this.lastHeard = Date.now();
      this.joinTimer = setTimeout(() => {
        if (this.ws === ws && this.state !== 'live') this.drop();
      }, 10_000);
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastHeard = Date.now();
      let msg;
      try { msg = JSON.parse(ev.data); } catch { return; }
      if (!msg || typeof msg !== 'object') return;
      const frames = msg.type === 'batch' && Array.isArray(msg.events) ? msg.events : [msg];
      for (const f of frames) {
        if (f && typeof f === 'object') this._handle(f);
      }
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this._teardown(ws);
      this._afterClose(ev);
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  _teardown() {
    clearTimeout(this.joinTimer);
    clearInterval(this.pingTimer);
  }

  _closeWs(code, reason) {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    this._teardown(ws);
    try { ws.close(code, reason); } catch { /* ignore */ }
  }

  _afterClose(ev) {
    this.onClose(ev);
    if (this.stopped) return;
    if (this.hold) {
      this.attempt += 1;
      this._status('reconnecting', { code: ev.code, reason: ev.reason, held: true });
      return;
    }
    this.attempt += 1;
    let delay = Math.min(10_000, 400 * 2 ** Math.min(this.attempt - 1, 5));
    if (ev.code === 4029) delay = Math.max(delay, 5_000);
    delay = Math.round(delay * (0.8 + Math.random() * 0.4));
    this._status('reconnecting', { code: ev.code, reason: ev.reason, delay });
    this.retryTimer = setTimeout(() => this._connect(), delay);
  }

  _handle(f) {
    if (f.type === 'joined') {
      const epochChanged = this.epoch != null && f.epoch != null && f.epoch !== this.epoch;
      const resumed = this.sentSince && !epochChanged && f.resumed !== false;
      this.replayUntil = this.sentSince ? Number(f.seq) || 0 : 0;
      if (epochChanged) this.lastSeq = 0; // new server run: seqs restarted
      else if (!this.sentSince) this.lastSeq = Number(f.seq) || 0;
      if (f.epoch != null) this.epoch = f.epoch;
      this.joins += 1;
      clearTimeout(this.joinTimer);
      const ws = this.ws;
      clearInterval(this.pingTimer);
      this.pingTimer = setInterval(() => {
        if (this.ws !== ws) return;
        if (Date.now() - this.lastHeard > 60_000) {
          this.drop(); // silent for too long: a dead connection the OS has not noticed
          return;
        }
        this.send({ type: 'ping', t: Date.now() });
      }, 20_000);
      const wasReconnect = this.attempt > 0;
      const first = this.joins === 1;
      this.attempt = 0;
      this._status('live');
      this.onFrame({ ...f, _resume: { sent: this.sentSince, resumed, epochChanged, reconnect: wasReconnect, first } });
      return;
    }
    if (typeof f.seq === 'number' && !NON_ROOM.has(f.type)) {
      if (f.seq <= this.lastSeq) return; // seen already (replay overlap)
      if (this.lastSeq > 0 && f.seq > this.lastSeq + 1) this.gaps += 1;
      this.lastSeq = f.seq;
      if (f.seq <= this.replayUntil) f._replay = true;
    }
    this.onFrame(f);
  }
}

/** Connection status → {text, kind} for a pill. */
export function describeStatus(s) {
  switch (s.state) {
    case 'live': return { text: 'Live', kind: 'ok' };
    case 'connecting': return { text: 'Connecting…', kind: 'warn' };
    case 'reconnecting':
      return { text: `${s.held ? 'Disconnected' : 'Reconnecting'} #${s.attempt}`, kind: 'bad' };
    case 'closed': return { text: 'Closed', kind: 'bad' };
    default: return { text: 'Idle', kind: 'warn' };
  }
}

/** Human text for a gift rejection code. */
export function rejectionText(code, balance) {
  const bal = balance != null ? ` You have 🪙 ${formatCoins(balance)}.` : '';
  switch (code) {
    case 'insufficient_funds': return `Not enough coins for that gift.${bal}`;
    case 'rate_limited': return 'Slow down: too many gifts, try again in a moment.';
    case 'unknown_sticker': return 'That sticker is no longer available.';
    case 'invalid': return 'That gift was not valid.';
    case 'conflict': return 'That gift id was already used for another gift.';
    case 'unauthorized': return 'Your session expired. Please sign in again.';
    case 'not_found': return 'This stream is not live, so it cannot take gifts right now.';
    case 'unavailable': return 'Gifts are briefly unavailable; retrying…';
    default: return `Gift rejected (${code}).`;
  }
}

/** Human text for a red packet rejection code (red_packet_rejected). */
export function packetRejectionText(code, balance) {
  const bal = balance != null ? ` You have 🪙 ${formatCoins(balance)}.` : '';
  switch (code) {
    case 'insufficient_funds': return `Not enough coins for that red packet.${bal}`;
    case 'rate_limited': return 'Slow down: too many gifts, try again in a moment.';
    case 'invalid': return 'That red packet was not valid: every share needs at least one coin.';
    case 'conflict': return 'That red packet id was already used for another packet.';
    case 'unauthorized': return 'Your session expired. Please sign in again.';
    case 'not_found': return 'This stream is not live, so it cannot take red packets right now.';
    case 'unavailable': return 'Red packets are unavailable right now.';
    default: return `Red packet rejected (${code}).`;
  }
}

/** Human text for a grab rejection code (grab_rejected). */
export function grabRejectionText(code) {
  switch (code) {
    case 'gone': return 'Too late: all shares are gone.';
    case 'expired': return 'This red packet has expired.';
    case 'not_found': return 'This red packet is no longer available.';
    case 'unauthorized': return 'Sign in to grab red packets.';
    case 'rate_limited': return 'Slow down: try again in a moment.';
    case 'unavailable': return 'Red packets are unavailable right now.';
    case 'invalid': return 'That red packet is not valid.';
    default: return `Could not grab it (${code}).`;
  }
}

/** Expose test/debug hooks on window.__giftcast (merged across modules). */
export function exposeHooks(hooks) {
  window.__giftcast = Object.assign(window.__giftcast || {}, hooks);
}
