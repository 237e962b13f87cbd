// The Socket.IO peer of `tocsin bench peers`: what a team would otherwise run.
//
// A Socket.IO 4 server (websocket transport only, connection-state recovery on, the
// library's defaults otherwise: no permessage-deflate) that broadcasts what the bench's
// publisher posts, like the ceiling (tocsin/bench/ceiling.py):
//
//   POST /broadcast            one alert (JSON): io.emit("alert", frame), once
//   POST /broadcast?count=N    a JSON array of N alerts, emitted in order
//   GET  /healthz              {"sockets": k}
//
// Each emitted frame is shaped like tocsin's alert frame ({"type":"alert","seq":n,
// "redelivered":false,"alert":{...}}) so that the load generator reads all three the same
// way. A client's "ack" events are received and dropped, as the ceiling drops acks.
//
//   node server.js --port 8100 [--host 127.0.0.1] [--ping-interval 25]
//
// Prints "socket.io listening on HOST:PORT" once it accepts connections; stops on SIGTERM.
"use strict";

const http = require("http");
const { Server } = require("socket.io");

function option(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const host = option("host", "127.0.0.1");
const port = Number(option("port", "8100"));
const pingSeconds = Number(option("ping-interval", "25"));

let seq = 0;
let io = null;

function broadcast(alerts) {
  const first = seq + 1;
  for (const alert of alerts) {
    seq += 1;
    io.emit("alert", { type: "alert", seq, redelivered: false, alert });
  }
  return { seq, first_seq: first, count: alerts.length, sockets: io.engine.clientsCount };
}

function answer(res, status, body) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(body));
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://localhost");
  if (req.method === "GET" && url.pathname === "/healthz") {
    answer(res, 200, { sockets: io.engine.clientsCount });
    return;
  }
  if (req.method !== "POST" || url.pathname !== "/broadcast") {
    answer(res, 404, { error: "not found" });
    return;
  }
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    let parsed;
    try {
      parsed = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch (err) {
      answer(res, 400, { error: `body: not JSON: ${err.message}` });
      return;
    }
    const count = url.searchParams.get("count");
    if (count === null) {
      answer(res, 200, broadcast([parsed]));
    } else if (!Array.isArray(parsed) || parsed.length !== Number(count)) {
      answer(res, 400, { error: `count=${count} but the body is not a JSON array of that many alerts` });
    } else {
      answer(res, 200, broadcast(parsed));
    }
  });
});

io = new Server(server, {
  transports: ["websocket"],
  pingInterval: pingSeconds * 1000,
  pingTimeout: 20000,
  connectionStateRecovery: { maxDisconnectionDuration: 2 * 60 * 1000, skipMiddlewares: true },
});
io.on("connection", (socket) => {
  socket.on("ack", () => {});
});

server.listen(port, host, () => {
  console.log(`socket.io listening on ${host}:${server.address().port}`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    io.close();
    process.exit(0);
  });
}
