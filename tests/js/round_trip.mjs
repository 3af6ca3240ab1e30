// JS -> astral -> JS over a real WebSocket: values as JSON.stringify writes them come back
// identical. Run by tests/test_javascript_fidelity.py with node --experimental-websocket (Node 20+).
const url = process.argv[2];
const ws = new WebSocket(url);
const cases = {
  "1": "a\ud800b",           // a string cut inside an emoji
  "2": "😀".slice(0, 1),      // the same, by slicing
  "3": 1e16,
  "4": 2 ** 60,
  "5": {"\udfff": [1e16, -(2 ** 64), "x\udc00"]},
};
let pending = Object.keys(cases).length;
let failed = 0;
ws.onopen = () => {
  for (const [id, input] of Object.entries(cases)) {
    ws.send(JSON.stringify({type: "call", id, capability: "echo", input}));
  }
};
ws.onmessage = (event) => {
  const frame = JSON.parse(event.data);
  const sent = JSON.stringify(cases[frame.id]);
  const back = JSON.stringify(frame.output);
  const ok = frame.error === undefined && sent === back;
  if (!ok) failed++;
  console.log(ok ? "same" : "DIFFERENT", frame.id, sent, back, frame.error ?? "");
  if (--pending === 0) { ws.close(); process.exitCode = failed ? 1 : 0; }
};
ws.onerror = (e) => { console.log("error", e.message); process.exitCode = 2; };
