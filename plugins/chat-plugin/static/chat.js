// The chat page: asks /config.json for the websocket port, then speaks the
// JSON protocol of plugins/chat-plugin/README.md. User data only ever goes
// into the page through textContent.
"use strict";

(() => {
  const PING_MS = 25000;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 8000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    joinForm: $("join-form"),
    name: $("name"),
    room: $("room"),
    leave: $("leave"),
    title: $("room-title"),
    messages: $("messages"),
    sayForm: $("say-form"),
    text: $("text"),
    online: $("online"),
  };

  let wsUrl = null; // from /config.json, fetched once
  let ws = null;
  let backoff = BACKOFF_MIN_MS;
  let pingTimer = null;
  let wanted = null; // {room, name} the user joined; joined again after a reconnect
  let current = null; // the room the server last sent history for

  const store = {
    get: (k) => { try { return localStorage.getItem(k); } catch { return null; } },
    set: (k, v) => { try { localStorage.setItem(k, v); } catch { /* private mode */ } },
  };
  ui.name.value = store.get("chat.name") || "";

  function setStatus(text) {
    ui.status.textContent = text;
    ui.status.dataset.state = text;
  }

  function isOpen() {
    return ws !== null && ws.readyState === WebSocket.OPEN;
  }

  function send(msg) {
    if (!isOpen()) return false;
    ws.send(JSON.stringify(msg));
    return true;
  }

  // Appends a line to the message list, keeping the view at the bottom if it was.
  function append(li) {
    const list = ui.messages;
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.append(li);
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function showMessage(m) {
    const li = el("li", "message");
    if (wanted && m.from === wanted.name) li.classList.add("mine");
    const when = new Date(m.ts);
    const time = el("time", "ts", when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }));
    time.dateTime = when.toISOString();
    li.append(time, " ", el("span", "from", m.from), ": ", el("span", "text", m.text));
    append(li);
  }

  function notice(text, kind = "info") {
    append(el("li", `notice ${kind}`, text));
  }

  function showOnline(names) {
    ui.online.replaceChildren(
      ...names.map((n) => {
        const li = el("li", wanted && n === wanted.name ? "me" : "", n);
        return li;
      }),
    );
  }

  function leftRoom() {
    current = null;
    ui.title.textContent = "Not in a room";
    ui.online.replaceChildren();
  }

  function onServerMessage(m) {
    switch (m.type) {
      case "history":
        current = m.room;
        ui.title.textContent = `# ${m.room}`;
        ui.messages.replaceChildren();
        m.messages.forEach(showMessage);
        notice(`You joined ${m.room}.`);
        ui.text.focus();
        break;
      case "message":
        if (m.room === current) showMessage(m);
        break;
      case "presence":
        if (m.room === current) showOnline(m.online);
        break;
      case "error":
        notice(m.reason, "error");
        break;
      case "pong":
        break;
    }
  }

  async function fetchUrl() {
    const r = await fetch("/config.json", { cache: "no-store" });
    if (!r.ok) throw new Error(`/config.json answered ${r.status}`);
    const { ws_port } = await r.json();
    // A page served over https talks to a wss:// listener.
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    return `${scheme}://${location.hostname}:${ws_port}/`;
  }

  function reconnectLater() {
    const delay = backoff + Math.random() * 250;
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    ui.status.title = `reconnecting in ${(delay / 1000).toFixed(1)} s`;
    setTimeout(connect, delay);
  }

  async function connect() {
    if (!wsUrl) {
      try {
        wsUrl = await fetchUrl();
      } catch (e) {
        setStatus("disconnected");
        notice(`Cannot reach the server: ${e.message}`, "error");
        return reconnectLater();
      }
    }
    const sock = new WebSocket(wsUrl);
    ws = sock;
    sock.onopen = () => {
      backoff = BACKOFF_MIN_MS;
      ui.status.title = wsUrl;
      setStatus("connected");
      pingTimer = setInterval(() => send({ type: "ping" }), PING_MS);
      if (wanted) send({ type: "join", ...wanted });
    };
    sock.onmessage = (ev) => {
      let m;
      try {
        m = JSON.parse(ev.data);
      } catch {
        return;
      }
      onServerMessage(m);
    };
    sock.onclose = () => {
      if (ws !== sock) return;
      ws = null;
      clearInterval(pingTimer);
      setStatus("disconnected");
      if (current) notice("Connection lost; reconnecting…", "error");
      leftRoom();
      reconnectLater();
    };
  }

  ui.joinForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const name = ui.name.value.trim();
    const room = ui.room.value.trim();
    if (!name) return ui.name.focus();
    if (!room) return ui.room.focus();
    wanted = { room, name };
    store.set("chat.name", name);
    if (!send({ type: "join", room, name })) notice(`Will join ${room} once connected.`);
  });

  ui.leave.addEventListener("click", () => {
    if (!wanted && !current) return;
    const room = current || wanted.room;
    wanted = null;
    send({ type: "leave" });
    leftRoom();
    notice(`You left ${room}.`);
  });

  ui.sayForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = ui.text.value.trim();
    if (!text) return;
    if (!isOpen()) return notice("Not connected; your message was not sent.", "error");
    send({ type: "say", text });
    ui.text.value = "";
  });

  connect();
})();
