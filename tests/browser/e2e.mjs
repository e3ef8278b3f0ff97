// End-to-end test of the giftcast web pages in headless Chromium (system /usr/bin/chromium).
//
//   BASE_URL=http://127.0.0.1:18080 ADMIN_TOKEN=... ARTIFACTS=/tmp/shots node tests/browser/e2e.mjs
//
// Optional: CHAT_RATE (the server's --chat-rate, default 60; 0 skips the rate-limit check),
// SPLIT (the server's --split), CHROMIUM (browser binary, default /usr/bin/chromium).
//
// A streamer (dashboard), a viewer, a second viewer and an OBS overlay, each in its own
// browser context. Prints one line per check and ends with "N passed, M failed"; exits
// non-zero on any failure.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const BASE = (process.env.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const ADMIN = process.env.ADMIN_TOKEN || '';
const ARTIFACTS = process.env.ARTIFACTS || path.join(os.tmpdir(), 'giftcast-e2e');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SPLIT = Object.fromEntries((process.env.SPLIT || 'store=3000,streamer=5000,platform=2000')
  .split(',').map((kv) => kv.split('=')).map(([k, v]) => [k.trim(), BigInt(v)]));
const T = 15_000; // default wait for anything to show up
const OVERALL = Number(process.env.E2E_TIMEOUT_MS || 240_000);

fs.mkdirSync(ARTIFACTS, { recursive: true });

let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch (e) {
  console.log(`FAIL playwright-core is not installed (run: cd tests/browser && npm ci) -- ${e.message.split('\n')[0]}`);
  console.log('0 passed, 1 failed');
  process.exit(1);
}

let passed = 0;
let failed = 0;
let browser = null;

function record(name, ok, detail) {
  if (ok) passed += 1;
  else failed += 1;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${!ok && detail ? ` -- ${detail}` : ''}`);
  return ok;
}

/** One check: passes when `fn` resolves, fails (with its message) when it throws. */
async function check(name, fn) {
  try {
    await fn();
    return record(name, true);
  } catch (e) {
    return record(name, false, String((e && e.message) || e).split('\n')[0]);
  }
}

function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}

function finish(code) {
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(code || (failed ? 1 : 0));
}

const watchdog = setTimeout(async () => {
  record('whole run finishes in time', false, `still running after ${OVERALL} ms`);
  try { if (browser) await browser.close(); } catch { /* ignore */ }
  finish(1);
}, OVERALL);

/** Coins with 4 decimals from units of 1/10000 coin, integer math (the expected display). */
function units(u, unit = 10000n) {
  const neg = u < 0n;
  const a = neg ? -u : u;
  const d = unit.toString().length - 1;
  const whole = (a / unit).toString().replace(/\B(?=(\d{3})+(?!\d))/g, ',');
  return `${neg ? '-' : ''}${whole}.${(a % unit).toString().padStart(d, '0')}`;
}

async function http(pathname, { method = 'GET', token, body } = {}) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(BASE + pathname, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not json */ }
  return { status: res.status, json, text };
}

const dialogs = [];
const pageErrors = [];
const badAssets = [];

async function newPage(label, options) {
  const ctx = await browser.newContext({ baseURL: BASE, ...options });
  const page = await ctx.newPage();
  page.setDefaultTimeout(T);
  page.on('dialog', (d) => {
    dialogs.push(`${label}: ${d.type()} ${d.message()}`);
    d.dismiss().catch(() => {});
  });
  page.on('pageerror', (e) => pageErrors.push(`${label}: ${e.message}`));
  page.on('console', (m) => {
    // Content-Security-Policy violations and other script errors the page logs.
    if (m.type() === 'error' && /Refused to|Content Security Policy|Uncaught/i.test(m.text())) pageErrors.push(`${label}: ${m.text()}`);
  });
  page.on('response', (r) => {
    const u = new URL(r.url());
    if (u.origin === new URL(BASE).origin && !u.pathname.startsWith('/api/') && r.status() >= 400) badAssets.push(`${label}: ${r.status()} ${u.pathname}`);
  });
  return { ctx, page };
}

const shot = (page, name, opts = {}) => page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), ...opts });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function readRevenue(page) {
  return page.evaluate(() => ({
    gross: document.querySelector('#rev-gross').dataset.coins,
    store: document.querySelector('#rev-store').dataset.units,
    streamer: document.querySelector('#rev-streamer').dataset.units,
    platform: document.querySelector('#rev-platform').dataset.units,
    text: {
      store: document.querySelector('#rev-store').textContent,
      streamer: document.querySelector('#rev-streamer').textContent,
      platform: document.querySelector('#rev-platform').textContent,
    },
  }));
}

async function main() {
  // ---------- the server is up ----------
  let catalog = [];
  const up = await check('server answers /healthz and /api/catalog', async () => {
    const h = await http('/healthz');
    assert(h.status === 200, `/healthz ${h.status}`);
    const c = await http('/api/catalog');
    assert(c.status === 200 && c.json && Array.isArray(c.json.stickers) && c.json.stickers.length, `/api/catalog ${c.status}`);
    catalog = c.json.stickers;
  });
  if (!up) return;
  const byPrice = [...catalog].sort((a, b) => a.price - b.price);
  // A sticker whose messages get pinned (a paid question), else the cheapest.
  const giftSticker = byPrice.find((s) => (s.pin_secs || 0) > 0 && s.price <= 100) || byPrice[0];
  const cheapest = byPrice[0];
  const priciest = byPrice[byPrice.length - 1];
  const GIFT_COUNT = 2;
  const A = BigInt(giftSticker.price * GIFT_COUNT);
  const question = `What's your setup? <b>bold?</b> ${Date.now() % 10000}`;
  const thanksText = `Thanks a lot! 🎉 ${Date.now() % 1000}`;

  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
  });

  // ---------- streamer dashboard ----------
  const { page: dash } = await newPage('dashboard', { viewport: { width: 1280, height: 900 } });
  let base = null;
  await check('dashboard: sign in as the demo streamer and go live', async () => {
    await dash.goto('/dashboard');
    await dash.waitForSelector('body[data-auth="signed-out"] #signin-form');
    await dash.fill('#name-input', 'Demo Streamer');
    await dash.fill('#stream-input', 'demo');
    await dash.click('#signin-btn');
    await dash.waitForSelector('body[data-auth="signed-in"][data-conn="live"]');
    await dash.waitForSelector('body[data-revenue="loaded"]');
    base = await readRevenue(dash);
  });
  await check('dashboard: revenue shares shown as coins with exactly 4 decimals', async () => {
    assert(base, 'no revenue');
    for (const k of ['store', 'streamer', 'platform']) {
      assert(base.text[k] === units(BigInt(base[k])), `${k}: shows ${base.text[k]}, expected ${units(BigInt(base[k]))}`);
    }
  });

  // ---------- overlay (read-only, no token) ----------
  const { page: overlay } = await newPage('overlay', { viewport: { width: 1280, height: 720 } });
  await check('overlay: joins read-only with a transparent background', async () => {
    await overlay.goto('/overlay/demo');
    await overlay.waitForSelector('body[data-conn="live"]');
    const bg = await overlay.evaluate(() => getComputedStyle(document.body).backgroundColor);
    assert(bg === 'rgba(0, 0, 0, 0)' || bg === 'transparent', `background is ${bg}`);
  });

  // ---------- viewer ----------
  const { page: viewer } = await newPage('viewer', { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  await check('viewer: signed-out visitor watches read-only with a sign-in prompt', async () => {
    await viewer.goto('/?stream=demo');
    await viewer.waitForSelector('body[data-conn="live"]');
    await viewer.waitForSelector('body[data-auth="signed-out"] #signin-bar:not([hidden])');
    assert(await viewer.isHidden('#composer'), 'composer visible while signed out');
  });
  let balance0 = null;
  await check('viewer: guest sign-in shows the balance', async () => {
    await viewer.fill('#name-input', 'Alice');
    await viewer.click('#signin-btn');
    await viewer.waitForSelector('body[data-auth="signed-in"] #composer:not([hidden])');
    await viewer.waitForSelector('#balance:not([hidden])[data-value]');
    await viewer.waitForSelector('body[data-conn="live"]');
    balance0 = BigInt(await viewer.getAttribute('#balance', 'data-value'));
    assert(balance0 >= A, `balance ${balance0} < ${A}`);
    const token = await viewer.evaluate(() => JSON.parse(localStorage.getItem('giftcast.viewer')).token);
    assert(typeof token === 'string' && token.split('.').length === 3, 'no token stored');
  });

  let giftId = null;
  await check(`viewer: sends ${GIFT_COUNT}× ${giftSticker.id} with a public question`, async () => {
    await viewer.click('#gift-btn');
    await viewer.waitForSelector('#gift-sheet:not([hidden])');
    await viewer.click(`#sticker-grid [data-sticker="${giftSticker.id}"]`);
    await viewer.fill('#count-input', String(GIFT_COUNT));
    await viewer.fill('#gift-message', question);
    await viewer.click('#gift-send');
    await viewer.waitForSelector('#gift-sheet', { state: 'hidden' });
    await viewer.waitForFunction((want) => document.querySelector('#balance').dataset.value === want, String(balance0 - A));
    const li = viewer.locator('#chat li[data-type="shoutout"]').filter({ has: viewer.locator('.question', { hasText: question }) });
    await li.first().waitFor();
    giftId = await li.first().getAttribute('data-gift-id');
    assert(/^[A-Za-z0-9_-]{1,64}$/.test(giftId || ''), `bad gift id ${giftId}`);
    assert((await li.first().locator('.question').textContent()) === question, 'question not shown literally');
  });

  await check('dashboard: the gift and its question appear in the thanks queue and feed', async () => {
    const item = dash.locator(`#queue li[data-gift-id="${giftId}"]`);
    await item.waitFor();
    assert((await item.locator('.msg').textContent()) === question, 'question text differs');
    await dash.locator(`#feed li[data-gift-id="${giftId}"]`).waitFor();
    await dash.click('.tabs [data-tab="questions"]');
    await dash.locator(`#queue li.question[data-gift-id="${giftId}"]`).waitFor();
    await dash.click('.tabs [data-tab="all"]');
    await item.waitFor();
  });

  await check('dashboard: viewer count follows the room', async () => {
    await dash.waitForFunction(() => Number(document.querySelector('#viewers').textContent.replace(/\D/g, '')) >= 2);
  });

  await check(`dashboard: revenue moves by the exact split of ${A} coins`, async () => {
    const want = {
      gross: (BigInt(base.gross) + A).toString(),
      store: (BigInt(base.store) + A * SPLIT.store).toString(),
      streamer: (BigInt(base.streamer) + A * SPLIT.streamer).toString(),
      platform: (BigInt(base.platform) + A * SPLIT.platform).toString(),
    };
    try {
      await dash.waitForFunction((w) => ['store', 'streamer', 'platform'].every((k) => document.querySelector(`#rev-${k}`).dataset.units === w[k])
        && document.querySelector('#rev-gross').dataset.coins === w.gross, want, { timeout: T });
    } catch {
      throw new Error(`got ${JSON.stringify(await readRevenue(dash))}, want ${JSON.stringify(want)}`);
    }
    const now = await readRevenue(dash);
    for (const k of ['store', 'streamer', 'platform']) {
      assert(now.text[k] === units(BigInt(want[k])), `${k} shows ${now.text[k]}, want ${units(BigInt(want[k]))}`);
    }
    if (ADMIN) {
      const r = await http('/api/streams/demo/revenue', { token: ADMIN });
      assert(r.status === 200, `admin revenue ${r.status}`);
      const m = Object.fromEntries(['gross', 'store', 'streamer', 'platform'].map((k) => [k, (r.text.match(new RegExp(`"${k}"\\s*:\\s*(\\d+)`)) || [])[1]]));
      assert(m.store === now.store && m.streamer === now.streamer && m.platform === now.platform && m.gross === now.gross,
        `server says ${JSON.stringify(m)}, dashboard ${JSON.stringify(now)}`);
    }
  });

  await check('dashboard: top gifters and the revenue chart include the gift', async () => {
    await dash.locator('#gifters li', { hasText: 'Alice' }).first().waitFor();
    const d = await dash.getAttribute('#chart path.line', 'd');
    assert(d && d.length > 10, 'no chart line');
  });

  await check('overlay: shows the alert with emoji, sender, count and question', async () => {
    const alert = overlay.locator(`.alert[data-gift-id="${giftId}"]`);
    await alert.waitFor();
    const text = await alert.textContent();
    assert(text.includes('Alice') && text.includes(giftSticker.emoji) && text.includes(`${GIFT_COUNT}×`) && text.includes(question), `alert text: ${text}`);
    await sleep(700); // let the entry animation settle for the screenshot
    await shot(overlay, 'overlay', { omitBackground: true });
  });

  await check('dashboard: one-click thanks clears the gift from the queue', async () => {
    const item = dash.locator(`#queue li[data-gift-id="${giftId}"]`);
    await item.locator('input').fill(thanksText);
    await item.locator('button').click();
    await item.waitFor({ state: 'detached' });
    await dash.locator(`#feed li.thanks[data-gift-id="${giftId}"]`).waitFor();
  });

  await check('viewer: sees the streamer\'s thanks in the room', async () => {
    const t = viewer.locator(`#chat li[data-type="thanks"][data-gift-id="${giftId}"]`);
    await t.waitFor();
    assert((await t.textContent()).includes(thanksText), 'thanks text missing');
    await viewer.locator(`#chat li[data-type="shoutout"][data-gift-id="${giftId}"].thanked`).waitFor();
  });
  await shot(dash, 'dashboard');
  await shot(viewer, 'viewer');

  await check('overlay: the alert is shown exactly once, also after a reconnect that replays history', async () => {
    const alertMs = (giftSticker.alert_secs || 5) * 1000;
    await overlay.locator(`.alert[data-gift-id="${giftId}"]`).waitFor({ state: 'detached', timeout: alertMs + T });
    await overlay.evaluate(() => window.__giftcast.dropSocket({ rewindTo: 0 }));
    await overlay.waitForSelector('body[data-conn="live"]');
    await sleep(1500);
    const shown = await overlay.evaluate(() => window.__giftcast.state().shown);
    const n = shown.filter((id) => id === giftId).length;
    assert(n === 1, `shown ${n} times`);
    assert(await overlay.locator(`.alert[data-gift-id="${giftId}"]`).count() === 0, 'alert showing again');
  });

  // ---------- hostile text ----------
  const xss = '<img src=x onerror=alert(1)>';
  await check('chat: markup is shown as literal text, never run', async () => {
    await viewer.fill('#chat-input', xss);
    await viewer.press('#chat-input', 'Enter');
    const mine = viewer.locator('#chat li[data-type="chat"] .text', { hasText: xss });
    await mine.first().waitFor();
    assert((await mine.first().textContent()) === xss, 'viewer text differs');
    const fed = dash.locator('#feed li.chat .text', { hasText: xss });
    await fed.first().waitFor();
    await sleep(500);
    for (const [label, p] of [['viewer', viewer], ['dashboard', dash]]) {
      assert(await p.locator('#chat img, #feed img, #queue img').count() === 0, `${label} rendered an <img>`);
    }
    assert(dialogs.length === 0, `dialogs fired: ${dialogs.join('; ')}`);
  });

  // ---------- dropped connection resumes without loss ----------
  const { page: bob } = await newPage('viewer2', { viewport: { width: 800, height: 700 } });
  await check('second viewer signs in', async () => {
    await bob.goto('/?stream=demo');
    await bob.fill('#name-input', 'Bob');
    await bob.click('#signin-btn');
    await bob.waitForSelector('body[data-auth="signed-in"][data-conn="live"] #composer:not([hidden])');
  });
  const missed = [`missed one ${Date.now()}`, `missed two ${Date.now()}`];
  let retryId = null;
  let balanceBeforeRetry = null;
  await check('viewer: a dropped connection shows reconnecting with the attempt count', async () => {
    balanceBeforeRetry = BigInt(await viewer.getAttribute('#balance', 'data-value'));
    // A gift whose gift_ok may be lost with the socket: it must be retried with the same id.
    retryId = await viewer.evaluate((k) => {
      const id = window.__giftcast.sendGift(k, 1);
      window.__giftcast.dropSocket({ hold: true });
      return id;
    }, cheapest.id);
    await viewer.waitForSelector('body[data-conn="reconnecting"]');
    const pill = await viewer.textContent('#conn');
    assert(/(disconnected|reconnecting).*#1\b/i.test(pill), `status pill says "${pill}"`);
    await viewer.waitForSelector('#notice[data-code="reconnecting"]:not([hidden])');
    const why = await viewer.textContent('#notice');
    assert(/attempt\s*1/i.test(why), `notice says "${why}"`);
    await shot(viewer, 'viewer-reconnecting');
  });
  await check('chat sent while the viewer is away reaches the room', async () => {
    for (const m of missed) {
      await bob.fill('#chat-input', m);
      await bob.press('#chat-input', 'Enter');
      await bob.locator('#chat li[data-type="chat"] .text', { hasText: m }).first().waitFor();
    }
    await dash.locator('#feed li.chat .text', { hasText: missed[1] }).first().waitFor();
  });
  await check('viewer: resumes with since and shows each missed message exactly once', async () => {
    await viewer.evaluate(() => window.__giftcast.reconnect());
    await viewer.waitForSelector('body[data-conn="live"]');
    for (const m of missed) await viewer.locator('#chat li[data-type="chat"] .text', { hasText: m }).first().waitFor();
    await sleep(1000);
    for (const m of missed) {
      const n = await viewer.locator('#chat li[data-type="chat"] .text', { hasText: m }).count();
      assert(n === 1, `"${m}" shown ${n} times`);
    }
    const seqs = await viewer.evaluate(() => [...document.querySelectorAll('#chat li[data-seq]')].map((li) => Number(li.dataset.seq)));
    assert(new Set(seqs).size === seqs.length, `duplicate seqs: ${seqs.join(',')}`);
    assert(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), `out of order: ${seqs.join(',')}`);
  });
  await check('viewer: the gift interrupted by the drop is retried with the same id and debited once', async () => {
    const want = (balanceBeforeRetry - BigInt(cheapest.price)).toString();
    await viewer.waitForFunction((w) => document.querySelector('#balance').dataset.value === w, want);
    await viewer.locator(`#chat li[data-type="shoutout"][data-gift-id="${retryId}"]`).waitFor();
    await sleep(800);
    const n = await viewer.locator(`#chat li[data-type="shoutout"][data-gift-id="${retryId}"]`).count();
    assert(n === 1, `shout-out shown ${n} times`);
    const pending = await viewer.evaluate(() => window.__giftcast.state().pending);
    assert(pending.length === 0, `still pending: ${pending}`);
    assert(await viewer.getAttribute('#balance', 'data-value') === want, 'balance moved again');
  });

  await check('viewer: going offline and back online resumes without loss', async () => {
    const vctx = viewer.context();
    await vctx.setOffline(true);
    await viewer.waitForSelector('body[data-conn="reconnecting"]');
    const m = `while offline ${Date.now()}`;
    await bob.fill('#chat-input', m);
    await bob.press('#chat-input', 'Enter');
    await dash.locator('#feed li.chat .text', { hasText: m }).first().waitFor();
    await vctx.setOffline(false);
    await viewer.waitForSelector('body[data-conn="live"]');
    await viewer.locator('#chat li[data-type="chat"] .text', { hasText: m }).first().waitFor();
    await sleep(500);
    const n = await viewer.locator('#chat li[data-type="chat"] .text', { hasText: m }).count();
    assert(n === 1, `shown ${n} times`);
  });

  // ---------- combos ----------
  await check('viewer: quick repeat gifts of one sticker show a combo count', async () => {
    // Meanwhile the streamer is typing a reply; new gifts must not wipe it.
    const draft = dash.locator('#queue li.qitem input').first();
    await draft.fill('typing a reply…');
    await draft.focus();
    const ids = [];
    for (let i = 0; i < 3; i++) {
      const id = await bob.evaluate((k) => window.__giftcast.sendGift(k, 1), cheapest.id);
      ids.push(id);
      await bob.waitForFunction((g) => !window.__giftcast.state().pending.includes(g), id);
    }
    const third = viewer.locator(`#chat li[data-type="shoutout"][data-gift-id="${ids[2]}"] .combo`);
    await third.waitFor();
    assert(/x3 combo/.test(await third.textContent()), `combo badge says ${await third.textContent()}`);
  });
  await check('dashboard: a reply being typed survives new gifts arriving', async () => {
    await dash.locator('#feed li.gift .combo', { hasText: 'x3 combo' }).first().waitFor();
    const kept = await dash.evaluate(() => {
      const a = document.activeElement;
      return a && a.matches('#queue input') ? a.value : null;
    });
    assert(kept === 'typing a reply…', `focused input holds ${JSON.stringify(kept)}`);
  });

  // ---------- chat rate limit ----------
  const chatRate = Number(process.env.CHAT_RATE ?? 60);
  if (chatRate > 0) {
    await check(`viewer: chatting over the limit (${chatRate}/min) shows a clear rate-limit notice`, async () => {
      await bob.evaluate((n) => {
        for (let i = 0; i < n; i++) window.__giftcast.socket.send({ type: 'chat', text: `burst ${i}` });
      }, chatRate + 5);
      const n = bob.locator('#notice[data-code="rate_limited"]:not([hidden])');
      await n.waitFor();
      assert(/too fast/i.test(await n.textContent()), 'notice unclear');
      await shot(bob, 'viewer-rate-limited');
    });
  }

  // ---------- insufficient coins ----------
  await check('viewer: a gift above the balance says "Not enough coins" before sending', async () => {
    const bal = BigInt(await viewer.getAttribute('#balance', 'data-value'));
    assert(BigInt(priciest.price) * 99n > bal, 'catalog too cheap to test');
    await viewer.click('#gift-btn');
    await viewer.click(`#sticker-grid [data-sticker="${priciest.id}"]`);
    await viewer.fill('#count-input', '99');
    await viewer.waitForSelector('#gift-send:disabled');
    const err = viewer.locator('#gift-error[data-code="insufficient_funds"]');
    await err.waitFor();
    assert(/not enough coins/i.test(await err.textContent()), 'no clear message');
    assert(/not enough coins/i.test(await viewer.textContent('#gift-send')), 'button does not say why');
    await viewer.keyboard.press('Escape');
    await viewer.waitForSelector('#gift-sheet', { state: 'hidden' });
  });
  await check('viewer: the server\'s insufficient_funds rejection is shown clearly and debits nothing', async () => {
    const before = await viewer.getAttribute('#balance', 'data-value');
    await viewer.evaluate((k) => window.__giftcast.sendGift(k, 99, 'too much'), priciest.id);
    const n = viewer.locator('#notice[data-code="insufficient_funds"]:not([hidden])');
    await n.waitFor();
    assert(/not enough coins/i.test(await n.textContent()), 'notice unclear');
    assert(await viewer.getAttribute('#balance', 'data-value') === before, 'balance changed');
    await shot(viewer, 'viewer-insufficient');
  });

  // ---------- red packets ----------
  const PACKET_COINS = 30n;
  const packetMsg = `Happy stream! <i>grab</i> 🧧 ${Date.now() % 1000}`;
  let packetId = null;
  let aliceBeforePacket = null;
  const card = (page, id) => page.locator(`#packets .packet-card[data-packet-id="${id}"]`);
  const bal = async (page) => BigInt(await page.getAttribute('#balance', 'data-value'));
  await check('viewer: drops a 30-coin red packet with 3 random shares from the form', async () => {
    aliceBeforePacket = await bal(viewer);
    assert(aliceBeforePacket >= PACKET_COINS, `balance ${aliceBeforePacket} < ${PACKET_COINS}`);
    await viewer.click('#packet-btn');
    await viewer.waitForSelector('#packet-sheet:not([hidden])');
    await viewer.fill('#packet-coins', String(PACKET_COINS));
    await viewer.fill('#packet-shares', '3');
    await viewer.click('#split-row [data-split="random"]');
    await viewer.fill('#packet-message', packetMsg);
    assert(/drop/i.test(await viewer.textContent('#packet-send')), `button says ${await viewer.textContent('#packet-send')}`);
    await shot(viewer, 'viewer-packet-form');
    await viewer.click('#packet-send');
    await viewer.waitForSelector('#packet-sheet', { state: 'hidden' });
    await viewer.waitForFunction((w) => document.querySelector('#balance').dataset.value === w, String(aliceBeforePacket - PACKET_COINS));
    const c = viewer.locator('#packets .packet-card').filter({ has: viewer.locator('.pmsg', { hasText: packetMsg }) });
    await c.first().waitFor();
    packetId = await c.first().getAttribute('data-packet-id');
    assert(/^[A-Za-z0-9_-]{1,64}$/.test(packetId || ''), `bad packet id ${packetId}`);
    assert((await c.first().locator('.pmsg').textContent()) === packetMsg, 'message not shown literally');
    const text = await c.first().textContent();
    assert(text.includes('Alice') && text.includes('3/3 left') && /⏱ [0-9]+:[0-5][0-9]/.test(text), `card says ${text}`);
    const pend = await viewer.evaluate(() => window.__giftcast.state().pendingPackets);
    assert(pend.length === 0, `still pending: ${pend}`);
  });

  let grabbed = null;
  await check('second viewer grabs the packet in the browser and sees its coins', async () => {
    const before = await bal(bob);
    const c = card(bob, packetId);
    await c.locator('button.grab').click();
    await c.and(bob.locator('[data-mine]')).waitFor();
    grabbed = BigInt(await c.getAttribute('data-mine'));
    assert(grabbed >= 1n && grabbed <= PACKET_COINS - 2n, `got ${grabbed} of ${PACKET_COINS} in 3 shares`);
    const status = await c.locator('.pstatus').textContent();
    assert(status === `You got ${grabbed} ${grabbed === 1n ? 'coin' : 'coins'}!`, `card says "${status}"`);
    await bob.waitForFunction((w) => document.querySelector('#balance').dataset.value === w, String(before + grabbed));
    await bob.locator('.toast', { hasText: `You got ${grabbed}` }).first().waitFor();
    assert(await c.locator('button.grab').count() === 0, 'grab button still offered');
    await shot(bob, 'viewer-packet-grabbed');
  });
  await check('viewer: the card follows the grab (2/3 left), the balance went down by exactly 30', async () => {
    const c = card(viewer, packetId);
    await c.and(viewer.locator('[data-left="2"]')).waitFor();
    assert((await c.textContent()).includes('2/3 left'), `card: ${await c.textContent()}`);
    await viewer.locator(`#chat li[data-type="grabbed"][data-packet-id="${packetId}"]`, { hasText: 'Bob' }).waitFor();
    assert(await bal(viewer) === aliceBeforePacket - PACKET_COINS, `balance ${await bal(viewer)}, want ${aliceBeforePacket - PACKET_COINS}`);
    await sleep(300);
    await shot(viewer, 'viewer-packet');
  });
  await check('dashboard: the live feed shows the red packet and the grab', async () => {
    const li = dash.locator(`#feed li.packet[data-packet-id="${packetId}"]`);
    await li.waitFor();
    const t = await li.textContent();
    assert(t.includes('Alice') && t.includes(`🪙 ${PACKET_COINS}`) && t.includes('3 shares') && t.includes(packetMsg), `feed: ${t}`);
    const g = dash.locator(`#feed li.packet-grab[data-packet-id="${packetId}"]`);
    await g.waitFor();
    assert((await g.textContent()).includes('Bob') && (await g.textContent()).includes(`🪙 ${grabbed}`), `feed grab: ${await g.textContent()}`);
    assert(await dash.locator('#feed i, #feed b').count() === 0, 'feed rendered markup');
    await shot(dash, 'dashboard-packet');
  });
  await check('overlay: shows the red packet alert once, also across a reconnect', async () => {
    const a = overlay.locator(`.alert.packet[data-packet-id="${packetId}"]`);
    await a.waitFor({ timeout: 2 * T });
    const t = await a.textContent();
    assert(t.includes('Alice') && t.includes(`🪙 ${PACKET_COINS}`) && t.includes(packetMsg), `alert: ${t}`);
    await sleep(700);
    await shot(overlay, 'overlay-packet', { omitBackground: true });
    await overlay.evaluate(() => window.__giftcast.dropSocket({ rewindTo: 0 }));
    await overlay.waitForSelector('body[data-conn="live"]');
    await sleep(1000);
    const st = await overlay.evaluate(() => window.__giftcast.state());
    const n = st.shownPackets.filter((id) => id === packetId).length;
    assert(n === 1 && !st.queuedPackets.includes(packetId), `shown ${n} times, queued again: ${st.queuedPackets.includes(packetId)}`);
  });
  await check('viewer: a red packet interrupted by a drop is retried with the same id and debited once', async () => {
    const before = await bal(viewer);
    const id = await viewer.evaluate(() => {
      const pid = window.__giftcast.sendRedPacket(2, 1, 'equal', 'one share only');
      window.__giftcast.dropSocket({ hold: true });
      return pid;
    });
    await viewer.waitForSelector('body[data-conn="reconnecting"]');
    await viewer.evaluate(() => window.__giftcast.reconnect());
    await viewer.waitForSelector('body[data-conn="live"]');
    await viewer.waitForFunction((w) => document.querySelector('#balance').dataset.value === w, String(before - 2n));
    await card(viewer, id).waitFor();
    await viewer.waitForFunction((p) => !window.__giftcast.state().pendingPackets.includes(p), id);
    await sleep(500);
    assert(await bal(viewer) === before - 2n, 'balance moved again');
    assert(await viewer.locator(`#chat li[data-type="red_packet"][data-packet-id="${id}"]`).count() === 1, 'announced twice');
    // Its only share: Bob takes it, the card closes for everyone, a late grab is told "gone".
    await card(bob, id).locator('button.grab').click();
    await card(bob, id).and(bob.locator('[data-mine="2"]')).waitFor();
    const c = card(viewer, id);
    await c.and(viewer.locator('[data-state="gone"]')).waitFor();
    assert(await c.locator('button.grab').count() === 0, 'grab still offered on an empty packet');
    assert(/all shares are gone/i.test(await c.locator('.pstatus').textContent()), `card says ${await c.textContent()}`);
    await viewer.evaluate((p) => window.__giftcast.grab(p), id);
    await viewer.waitForFunction((p) => !window.__giftcast.state().grabbing.includes(p), id);
    assert(await c.getAttribute('data-state') === 'gone' && await c.getAttribute('data-mine') === null, 'late grab changed the card');
    await c.scrollIntoViewIfNeeded();
    await sleep(400);
    await shot(viewer, 'viewer-packet-gone');
  });

  // A fresh gift so the viewer screenshot shows a pinned paid message and an animation.
  await check('viewer: a paid message is pinned', async () => {
    const id = await viewer.evaluate((k) => window.__giftcast.sendGift(k, 1, 'Pinned question: how long is the stream?'), giftSticker.id);
    if ((giftSticker.pin_secs || 0) > 0) await viewer.locator(`#pins .pin[data-gift-id="${id}"]`).waitFor();
    await sleep(700);
    await shot(viewer, 'viewer-end');
  });

  await check('pages load every asset and raise no script errors, CSP violations or dialogs', async () => {
    assert(badAssets.length === 0, badAssets.join('; '));
    assert(pageErrors.length === 0, pageErrors.join('; '));
    assert(dialogs.length === 0, dialogs.join('; '));
  });

  if (ADMIN) {
    await check('ledger audit is ok after the run', async () => {
      const a = await http('/api/admin/audit', { token: ADMIN });
      assert(a.status === 200 && a.json && a.json.ok === true, `audit ${a.status} ${a.text.slice(0, 200)}`);
    });
  }
}

try {
  await main();
} catch (e) {
  record('run', false, String((e && e.stack) || e));
} finally {
  clearTimeout(watchdog);
  try { if (browser) await browser.close(); } catch { /* ignore */ }
}
console.log(`screenshots in ${ARTIFACTS}`);
finish();
