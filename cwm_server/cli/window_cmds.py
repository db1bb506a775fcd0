"""`cwm ls`, `cwm show`, `cwm clone`, `cwm rm`: catalog commands over the SDK."""

from __future__ import annotations

import argparse

from cwm_client import WindowClient, pb
from cwm_server.cli.options import Subparsers, add_command, add_ttl_option
from cwm_server.cli.render import (
    WINDOW_HEADERS,
    count_of,
    human_bytes,
    print_json,
    print_table,
    window_dict,
    window_row,
)


def _tags(pairs: list[str] | None) -> dict[str, str]:
    tags: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --tag expects KEY=VALUE, got {pair!r}")
        tags[key] = value
    return tags


def cmd_ls(args: argparse.Namespace, client: WindowClient) -> int:
    windows = list(
        client.list(
            name_prefix=args.prefix or "",
            session_id=args.session or "",
            model_id=args.model or "",
            tags=_tags(args.tag),
            search=args.search or "",
        )
    )
    if args.json:
        print_json([window_dict(w) for w in windows])
    elif windows:
        print_table(WINDOW_HEADERS, (window_row(w) for w in windows))
    else:
        print("no windows")
    return 0


def cmd_show(args: argparse.Namespace, client: WindowClient) -> int:
    window = client.get(args.name, view=pb.WindowView.WINDOW_VIEW_FULL)
    if args.json:
        print_json(window_dict(window, full=True))
        return 0
    if args.tokens:  # what a thawed session's next prompt starts with
        print(" ".join(str(token) for token in window.token_ids))
        return 0
    info = window_dict(window)
    model = info.pop("model")
    for key, value in info.items():
        if key in ("raw_bytes", "stored_bytes"):
            value = f"{value} ({human_bytes(value)})"
        print(f"{key:>13}: {value}")
    print(
        f"{'model':>13}: {model['model_id']} ({model['engine']}, {model['kv_dtype']}, "
        f"{model['num_layers']} layers x {model['num_kv_heads']} kv heads x "
        f"{model['head_dim']} dim)"
    )
    return 0


def cmd_clone(args: argparse.Namespace, client: WindowClient) -> int:
    window = client.clone(
        args.source,
        args.dest,
        description=args.description or "",
        tags=_tags(args.tag),
        ttl_seconds=args.ttl or 0,
    )
    if args.json:
        print_json(window_dict(window))
    else:
        shared = count_of(window.chunk_count, "chunk")
        print(f"cloned {args.source} -> {window.name} ({shared} shared)")
    return 0


def cmd_rm(args: argparse.Namespace, client: WindowClient) -> int:
    response = client.delete(args.name)
    if args.json:
        print_json(
            {
                "name": args.name,
                "chunks_freed": response.chunks_freed,
                "bytes_freed": response.bytes_freed,
            }
        )
    else:
        print(
            f"deleted {args.name} (freed {count_of(response.chunks_freed, 'chunk')}, "
            f"{human_bytes(response.bytes_freed)})"
        )
    return 0


def add_parsers(sub: Subparsers) -> None:
    ls = add_command(sub, "ls", help="list windows")
    ls.add_argument("--prefix", help="only names starting with this")
    ls.add_argument("--session", help="only windows of this session id")
    ls.add_argument("--model", help="only windows of this model id")
    ls.add_argument("--tag", action="append", metavar="KEY=VALUE", help="only with this tag")
    ls.add_argument("--search", help="text in the name or description")
    ls.set_defaults(handler=cmd_ls, needs_client=True)

    show = add_command(sub, "show", help="show one window")
    show.add_argument("name")
    show.add_argument(
        "--tokens",
        action="store_true",
        help="print only the window's token ids (space-separated): the prompt a thawed "
        "session continues from (--json includes them as token_ids)",
    )
    show.set_defaults(handler=cmd_show, needs_client=True)

    clone = add_command(sub, "clone", help="branch a window (copy-on-write, no bytes copied)")
    clone.add_argument("source")
    clone.add_argument("dest")
    clone.add_argument("--description")
    clone.add_argument("--tag", action="append", metavar="KEY=VALUE")
    add_ttl_option(
        clone,
        help="expire after this long: 5m, 1h, 24h, 7d, <n>s/m/h/d or seconds; never/pinned: "
        "no expiry",
    )
    clone.set_defaults(handler=cmd_clone, needs_client=True)

    rm = add_command(sub, "rm", help="delete a window")
    rm.add_argument("name")
    rm.set_defaults(handler=cmd_rm, needs_client=True)
