"""Which attention realises ``train.packing``'s prompt-sharing mask best on CPU: one attention call,
forward + backward, on the packed layout of one group (SmolLM2-135M heads: 9 query, 3 key/value,
head dim 64; prompt 512, K = 4 continuations of 152 tokens), per layer.

- ``sdpa-bool``: ``scaled_dot_product_attention`` with the dense (1, 1, L, L) bool mask, K/V repeated
  to the query heads (what transformers' sdpa attention does with a mask: the path btpo takes);
- ``sdpa-float``: the same with an additive float mask;
- ``eager``: softmax(QKᵀ + mask) V written out (transformers' eager attention);
- ``split``: the prompt causally, then each continuation against [prompt ; itself] (no masked-out
  score is computed: the FLOP minimum; a custom attention function would be needed to run it inside
  a transformers model);
- ``flex``: ``flex_attention`` with a BlockMask of the same predicate (eager mode: PyTorch warns that
  it is unfused there; ``--compile`` tries ``torch.compile`` on it, which needs a C++ toolchain).

    python bench/bench_packed_attention.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def layout(p: int, k: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """part (L,): 0 for the prompt, j + 1 for continuation j; the (L, L) bool mask."""
    part = torch.cat([torch.zeros(p, dtype=torch.long)] + [torch.full((c,), j + 1) for j in range(k)])
    ar = torch.arange(len(part))
    m = (ar[:, None] >= ar[None, :]) & ((part[None, :] == 0) | (part[:, None] == part[None, :]))
    return part, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--cont", type=int, default=152)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    part, m = layout(args.prompt, args.k, args.cont)
    n = len(part)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, n, 64, generator=g, requires_grad=True)
    kv = [torch.randn(1, 3, n, 64, generator=g, requires_grad=True) for _ in range(2)]
    fmask = torch.zeros(n, n).masked_fill(~m, float("-inf"))

    def rep(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(3, dim=1)

    def sdpa_bool() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, rep(kv[0]), rep(kv[1]), attn_mask=m[None, None])

    def sdpa_float() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, rep(kv[0]), rep(kv[1]), attn_mask=fmask[None, None])

    def eager() -> torch.Tensor:
        w = torch.softmax(q @ rep(kv[0]).transpose(-1, -2) / 8.0 + fmask, -1)
        return w @ rep(kv[1])

    p, c = args.prompt, args.cont
    cmask = torch.cat([torch.ones(c, p, dtype=torch.bool), torch.ones(c, c, dtype=torch.bool).tril()], 1)

    def split() -> torch.Tensor:
        k, v = rep(kv[0]), rep(kv[1])
        outs = [F.scaled_dot_product_attention(q[:, :, :p], k[:, :, :p], v[:, :, :p], is_causal=True)]
        for j in range(args.k):
            s = slice(p + j * c, p + (j + 1) * c)
            outs.append(F.scaled_dot_product_attention(q[:, :, s], torch.cat([k[:, :, :p], k[:, :, s]], 2),
                                                       torch.cat([v[:, :, :p], v[:, :, s]], 2), attn_mask=cmask))
        return torch.cat(outs, 2)

    variants = {"sdpa-bool": sdpa_bool, "sdpa-float": sdpa_float, "eager": eager, "split": split}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def pred(b, h, qi, ki):
            return (qi >= ki) & ((part[ki] == 0) | (part[qi] == part[ki]))

        bm = create_block_mask(pred, None, None, n, n, device="cpu")
        fa = torch.compile(flex_attention) if args.compile else flex_attention

        def flex() -> torch.Tensor:
            return fa(q, kv[0], kv[1], block_mask=bm, enable_gqa=True)

        variants["flex"] = flex
    except Exception as e:  # noqa: BLE001 - report, don't fail: an optional variant
        print(f"flex_attention unavailable: {e}", file=sys.stderr)
    ref = sdpa_bool().detach()
    times: dict[str, list[float]] = {v: [] for v in variants}
    errors: dict[str, str] = {}
    for r in range(args.repeats + 1):
        for name, fn in list(variants.items()):
            try:
                t0 = time.perf_counter()
                out = fn()
                out.sum().backward()
                dt = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                errors[name] = str(e).splitlines()[0][:200]
                variants.pop(name)
                continue
            if r:
                times[name].append(dt)
            else:
                errors.setdefault(f"{name}_max_abs_diff", f"{float((out.detach() - ref).abs().max()):.2e}")
    res = {"tokens": n, "median_ms": {v: round(1e3 * statistics.median(t), 1) for v, t in times.items() if t},
           "notes": errors}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
