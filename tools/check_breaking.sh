#!/usr/bin/env bash
# `buf breaking` against the contract as it was in earlier commits: the previous commit and
# the first commit that had a proto, so neither a single step nor a slow drift can break
# clients. Runs from the repository root; needs `buf` on PATH and a git history.
set -euo pipefail
first=$(git log --reverse --format=%H -- proto/cwm 2>/dev/null | head -n 1 || true)
previous=$(git rev-parse --verify -q HEAD~1 2>/dev/null || true)
checked=0
for ref in "$previous" "$first"; do
    [ -n "$ref" ] || continue
    git cat-file -e "$ref:proto/buf.yaml" 2>/dev/null || continue
    echo "buf breaking against $ref"
    (cd proto && buf breaking --against "../.git#ref=$ref,subdir=proto")
    checked=$((checked + 1))
done
[ "$checked" -gt 0 ] || echo "buf breaking: no earlier commit has a proto yet; nothing to compare"
