// A terminal in the browser: xterm.js over the daemon's shell WebSocket (/vm/{hostname}/shell).
// Frames both ways: type (1 byte) | length (u32, big endian) | payload. Types: 1 data, 2 window
// size (cols, rows as u32), 3 shutdown, 4 heartbeat, 5 session close (payload: the exit code).

const DATA = 1, WINDOW_SIZE = 2, HEARTBEAT = 4, SESSION_CLOSE = 5;
const encoder = new TextEncoder();

export function frame(type, payload = new Uint8Array(0)) {
  const out = new Uint8Array(5 + payload.length);
  const view = new DataView(out.buffer);
  out[0] = type;
  view.setUint32(1, payload.length, false);
  out.set(payload, 5);
  return out;
}

function sizeFrame(cols, rows) {
  const payload = new Uint8Array(8);
  const view = new DataView(payload.buffer);
  view.setUint32(0, cols, false);
  view.setUint32(4, rows, false);
  return frame(WINDOW_SIZE, payload);
}

// The page's Content-Security-Policy (style-src 'self') keeps the <style> elements xterm's DOM
// renderer writes from applying. Constructed style sheets are not inline styles: mirror them there.
function mirrorStyles(root) {
  if (!("adoptedStyleSheets" in document) || typeof CSSStyleSheet !== "function") return () => {};
  const sheet = new CSSStyleSheet();
  document.adoptedStyleSheets = [...document.adoptedStyleSheets, sheet];
  let last = "";
  const sync = () => {
    const text = [...root.querySelectorAll("style")].map((s) => s.textContent).join("\n");
    if (text !== last) {
      last = text;
      sheet.replaceSync(text);
    }
  };
  const observer = new MutationObserver(sync);
  observer.observe(root, { subtree: true, childList: true, characterData: true });
  sync();
  return () => {
    observer.disconnect();
    document.adoptedStyleSheets = document.adoptedStyleSheets.filter((s) => s !== sheet);
  };
}

export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch { /* fall back below */ }
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.appendChild(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch { ok = false; }
  area.remove();
  return ok;
}

export class Shell {
  constructor(container, hostname, { onState = () => {}, onError = () => {}, onRefused = () => {} } = {}) {
    this.container = container;
    this.hostname = hostname;
    this.onState = onState;
    this.onError = onError;
    this.onRefused = onRefused;  // the upgrade was refused: the browser does not show why, the API will
    this.ws = null;
    this.state = "closed";
    this.pending = new Uint8Array(0);
    this.disposed = false;
    const TerminalClass = window.Terminal;
    const Fit = window.FitAddon && window.FitAddon.FitAddon;
    if (!TerminalClass || !Fit) throw new Error("xterm.js is not installed (python3 -m slicer.console.assets)");
    this.term = new TerminalClass({
      cursorBlink: true,
      convertEol: false,
      scrollback: 5000,
      fontFamily: '"DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
      fontSize: 14,
      theme: {
        background: "#0b0f14", foreground: "#d6dde6", cursor: "#7cc4ff", selectionBackground: "#2f4a66",
      },
    });
    this.fit = new Fit();
    this.term.loadAddon(this.fit);
    this.unmirror = mirrorStyles(container);
    this.term.open(container);
    this.term.attachCustomKeyEventHandler((e) => {
      if (e.type === "keydown" && e.ctrlKey && e.shiftKey && (e.key === "C" || e.key === "c")) {
        this.copySelection();
        return false;
      }
      // Ctrl+Shift+V: the browser's own paste, which xterm turns into input
      if (e.type === "keydown" && e.ctrlKey && e.shiftKey && (e.key === "V" || e.key === "v")) return false;
      return true;
    });
    this.term.onData((d) => this.send(DATA, encoder.encode(d)));
    this.term.onBinary((d) => this.send(DATA, Uint8Array.from(d, (c) => c.charCodeAt(0) & 0xff)));
    this.term.onResize(({ cols, rows }) => this.sendRaw(sizeFrame(cols, rows)));
    this.resizer = new ResizeObserver(() => this.refit());
    this.resizer.observe(container);
    this.heartbeat = setInterval(() => this.send(HEARTBEAT), 20000);
    this.refit();
  }

  refit() {
    if (this.disposed || !this.container.offsetParent) return;  // hidden: nothing to measure
    try {
      this.fit.fit();
    } catch { /* not laid out yet */ }
  }

  setState(state, detail = "") {
    this.state = state;
    this.onState(state, detail);
  }

  connect() {
    if (this.disposed) return;
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${location.host}/vm/${encodeURIComponent(this.hostname)}/shell`;
    this.pending = new Uint8Array(0);
    this.setState("connecting");
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      if (ws !== this.ws) return;
      opened = true;
      this.setState("connected");
      this.refit();
      this.sendRaw(sizeFrame(this.term.cols, this.term.rows));
      this.term.focus();
    };
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      if (typeof ev.data === "string") {
        this.term.write(ev.data);
        return;
      }
      this.receive(new Uint8Array(ev.data));
    };
    ws.onclose = (ev) => {
      if (ws !== this.ws || this.disposed) return;
      const why = ev.reason ? `: ${ev.reason}` : ev.code && ev.code !== 1000 && ev.code !== 1005 ? ` (code ${ev.code})` : "";
      if (this.state !== "ended") {
        this.term.write(`\r\n\x1b[33m[disconnected${why}]\x1b[0m\r\n`);
        this.setState("closed", why);
      }
      if (!opened) this.onRefused();
      else if (ev.reason && ev.code !== 1000) this.onError(ev.reason);
    };
    ws.onerror = () => { /* onclose follows and says it */ };
  }

  receive(bytes) {
    let buf = bytes;
    if (this.pending.length) {
      buf = new Uint8Array(this.pending.length + bytes.length);
      buf.set(this.pending);
      buf.set(bytes, this.pending.length);
    }
    let at = 0;
    while (buf.length - at >= 5) {
      const type = buf[at];
      const length = new DataView(buf.buffer, buf.byteOffset + at + 1, 4).getUint32(0, false);
      if (buf.length - at - 5 < length) break;
      const payload = buf.subarray(at + 5, at + 5 + length);
      at += 5 + length;
      if (type === DATA) {
        this.term.write(payload.slice());
      } else if (type === SESSION_CLOSE) {
        const code = new TextDecoder().decode(payload).trim();
        this.term.write(`\r\n\x1b[33m[session ended${code ? `: exit ${code}` : ""}]\x1b[0m\r\n`);
        this.setState("ended", code);
        try { this.ws.close(1000); } catch { /* closed */ }
      }
    }
    this.pending = buf.slice(at);
  }

  send(type, payload) {
    this.sendRaw(frame(type, payload));
  }

  sendRaw(bytes) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(bytes);
  }

  async copySelection() {
    const text = this.term.getSelection();
    if (!text) return "empty";
    return (await copyText(text)) ? "copied" : "failed";
  }

  paste(text) {
    this.term.paste(text);
    this.term.focus();
  }

  dispose() {
    this.disposed = true;
    clearInterval(this.heartbeat);
    this.resizer.disconnect();
    if (this.ws) {
      try { this.ws.close(1000); } catch { /* closed */ }
    }
    this.term.dispose();
    this.unmirror();
  }
}
