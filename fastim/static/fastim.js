// fastim.js: the browser client of fastim (an ES module, no dependencies, no build step).
//
// Served by every fastim node at /fastim.js. It speaks the JSON protocol over WebSocket
// (subprotocol "fastim.json", docs/protocol.md) and keeps the Python SDK's promises
// (docs/client.md) across reconnects:
//
// - each channel message is handed to the application once, in offset order: on every
//   reconnect a subscription asks again with `since` (its epoch and last offset), the
//   node sends what was missed, and offsets already delivered are dropped; history the
//   node no longer has is reported as a gap, in stream order;
// - each direct message is handed over once, in seq order (copies from the node's
//   retries and replays are dropped), and acknowledged cumulatively once taken;
// - a `send` is retried with the same client id (`cid`) until the node acknowledges it,
//   so it is stored once;
// - reconnects wait with exponential backoff and full jitter, and stop on close codes
//   that say "do not retry the same thing" (4500-4999, 1002, 1008...).
//
//   import { connect } from "/fastim.js";
//   const client = connect({ user: "alice" });
//   const room = client.subscribe("room:lobby", { history: 50, onMessage: (m) => show(m) });
//   await client.publish("room:lobby", { text: "hi" });
//   client.onDirect = (dm) => console.log(dm.from, dm.data);
//   await client.send("bob", { text: "psst" });

/** Protocol version this client speaks (docs/protocol.md). */
export const PROTOCOL_VERSION = 1;

/** fastim error codes the client acts on (docs/protocol.md, "Error codes"). */
export const ErrorCode = Object.freeze({
  BAD_REQUEST: 102,
  LIMIT_EXCEEDED: 109,
  NOT_SUBSCRIBED: 111,
  ALREADY_SUBSCRIBED: 112,
  INBOX_FULL: 113,
  STORE_UNAVAILABLE: 114,
  NO_USER: 115,
  RATE_LIMITED: 116,
  AUTH_FAILED: 117,
  PERMISSION_DENIED: 118,
  BACKEND_UNAVAILABLE: 120,
  NOT_AVAILABLE: 121,
});

/**
 * @typedef {object} Since  A position in a channel's history.
 * @property {number} off    the last offset delivered
 * @property {string} epoch  the history it belongs to
 *
 * @typedef {object} Message  One channel message.
 * @property {string} channel
 * @property {number} offset  strictly increasing within an epoch
 * @property {any} data       the published JSON document
 *
 * @typedef {object} Gap  Messages of a channel the application will never see.
 * @property {string} channel
 * @property {string} lastEpoch   epoch of the last message delivered before the gap
 * @property {number} lastOffset  last offset delivered before the gap (0: none)
 * @property {string} epoch       the channel's epoch from here on
 * @property {number} offset      the channel's latest offset when the gap was found
 * @property {"trimmed"|"epoch"|"rewound"} reason  history trimmed (what was left
 *     follows), history lost (a new epoch: offsets start again), or the store went back
 *
 * @typedef {object} Subscribed  The node's answer to a subscribe.
 * @property {string} epoch
 * @property {number} offset     the channel's latest offset when it took effect
 * @property {boolean} recovered every message asked for (since / history) was sent
 *
 * @typedef {object} DirectMessage  A direct message to this client's user.
 * @property {number} seq        the recipient's sequence: 1, 2, 3, ...
 * @property {string} mid        the node's message id
 * @property {string|null} from  the sender's user id
 * @property {any} data
 * @property {string} epoch      the inbox's epoch: seq counts within it
 *
 * @typedef {object} DirectGap  The inbox's numbering started again (the node's store
 *     lost it): messages of the old epoch after `lastSeq` not received may be lost;
 *     the new epoch's messages follow, from its start.
 * @property {string} lastEpoch  the epoch this client was in
 * @property {number} lastSeq    its last seq handed to onDirect (0: none)
 * @property {string} epoch      the inbox's epoch from here on
 *
 * @typedef {object} Sent  The node's acknowledgement of a send.
 * @property {string} mid
 * @property {number} seq
 * @property {boolean} dup  this cid had been stored before (a retry)
 *
 * @typedef {object} Presence
 * @property {string} ch
 * @property {number} count     subscribed connections
 * @property {string[]} [users] distinct users (absent where the namespace hides them)
 *
 * @typedef {object} BackoffOptions  Delay before each reconnect attempt, in ms.
 * @property {number} [base=100]    ceiling of the first attempt
 * @property {number} [factor=2]    growth of the ceiling per attempt
 * @property {number} [max=10000]   cap on the ceiling
 * @property {"full"|"equal"|"none"} [jitter="full"]  uniform in [0, ceiling], in
 *     [ceiling/2, ceiling], or exactly the ceiling
 *
 * @typedef {"connecting"|"connected"|"reconnecting"|"suspended"|"closed"} State
 *     suspended: the page was hidden (left for another); it reconnects if shown again
 *
 * @typedef {object} ClientOptions
 * @property {string|string[]} [url]  ws:// or wss:// URL(s) of nodes, tried in turn;
 *     default: the /ws endpoint of the origin this module was loaded from
 * @property {string} [user]      user to declare (nodes without token verification):
 *     needed for direct messages and presence
 * @property {string} [token]     a connect token (JWT), sent as ?token= at the upgrade
 * @property {() => (string|Promise<string>)} [getToken]  called for a fresh token before
 *     each connection and before the current one expires (then sent as "refresh")
 * @property {BackoffOptions} [backoff]
 * @property {number} [requestTimeout=10000]  ms to wait for a reply (and for a
 *     connection, while reconnecting)
 * @property {number} [sendTimeout=30000]     ms a send keeps retrying
 * @property {boolean} [autoAck=true]  acknowledge a direct message once onDirect returned
 *     (or its promise resolved); false: call client.ack(seq)
 * @property {(dm: DirectMessage) => any} [onDirect]
 * @property {(gap: DirectGap) => void} [onDirectGap]  called, in order with onDirect,
 *     where the inbox's numbering started again
 * @property {(event: object) => void} [onEvent]  join, leave and other events
 * @property {(state: State, info: {code?: number, reason?: string}) => void} [onState]
 * @property {(err: Error) => void} [onError]  failures with no request to report them to
 * @property {(sub: Subscription) => void} [onServerSubscribe]  a channel the node
 *     subscribed this connection to by itself (a connect hook's `channels`)
 * @property {(m: Message) => void} [onMessage]  messages of server-side subscriptions
 * @property {(g: Gap) => void} [onGap]  gaps of server-side subscriptions
 * @property {WebSocketClass} [WebSocket]  the WebSocket class to connect with; default:
 *     the global one (browsers, Deno, Bun, Node 22+ or Node 20 with
 *     --experimental-websocket); elsewhere pass one, e.g. the `ws` package's
 * @property {Transport[]} [transports]  what to connect with, in order of preference
 *     (default ["websocket", "http_stream", "sse"]): one that cannot connect (blocked
 *     WebSocket, a proxy that drops upgrades or buffers streams) is followed by the
 *     next at once; each reconnect starts again with the first. Those the runtime
 *     lacks (no WebSocket, fetch or EventSource) are left out.
 * @property {(transport: Transport) => void} [onTransport]  called with the transport
 *     of each new connection whose transport differs from the last one's
 *     (also `client.transport`)
 *
 * @typedef {"websocket" | "http_stream" | "sse"} Transport
 *
 * @typedef {new (url: string, protocols?: string | string[]) => WebSocket} WebSocketClass
 */

/** The node refused a request. */
export class RequestError extends Error {
  /** @param {number} code  @param {string} reason */
  constructor(code, reason) {
    super(`${code}: ${reason}`);
    this.name = "RequestError";
    /** fastim error code */
    this.code = code;
    this.reason = reason;
  }
}

/** The connection was lost (or the client closed) before the reply came. */
export class ConnectionClosed extends Error {
  /** @param {number} code  @param {string} reason */
  constructor(code, reason) {
    super(`connection closed: ${code} ${reason}`.trim());
    this.name = "ConnectionClosed";
    this.code = code;
    this.reason = reason;
  }

  /** Whether reconnecting may help (docs/protocol.md, "Close codes"). */
  get temporary() {
    return shouldReconnect(this.code);
  }
}

/** No reply (or no connection) in time. */
export class TimeoutError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "TimeoutError";
  }
}

/**
 * Close codes after which reconnecting may help; others mean "fix the client" or "do
 * not reconnect automatically" (4500-4999: bad request, auth failed, disconnected).
 * 1006 is what a browser reports when the connection dropped without a close frame.
 * @param {number} code
 */
export function shouldReconnect(code) {
  return [1001, 1006, 1011, 1012, 1013].includes(code) || (code >= 4000 && code < 4500);
}

/** Exponential backoff with jitter: the delay before each reconnect attempt. */
export class Backoff {
  /** @param {BackoffOptions} [opts] */
  constructor(opts = {}) {
    this.base = opts.base ?? 100;
    this.factor = opts.factor ?? 2;
    this.max = opts.max ?? 10000;
    this.jitter = opts.jitter ?? "full";
    if (!(this.base > 0) || !(this.factor >= 1) || !(this.max >= this.base)) {
      throw new RangeError("backoff: need base > 0, factor >= 1, max >= base");
    }
    this.attempts = 0;
    this._ceiling = this.base;
  }

  /** Draw the next delay (ms) and advance. */
  next() {
    const cap = this._ceiling;
    this.attempts += 1;
    this._ceiling = Math.min(this.max, cap * this.factor);
    if (this.jitter === "full") return Math.random() * cap;
    if (this.jitter === "equal") return cap / 2 + Math.random() * (cap / 2);
    return cap;
  }

  /** Start over (after a successful connection). */
  reset() {
    this.attempts = 0;
    this._ceiling = this.base;
  }
}

/** @type {BackoffOptions} */
const SEND_BACKOFF = { base: 50, factor: 2, max: 2000, jitter: "full" };
const RESUB_RETRY = [200, 5000];
const HOLE_CHECK = [200, 5000];
const ACK_RETRY = 500;
const MAX_LEFT_EPOCHS = 8;

/** @param {number} ms */
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A random client id for a send (crypto.randomUUID needs a secure context; this does not). */
function newCid() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** The default endpoint: /ws on the origin this module came from (http→ws, https→wss). */
function defaultUrl() {
  if (!/^https?:/.test(import.meta.url)) {
    throw new TypeError(`connect: pass url (this module was not loaded from a node: ${import.meta.url})`);
  }
  const u = new URL("/ws", import.meta.url);
  u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
  return u.href;
}

/** Seconds since the epoch at which a JWT expires, or null (the signature is the node's business). */
function tokenExp(/** @type {string} */ token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4))).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

/**
 * A channel subscription. Created by {@link Client#subscribe}; lives across reconnects.
 * Messages go to `onMessage` once each, in offset order; gaps to `onGap`, in order.
 */
export class Subscription {
  /**
   * @param {Client} client
   * @param {string} channel
   * @param {{history?: number, since?: Since, onMessage?: (m: Message) => void,
   *          onGap?: (g: Gap) => void, onError?: (e: Error) => void}} opts
   */
  constructor(client, channel, opts) {
    this.channel = channel;
    /** The last offset delivered (or where the subscription started). */
    this.offset = opts.since ? opts.since.off : 0;
    /** The epoch `offset` belongs to ("" until the node named one). */
    this.epoch = opts.since ? opts.since.epoch : "";
    /** Newest messages asked for on the first subscribe (when no `since`). */
    this.history = opts.history ?? 0;
    this.onMessage = opts.onMessage ?? null;
    this.onGap = opts.onGap ?? null;
    this.onError = opts.onError ?? null;
    /** Messages delivered, copies dropped, gaps found. */
    this.delivered = 0;
    this.duplicates = 0;
    this.gaps = 0;
    /** @type {Gap|null} */
    this.lastGap = null;
    this.active = true;
    this._client = client;
    this._retryDelay = 0;
    /** @type {Map<string, number>} epochs left → the last offset delivered in each */
    this._left = new Map();
    /** Asked for Fossil deltas (docs/delta.md); deltas applied, deltas that failed. */
    this.delta = opts.delta === "fossil";
    this.deltas = 0;
    this.deltaFailures = 0;
    /** @type {Uint8Array|null} the data of the last message received: the next base */
    this._base = null;
    this._baseOff = 0;
    this._resyncing = false;
    /** @type {(v: Subscribed) => void} */
    let ok = () => {};
    /** @type {(e: Error) => void} */
    let fail = () => {};
    /** Resolves with the first answer of the node; rejects if the node refused. */
    this.ready = /** @type {Promise<Subscribed>} */ (
      new Promise((resolve, reject) => ((ok = resolve), (fail = reject)))
    );
    this.ready.catch(() => {}); // reported through onError too; no unhandled rejection
    this._ready = ok;
    this._readyFail = fail;
    this._answered = false;
  }

  /** Where this subscription is: pass it as `since` to resume elsewhere (another page). */
  get since() {
    return { off: this.offset, epoch: this.epoch };
  }

  /** Stop: no more messages. Resolves when the node confirmed (or at once if offline). */
  unsubscribe() {
    return this._client._unsubscribe(this);
  }

  /** @param {string} epoch  @param {number} offset */
  _move(epoch, offset) {
    if (this.epoch && epoch !== this.epoch) {
      this._left.set(this.epoch, this.offset);
      for (const old of this._left.keys()) {
        if (this._left.size <= MAX_LEFT_EPOCHS) break;
        this._left.delete(old);
      }
    }
    this.epoch = epoch;
    this.offset = offset;
  }

  /** @param {Message} msg */
  _deliver(msg) {
    this.delivered += 1;
    this._client._callback(this.onMessage, msg);
  }

  /** @param {Gap} gap */
  _gap(gap) {
    this.gaps += 1;
    this.lastGap = gap;
    this._client._callback(this.onGap, gap);
  }

  /** @param {Error} err */
  _end(err) {
    if (!this.active) return;
    this.active = false;
    if (!this._answered) this._readyFail(err);
    if (err && !(err instanceof ConnectionClosed && err.code === 1000)) {
      this._client._callback(this.onError, err);
    }
  }
}

/** Commands per POST at most (the node takes 256: fastim/transport/sse.py). */
const POST_BATCH = 200;

/**
 * A node's stream (docs/transports.md) behind the few WebSocket members the client
 * uses (send, close, onopen, onmessage, onclose, onerror), so every other part of the
 * client is the same on each transport. Events arrive as Server-Sent Events, read by
 * `fetch` ("http_stream") or `EventSource` ("sse"); commands go out as POSTs of JSON
 * lines to `<stream>/<sid>`, one POST at a time so they keep their order.
 */
class StreamSocket {
  /** @param {string} url  http(s) URL of /stream or /sse  @param {Transport} kind */
  constructor(url, kind) {
    this.url = url;
    this.kind = kind;
    this.readyState = 0;
    /** @type {any} */ this.onopen = null;
    /** @type {any} */ this.onmessage = null;
    /** @type {any} */ this.onclose = null;
    /** @type {any} */ this.onerror = null;
    /** @type {string|null} */ this._post = null;
    /** @type {string[]} */ this._out = [];
    this._posting = false;
    this._ended = false;
    /** the node could not be reached at all (fetch failed): no transport would be */
    this.unreachable = false;
    /** @type {EventSource|null} */ this._es = null;
    this._abort = typeof AbortController === "function" ? new AbortController() : null;
    setTimeout(() => (kind === "sse" ? this._startSse() : this._startFetch()), 0);
  }

  async _startFetch() {
    let res;
    try {
      res = await fetch(this.url, {
        method: "POST",
        credentials: "include",
        signal: this._abort ? this._abort.signal : undefined,
      });
    } catch (e) {
      this.unreachable = true;
      this._fail(1006, `could not connect: ${e}`);
      return;
    }
    if (!res.ok || !res.body) {
      this._fail(1006, `HTTP ${res.status} from ${this.kind}`);
      return;
    }
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || this._ended) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          /** @type {string|null} */
          let data = null;
          for (const line of block.split("\n")) {
            if (!line.startsWith("data:")) continue; // comments (": ping"), id, retry
            const v = line.slice(line[5] === " " ? 6 : 5);
            data = data === null ? v : `${data}\n${v}`;
          }
          if (data !== null) this._data(data);
          if (this._ended) return;
        }
      }
    } catch {
      /* aborted, or the connection broke */
    }
    this._fail(1006, "stream ended");
  }

  _startSse() {
    let es;
    try {
      es = new EventSource(this.url, { withCredentials: true });
    } catch (e) {
      this._fail(1006, `could not connect: ${e}`);
      return;
    }
    this._es = es;
    es.onmessage = (ev) => this._data(ev.data);
    // EventSource would reconnect by itself: the client does (backoff, other nodes,
    // resubscribing with since), so the first error ends this stream
    es.onerror = () => this._fail(1006, this.readyState ? "stream lost" : "could not connect");
  }

  /** @param {string} text  one event's data: a JSON object */
  _data(text) {
    if (this.readyState === 0) {
      let obj = null;
      try {
        obj = JSON.parse(text);
      } catch {
        /* not ours */
      }
      if (!obj || obj.op !== "session") {
        this._fail(1002, "the stream did not start with its session");
        return;
      }
      this._post = new URL(`${this.kind === "sse" ? "sse" : "stream"}/${obj.sid}`, this.url).href;
      this.readyState = 1;
      if (this.onopen) this.onopen({});
      this._pump();
      return;
    }
    if (text.startsWith('{"op":"close"')) {
      const obj = JSON.parse(text);
      this._fail(obj.code, obj.reason);
      return;
    }
    if (this.onmessage) this.onmessage({ data: text });
  }

  /** @param {string} text  one JSON command */
  send(text) {
    if (this.readyState > 1) return;
    this._out.push(text);
    this._pump();
  }

  async _pump() {
    if (this._posting || this.readyState !== 1 || !this._out.length || !this._post) return;
    this._posting = true;
    const batch = this._out.splice(0, POST_BATCH);
    try {
      const r = await fetch(this._post, { method: "POST", body: batch.join("\n"), credentials: "include" });
      if (!r.ok) this._fail(1006, r.status === 404 ? "the node closed the stream" : `POST: HTTP ${r.status}`);
    } catch (e) {
      this._fail(1006, `POST failed: ${e}`);
    }
    this._posting = false;
    this._pump();
  }

  close() {
    if (this._ended) return;
    this._ended = true;
    this.readyState = 3;
    if (this._abort) this._abort.abort();
    if (this._es) this._es.close();
  }

  /** @param {number} code  @param {string} reason */
  _fail(code, reason) {
    if (this._ended) return;
    const opened = this.readyState === 1;
    this.close();
    if (!opened && this.onerror) this.onerror({}); // an attempt that never opened
    if (this.onclose) this.onclose({ code, reason });
  }
}

/**
 * The /stream or /sse URL next to a node's WebSocket URL (ws→http, wss→https; a path
 * under a prefix keeps it: /app/ws → /app/stream).
 * @param {string} wsUrl  @param {Transport} kind
 */
export function streamUrl(wsUrl, kind) {
  const u = new URL(kind === "sse" ? "sse" : "stream", wsUrl);
  u.protocol = u.protocol === "wss:" || u.protocol === "https:" ? "https:" : "http:";
  return u.href;
}

/**
 * A fastim connection that reconnects by itself. Create it with {@link connect}.
 */
export class Client {
  /** @param {ClientOptions} [opts] */
  constructor(opts = {}) {
    const urls = opts.url ?? defaultUrl();
    /** @type {string[]} */
    this.urls = Array.isArray(urls) ? urls.slice() : [urls];
    if (!this.urls.length) throw new TypeError("connect: no url");
    /** @type {WebSocketClass} */
    this._WebSocket = opts.WebSocket ?? globalThis.WebSocket;
    const has = {
      websocket: typeof this._WebSocket === "function",
      http_stream: typeof globalThis.fetch === "function" && typeof TextDecoder === "function",
      sse: typeof globalThis.EventSource === "function" && typeof globalThis.fetch === "function",
    };
    /** @type {Transport[]} the transports to try, in order (those this runtime has) */
    this.transports = (opts.transports ?? ["websocket", "http_stream", "sse"]).filter(
      (t) => has[t],
    );
    /** @type {Transport|null} the transport of the current (or last) connection */
    this.transport = null;
    this.onTransport = opts.onTransport ?? null;
    this._tIndex = 0;
    /** attempts made in this round of transports (a round that all fail backs off) */
    this._tTried = 0;
    if (!this.transports.length) {
      throw new TypeError(
        "no WebSocket implementation: pass one as the WebSocket option, " +
          "connect({url, WebSocket: Impl}) (e.g. the ws package's), " +
          "or run Node 22+ or Node 20 with --experimental-websocket",
      );
    }
    this.user = opts.user ?? null;
    this.token = opts.token ?? null;
    this.getToken = opts.getToken ?? null;
    this.backoff = new Backoff(opts.backoff);
    this.requestTimeout = opts.requestTimeout ?? 10000;
    this.sendTimeout = opts.sendTimeout ?? 30000;
    this.autoAck = opts.autoAck ?? true;
    this.onEvent = opts.onEvent ?? null;
    this.onState = opts.onState ?? null;
    this.onError = opts.onError ?? null;
    /** Channels the node subscribed this connection to (a connect hook's): called with
     * each new server-side Subscription; its messages go to `onMessage` (and its gaps
     * to `onGap`) unless the callback sets the subscription's own. */
    this.onServerSubscribe = opts.onServerSubscribe ?? null;
    this.onMessage = opts.onMessage ?? null;
    this.onGap = opts.onGap ?? null;
    /** @type {State} */
    this.state = "connecting";
    /** Connections made after the first one. */
    this.reconnects = 0;
    /** The node's welcome (node id, heartbeat settings, user), once connected. */
    this.welcome = null;
    /** @type {Map<string, Subscription>} */
    this.subscriptions = new Map();
    /** Direct messages: every seq up to `delivered` was handed over (null: not known). */
    this.inbox = { delivered: /** @type {number|null} */ (null), taken: 0, acked: 0,
      duplicates: 0, skipped: 0, epoch: "", gaps: 0,
      lastGap: /** @type {DirectGap|null} */ (null) }; // prettier-ignore
    /** Called with each DirectGap, in order with onDirect. */
    this.onDirectGap = opts.onDirectGap ?? null;
    /** @type {string[]} inbox epochs left: their late copies are dropped */
    this._leftEpochs = [];

    /** @type {WebSocket|null} */
    this._ws = null;
    this._connected = false;
    this._closing = false;
    /** @type {ConnectionClosed|null} */
    this._failure = null;
    /** index in `urls` of the node tried last: a failed or lost one is followed by the next */
    this._urlIndex = 0;
    this._nextId = 1;
    /** @type {Map<number, {resolve: (v: any) => void, reject: (e: Error) => void, timer: any, sub?: Subscription, since?: Since|null, history?: number}>} */
    this._pending = new Map();
    /** @type {Array<() => void>} */
    this._waiters = [];
    this._pingInterval = 25000;
    this._deadAfter = 35000;
    this._lastRx = 0;
    this._hb = null;
    this._refreshTimer = null;
    /** @type {Map<number, DirectMessage>} */
    this._held = new Map();
    /** @type {Array<DirectMessage|{gap: DirectGap}>} */
    this._dmQueue = [];
    this._dmRunning = false;
    this._ackInflight = false;
    this._checking = false;
    this._onDirect = opts.onDirect ?? null;
    this._everWelcomed = false;
    this._suspended = false;
    /** @type {any} */
    this._reconnectTimer = null;
    /** @type {any} */
    this._handshakeTimer = null;
    // A page left for another keeps running in the back/forward cache with its socket
    // open, so the node would show its user present; close on pagehide, reconnect (and
    // recover what was missed) if the page is shown again.
    this._onPageHide = () => this._suspend();
    this._onPageShow = (/** @type {PageTransitionEvent} */ ev) => ev.persisted && this._resume();
    if (typeof window !== "undefined" && window.addEventListener) {
      window.addEventListener("pagehide", this._onPageHide);
      window.addEventListener("pageshow", this._onPageShow);
    }
    this._open(this.urls[0]);
  }

  /** Called with each direct message, once, in seq order. Messages wait until it is set. */
  get onDirect() {
    return this._onDirect;
  }

  set onDirect(fn) {
    this._onDirect = fn;
    this._runDirect();
  }

  /** Whether a connection is up and ready for requests. */
  get connected() {
    return this._connected;
  }

  /** Resolves when connected (at once if connected now); rejects when closed for good. */
  ready(timeout = this.requestTimeout) {
    return this._waitReady(Date.now() + timeout);
  }

  /**
   * Subscribe to a channel. Messages (and gaps) go to the callbacks in order; the
   * subscription survives reconnects without losing or repeating a message.
   * @param {string} channel
   * @param {{history?: number, since?: Since, onMessage?: (m: Message) => void,
   *          onGap?: (g: Gap) => void, onError?: (e: Error) => void, delta?: string}} [opts]
   *   history: on the first subscribe, the channel's newest N messages first;
   *   since: resume where another subscription was (its `since`);
   *   delta: "fossil" asks for Fossil deltas where the namespace has them (applied
   *   here: onMessage gets the same documents; docs/delta.md)
   * @returns {Subscription}  `sub.ready` resolves with the node's answer
   */
  subscribe(channel, opts = {}) {
    this._checkOpen();
    if (this.subscriptions.has(channel)) throw new Error(`already subscribed to ${channel}`);
    const sub = new Subscription(this, channel, opts);
    this.subscriptions.set(channel, sub);
    if (this._connected) this._subscribeOn(sub);
    else {
      // subscribed when the connection comes; a node that never comes fails `ready`
      const timer = setTimeout(() => {
        if (!sub._answered && !this._connected && this.subscriptions.get(channel) === sub) {
          sub._readyFail(new TimeoutError(`not connected within ${this.requestTimeout} ms`));
        }
      }, this.requestTimeout);
      sub.ready.finally(() => clearTimeout(timer)).catch(() => {});
    }
    return sub;
  }

  /**
   * Publish; resolves with the message's offset once the node stored it. Not retried
   * after a lost connection (it may have been stored: put an id in the message if your
   * application resends).
   * @param {string} channel  @param {any} data  @returns {Promise<number>}
   */
  async publish(channel, data) {
    const reply = await this._request({ op: "pub", ch: channel, data });
    return reply.off;
  }

  /**
   * Send a direct message to a user; resolves once the node stored it in their inbox.
   * Retried with the same `cid` (so stored once) after a lost connection, a
   * STORE_UNAVAILABLE reply or a timeout, until acknowledged or `sendTimeout`.
   * @param {string} to  @param {any} data
   * @param {{cid?: string, timeout?: number}} [opts]
   * @returns {Promise<Sent>}
   */
  async send(to, data, opts = {}) {
    const cid = opts.cid ?? newCid();
    const cmd = { op: "send", to, data, cid };
    JSON.stringify(cmd); // a TypeError now rather than on each attempt
    const limit = opts.timeout ?? this.sendTimeout;
    const end = Date.now() + limit;
    const backoff = new Backoff(SEND_BACKOFF);
    let last = null;
    for (;;) {
      this._checkOpen();
      const left = end - Date.now();
      if (left <= 0) {
        throw new TimeoutError(`send to ${to} (cid ${cid}) not acknowledged in ${limit} ms: ${last}`);
      }
      try {
        const r = await this._request(cmd, Math.min(this.requestTimeout, left));
        return { mid: r.mid, seq: r.seq, dup: !!r.dup, epoch: r.epoch || "" };
      } catch (e) {
        if (e instanceof RequestError && e.code === ErrorCode.STORE_UNAVAILABLE) {
          last = e;
          await sleep(Math.min(backoff.next(), Math.max(0, end - Date.now())));
        } else if (e instanceof ConnectionClosed && e.temporary && !this._closing) {
          last = e; // the next attempt waits for the reconnect
        } else if (e instanceof TimeoutError) {
          last = e;
        } else {
          throw e;
        }
      }
    }
  }

  /**
   * Acknowledge direct messages up to `seq` (with `autoAck: false`).
   * @param {number} seq
   */
  ack(seq) {
    this._took(seq, this.inbox.epoch);
  }

  /** @param {number} seq  @param {string} epoch  the message's (a left one is not acked) */
  _took(seq, epoch) {
    if (epoch !== this.inbox.epoch) return;
    const d = this.inbox.delivered;
    if (d !== null) seq = Math.min(seq, d); // never ack what this client has not seen
    if (seq > this.inbox.taken) {
      this.inbox.taken = seq;
      this._pumpAck();
    }
  }

  /** @param {string} channel  @returns {Promise<Presence>} */
  presence(channel) {
    return this._request({ op: "presence", ch: channel });
  }

  /**
   * Call a method of the application's backend through this connection (the node's
   * rpc hook, docs/proxy.md); resolves with the backend's `data`. Rejects with a
   * RequestError: the backend's own code, BACKEND_UNAVAILABLE (120), NOT_AVAILABLE (121).
   * @param {string} method  @param {any} [data]  @returns {Promise<any>}
   */
  async rpc(method, data) {
    /** @type {{op: string, method: string, data?: any}} */
    const cmd = { op: "rpc", method };
    if (data !== undefined) cmd.data = data;
    const r = await this._request(cmd);
    return r.data;
  }

  /** The inbox as the node has it. @returns {Promise<{acked: number, top: number, epoch: string}>} */
  async inboxState() {
    const r = await this._request({ op: "inbox" });
    return { acked: r.acked, top: r.top, epoch: r.epoch || "" };
  }

  /** Close for good: pending requests fail, subscriptions end. */
  close() {
    if (this._closing) return;
    this._closing = true;
    if (typeof window !== "undefined" && window.removeEventListener) {
      window.removeEventListener("pagehide", this._onPageHide);
      window.removeEventListener("pageshow", this._onPageShow);
    }
    const why = new ConnectionClosed(1000, "client closed");
    this._failure = why;
    if (this._reconnectTimer) clearTimeout(this._reconnectTimer);
    const ws = this._ws;
    this._detach();
    if (ws) {
      try {
        ws.close(1000, "bye");
      } catch {
        /* already closing */
      }
    }
    this._lost(why);
    this._endAll(why);
    this._setState("closed", { code: 1000, reason: "client closed" });
  }

  // ------------------------------------------------------------------ connection

  /** The page is hidden (pagehide): close the socket, keep every subscription's place. */
  _suspend() {
    if (this._closing || this._suspended) return;
    this._suspended = true;
    if (this._reconnectTimer) clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    const ws = this._ws;
    this._detach();
    if (ws) {
      try {
        ws.close(1000, "page hidden");
      } catch {
        /* closing */
      }
    }
    this._lost(new ConnectionClosed(1001, "page hidden"));
    this._setState("suspended", { code: 1001, reason: "page hidden" });
  }

  /** The page is shown again from the back/forward cache: reconnect and recover. */
  _resume() {
    if (this._closing || !this._suspended) return;
    this._suspended = false;
    this.backoff.reset();
    this._setState("reconnecting", {});
    this._open(this.urls[this._urlIndex]);
  }

  /** @param {string} url */
  async _open(url) {
    if (this._closing || this._suspended) return;
    let target = url;
    try {
      if (this.getToken) this.token = await this.getToken();
    } catch (e) {
      this._callback(this.onError, e);
      this._retry(new ConnectionClosed(1006, `getToken failed: ${e}`));
      return;
    }
    if (this._closing || this._suspended) return;
    /** @type {Record<string, Since>} where the server-side subscriptions were */
    const positions = {};
    for (const sub of this.subscriptions.values()) {
      if (sub.server && sub.epoch) positions[sub.channel] = sub.since;
    }
    if (this.token || Object.keys(positions).length) {
      const u = new URL(url);
      if (this.token) u.searchParams.set("token", this.token);
      // the node subscribes them again by itself, recovering from there
      if (Object.keys(positions).length) u.searchParams.set("subs", JSON.stringify(positions));
      target = u.href;
    }
    const kind = this.transports[this._tIndex];
    /** @type {any} */
    let ws;
    try {
      if (kind === "websocket") ws = new this._WebSocket(target, "fastim.json");
      else ws = new StreamSocket(streamUrl(target, kind) + new URL(target).search, kind);
      ws.kind = kind;
    } catch (e) {
      // a malformed URL: retrying cannot help
      this._giveUp(new ConnectionClosed(1002, `bad url ${url}: ${e}`));
      return;
    }
    this._ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this._onOpen(ws);
    };
    ws.onmessage = (ev) => this._onMessage(ws, ev);
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason);
    // Once open, a close event follows an error, with the code. Before open, browsers
    // follow it with a 1006 close but Node's WebSocket (undici) sends none: the attempt
    // failed either way, go on to the backoff now (not after the handshake timeout).
    ws.onerror = () => {
      if (!opened) this._onConnectFailed(ws);
    };
    // a node that takes the connection but never answers (or a path that drops it
    // silently) must not leave the client waiting: give up on it and try again
    this._handshakeTimer = setTimeout(() => {
      if (ws !== this._ws || this._connected) return;
      this._detach();
      try {
        ws.close(1000, "handshake timeout");
      } catch {
        /* closing */
      }
      const why = new ConnectionClosed(4000, `no welcome within ${this.requestTimeout} ms`);
      if (!this._nextTransport()) this._retry(why); // a proxy that holds streams back
    }, this.requestTimeout);
  }

  /** @param {WebSocket} ws */
  _onOpen(ws) {
    if (ws !== this._ws) return;
    this._lastRx = Date.now();
    // always a hello: its welcome says who the node takes this connection for (a
    // token's user, or the one a connect hook decided from the page's cookies)
    /** @type {{op: string, id: number, user?: string}} */
    const hello = { op: "hello", id: this._nextId++ };
    if (this.user) hello.user = this.user;
    this._pending.set(hello.id, {
      resolve: (w) => this._onWelcome(ws, w),
      reject: (e) => {
        // AUTH_FAILED and the like: the close that follows decides what happens next
        if (!(e instanceof ConnectionClosed)) this._callback(this.onError, e);
      },
      timer: null,
    });
    ws.send(JSON.stringify(hello));
  }

  /**
   * The handshake is done: resubscribe, start the heartbeat, let requests go.
   * @param {WebSocket} ws  @param {any} welcome  (null: no hello was needed)
   */
  _onWelcome(ws, welcome) {
    if (ws !== this._ws) return;
    clearTimeout(this._handshakeTimer);
    this.welcome = welcome;
    if (welcome && typeof welcome.ping_interval === "number") {
      this._pingInterval = welcome.ping_interval * 1000;
      this._deadAfter = (welcome.ping_interval + (welcome.pong_timeout ?? 10)) * 1000;
    }
    if (this._everWelcomed) this.reconnects += 1;
    this._everWelcomed = true;
    const kind = /** @type {any} */ (ws).kind;
    // the next connection starts with the preferred transport again: a fallback taken
    // while the node was restarting (its WebSocket refused a moment before its stream
    // was accepted) must not stick; behind a proxy that blocks WebSocket that costs
    // one quickly refused attempt per reconnect
    this._tTried = 0;
    this._tIndex = 0;
    if (kind !== this.transport) {
      this.transport = kind;
      this._callback(this.onTransport, kind);
    }
    this._connected = true;
    this.backoff.reset();
    for (const sub of this.subscriptions.values()) {
      if (!sub.server) this._subscribeOn(sub); // the node subscribes server-side ones
    }
    this._startHeartbeat();
    this._scheduleRefresh();
    this._setState("connected", {});
    const waiters = this._waiters;
    this._waiters = [];
    for (const w of waiters) w();
    this._pumpAck(); // an ack the last connection could not deliver
  }

  /** @param {WebSocket} ws  The connection could not be made (an error before open). */
  _onConnectFailed(ws) {
    if (ws !== this._ws) return;
    this._detach();
    try {
      ws.close();
    } catch {
      /* closed already */
    }
    // a stream that could not reach the node at all (a network error, not an HTTP
    // answer): the next transport would not either; back off (and, once the node is
    // back, do not land on a later transport than the proxy needs)
    const down = /** @type {any} */ (ws).unreachable === true;
    if (down) {
      this._tTried = 0;
      this._tIndex = 0;
    }
    if (down || !this._nextTransport()) {
      this._retry(new ConnectionClosed(1006, "could not connect"));
    }
  }

  /**
   * The current transport could not connect: try the next one now, on the same node
   * (true), unless every transport failed in this round (false: back off, as before).
   */
  _nextTransport() {
    this._tTried += 1;
    this._tIndex = (this._tIndex + 1) % this.transports.length;
    if (this._tTried >= this.transports.length) {
      this._tTried = 0;
      this._tIndex = 0; // the next round starts with the preferred one again
      return false;
    }
    if (this._closing || this._suspended) return true;
    this._open(this.urls[this._urlIndex]);
    return true;
  }

  /** @param {WebSocket} ws  @param {number} code  @param {string} reason */
  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    this._detach();
    this._retry(new ConnectionClosed(code, reason || ""));
  }

  /** Drop the current socket (no more events from it). */
  _detach() {
    const ws = this._ws;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this._ws = null;
    clearTimeout(this._handshakeTimer);
    this._stopHeartbeat();
    if (this._refreshTimer) clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
  }

  /** The connection is gone: fail what waited for its replies. */
  _lost(/** @type {ConnectionClosed} */ why) {
    this._connected = false;
    const pending = this._pending;
    this._pending = new Map();
    for (const p of pending.values()) {
      clearTimeout(p.timer);
      p.reject(new ConnectionClosed(why.code, why.reason));
    }
  }

  /** @param {ConnectionClosed} why */
  _retry(why) {
    const wasUp = this._connected;
    this._lost(why);
    if (this._closing || this._suspended) return;
    // an expired token is worth one new try when a fresh one can be had
    const retry = why.temporary || (why.code === 4501 && this.getToken && wasUp);
    if (!retry) {
      this._giveUp(why);
      return;
    }
    this._setState("reconnecting", { code: why.code, reason: why.reason });
    const delay = this.backoff.next();
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      this._urlIndex = (this._urlIndex + 1) % this.urls.length;
      this._open(this.urls[this._urlIndex]);
    }, delay);
  }

  /** @param {ConnectionClosed} why */
  _giveUp(why) {
    this._failure = why;
    this._closing = true;
    this._lost(why);
    this._endAll(why);
    this._setState("closed", { code: why.code, reason: why.reason });
    this._callback(this.onError, why);
  }

  _endAll(/** @type {Error} */ why) {
    const subs = [...this.subscriptions.values()];
    this.subscriptions.clear();
    for (const sub of subs) sub._end(why);
    const waiters = this._waiters;
    this._waiters = [];
    for (const w of waiters) w();
  }

  /** @param {State} state  @param {{code?: number, reason?: string}} info */
  _setState(state, info) {
    this.state = state;
    this._callback(this.onState, state, info);
  }

  _checkOpen() {
    if (this._failure) throw new ConnectionClosed(this._failure.code, this._failure.reason);
  }

  /** @param {number} deadline  (Date.now() ms) */
  async _waitReady(deadline) {
    while (!this._connected) {
      this._checkOpen();
      const left = deadline - Date.now();
      if (left <= 0) throw new TimeoutError("not connected in time");
      await new Promise((resolve) => {
        const t = setTimeout(resolve, left);
        this._waiters.push(() => {
          clearTimeout(t);
          resolve(undefined);
        });
      });
    }
  }

  /**
   * Send a command and wait for its reply (by id), connecting first if needed.
   * @param {{op: string} & Record<string, any>} cmd  @param {number} [timeout]
   * @returns {Promise<any>}
   */
  async _request(cmd, timeout = this.requestTimeout) {
    const deadline = Date.now() + timeout;
    await this._waitReady(deadline);
    const id = this._nextId++;
    const ws = /** @type {WebSocket} */ (this._ws);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new TimeoutError(`no reply to ${cmd.op} in ${timeout} ms`));
      }, Math.max(0, deadline - Date.now()));
      this._pending.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify({ ...cmd, id }));
    });
  }

  // ------------------------------------------------------------------ heartbeat, tokens

  _startHeartbeat() {
    this._stopHeartbeat();
    this._lastRx = Date.now();
    const tick = Math.max(250, Math.min(this._pingInterval / 2, 5000));
    let lastPing = Date.now();
    this._hb = setInterval(() => {
      const ws = this._ws;
      if (!ws || !this._connected) return;
      const now = Date.now();
      const silent = now - this._lastRx;
      if (silent >= this._deadAfter) {
        // the node (or the path to it) went silent: a new connection, as after 4000
        this._detach();
        try {
          ws.close(4000, "heartbeat timeout");
        } catch {
          /* closing */
        }
        this._retry(new ConnectionClosed(4000, `nothing from the server for ${silent} ms`));
        return;
      }
      // browsers answer the node's pings by themselves, unseen; ask for a pong instead
      if (silent >= this._pingInterval && now - lastPing >= this._pingInterval) {
        lastPing = now;
        ws.send('{"op":"ping"}');
      }
    }, tick);
  }

  _stopHeartbeat() {
    if (this._hb) clearInterval(this._hb);
    this._hb = null;
  }

  /** Before the token expires, ask getToken for a new one and send it as "refresh". */
  _scheduleRefresh() {
    if (!this.getToken || !this.token) return;
    const exp = tokenExp(this.token);
    if (exp === null) return;
    const left = exp * 1000 - Date.now();
    const at = Math.max(1000, Math.min(left - 30000, left * 0.8));
    if (this._refreshTimer) clearTimeout(this._refreshTimer);
    this._refreshTimer = setTimeout(async () => {
      this._refreshTimer = null;
      try {
        const token = await /** @type {() => any} */ (this.getToken)();
        await this._request({ op: "refresh", token });
        this.token = token;
        this._scheduleRefresh();
      } catch (e) {
        this._callback(this.onError, e); // on expiry the node closes 4501: reconnect then
      }
    }, at);
  }

  // ------------------------------------------------------------------ incoming

  /** @param {WebSocket} ws  @param {MessageEvent} ev */
  _onMessage(ws, ev) {
    if (ws !== this._ws) return;
    this._lastRx = Date.now();
    let obj;
    try {
      obj = JSON.parse(ev.data);
    } catch {
      this._callback(this.onError, new Error("a message from the node is not JSON"));
      return;
    }
    const op = obj.op;
    if (op === "msg") return this._onMsg(obj, ev.data);
    if (op === "dm") return this._onDm(obj);
    if (op === "resubscribe") return this._onResubscribe(obj);
    const p = obj.id !== undefined ? this._pending.get(obj.id) : undefined;
    if (p === undefined) {
      if (op === "subscribed" && obj.id === undefined) {
        this._onServerSubscribed(obj); // a channel the node subscribed us to
      } else if (op === "subscribed") {
        // the answer to a subscribe given up on: the node has it, we do not
        if (!this.subscriptions.has(obj.ch)) this._sendUnsub(obj.ch);
      } else if (op === "error") {
        this._callback(this.onError, new RequestError(obj.code, obj.reason));
      } else if (op !== "pong" && obj.id === undefined) {
        this._callback(this.onEvent, obj);
      }
      return;
    }
    this._pending.delete(obj.id);
    clearTimeout(p.timer);
    if (op === "error") {
      p.reject(new RequestError(obj.code, obj.reason));
      return;
    }
    if (op === "subscribed" && p.sub) {
      this._onSubscribed({ sub: p.sub, since: p.since ?? null, history: p.history ?? 0 }, obj);
    }
    p.resolve(obj);
  }

  /**
   * The node subscribed this connection to a channel by itself (the connect hook's
   * `channels`, docs/proxy.md): a Subscription with `server` true, announced through
   * `onServerSubscribe`; its messages go to its `onMessage`, by default the client's.
   * @param {any} obj
   */
  _onServerSubscribed(obj) {
    let sub = this.subscriptions.get(obj.ch);
    if (sub && !sub.server) return; // ours: its own subscribe answers for it
    if (!sub) {
      sub = new Subscription(this, obj.ch, {
        onMessage: (m) => this._callback(this.onMessage, m),
        onGap: (g) => this._callback(this.onGap, g),
      });
      sub.server = true;
      this.subscriptions.set(obj.ch, sub);
      this._onSubscribed({ sub, since: null, history: 0 }, obj);
      this._callback(this.onServerSubscribe, sub);
      return;
    }
    // subscribed again after a reconnect, recovered from the position this client gave
    // in its URL (`subs`): what could not be recovered is a gap, reported
    this._onSubscribed({ sub, since: sub.epoch ? sub.since : null, history: 0 }, obj);
  }

  /** @param {any} obj  @param {string} text the message as received */
  _onMsg(obj, text) {
    const sub = this.subscriptions.get(obj.ch);
    if (!sub) return; // not (or no longer) subscribed
    if (obj.off <= sub.offset) {
      sub.duplicates += 1; // delivered already (a resubscribe sent it again)
      return;
    }
    if (sub._resyncing) return; // a delta failed: recovery sends it again, full
    let data = obj.data;
    if (obj.delta === true) {
      // a Fossil delta against the previous message, carried as a JSON string whose
      // UTF-8 bytes are the delta (docs/delta.md)
      let out = null;
      if (sub._base && sub._baseOff === obj.off - 1 && sub.offset === obj.off - 1) {
        try {
          out = fossilApply(sub._base, UTF8.encode(data));
          data = JSON.parse(UTF8D.decode(out));
        } catch (e) {
          out = null;
        }
      }
      if (!out) {
        sub.deltaFailures += 1;
        this._resync(sub);
        return;
      }
      sub.deltas += 1;
      sub._base = out;
      sub._baseOff = obj.off;
    } else if (sub.delta) {
      // the exact bytes of `data` are the next delta's base: the text after the
      // offset (inside the channel's JSON string no unescaped `"off":` can occur)
      const key = `"off":${obj.off},"data":`;
      const at = text.indexOf(key);
      sub._base = at < 0 ? null : UTF8.encode(text.slice(at + key.length, -1));
      sub._baseOff = obj.off;
    }
    sub.offset = obj.off;
    sub._deliver({ channel: obj.ch, offset: obj.off, data });
  }

  /**
   * A delta could not be applied (no base, a base of another offset, a bad delta):
   * subscribe again with `since`; recovery sends the missed messages full, so nothing
   * is lost, and everything until its answer is dropped.
   * @param {Subscription} sub
   */
  _resync(sub) {
    sub._resyncing = true;
    sub._base = null;
    if (!this._connected) return; // the next connection subscribes again anyway
    this._sendUnsub(sub.channel);
    this._subscribeOn(sub);
  }

  // ------------------------------------------------------------------ subscriptions

  /**
   * Subscribe `sub` on the current connection: with since once it has a position.
   * @param {Subscription} sub
   */
  _subscribeOn(sub) {
    const ws = this._ws;
    if (!ws || !this._connected) return;
    const id = this._nextId++;
    /** @type {{op: string, ch: string, id: number, since?: Since, history?: number, delta?: string}} */
    const cmd = { op: "sub", ch: sub.channel, id };
    if (sub.delta) cmd.delta = "fossil";
    let since = null;
    let history = 0;
    if (sub.epoch) {
      since = sub.since;
      cmd.since = since;
    } else if (sub.history > 0) {
      history = sub.history;
      cmd.history = history;
    }
    const timer = setTimeout(() => {
      if (this._pending.get(id)) {
        this._pending.delete(id);
        this._resubFailed(sub, new TimeoutError(`no answer to sub ${sub.channel}`), true);
      }
    }, this.requestTimeout);
    this._pending.set(id, {
      sub, since, history, timer,
      resolve: () => { sub._retryDelay = 0; },
      reject: (e) => this._resubFailed(sub, e, false),
    }); // prettier-ignore
    ws.send(JSON.stringify(cmd));
  }

  /**
   * A subscribe was answered: place the subscription in the channel's history. Runs
   * before any message that follows the answer, so replayed and live messages meet the
   * right offset (mirrors fastim/client/client.py _on_subscribed).
   * @param {{sub: Subscription, since: Since|null, history: number}} p  @param {any} obj
   */
  _onSubscribed(p, obj) {
    const sub = p.sub;
    if (this.subscriptions.get(obj.ch) !== sub) {
      this._sendUnsub(obj.ch); // unsubscribed meanwhile
      return;
    }
    const { off, recovered } = obj;
    const epoch = obj.epoch || "";
    const since = p.since;
    sub._resyncing = false;
    sub._base = null; // a delta follows a full message of this subscription
    if (!sub._answered) {
      sub._answered = true;
      sub._ready({ epoch, offset: off, recovered: !!recovered });
    }
    if (!since) {
      // a first subscribe: the newest `history` messages follow (if asked), then live
      sub._move(epoch, p.history ? Math.max(0, off - p.history) : off);
      return;
    }
    if (recovered) {
      sub.epoch = epoch; // (since.off, off] follow, then live
      return;
    }
    /** @type {Gap["reason"]} */
    let reason = "trimmed"; // what the node still had of (since.off, off] follows
    if (epoch !== since.epoch) {
      reason = "epoch";
      // the node sends what it has of the new epoch from its start, then live ones
      // (an epoch this subscription was in before resumes where it was left)
      sub._move(epoch, sub._left.get(epoch) ?? 0);
    } else if (off < since.off) {
      reason = "rewound";
      sub._move(epoch, off); // offsets start again: live after `off`
    }
    sub.epoch = epoch;
    sub._gap({
      channel: obj.ch, lastEpoch: since.epoch, lastOffset: since.off, epoch, offset: off, reason,
    }); // prettier-ignore
  }

  /**
   * A (re)subscribe failed. Lost connection: the next connection subscribes again.
   * STORE_UNAVAILABLE or no answer: again on this connection, later. Refused: the
   * subscription ends (onError; `ready` rejects if it was the first answer).
   * @param {Subscription} sub  @param {Error} err  @param {boolean} timedOut
   */
  _resubFailed(sub, err, timedOut) {
    if (this.subscriptions.get(sub.channel) !== sub) return;
    if (err instanceof ConnectionClosed) return;
    const transient =
      err instanceof RequestError &&
      (err.code === ErrorCode.STORE_UNAVAILABLE || err.code === ErrorCode.BACKEND_UNAVAILABLE);
    if (timedOut || transient) {
      const delay = Math.min(Math.max(sub._retryDelay * 2, RESUB_RETRY[0]), RESUB_RETRY[1]);
      sub._retryDelay = delay;
      const ws = this._ws;
      setTimeout(() => {
        if (this._ws === ws && this.subscriptions.get(sub.channel) === sub) {
          if (timedOut) this._sendUnsub(sub.channel); // in case the node has it after all
          this._subscribeOn(sub);
        }
      }, delay);
      return;
    }
    this.subscriptions.delete(sub.channel);
    sub._end(err);
  }

  /**
   * History was lost while subscribed (a new epoch): subscribe again from its start.
   * @param {any} obj
   */
  _onResubscribe(obj) {
    const sub = this.subscriptions.get(obj.ch);
    if (!sub || typeof obj.epoch !== "string") return;
    if (obj.complete === false && sub.epoch && sub.epoch !== obj.epoch) {
      // the node may not have had every message of the old epoch (its owner was another
      // node or worker): what came after our offset may be lost
      sub._gap({
        channel: obj.ch, lastEpoch: sub.epoch, lastOffset: sub.offset, epoch: obj.epoch, offset: 0,
        reason: "epoch",
      }); // prettier-ignore
    }
    // an epoch names one history, never reused: one this subscription was in before
    // (a store that answered wrongly for a while) is resumed where it was left
    sub._move(obj.epoch, sub._left.get(obj.epoch) ?? 0);
    this._subscribeOn(sub);
  }

  /** @param {Subscription} sub */
  async _unsubscribe(sub) {
    if (this.subscriptions.get(sub.channel) !== sub) return;
    this.subscriptions.delete(sub.channel);
    sub._end(new ConnectionClosed(1000, "unsubscribed"));
    if (!this._connected) return; // the node dropped it with the connection
    try {
      await this._request({ op: "unsub", ch: sub.channel });
    } catch (e) {
      if (!(e instanceof ConnectionClosed) && !(e instanceof RequestError)) throw e;
    }
  }

  /** @param {string} ch */
  _sendUnsub(ch) {
    if (this._ws && this._connected) this._ws.send(JSON.stringify({ op: "unsub", ch }));
  }

  // ------------------------------------------------------------------ direct messages

  /**
   * A dm event (maybe a copy: the node retries until acked, replays on connect, and a
   * user may have several connections). Each seq is handed over once, in order; a
   * message with a hole before it waits for the hole (mirrors fastim/client/direct.py).
   * @param {any} obj
   */
  _onDm(obj) {
    const seq = obj.seq;
    if (!Number.isInteger(seq) || seq < 1) return;
    const inbox = this.inbox;
    const epoch = typeof obj.epoch === "string" ? obj.epoch : "";
    if (epoch && epoch !== inbox.epoch) {
      if (this._leftEpochs.includes(epoch)) {
        inbox.duplicates += 1; // a late copy of a numbering already left
        return;
      }
      this._newInboxEpoch(epoch);
    }
    if ((inbox.delivered !== null && seq <= inbox.delivered) || this._held.has(seq)) {
      inbox.duplicates += 1;
      return;
    }
    this._held.set(seq, {
      seq, mid: String(obj.mid ?? ""), from: typeof obj.from === "string" ? obj.from : null,
      data: obj.data, epoch: inbox.epoch,
    }); // prettier-ignore
    this._drainHeld();
    if (this._held.size) this._checkHole();
  }

  /**
   * The inbox numbers in `epoch` from now on (its store lost the old numbering). From
   * an unknown one nothing is lost; from a known one, what was held of it is handed
   * over, a gap follows, and the duplicate check starts afresh (mirrors direct.py).
   * @param {string} epoch
   */
  _newInboxEpoch(epoch) {
    const inbox = this.inbox;
    const old = inbox.epoch;
    inbox.epoch = epoch;
    if (!old) return;
    this._leftEpochs.push(old);
    if (this._leftEpochs.length > 8) this._leftEpochs.shift();
    let last = inbox.delivered ?? 0;
    for (const seq of [...this._held.keys()].sort((a, b) => a - b)) {
      this._dmQueue.push(/** @type {DirectMessage} */ (this._held.get(seq)));
      last = seq;
    }
    this._held.clear();
    const gap = { lastEpoch: old, lastSeq: last, epoch };
    inbox.gaps += 1;
    inbox.lastGap = gap;
    this._dmQueue.push({ gap });
    inbox.delivered = null;
    inbox.taken = 0;
    inbox.acked = 0;
    this._runDirect();
  }

  _drainHeld() {
    const inbox = this.inbox;
    if (inbox.delivered === null) return;
    for (const seq of [...this._held.keys()]) {
      if (seq <= inbox.delivered) {
        this._held.delete(seq); // acknowledged elsewhere (another device) meanwhile
        inbox.skipped += 1;
      }
    }
    let next = inbox.delivered + 1;
    while (this._held.has(next)) {
      this._dmQueue.push(/** @type {DirectMessage} */ (this._held.get(next)));
      this._held.delete(next);
      inbox.delivered = next;
      next += 1;
    }
    this._runDirect();
  }

  /** Ask the node where the inbox is acked: tells a message on its way from one acked elsewhere. */
  async _checkHole() {
    if (this._checking) return;
    this._checking = true;
    let delay = HOLE_CHECK[0];
    try {
      while (this._held.size && !this._closing) {
        try {
          const state = await this.inboxState();
          const inbox = this.inbox;
          if (state.epoch && state.epoch !== inbox.epoch && !this._leftEpochs.includes(state.epoch)) {
            this._newInboxEpoch(state.epoch); // moved on: hand over what is held of the old
          }
          if ((state.epoch === "" || state.epoch === inbox.epoch) &&
              (inbox.delivered === null || state.acked > inbox.delivered)) {
            inbox.delivered = state.acked;
          } // prettier-ignore
          this._drainHeld();
          if (!this._held.size) return;
        } catch (e) {
          if (this._closing) return;
        }
        await sleep(delay);
        delay = Math.min(delay * 2, HOLE_CHECK[1]);
      }
    } finally {
      this._checking = false;
    }
  }

  /** Hand queued direct messages to onDirect, one at a time; ack each once it returned. */
  async _runDirect() {
    if (this._dmRunning || !this._onDirect) return;
    this._dmRunning = true;
    try {
      while (this._dmQueue.length && this._onDirect) {
        const item = /** @type {DirectMessage|{gap: DirectGap}} */ (this._dmQueue.shift());
        if ("gap" in item) {
          this._callback(this.onDirectGap, item.gap);
          continue;
        }
        const dm = item;
        try {
          await this._onDirect(dm);
        } catch (e) {
          this._callback(this.onError, e); // the application's bug: the message counts as taken
        }
        if (this.autoAck) this._took(dm.seq, dm.epoch);
      }
    } finally {
      this._dmRunning = false;
    }
  }

  /** At most one ack in flight; the next carries the highest seq taken since. */
  async _pumpAck() {
    const inbox = this.inbox;
    if (this._ackInflight || inbox.taken <= inbox.acked || !this._connected) return;
    this._ackInflight = true;
    const seq = inbox.taken;
    const epoch = inbox.epoch;
    let again = true;
    try {
      /** @type {{op: string, seq: number, epoch?: string}} */
      const cmd = { op: "ack", seq };
      if (epoch) cmd.epoch = epoch;
      const r = await this._request(cmd);
      if (epoch === inbox.epoch) {
        if ((r.epoch ?? epoch) === epoch) {
          inbox.acked = Math.max(inbox.acked, Number.isInteger(r.seq) ? r.seq : seq);
        } else {
          // the node's inbox numbers in another epoch (or has none: a memory store
          // restarted): this ack changes nothing there, and neither would the same one
          // again. Not repeated (at network speed) until more is taken or a reconnect.
          again = false;
        }
      }
    } catch (e) {
      if (e instanceof RequestError) {
        if (e.code === ErrorCode.STORE_UNAVAILABLE) await sleep(ACK_RETRY);
        else again = false;
      } // lost connection or timeout: sent again once connected
    } finally {
      this._ackInflight = false;
    }
    if (again && !this._closing) this._pumpAck();
  }

  // ------------------------------------------------------------------ helpers

  /**
   * Call an application callback; its exceptions must not break the stream.
   * @param {Function|null|undefined} fn  @param {...any} args
   */
  _callback(fn, ...args) {
    if (!fn) return;
    try {
      fn(...args);
    } catch (e) {
      if (fn !== this.onError && this.onError) this._callback(this.onError, e);
      else console.error("fastim: callback failed", e);
    }
  }
}

// ---------------------------------------------------------------- Fossil deltas

const UTF8 = new TextEncoder();
const UTF8D = new TextDecoder("utf-8", { fatal: true });
/** base-64 digit values of the Fossil delta format (0-9 A-Z _ a-z ~), -1 elsewhere */
const B64 = (() => {
  const t = new Int8Array(128).fill(-1);
  const digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";
  for (let i = 0; i < 64; i++) t[digits.charCodeAt(i)] = i;
  return t;
})();

/**
 * Apply a Fossil delta (fossil-scm.org delta_format) to `src`; throws if it is not a
 * valid delta for it (bounds, announced size, checksum). Written from the format's
 * description, like fastim/_pyref/delta.py.
 * @param {Uint8Array} src  @param {Uint8Array} delta  @returns {Uint8Array}
 */
export function fossilApply(src, delta) {
  let pos = 0;
  const num = () => {
    let v = 0;
    const start = pos;
    while (pos < delta.length && delta[pos] < 128 && B64[delta[pos]] >= 0) {
      v = v * 64 + B64[delta[pos++]];
      if (v > 0xffffffff) throw new Error("delta: number over 32 bits");
    }
    if (pos === start) throw new Error("delta: number expected");
    return v;
  };
  const size = num();
  if (delta[pos++] !== 10) throw new Error("delta: size not terminated by a newline");
  if (size > 1 << 26) throw new Error("delta: target too large");
  const out = new Uint8Array(size);
  let total = 0;
  while (pos < delta.length) {
    const cnt = num();
    const op = delta[pos++];
    if (op === 64) {
      const ofst = num();
      if (delta[pos++] !== 44) throw new Error("delta: copy not terminated by ','");
      if (total + cnt > size || ofst + cnt > src.length) throw new Error("delta: bad copy");
      out.set(src.subarray(ofst, ofst + cnt), total);
      total += cnt;
    } else if (op === 58) {
      if (total + cnt > size || pos + cnt > delta.length) throw new Error("delta: bad insert");
      out.set(delta.subarray(pos, pos + cnt), total);
      total += cnt;
      pos += cnt;
    } else if (op === 59) {
      if (total !== size) throw new Error("delta: target shorter than announced");
      if (fossilChecksum(out) !== cnt) throw new Error("delta: bad checksum");
      return out;
    } else {
      throw new Error("delta: unknown command");
    }
  }
  throw new Error("delta: unterminated");
}

/** Fossil's checksum: the sum of the big-endian 32-bit words, the tail zero-padded. */
function fossilChecksum(/** @type {Uint8Array} */ z) {
  let sum = 0;
  const n = z.length - (z.length % 4);
  for (let i = 0; i < n; i += 4) {
    sum = (sum + ((z[i] << 24) | (z[i + 1] << 16) | (z[i + 2] << 8) | z[i + 3])) >>> 0;
  }
  let tail = 0;
  for (let i = n, sh = 24; i < z.length; i++, sh -= 8) tail |= z[i] << sh;
  return (sum + (tail >>> 0)) >>> 0;
}

/**
 * Connect to a fastim node; the client connects (and reconnects) in the background.
 * @param {ClientOptions} [opts]
 * @returns {Client}
 */
export function connect(opts) {
  return new Client(opts);
}
