// A cwm client in Node.js built from proto/cwm/v1 alone (@grpc/grpc-js + @grpc/proto-loader;
// BLAKE3 from @noble/hashes). Against a real manager it freezes a window of known bytes,
// lists it, thaws it and checks every chunk's digest and bytes, then re-freezes the same
// chunks under another name (nothing is sent: FindMissingChunks says the store has them)
// and checks that errors carry rich details and that the request id comes back.
//
//   node interop.mjs --target 127.0.0.1:50051 --name node-window
//
// Prints one JSON object on stdout; exits 1 with a message on stderr if a check fails.

import { randomUUID } from "node:crypto";
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { blake3 } from "@noble/hashes/blake3.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const protoRoot = path.resolve(here, "..", "..", "proto");

function arg(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at >= 0 ? process.argv[at + 1] : fallback;
}

const target = arg("target", "127.0.0.1:50051");
const name = arg("name", `node-${Date.now()}`);

// 2 (K,V) x 4 layers x 2 KV heads x 32 dims x 2 bytes (bf16) = 1 KiB per token.
const FINGERPRINT = {
  model_id: "node-interop",
  weights_digest: "ab".repeat(32),
  tokenizer_digest: "cd".repeat(32),
  kv_dtype: "KV_DTYPE_BFLOAT16",
  num_layers: 4,
  num_kv_heads: 2,
  head_dim: 32,
  engine_name: "node",
  engine_version: process.version,
  block_size: 16,
};
const BYTES_PER_TOKEN = 2 * 4 * 2 * 32 * 2;
const CHUNK_TOKENS = 128; // 128 KiB chunks
const TOKENS = 300; // chunks of 128, 128 and 44 tokens
const PART_BYTES = 64 * 1024; // every full chunk travels as two parts each way

function fail(message) {
  process.stderr.write(`interop: ${message}\n`);
  process.exit(1);
}

function check(condition, message) {
  if (!condition) fail(message);
}

const hex = (bytes) => Buffer.from(bytes).toString("hex");

// Known bytes: a fixed pattern per chunk, so a thaw can be compared byte for byte.
function chunkBytes(index, tokenCount) {
  const data = Buffer.alloc(tokenCount * BYTES_PER_TOKEN);
  for (let i = 0; i < data.length; i++) {
    data[i] = (i * 31 + index * 7 + (i >> 8)) & 0xff;
  }
  return data;
}

const chunks = [];
for (let index = 0, start = 0; start < TOKENS; index++, start += CHUNK_TOKENS) {
  const count = Math.min(CHUNK_TOKENS, TOKENS - start);
  const data = chunkBytes(index, count);
  chunks.push({ index, start, count, data, digest: Buffer.from(blake3(data)) });
}
const tokenIds = Array.from({ length: TOKENS }, (_, i) => (i * 7919) % 32000);

const definition = protoLoader.loadSync(
  ["cwm/v1/window_service.proto", "cwm/v1/session_service.proto"],
  { includeDirs: [protoRoot], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true },
);
const cwm = grpc.loadPackageDefinition(definition).cwm.v1;
const client = new cwm.WindowService(target, grpc.credentials.createInsecure(), {
  "grpc.max_receive_message_length": 16 << 20,
  "grpc.max_send_message_length": 16 << 20,
});

function withRequestId() {
  const metadata = new grpc.Metadata();
  const id = `node-${randomUUID()}`;
  metadata.set("x-request-id", id);
  return { metadata, id };
}

// Settles once both the response (or error) and the status with its trailers are in:
// grpc-js may deliver them in either order.
function settle(resolve, reject) {
  let outcome = null;
  let trailing = null;
  const done = () => {
    if (!outcome || !trailing) return;
    if (outcome.error) reject(outcome.error);
    else resolve({ response: outcome.response, trailing });
  };
  return {
    callback: (error, response) => {
      outcome = { error, response };
      done();
    },
    status: (status) => {
      trailing = status.metadata;
      done();
    },
  };
}

function unary(method, request, metadata = new grpc.Metadata()) {
  return new Promise((resolve, reject) => {
    const waiter = settle(({ response }) => resolve(response), reject);
    const call = client[method](request, metadata, waiter.callback);
    call.on("status", waiter.status);
  });
}

function freeze(windowName, toSend, metadata) {
  return new Promise((resolve, reject) => {
    const waiter = settle(resolve, reject);
    const call = client.Freeze(metadata, waiter.callback);
    call.on("status", waiter.status);
    call.write({
      header: {
        name: windowName,
        session_id: "node-session",
        cache_salt: "node-salt",
        fingerprint: FINGERPRINT,
        token_ids: tokenIds,
        chunk_tokens: CHUNK_TOKENS,
        chunk_digests: chunks.map((c) => c.digest),
        tags: { client: "node" },
        description: "frozen by the Node.js interop client",
      },
    });
    for (const chunk of toSend) {
      for (let offset = 0; offset < chunk.data.length; offset += PART_BYTES) {
        call.write({
          chunk: {
            index: chunk.index,
            token_start: chunk.start,
            token_count: chunk.count,
            digest: chunk.digest,
            codec: "CHUNK_CODEC_RAW",
            raw_size: chunk.data.length,
            encoded_size: chunk.data.length,
            data_offset: offset,
            data: chunk.data.subarray(offset, offset + PART_BYTES),
          },
        });
      }
    }
    call.end();
  });
}

function thaw(windowName) {
  return new Promise((resolve, reject) => {
    const stream = client.Thaw({ name: windowName, max_part_bytes: PART_BYTES });
    let window = null;
    const assembled = new Map();
    let parts = 0;
    stream.on("data", (message) => {
      if (message.payload === "window") {
        window = message.window;
        return;
      }
      const part = message.chunk;
      parts += 1;
      if (!assembled.has(part.index)) {
        assembled.set(part.index, { part, buffer: Buffer.alloc(part.encoded_size), filled: 0 });
      }
      const entry = assembled.get(part.index);
      Buffer.from(part.data).copy(entry.buffer, part.data_offset);
      entry.filled += part.data.length;
    });
    stream.on("error", reject);
    stream.on("end", () => resolve({ window, assembled, parts }));
  });
}

async function main() {
  const digests = chunks.map((c) => c.digest);

  // 1. Which chunks does the store lack? (All of them, on a fresh manager.)
  const missing = await unary("FindMissingChunks", { digests });
  const missingHex = new Set(missing.missing_digests.map(hex));
  const toSend = chunks.filter((c) => missingHex.has(hex(c.digest)));

  // 2. Freeze, with a request id of our own: it must come back in the trailers.
  const { metadata, id } = withRequestId();
  const { response: frozen, trailing } = await freeze(name, toSend, metadata);
  check(frozen.window.name === name, `freeze committed ${frozen.window.name}, not ${name}`);
  check(frozen.chunks_received === toSend.length, "freeze: wrong chunks_received");
  const sentBytes = toSend.reduce((n, c) => n + c.data.length, 0);
  check(frozen.bytes_received === sentBytes, "freeze: wrong bytes_received");
  const echoed = trailing && trailing.get("x-request-id")[0];
  check(echoed === id, `request id not echoed (sent ${id}, got ${echoed})`);

  // 3. List it.
  const listed = await unary("ListWindows", { name_prefix: name, page_size: 10 });
  const found = listed.windows.find((w) => w.name === name);
  check(found, `ListWindows did not list ${name}`);
  check(found.token_count === TOKENS, "listed token_count differs");
  check(found.chunk_count === chunks.length, "listed chunk_count differs");
  const rawBytes = chunks.reduce((n, c) => n + c.data.length, 0);
  check(found.raw_bytes === rawBytes, "listed raw_bytes differs");
  check(found.tags.client === "node", "listed tags differ");

  // 4. Thaw it and check every chunk: digest from the manager, BLAKE3 of the bytes, and
  //    the bytes themselves.
  const thawed = await thaw(name);
  check(thawed.window && thawed.window.name === name, "thaw: the window info came not first");
  check(thawed.window.token_ids.join(",") === tokenIds.join(","), "thaw: token ids differ");
  check(thawed.assembled.size === chunks.length, `thaw: got ${thawed.assembled.size} chunks`);
  const thawedDigests = [];
  for (const chunk of chunks) {
    const entry = thawed.assembled.get(chunk.index);
    check(entry, `thaw: chunk ${chunk.index} missing`);
    check(entry.filled === entry.part.encoded_size, `thaw: chunk ${chunk.index} incomplete`);
    check(entry.part.codec === "CHUNK_CODEC_RAW", `thaw: chunk ${chunk.index} not raw`);
    const computed = Buffer.from(blake3(entry.buffer));
    check(computed.equals(Buffer.from(entry.part.digest)), `thaw: chunk ${chunk.index} digest`);
    check(computed.equals(chunk.digest), `thaw: chunk ${chunk.index} is not what was frozen`);
    check(entry.buffer.equals(chunk.data), `thaw: chunk ${chunk.index} bytes differ`);
    thawedDigests.push(hex(computed));
  }

  // 5. Re-freeze the same KV under another name: the store holds every chunk, none moves.
  const again = await unary("FindMissingChunks", { digests });
  check(again.missing_digests.length === 0, "the store lacks chunks it just stored");
  const copy = `${name}.copy`;
  const { response: reused } = await freeze(copy, [], new grpc.Metadata());
  check(reused.chunks_received === 0 && reused.chunks_reused === chunks.length, "re-freeze moved chunks");

  // 6. A client mistake: NOT_FOUND with google.rpc.Status details and the request id.
  let notFound = null;
  try {
    await unary("GetWindow", { name: `${name}.absent` });
  } catch (error) {
    notFound = error;
  }
  check(notFound && notFound.code === grpc.status.NOT_FOUND, "GetWindow of a missing window");
  check(notFound.metadata.get("grpc-status-details-bin").length === 1, "no rich error details");
  check(notFound.metadata.get("x-request-id").length === 1, "no request id on the error");

  process.stdout.write(
    `${JSON.stringify({
      window: name,
      copy,
      tokens: TOKENS,
      chunks: chunks.length,
      raw_bytes: rawBytes,
      chunks_sent: toSend.length,
      bytes_sent: sentBytes,
      thaw_parts: thawed.parts,
      digests: chunks.map((c) => hex(c.digest)),
      thawed_digests: thawedDigests,
      request_id: id,
      not_found_code: notFound.code,
    })}\n`,
  );
  client.close();
}

main().catch((error) => fail(error.stack || String(error)));
