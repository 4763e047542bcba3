// The service's public HTTP API, as the viewer uses it. Every error answer is RFC 9457
// problem+json; it becomes an ApiError whose message is the problem's title and detail.

export class ApiError extends Error {
  constructor(status, problem) {
    const title = problem.title || `HTTP ${status}`;
    super(problem.detail ? `${title}: ${problem.detail}` : title);
    this.status = status;
    this.problem = problem;
  }
}

async function problemOf(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return { title: `HTTP ${response.status} ${response.statusText}`, detail: text.slice(0, 200) };
  }
}

export class Api {
  constructor(apiKey = () => "") {
    this.apiKey = apiKey;
  }

  headers(extra = {}) {
    const key = this.apiKey();
    return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
  }

  async request(method, path, { body, headers = {} } = {}) {
    const init = { method, headers: this.headers(headers) };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const response = await fetch(path, init);
    if (!response.ok) throw new ApiError(response.status, await problemOf(response));
    return response;
  }

  async json(method, path, options) {
    return (await this.request(method, path, options)).json();
  }

  // multipart upload through XMLHttpRequest, the one browser API that reports upload progress
  createSession(ct, pet, centre, onProgress) {
    const form = new FormData();
    form.append("ct", ct, ct.name);
    form.append("pet", pet, pet.name);
    if (centre) form.append("centre", centre.map((v) => v.toFixed(2)).join(","));
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/v1/sessions");
      for (const [name, value] of Object.entries(this.headers())) xhr.setRequestHeader(name, value);
      xhr.upload.onprogress = (e) => e.lengthComputable && onProgress("uploading", e.loaded / e.total);
      xhr.upload.onload = () => onProgress("computing", 1);
      xhr.onerror = () => reject(new ApiError(0, { title: "Network error", detail: "the service did not answer" }));
      xhr.onload = () => {
        let answer;
        try {
          answer = JSON.parse(xhr.responseText);
        } catch {
          answer = { title: `HTTP ${xhr.status}`, detail: xhr.responseText.slice(0, 200) };
        }
        if (xhr.status === 201) resolve(answer);
        else reject(new ApiError(xhr.status, answer));
      };
      xhr.send(form);
    });
  }

  session(id) {
    return this.json("GET", `/v1/sessions/${id}`);
  }

  click(id, version, click) {
    return this.json("POST", `/v1/sessions/${id}/clicks`, {
      body: { clicks: [click] },
      headers: { "If-Match": `"${version}"`, "Idempotency-Key": crypto.randomUUID() },
    });
  }

  undo(id, version) {
    return this.json("POST", `/v1/sessions/${id}/undo`, { headers: { "If-Match": `"${version}"` } });
  }

  async bytes(path) {
    return (await this.request("GET", path)).arrayBuffer();
  }

  async blob(path) {
    const response = await this.request("GET", path);
    const disposition = response.headers.get("Content-Disposition") || "";
    const name = /filename="([^"]+)"/.exec(disposition);
    return { blob: await response.blob(), name: name ? name[1] : "mask" };
  }

  // the mask formats GET /mask offers, read from the OpenAPI description (NIfTI always)
  async maskFormats() {
    try {
      const spec = await (await fetch("/openapi.json")).json();
      const parameters = spec.paths["/v1/sessions/{session_id}/mask"].get.parameters || [];
      const format = parameters.find((p) => p.name === "format");
      const schema = format && (format.schema.enum ? format.schema : (format.schema.anyOf || [])[0]);
      return schema && schema.enum ? schema.enum : ["nifti"];
    } catch {
      return ["nifti"];
    }
  }
}
