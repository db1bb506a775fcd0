"""The bulk channel: chunk bytes of a Freeze or Thaw on a Unix socket or a TCP port beside
gRPC, authorized by a single-use ticket that the gRPC call issues (see `channel`)."""
