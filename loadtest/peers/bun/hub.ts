// A minimal Bun hub on its built-in uWebSockets pub/sub, speaking giftcast's protocol subset
// (join, chat, ping; joined, chat events with a per-room seq, pong, error).
// Usage: node_modules/.bin/bun hub.ts [--port 18091] [--host 127.0.0.1] [--token-secret S]
import { createHmac } from "crypto";

const arg = (name: string, dflt: string) => {
  const i = Bun.argv.indexOf(name);
  return i > 0 && i + 1 < Bun.argv.length ? Bun.argv[i + 1] : dflt;
};
const port = Number(arg("--port", process.env.PORT ?? "18091"));
const hostname = arg("--host", "127.0.0.1");
const secret = arg("--token-secret", process.env.TOKEN_SECRET ?? "");

type User = { id: string; name: string };
type Data = { room: string | null; user: User | null };
const rooms = new Map<string, { seq: number; n: number }>();

function userOf(token: string): User | null {
  const parts = String(token).split(".");
  if (parts.length !== 3) return null;
  if (secret) {
    const sig = createHmac("sha256", secret).update(parts[0] + "." + parts[1]).digest("base64url");
    if (sig !== parts[2]) return null;
  }
  try {
    const p = JSON.parse(Buffer.from(parts[1], "base64url").toString());
    if (p.exp && p.exp < Date.now() / 1000) return null;
    return { id: String(p.sub), name: String(p.name) };
  } catch {
    return null;
  }
}

const server = Bun.serve<Data, {}>({
  port,
  hostname,
  fetch(req, server) {
    const url = new URL(req.url);
    if (url.pathname === "/ws" && server.upgrade(req, { data: { room: null, user: null } })) return;
    if (url.pathname === "/healthz" || url.pathname === "/readyz") return new Response("ok");
    return new Response("not found", { status: 404 });
  },
  websocket: {
    perMessageDeflate: false,
    maxPayloadLength: 16 * 1024,
    backpressureLimit: 4 << 20,
    closeOnBackpressureLimit: true,
    message(ws, data) {
      const err = (code: string, message: string) => ws.send(JSON.stringify({ type: "error", code, message }));
      let m: any;
      try {
        m = JSON.parse(String(data));
      } catch {
        return err("bad_frame", "not JSON");
      }
      switch (m && m.type) {
        case "join": {
          if (ws.data.room) return err("already_joined", "already joined");
          if (m.token) {
            ws.data.user = userOf(m.token);
            if (!ws.data.user) return ws.close(4003, "bad token");
          }
          const id = String(m.stream);
          let room = rooms.get(id);
          if (!room) rooms.set(id, (room = { seq: 0, n: 0 }));
          room.n += 1;
          ws.data.room = id;
          ws.subscribe(id);
          ws.send(JSON.stringify({ type: "joined", stream: id, user: ws.data.user?.id, seq: room.seq, viewers: room.n, catalog: [] }));
          return;
        }
        case "chat": {
          const id = ws.data.room;
          if (!id) return err("not_joined", "join first");
          if (!ws.data.user) return err("read_only", "no token");
          const text = String(m.text ?? "").trim();
          if (!text || [...text].length > 500) return err("invalid", "bad text");
          const room = rooms.get(id)!;
          room.seq += 1;
          server.publish(id, JSON.stringify({ type: "chat", seq: room.seq, from: ws.data.user, text, ts: Date.now() }));
          return;
        }
        case "ping":
          return ws.send(JSON.stringify({ type: "pong", t: m.t }));
        default:
          return err("bad_frame", "unknown type");
      }
    },
    close(ws) {
      const id = ws.data.room;
      if (id) {
        const room = rooms.get(id);
        if (room) room.n -= 1;
      }
    },
  },
});

console.log(`bun hub on ws://${server.hostname}:${server.port}/ws`);
