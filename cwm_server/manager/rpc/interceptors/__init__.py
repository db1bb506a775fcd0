"""What every RPC passes through on its way to a servicer, one module per concern.

The concerns, outermost first (each one sees what the ones inside it did):

1. `request_context`: the request id (``x-request-id``), bound into the log context for the
   whole call and echoed in the trailing metadata; the one ``rpc`` log line per call.
2. `metrics`: streams in flight and the call's duration by status code (the counting of
   messages and bytes happens where they are parsed and serialized, see 5).
3. `error_mapping`: `cwm_client.errors` classes become their status code, message and
   ``google.rpc.Status`` details; anything else is a bug, logged and answered INTERNAL
   naming the request id, so a client's mistake never surfaces as UNKNOWN.
4. `authentication`: the caller is resolved and authorized for the method before a byte of
   the request is parsed, and set for the call (`tenancy.current_tenant`).
5. `serialization`: the request bytes are parsed here rather than by gRPC, so that a bad
   message is the client's INVALID_ARGUMENT; responses are serialized here, Thaw's chunk
   parts (`windows.wire.PreEncoded`) going out as they are. Both count what they handle.

The order is not a choice left to the caller: authentication must run before parsing, the
error mapping must enclose both (their refusals are CwmErrors), and the log line and the
duration must come after the error mapping set the call's final code.

**Why one gRPC interceptor and not five.** Stacked grpc.aio interceptors each wrap the
handler of the one inside, so for a streaming call each would wrap the stream: one more
async generator step per message for every layer, on Freeze's and Thaw's chunk parts, the
hot path. Here `interceptor.RpcInterceptor` is the only gRPC interceptor: it wraps a
stream once and runs the concerns above around it per call (context managers that cost
nothing per message), and the per-message work of parsing, serializing and counting is one
function each. `server.py` installs it.
"""
