// Calls to the service that served this page (same origin), each timed and reported to `onRequest`.
// An error answer becomes an ApiError carrying the service's message and status.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export class Api {
  constructor(onRequest) {
    this.onRequest = onRequest; // ({method, path, status, ms}) after every answer, the streamed ones included
  }

  get(path) {
    return this.#json("GET", path);
  }

  post(path, body) {
    return this.#json("POST", path, body);
  }

  async #json(method, path, body) {
    const started = performance.now();
    const init = { method, headers: { accept: "application/json" } };
    if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let status = 0;
    try {
      const response = await fetch(path, init);
      status = response.status;
      const answer = await response.json();
      if (!response.ok) throw new ApiError(status, errorMessage(answer, status));
      return answer;
    } finally {
      this.onRequest({ method, path, status, ms: performance.now() - started });
    }
  }

  // POST asking for server-sent events: calls onProgress(data) per `progress` event and resolves with the data
  // of the `result` event (the body the plain request answers). EventSource cannot POST, so fetch reads the stream.
  async stream(path, body, onProgress) {
    const started = performance.now();
    let status = 0;
    try {
      const response = await fetch(path, {
        method: "POST",
        headers: { accept: "text/event-stream", "content-type": "application/json" },
        body: JSON.stringify(body),
      });
      status = response.status;
      if (!response.ok) throw new ApiError(status, errorMessage(await response.json(), status));
      for await (const { event, data } of events(response.body)) {
        if (event === "progress") onProgress(JSON.parse(data));
        else if (event === "result") return JSON.parse(data);
        else if (event === "error") {
          const err = JSON.parse(data);
          status = err.status;
          throw new ApiError(err.status, errorMessage(err, err.status));
        }
      }
      throw new ApiError(status, "the stream ended without a result");
    } finally {
      this.onRequest({ method: "POST", path: `${path} (stream)`, status, ms: performance.now() - started });
    }
  }
}

function errorMessage(answer, status) {
  return answer?.error?.message ?? `HTTP ${status}`;
}

// The events of a text/event-stream body: {event, data} per blank-line-terminated block; comment lines skipped.
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}
