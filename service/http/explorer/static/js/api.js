// The gateway's JSON API as the explorer calls it: POST /v1/<Method> with a proto3-JSON body.
// Unary calls resolve to the response object; streaming calls read the server-sent events off the
// response body (EventSource cannot POST) and hand each message to a callback. Every failure becomes an
// ApiError carrying the server's {code, message, request_id}, so the page can show what the server said.

const TOKEN_KEY = "featurewire.token";

export class ApiError extends Error {
  constructor(code, message, requestId = "", status = 0) {
    super(message);
    this.code = code;
    this.requestId = requestId;
    this.status = status;
  }
}

export function bearerToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setBearerToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function headers() {
  const h = { "content-type": "application/json" };
  const token = bearerToken();
  if (token) h.authorization = `Bearer ${token}`;
  return h;
}

async function errorOf(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    body = { code: "UNKNOWN", message: `HTTP ${response.status} with a body that is not JSON` };
  }
  return new ApiError(body.code || "UNKNOWN", body.message || `HTTP ${response.status}`,
    body.request_id || "", response.status);
}

async function post(method, body, signal) {
  let response;
  try {
    response = await fetch(`v1/${method}`, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError("UNAVAILABLE", `cannot reach the server (${exc.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** One unary RPC: the response message as a plain object. */
export async function call(method, body = {}, { signal } = {}) {
  const response = await post(method, body, signal);
  return response.json();
}

/** One server-streaming RPC: `onMessage(message)` per event; resolves with the final status (code OK). */
export async function stream(method, body, onMessage, { signal } = {}) {
  const response = await post(method, body, signal);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += value;
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const block = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      const event = parseEvent(block);
      if (event === null) continue;
      if (event.name === "status") {
        if (event.data.code !== "OK") {
          throw new ApiError(event.data.code, event.data.message, event.data.request_id || "", 200);
        }
        return event.data;
      }
      onMessage(event.data);
    }
  }
  throw new ApiError("UNAVAILABLE", "the stream ended without a status event (connection lost)");
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) name = line.slice(7);
    else if (line.startsWith("data: ")) data.push(line.slice(6));
  }
  return data.length ? { name, data: JSON.parse(data.join("\n")) } : null;
}
