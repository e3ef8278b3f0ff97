// A minimal Node `ws` broadcast hub speaking giftcast's protocol subset (join, chat, ping;
// joined, chat events with a per-room seq, pong, error) — the peer for side-by-side runs of
// the load harness. Usage: node hub.js [--port 18090] [--host 127.0.0.1] [--token-secret S]
// With --token-secret, join tokens are verified (HS256); without, their payload is trusted.
'use strict';
const http = require('http');
const crypto = require('crypto');
const { WebSocketServer } = require('ws');

const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
};
const port = Number(arg('--port', process.env.PORT || 18090));
const host = arg('--host', '127.0.0.1');
const secret = arg('--token-secret', process.env.TOKEN_SECRET || '');
const MAX_BUFFERED = 4 << 20; // a client this far behind is dropped (slow consumer)

function userOf(token) {
  const parts = String(token).split('.');
  if (parts.length !== 3) return null;
  if (secret) {
    const sig = crypto.createHmac('sha256', secret).update(parts[0] + '.' + parts[1]).digest('base64url');
    if (sig !== parts[2]) return null;
  }
  try {
    const p = JSON.parse(Buffer.from(parts[1], 'base64url').toString());
    if (p.exp && p.exp < Date.now() / 1000) return null;
    return { id: String(p.sub), name: String(p.name) };
  } catch {
    return null;
  }
}

const rooms = new Map(); // stream id -> { seq, members: Set<ws> }
const err = (ws, code, message) => ws.send(JSON.stringify({ type: 'error', code, message }));

const server = http.createServer((req, res) => {
  if (req.url === '/healthz' || req.url === '/readyz') return res.end('ok');
  res.writeHead(404).end();
});
const wss = new WebSocketServer({ server, path: '/ws', perMessageDeflate: false, maxPayload: 16 * 1024 });

wss.on('connection', (ws) => {
  let room = null;
  let user = null;
  ws.on('message', (data) => {
    let m;
    try {
      m = JSON.parse(data);
    } catch {
      return err(ws, 'bad_frame', 'not JSON');
    }
    switch (m && m.type) {
      case 'join': {
        if (room) return err(ws, 'already_joined', 'already joined');
        if (m.token) {
          user = userOf(m.token);
          if (!user) return ws.close(4003, 'bad token');
        }
        const id = String(m.stream);
        room = rooms.get(id);
        if (!room) rooms.set(id, (room = { seq: 0, members: new Set() }));
        room.members.add(ws);
        ws.send(JSON.stringify({ type: 'joined', stream: id, user: user ? user.id : undefined, seq: room.seq, viewers: room.members.size, catalog: [] }));
        return;
      }
      case 'chat': {
        if (!room) return err(ws, 'not_joined', 'join first');
        if (!user) return err(ws, 'read_only', 'no token');
        const text = String(m.text || '').trim();
        if (!text || [...text].length > 500) return err(ws, 'invalid', 'bad text');
        room.seq += 1;
        const out = JSON.stringify({ type: 'chat', seq: room.seq, from: user, text, ts: Date.now() });
        for (const c of room.members) {
          if (c.bufferedAmount > MAX_BUFFERED) {
            c.terminate();
            continue;
          }
          c.send(out);
        }
        return;
      }
      case 'ping':
        return ws.send(JSON.stringify({ type: 'pong', t: m.t }));
      default:
        return err(ws, 'bad_frame', 'unknown type');
    }
  });
  ws.on('close', () => {
    if (room) room.members.delete(ws);
  });
  ws.on('error', () => {});
});

server.listen(port, host, () => console.log(`node ws hub on ws://${host}:${port}/ws`));
process.on('SIGTERM', () => process.exit(0));
