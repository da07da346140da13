// The demo chat: rooms are channels "room:NAME", the people list is presence (kept
// current by join/leave events where the namespace announces them, and by asking
// again every few seconds where it does not), a room opened shows its last messages
// (subscribe with history), and people message each other directly (send / dm).
// Everything it does goes through fastim.js, the client every node serves.

import { connect } from "../fastim.js";

const HISTORY = 50; // messages shown when a room is opened
const PRESENCE_POLL = 10000; // ms; join/leave events make it instant where enabled
const NAME = /^[^\u0000-\u001f\u007f]{1,32}$/u;
const ROOM = /^[a-z0-9_-]{1,32}$/;
const DM_LINES = 200; // kept per direct conversation across reloads

const $ = (/** @type {string} */ sel) => /** @type {HTMLElement} */ (document.querySelector(sel));

/** @typedef {{who: string, text: string, ts: number, off?: number, mine?: boolean,
 *             pending?: boolean, failed?: string, notice?: boolean, cid?: string,
 *             mid?: string, gap?: string}} Line
 *  pending: sent, not yet confirmed by the node; failed: not sent (why); cid: the id a
 *  room message of this page carries, to put the node's copy in its place; mid: a
 *  direct message's id (the node may hand one over again after a reload); gap: a notice
 *  that history was lost there (the Gap's reason) */

const state = {
  /** @type {string} */ user: "",
  /** @type {import("../fastim.js").Client|null} */ client: null,
  /** room name → {sub, lines, unread, users} */
  rooms: /** @type {Map<string, {sub: any, lines: Line[], unread: number, users: Set<string>}>} */ (new Map()),
  /** peer → {lines, unread} */
  dms: /** @type {Map<string, {lines: Line[], unread: number}>} */ (new Map()),
  /** the open conversation */
  current: { kind: "room", name: "lobby" },
  /** the room whose people are listed (the last one opened) */
  room: "lobby",
};

// ---------------------------------------------------------------- start

const saved = sessionStorage.getItem("fastim-demo-user");
if (saved && NAME.test(saved)) start(saved);
else askWho();

/**
 * Ask the node who this page is before asking the person: a node whose application
 * decides (a connect hook reading the application's session cookie, docs/proxy.md)
 * names the user in its welcome, and the demo starts as that user. A node without one
 * welcomes an anonymous page: the name form as always.
 */
function askWho() {
  const probe = connect({
    requestTimeout: 5000,
    backoff: { base: 200, max: 200 },
    onState: (s, info) => {
      if (s === "connected") {
        const user = probe.welcome && probe.welcome.user;
        probe.close();
        if (typeof user === "string" && NAME.test(user) && !state.user) start(user);
      } else if (s === "closed" || (s === "reconnecting" && info.code === 4501)) {
        probe.close();
        if (info.code === 4501 && info.reason) {
          // the application refused this page (no session): sign in there first
          $("#login-error").textContent = `The node's application says: ${info.reason}. Sign in there first.`;
        }
      }
    },
  });
}

$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = /** @type {HTMLInputElement} */ ($("#name")).value.trim();
  if (!NAME.test(name)) {
    $("#login-error").textContent = "1 to 32 characters, please.";
    return;
  }
  sessionStorage.setItem("fastim-demo-user", name);
  start(name);
});

/** @param {string} user */
function start(user) {
  state.user = user;
  $("#login").hidden = true;
  $("#chat").hidden = false;
  $("#me").hidden = false;
  $("#me").textContent = user;
  $("#status").hidden = false;
  $("#menu").hidden = false;
  loadDms();
  state.client = connect({
    user,
    onState: (s, info) => {
      const el = $("#status");
      el.dataset.state = s;
      el.textContent = s === "closed" && info.reason ? `closed: ${info.reason}` : s;
      if (s === "connected") refreshPresence();
    },
    onEvent: onEvent,
    onDirect: onDirect,
    onDirectGap: onDirectGap,
    onError: (e) => console.warn("fastim:", e),
  });
  let rooms = [];
  try {
    rooms = JSON.parse(sessionStorage.getItem("fastim-demo-rooms") || "[]");
  } catch {
    rooms = [];
  }
  if (!rooms.includes("lobby")) rooms.unshift("lobby");
  for (const r of rooms) if (ROOM.test(r)) joinRoom(r);
  const cur = sessionStorage.getItem("fastim-demo-current");
  open(cur && state.rooms.has(cur) ? { kind: "room", name: cur } : { kind: "room", name: "lobby" });
  setInterval(refreshPresence, PRESENCE_POLL);
  $("#text").focus();
}

// ---------------------------------------------------------------- rooms

/** @param {string} name */
function joinRoom(name) {
  if (state.rooms.has(name)) return;
  const client = /** @type {import("../fastim.js").Client} */ (state.client);
  const room = { sub: /** @type {any} */ (null), lines: /** @type {Line[]} */ ([]), unread: 0,
    users: /** @type {Set<string>} */ (new Set()) }; // prettier-ignore
  state.rooms.set(name, room);
  sessionStorage.setItem("fastim-demo-rooms", JSON.stringify([...state.rooms.keys()]));
  room.sub = client.subscribe(`room:${name}`, {
    history: HISTORY,
    onMessage: (m) => {
      const d = m.data && typeof m.data === "object" ? m.data : { text: String(m.data) };
      const mine = d.user === state.user;
      // this page's own line, shown while it was on its way: the node's copy replaces it
      const local = mine && d.cid ? room.lines.findIndex((l) => l.cid === d.cid) : -1;
      if (local >= 0) {
        room.lines.splice(local, 1);
        if (sameConv(state.current, { kind: "room", name })) renderMessages();
      }
      addLine(room, { who: String(d.user ?? "?"), text: String(d.text ?? ""),
        ts: Number(d.ts) || Date.now(), off: m.offset, mine }, { kind: "room", name }); // prettier-ignore
    },
    // where the stream has a hole, a line says so; the messages that follow come after it
    onGap: (g) => addLine(room, { who: "", text: gapText(g), ts: Date.now(), notice: true,
      gap: g.reason }, { kind: "room", name }), // prettier-ignore
    onError: (e) => addLine(room, { who: "", text: `left: ${e.message}`, ts: Date.now(),
      notice: true }, { kind: "room", name }), // prettier-ignore
  });
  room.sub.ready.then(() => name === state.room && refreshPresence()).catch(() => {});
  renderSide();
}

/**
 * The line shown where a room's messages have a hole (fastim.js reports a Gap).
 * @param {import("../fastim.js").Gap} g
 */
function gapText(g) {
  const after = g.lastOffset > 0 ? `messages after #${g.lastOffset}` : "earlier messages";
  if (g.reason === "epoch") {
    // a new epoch: the node lost the room's history; the new one follows from its start
    return `history was lost here: ${after} are gone (the node restarted without its store)`;
  }
  if (g.reason === "rewound") {
    return `history was lost here: ${after} may be gone (the node's store went back)`;
  }
  return "history was cut here: some older messages are no longer kept"; // "trimmed"
}

// The form is novalidate: a name refused once must not block the next submit (the
// browser's own check would stop every later one while the custom message is set).
$("#room-name").addEventListener("input", () => {
  /** @type {HTMLInputElement} */ ($("#room-name")).setCustomValidity("");
});

$("#new-room").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = /** @type {HTMLInputElement} */ ($("#room-name"));
  const name = input.value.trim().toLowerCase();
  if (!ROOM.test(name)) {
    input.setCustomValidity("a-z, 0-9, _ and -, up to 32 (e.g. dev-talk)");
    input.reportValidity();
    return;
  }
  input.setCustomValidity("");
  input.value = "";
  joinRoom(name);
  open({ kind: "room", name });
});

// ---------------------------------------------------------------- presence

async function refreshPresence() {
  const client = state.client;
  const name = state.room;
  const room = state.rooms.get(name);
  if (!room || !client || !client.connected) return;
  try {
    const p = await client.presence(`room:${name}`);
    room.users = new Set(p.users ?? []);
    renderSide();
  } catch (e) {
    console.warn("presence:", e);
  }
}

/** join / leave events (namespaces with join_leave = true) */
function onEvent(/** @type {any} */ ev) {
  if ((ev.op !== "join" && ev.op !== "leave") || typeof ev.ch !== "string") return;
  const room = state.rooms.get(ev.ch.replace(/^room:/, ""));
  if (!room) return;
  if (ev.op === "join") room.users.add(ev.user);
  else room.users.delete(ev.user);
  renderSide();
}

// ---------------------------------------------------------------- direct messages

/** @param {string} peer */
function dmWith(peer) {
  let c = state.dms.get(peer);
  if (!c) {
    c = { lines: [], unread: 0 };
    state.dms.set(peer, c);
    saveDms();
  }
  return c;
}

/** Direct conversations live in this browser only (the node keeps an inbox until it is
 * acknowledged, not a history): kept in localStorage per user, so a reload keeps them. */
function saveDms() {
  /** @type {Record<string, {lines: Line[], unread: number}>} */
  const out = {};
  for (const [peer, c] of state.dms) {
    out[peer] = { lines: c.lines.slice(-DM_LINES), unread: c.unread };
  }
  try {
    localStorage.setItem(`fastim-demo-dms:${state.user}`, JSON.stringify(out));
  } catch (e) {
    console.warn("direct messages not saved:", e); // storage full or refused
  }
}

function loadDms() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(`fastim-demo-dms:${state.user}`) || "{}") || {};
  } catch {
    saved = {};
  }
  for (const [peer, c] of Object.entries(saved)) {
    if (!NAME.test(peer) || !c || !Array.isArray(c.lines)) continue;
    const lines = c.lines.filter((/** @type {any} */ l) => l && typeof l.text === "string");
    for (const l of lines) {
      if (l.pending) {
        // its page went away before the node answered: it may or may not have been stored
        l.pending = false;
        l.failed = "not confirmed before the page was left";
      }
    }
    state.dms.set(peer, { lines, unread: Number(c.unread) || 0 });
  }
}

/** @param {import("../fastim.js").DirectMessage} dm */
function onDirect(dm) {
  const peer = dm.from ?? "server";
  const conv = dmWith(peer);
  // handed over again after a reload before its ack reached the node: shown already
  if (dm.mid && conv.lines.some((l) => l.mid === dm.mid)) return;
  const d = dm.data && typeof dm.data === "object" ? dm.data : { text: String(dm.data) };
  addLine(conv, { who: peer, text: String(d.text ?? ""), ts: Number(d.ts) || Date.now(),
    mid: dm.mid }, { kind: "dm", name: peer }); // prettier-ignore
  saveDms();
  renderSide();
}

/**
 * The inbox's numbering started again (the node lost it: a restart without its store):
 * messages sent to this user before and not received are gone. Said in every direct
 * conversation (the inbox is one for all of them), before what comes next.
 * @param {import("../fastim.js").DirectGap} _g
 */
function onDirectGap(_g) {
  for (const [peer, conv] of state.dms) {
    const last = conv.lines.at(-1);
    if (!last || last.gap) continue; // nothing before to speak of, or said already
    addLine(conv, { who: "", text: "history was lost here: messages sent to you before this " +
      "line and not shown are gone (the node restarted without its store)", ts: Date.now(),
      notice: true, gap: "epoch" }, { kind: "dm", name: peer }); // prettier-ignore
  }
  saveDms();
}

// ---------------------------------------------------------------- sending

$("#composer").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = /** @type {HTMLInputElement} */ ($("#text"));
  const text = input.value.trim();
  const client = state.client;
  if (!text || !client) return;
  input.value = "";
  const cur = { ...state.current };
  const ts = Date.now();
  const conv = cur.kind === "room" ? state.rooms.get(cur.name) : dmWith(cur.name);
  if (!conv) return;
  /** @type {Line} */
  const line = { who: state.user, text, ts, mine: true, pending: true };
  if (cur.kind === "room") line.cid = Math.random().toString(36).slice(2);
  addLine(conv, line, cur); // pending until the node confirms, then sent or not sent
  if (cur.kind === "dm") saveDms();
  try {
    if (cur.kind === "room") {
      // the node's copy (with its offset: one order for all) replaces this line when it
      // comes back; until then, or if it does not, the line stands as sent
      const off = await client.publish(`room:${cur.name}`, { user: state.user, text, ts,
        cid: line.cid }); // prettier-ignore
      line.off = off;
    } else {
      const sent = await client.send(cur.name, { text, ts });
      line.mid = sent.mid;
    }
    line.pending = false;
  } catch (e) {
    line.pending = false;
    line.failed = e instanceof Error ? e.message : String(e);
  }
  if (cur.kind === "dm") saveDms();
  if (sameConv(state.current, cur) && conv.lines.includes(line)) renderMessages();
});

// ---------------------------------------------------------------- rendering

/** @param {{kind: string, name: string}} a  @param {{kind: string, name: string}} b */
function sameConv(a, b) {
  return a.kind === b.kind && a.name === b.name;
}

/**
 * @param {{lines: Line[], unread: number}} conv  @param {Line} line
 * @param {{kind: string, name: string}} where
 */
function addLine(conv, line, where) {
  conv.lines.push(line);
  if (conv.lines.length > 500) conv.lines.splice(0, conv.lines.length - 500);
  if (sameConv(state.current, where)) {
    appendLine(line);
  } else if (!line.notice) {
    conv.unread += 1;
    renderSide();
  }
}

/** @param {{kind: string, name: string}} where */
function open(where) {
  state.current = where;
  if (where.kind === "room") {
    state.room = where.name;
    sessionStorage.setItem("fastim-demo-current", where.name);
  }
  const conv = where.kind === "room" ? state.rooms.get(where.name) : dmWith(where.name);
  if (conv) conv.unread = 0;
  if (where.kind === "dm") saveDms();
  showSide(false); // narrow screens: the conversation takes the screen
  $("#title").textContent = where.kind === "room" ? `# ${where.name}` : `@ ${where.name}`;
  $("#conversation").dataset.kind = where.kind;
  $("#conversation").dataset.name = where.name;
  renderMessages();
  renderSide();
  refreshPresence();
}

function renderMessages() {
  const cur = state.current;
  const conv = cur.kind === "room" ? state.rooms.get(cur.name) : state.dms.get(cur.name);
  $("#messages").replaceChildren();
  for (const line of conv ? conv.lines : []) appendLine(line);
}

/** @param {Line} line */
function appendLine(line) {
  const list = $("#messages");
  const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 40;
  const li = document.createElement("li");
  if (line.notice) {
    li.className = "notice";
    if (line.gap) {
      li.classList.add("gap");
      li.dataset.gap = line.gap;
    }
  } else {
    if (line.mine) li.classList.add("mine");
    if (line.pending) li.classList.add("pending");
    if (line.failed) li.classList.add("failed");
    if (line.off !== undefined) li.dataset.off = String(line.off);
    li.dataset.who = line.who;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = line.who;
    li.append(who);
  }
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = line.text;
  const time = document.createElement("time");
  time.textContent = new Date(line.ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  li.append(text);
  if (!line.gap) li.append(time); // a gap line marks a place in the stream, not a time
  if (line.pending || line.failed) {
    const mark = document.createElement("span");
    mark.className = "mark";
    mark.textContent = line.pending ? "sending…" : `not sent: ${line.failed}`;
    li.append(mark);
  }
  list.append(li);
  if (stick) list.scrollTop = list.scrollHeight;
}

function renderSide() {
  const cur = state.current;
  const rooms = $("#rooms");
  rooms.replaceChildren(
    ...[...state.rooms].map(([name, room]) =>
      item(`# ${name}`, room.unread, sameConv(cur, { kind: "room", name }), () =>
        open({ kind: "room", name }), { room: name })), // prettier-ignore
  );
  const here = state.rooms.get(state.room);
  const people = here ? [...here.users].sort() : [];
  $("#presence").replaceChildren(
    ...people.map((u) =>
      u === state.user
        ? item(`${u} (you)`, 0, false, null, { user: u }, "self")
        : item(u, 0, false, () => open({ kind: "dm", name: u }), { user: u })),
  ); // prettier-ignore
  $("#dms").replaceChildren(
    ...[...state.dms].map(([peer, c]) =>
      item(`@ ${peer}`, c.unread, sameConv(cur, { kind: "dm", name: peer }), () =>
        open({ kind: "dm", name: peer }), { peer })), // prettier-ignore
  );
  // narrow screens: the side panel is behind the menu button, which shows what is unread
  let unread = 0;
  for (const c of [...state.rooms.values(), ...state.dms.values()]) unread += c.unread;
  const menu = $("#menu");
  menu.querySelector(".badge")?.remove();
  if (unread) {
    const b = document.createElement("span");
    b.className = "badge";
    b.textContent = String(unread);
    menu.append(b);
  }
}

// ---------------------------------------------------------------- narrow screens

/** Show or hide the side panel (only narrow screens hide it: demo.css). @param {boolean} on */
function showSide(on) {
  $("#chat").classList.toggle("side-open", on);
  $("#menu").setAttribute("aria-expanded", String(on));
  /** @type {HTMLElement} */ ($("#menu .label")).textContent = on ? "Chat" : "Rooms";
}

$("#menu").addEventListener("click", () => showSide(!$("#chat").classList.contains("side-open")));

/**
 * @param {string} label  @param {number} unread  @param {boolean} current
 * @param {(() => void)|null} onClick  @param {Record<string, string>} data  @param {string} [cls]
 */
function item(label, unread, current, onClick, data, cls) {
  const li = document.createElement("li");
  li.textContent = label;
  Object.assign(li.dataset, data);
  if (current) li.classList.add("current");
  if (cls) li.classList.add(cls);
  if (unread) {
    const b = document.createElement("span");
    b.className = "badge";
    b.textContent = String(unread);
    li.append(b);
  }
  if (onClick) {
    li.tabIndex = 0;
    li.addEventListener("click", onClick);
    li.addEventListener("keydown", (ev) => ev.key === "Enter" && onClick());
  }
  return li;
}
