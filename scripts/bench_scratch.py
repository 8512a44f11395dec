"""Train from scratch: does LORS (one shared matrix per group of stacked layers plus low-rank private parts) match
fully private stacked layers at a fraction of the parameters? A small reproduction of Li et al., CVPR 2024.

    python scripts/bench_scratch.py [--task det|lm|both] [--gpu] [--det-steps N] [--lm-steps N] [--out FILE]

Two tasks, every variant trained from scratch on the same batches for the same number of steps:
- det: set prediction on generated images (1-4 coloured rectangles in 64x64, class = colour), a tiny CNN backbone
  and 6 stacked AdaMixer-style decoder stages (each query samples backbone features around its box and mixes their
  channels with a matrix generated from the query), Hungarian matching, class + L1 + GIoU losses at every stage.
  Variants: dense; static LORS (the stages' Linear layers as W_i = S + B_i A_i); static + adaptive LORS (the
  generated channel mixing as M_i(q) = G(q) + L_i Z_i(q) R_i); a narrower dense decoder of the same size.
  Metrics on a fixed held-out set: AP@0.5 (mean over classes) and the mean IoU of Hungarian-matched boxes.
- lm: byte-level GPT on mixed_en.txt (streamed; every 50th line held out, never trained on); dense, LORS at 50%
  and 70% fewer stacked parameters, and dense models of the same size made narrower or shallower. Metrics:
  held-out loss (nats per byte) and loss on pydocs_en.txt paragraphs (text of another kind).

Default sizes fit a 2-core CPU in a few minutes per task; --gpu switches to bigger models and more steps on CUDA.
Prints a markdown table per task, writes the results as JSON (--out) and, when matplotlib is importable (the
`plot` extra), PNG curves beside it. Seeded: the same command gives the same numbers on the same machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lors_convert.checkpoint import TensorInfo
from lors_convert.config import LorsifyConfig
from lors_convert.nn import SHARED_ATTRIBUTE, AdaptiveLors, LorsLinear, lorsify
from lors_convert.scratch import scratch_ranks
from lors_convert.stacks import find_stacks

DATA = REPO / "data"

SCALES = {
    "cpu": {
        "det": dict(
            dim=64, channels=32, points=16, out_points=16, queries=8, heads=4, stages=6, batch=32, steps=500, lr=1e-3
        ),
        "det_eval": 256,
        "lm": dict(dim=128, layers=6, heads=4, ctx=128, batch=16, steps=400, lr=2e-3),
        "lm_eval": 96,
    },
    "gpu": {
        "det": dict(
            dim=256,
            channels=64,
            points=32,
            out_points=32,
            queries=16,
            heads=8,
            stages=6,
            batch=128,
            steps=6000,
            lr=5e-4,
        ),
        "det_eval": 2048,
        "lm": dict(dim=384, layers=12, heads=6, ctx=256, batch=64, steps=5000, lr=1e-3),
        "lm_eval": 512,
    },
}
CORE_SIZES = (32, 24, 16, 12, 8, 6, 4)  # the official core size first, smaller ones when the budget needs them
CORE_GROUPS = (1, 1, 2, 2, 3, 3)  # per stage, as in the official config


# ------------------------------------------------------------------------------------------------ shared helpers


def lorsify_fewer(model: nn.Module, fewer: float) -> nn.Module:
    """lorsify every stacked Linear group of `model`, each at its own rank for `fewer` fewer parameters."""
    info = {f"{p}.weight": m.weight for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    stacks, _ = find_stacks({n: TensorInfo(tuple(w.shape), w.dtype) for n, w in info.items()})
    for stack in stacks:
        rank = max(1, scratch_ranks(stack.rows, stack.cols, len(stack.layers), fewer))
        lorsify(model, LorsifyConfig(rank, include=[stack.template]))
    return model


def count(*modules: nn.Module) -> int:
    seen = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in seen.values())


def hungarian(cost: list[list[float]]) -> tuple[list[int], list[int]]:
    """Exact minimum-cost assignment (shortest augmenting paths, O(n²m)). Matches every row of the shorter side;
    returns (rows, cols), sorted by row."""
    n = len(cost)
    m = len(cost[0]) if n else 0
    if n == 0 or m == 0:
        return [], []
    if n > m:
        cols, rows = hungarian([list(column) for column in zip(*cost)])
        pairs = sorted(zip(rows, cols))
        return [r for r, _ in pairs], [c for _, c in pairs]
    inf = float("inf")
    u, v, match, way = [0.0] * (n + 1), [0.0] * (m + 1), [0] * (m + 1), [0] * (m + 1)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        best, used = [inf] * (m + 1), [False] * (m + 1)
        while True:
            used[j0], i0, delta, j1 = True, match[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < best[j]:
                        best[j], way[j] = reduced, j0
                    if best[j] < delta:
                        delta, j1 = best[j], j
            for j in range(m + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    best[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    pairs = sorted((match[j] - 1, j - 1) for j in range(1, m + 1) if match[j])
    return [r for r, _ in pairs], [c for _, c in pairs]


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine down to 10% of lr."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


def train(model, batches, loss_fn, evaluate, steps: int, lr: float, evals: int, device) -> dict:
    """AdamW from scratch for `steps` steps; `evaluate()` (a dict of metrics) at `evals` points. Times training only."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    at = {round(steps * k / evals) for k in range(1, evals + 1)}
    curve, losses, seconds = [], [], 0.0
    for step in range(steps):
        batch = next(batches)
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        model.train()
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        if step + 1 in at:
            model.eval()
            with torch.no_grad():
                metrics = evaluate(model)
            recent = losses[-max(1, steps // (2 * evals)) :]
            curve.append({"step": step + 1, "train_loss": sum(recent) / len(recent), **metrics})
            print(f"    step {step + 1:5d}  " + "  ".join(f"{k} {v:.4f}" for k, v in curve[-1].items() if k != "step"))
    return {"train_seconds": seconds, "curve": curve, "final": curve[-1]}


# --------------------------------------------------------------------------------------- task (a): set prediction

COLOURS = torch.tensor([[0.9, 0.15, 0.1], [0.1, 0.75, 0.2], [0.15, 0.3, 0.95], [0.95, 0.85, 0.1]])


def make_images(n: int, seed: int, size: int = 64) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """`n` images of 1-4 non-overlapping rectangles, class = colour (jittered) on a noisy grey background.
    Targets: (labels, boxes as normalised cx, cy, w, h) per image."""
    g = torch.Generator().manual_seed(seed)
    images = 0.45 + 0.06 * torch.randn(n, 3, size, size, generator=g)
    targets = []
    for image in images:
        placed, labels = [], []
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            for _try in range(20):
                w, h = (int(v) for v in torch.randint(6, size // 2 + 1, (2,), generator=g))
                x0, y0 = (
                    int(torch.randint(0, size - w + 1, (1,), generator=g)),
                    int(torch.randint(0, size - h + 1, (1,), generator=g)),
                )
                if all(x0 >= bx1 or bx0 >= x0 + w or y0 >= by1 or by0 >= y0 + h for bx0, by0, bx1, by1 in placed):
                    break
            else:
                continue
            label = int(torch.randint(0, len(COLOURS), (1,), generator=g))
            colour = COLOURS[label] + 0.05 * torch.randn(3, generator=g)
            image[:, y0 : y0 + h, x0 : x0 + w] = colour[:, None, None] + 0.04 * torch.randn(3, h, w, generator=g)
            placed.append((x0, y0, x0 + w, y0 + h))
            labels.append(label)
        boxes = torch.tensor([[(a + c) / 2, (b + d) / 2, c - a, d - b] for a, b, c, d in placed]) / size
        targets.append((torch.tensor(labels), boxes))
    return images, targets


def iou_giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and generalised IoU of cx, cy, w, h boxes (broadcast over leading dims)."""
    a = torch.cat([a[..., :2] - a[..., 2:] / 2, a[..., :2] + a[..., 2:] / 2], -1)
    b = torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    inter = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-9)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).prod(-1)
    return iou, iou - (hull - union) / hull.clamp(min=1e-9)


def box_embedding(box: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (cx, cy, w, h), dim/4 features per coordinate."""
    freqs = 2.0 ** torch.arange(dim // 8, device=box.device) * math.pi
    angles = box[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)


class Stage(nn.Module):
    """One AdaMixer-style decoder stage: self-attention over queries, adaptive sampling around each query's box,
    adaptive channel mixing (skipped here when the decoder's AdaptiveLors does it) and spatial mixing, FFN, heads."""

    def __init__(self, dim, channels, points, out_points, heads, classes, channel_mixing=True):
        super().__init__()
        self.heads, self.channels, self.points, self.out_points = heads, channels, points, out_points
        self.qkv, self.attn_out, self.norm1 = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.offsets = nn.Linear(dim, 2 * points)
        self.channel = nn.Linear(dim, channels * channels) if channel_mixing else None
        self.spatial = nn.Linear(dim, points * out_points)
        self.out, self.norm2 = nn.Linear(channels * out_points, dim), nn.LayerNorm(dim)
        self.ffn1, self.ffn2, self.norm3 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), nn.LayerNorm(dim)
        self.cls, self.box = nn.Linear(dim, classes + 1), nn.Linear(dim, 4)

    def forward(self, q, box, feats, mixer, index):
        b, n, d = q.shape
        qkv = self.qkv(q + box_embedding(box, d)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q = self.norm1(q + self.attn_out(F.scaled_dot_product_attention(*qkv).transpose(1, 2).reshape(b, n, d)))
        offsets = self.offsets(q).view(b, n, self.points, 2)
        where = box[:, :, None, :2] + box[:, :, None, 2:] * offsets  # in units of the box, around its centre
        x = F.grid_sample(feats, (2 * where - 1).view(b, n * self.points, 1, 2), align_corners=False)
        x = x.view(b, self.channels, n, self.points).permute(0, 2, 3, 1)  # (b, n, points, channels)
        if mixer is None:
            x = x @ self.channel(q).view(b, n, self.channels, self.channels)
        else:
            x = mixer(x, q, index)
        x = F.relu(F.layer_norm(x, x.shape[-2:]))
        x = x.transpose(-1, -2) @ self.spatial(q).view(b, n, self.points, self.out_points)
        x = F.relu(F.layer_norm(x, x.shape[-2:]))
        q = self.norm2(q + self.out(x.flatten(-2)))
        q = self.norm3(q + self.ffn2(F.relu(self.ffn1(q))))
        box = (torch.logit(box, eps=1e-4) + self.box(q)).sigmoid()
        return q, self.cls(q), box


class Decoder(nn.Module):
    def __init__(self, dim, channels, points, out_points, queries, heads, stages, classes, adaptive=None):
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.init_box = nn.Parameter(torch.tensor([0.0, 0.0, 3.0, 3.0]).repeat(queries, 1))  # whole image, logits
        mix = adaptive is None
        self.stages = nn.ModuleList(
            Stage(dim, channels, points, out_points, heads, classes, channel_mixing=mix) for _ in range(stages)
        )
        self.mixer = None if mix else AdaptiveLors(dim, channels, channels, stages, adaptive, CORE_GROUPS[:stages])

    def forward(self, feats):
        q = self.query.expand(feats.shape[0], -1, -1)
        box = self.init_box.sigmoid().expand(feats.shape[0], -1, -1)
        outputs = []
        for index, stage in enumerate(self.stages):
            q, logits, box = stage(q, box.detach(), feats, self.mixer, index)
            outputs.append((logits, box))
        return outputs


class Detector(nn.Module):
    def __init__(self, dim, channels, points, out_points, queries, heads, stages, classes, adaptive=None, **_):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(32, channels, 3, 1, 1),
        )  # stride 4: 16x16 features for 64x64 images
        self.decoder = Decoder(dim, channels, points, out_points, queries, heads, stages, classes, adaptive)

    def forward(self, images):
        return self.decoder(self.backbone(images))


def init_generators(decoder: Decoder) -> None:
    """AdaMixer's initialisation of the generated parameters, for dense and LORS stages alike: generator weights
    zero (the bias alone at first), sampling offsets a fixed grid over the box."""
    side = math.isqrt(decoder.stages[0].points)
    grid = (torch.arange(side) + 0.5) / side - 0.5
    grid = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).flatten()
    grid = torch.cat([grid, torch.rand(2 * decoder.stages[0].points - grid.numel()) - 0.5])  # points not a square
    with torch.no_grad():
        for stage in decoder.stages:
            for layer in (stage.offsets, stage.channel, stage.spatial):
                if isinstance(layer, LorsLinear):
                    layer.shared.zero_()
                    layer.lora_B.zero_()
                elif layer is not None:
                    layer.weight.zero_()
            stage.offsets.bias.copy_(grid)


def match(logits, boxes, targets) -> list[tuple[list[int], list[int]]]:
    """Per image: (target indices, query indices) of the minimum-cost assignment (class 1, L1 5, GIoU 2)."""
    prob = logits.softmax(-1)
    out = []
    for p, bx, (labels, tb) in zip(prob, boxes, targets):
        cost = -p[:, labels].T + 5 * torch.cdist(tb, bx, p=1) - 2 * iou_giou(tb[:, None], bx[None])[1]
        out.append(hungarian(cost.tolist()))
    return out


def set_loss(outputs, targets, classes: int) -> torch.Tensor:
    """DETR's loss summed over stages: cross-entropy (no-object weight 0.1) + 5 L1 + 2 (1 - GIoU) per box."""
    weight = torch.ones(classes + 1, device=outputs[0][0].device)
    weight[-1] = 0.1
    nbox = sum(len(t[0]) for t in targets)
    total = 0.0
    for logits, boxes in outputs:
        with torch.no_grad():
            pairs = match(logits.detach().float().cpu(), boxes.detach().float().cpu(), targets)
        wanted = torch.full(logits.shape[:2], classes, dtype=torch.long)
        img, query, tb = [], [], []
        for i, ((t, q), (labels, gt)) in enumerate(zip(pairs, targets)):
            wanted[i, q] = labels[t]
            img += [i] * len(q)
            query += q
            tb.append(gt[t])
        pb, tb = boxes[img, query], torch.cat(tb).to(boxes.device)
        ce = F.cross_entropy(logits.flatten(0, 1), wanted.to(logits.device).flatten(), weight=weight)
        total = total + 2 * ce + (5 * (pb - tb).abs().sum() + 2 * (1 - iou_giou(pb, tb)[1]).sum()) / nbox
    return total


def average_precision(scores, labels, boxes, targets, classes: int, threshold: float = 0.5) -> float:
    """Mean over classes of the all-point interpolated AP at IoU >= threshold (each query one detection)."""
    aps = []
    for c in range(classes):
        dets, n_gt = [], 0
        for i, (s, lab, bx, (tl, tb)) in enumerate(zip(scores, labels, boxes, targets)):
            gt = tb[tl == c]
            n_gt += len(gt)
            mine = lab == c
            ious = (
                iou_giou(bx[mine][:, None], gt[None])[0].tolist() if len(gt) else [[] for _ in range(int(mine.sum()))]
            )
            dets += [(score, i, row) for score, row in zip(s[mine].tolist(), ious)]
        dets.sort(key=lambda d: -d[0])
        taken, tp = set(), []
        for _, i, row in dets:
            j = max(range(len(row)), key=row.__getitem__) if row else -1
            hit = j >= 0 and row[j] >= threshold and (i, j) not in taken
            if hit:
                taken.add((i, j))
            tp.append(hit)
        hits = list(itertools.accumulate(tp))
        precision = [h / (k + 1) for k, h in enumerate(hits)]
        for k in range(len(precision) - 2, -1, -1):
            precision[k] = max(precision[k], precision[k + 1])
        aps.append(sum(p for p, t in zip(precision, tp) if t) / max(1, n_gt))
    return sum(aps) / len(aps)


def det_evaluate(model, images, targets, classes, device, batch=128) -> dict:
    scores, labels, boxes, ious = [], [], [], []
    for start in range(0, len(images), batch):
        logits, box = model(images[start : start + batch].to(device))[-1]
        logits, box = logits.float().cpu(), box.float().cpu()
        score, label = logits.softmax(-1)[..., :classes].max(-1)
        scores += list(score)
        labels += list(label)
        boxes += list(box)
        for (t, q), (_, gt), bx in zip(match(logits, box, targets[start : start + batch]), targets[start:], box):
            ious += iou_giou(bx[q], gt[t])[0].tolist()
    return {"ap50": average_precision(scores, labels, boxes, targets, classes), "matched_iou": sum(ious) / len(ious)}


def det_params(model: Detector) -> dict:
    return {"decoder": count(model.decoder), "total": count(model)}


def build_det(settings: dict, fewer: float | None, classes: int, seed: int = 0) -> Detector:
    """A detector from scratch; its decoder's stacked Linear layers as LORS at `fewer` fewer parameters unless None."""
    torch.manual_seed(seed)
    model = Detector(**settings, classes=classes)
    if fewer is not None:
        lorsify_fewer(model.decoder, fewer)
    init_generators(model.decoder)
    return model


def det_variants(cfg: dict, classes: int) -> list[tuple[str, dict, float | None]]:
    """(name, model settings, static LORS fraction) per variant; sizes chosen so the LORS and narrow decoders come
    to about 70% fewer parameters than the dense one."""

    def decoder_size(settings, fewer):
        with torch.device("meta"):  # shapes only: many candidates are sized
            return det_params(build_det(settings, fewer, classes))["decoder"]

    dense = decoder_size(cfg, None)
    target = 0.3 * dense
    # the largest core size (official 32, smaller as needed) with which static + adaptive comes to ~70% fewer
    core = next((k for k in CORE_SIZES if decoder_size({**cfg, "adaptive": k}, 0.7) <= 1.02 * target), CORE_SIZES[-1])
    adaptive = decoder_size({**cfg, "adaptive": core}, 0.7)
    narrow = min(
        ({**cfg, "dim": d, "channels": c} for d in range(8, cfg["dim"], 8) for c in range(4, cfg["channels"] + 1, 4)),
        key=lambda s: abs(decoder_size(s, None) - adaptive),
    )
    return [
        ("dense", cfg, None),
        ("static LORS", cfg, 0.7),
        (f"static + adaptive LORS (core {core})", {**cfg, "adaptive": core}, 0.7),
        (f"dense narrow (dim {narrow['dim']}, ch {narrow['channels']})", narrow, None),
    ]


def run_det(scale: dict, steps: int, seed: int, device) -> list[dict]:
    cfg, classes = {**scale["det"], "steps": steps}, len(COLOURS)
    held_images, held_targets = make_images(scale["det_eval"], seed=10**6 + seed)
    rows = []
    for name, settings, fewer in det_variants(cfg, classes):
        print(f"  det: {name}")
        model = build_det(settings, fewer, classes, seed).to(device)

        def batches():
            for step in itertools.count():
                images, targets = make_images(cfg["batch"], seed=seed * 1_000_003 + step)
                yield images.to(device), targets

        result = train(
            model,
            batches(),
            lambda m, batch: set_loss(m(batch[0]), batch[1], classes),
            lambda m: det_evaluate(m, held_images, held_targets, classes, device),
            steps,
            cfg["lr"],
            5,
            device,
        )
        rows.append({"variant": name, "params": det_params(model), "steps": steps, **result})
    return rows


# ------------------------------------------------------------------------------------ task (b): language modelling


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(*qkv, is_causal=True).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, dim, layers, heads, ctx, vocab=256, **_):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(model, chunk):
    logits = model(chunk[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten())


def byte_chunks(path: Path, length: int, keep=lambda i: True, cycle=False):
    """Stream `length`-byte chunks of the lines `keep(line number)` accepts, each line ending in a newline."""
    buf = bytearray()
    while True:
        with open(path, "rb") as f:
            for i, line in enumerate(f):
                if keep(i):
                    buf += line.rstrip(b"\r\n") + b"\n"
                    while len(buf) >= length:
                        yield torch.frombuffer(buf[:length], dtype=torch.uint8).long()
                        del buf[:length]
        if not cycle:
            return


def held_out(i: int) -> bool:
    return i % 50 == 0  # every 50th line of mixed_en.txt, never trained on


def lm_params(model: GPT) -> dict:
    return {"stacked": count(model.blocks, getattr(model, SHARED_ATTRIBUTE, nn.Module())), "total": count(model)}


def build_lm(settings: dict, fewer: float | None, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(**settings)
    return model if fewer is None else lorsify_fewer(model, fewer)


def lm_variants(cfg: dict) -> list[tuple[str, dict, float | None]]:
    def size(settings, fewer=None):
        with torch.device("meta"):
            return lm_params(build_lm(settings, fewer))["stacked"]

    dense = size(cfg)
    out = [("dense", cfg, None)]
    for fewer in (0.5, 0.7):
        out.append((f"LORS {fewer:.0%} fewer", cfg, fewer))
    for fewer in (0.5, 0.7):
        target = size(cfg, fewer)
        step = cfg["heads"]
        narrow = min(range(step, cfg["dim"], step), key=lambda d: abs(size({**cfg, "dim": d}) - target))
        out.append((f"dense narrow (dim {narrow}) ~{fewer:.0%}", {**cfg, "dim": narrow}, None))
        layers = max(1, round(cfg["layers"] * target / dense))
        out.append((f"dense shallow ({layers} layers) ~{fewer:.0%}", {**cfg, "layers": layers}, None))
    return out


def run_lm(scale: dict, steps: int, seed: int, device) -> list[dict]:
    cfg = {**scale["lm"], "steps": steps}
    length, n_eval = cfg["ctx"] + 1, scale["lm_eval"]
    sets = {
        "heldout": torch.stack(list(itertools.islice(byte_chunks(DATA / "mixed_en.txt", length, held_out), n_eval))),
        "pydocs": torch.stack(
            list(itertools.islice(byte_chunks(DATA / "pydocs_en.txt", length, lambda i: i % 5 == 0), n_eval))
        ),
    }

    def evaluate(model):
        out = {}
        for name, chunks in sets.items():
            losses = [lm_loss(model, chunks[i : i + 32].to(device)).item() for i in range(0, len(chunks), 32)]
            out[f"{name}_loss"] = sum(losses) / len(losses)
        return out

    rows = []
    for name, settings, fewer in lm_variants(cfg):
        print(f"  lm: {name}")
        model = build_lm(settings, fewer, seed).to(device)
        chunks = byte_chunks(DATA / "mixed_en.txt", length, lambda i: not held_out(i), cycle=True)
        batches = (torch.stack(list(itertools.islice(chunks, cfg["batch"]))).to(device) for _ in itertools.count())
        result = train(model, batches, lm_loss, evaluate, steps, cfg["lr"], 5, device)
        rows.append({"variant": name, "params": lm_params(model), "steps": steps, **result})
    return rows


# ------------------------------------------------------------------------------------------------------- output


def table(rows: list[dict], size_key: str, metrics: list[str]) -> str:
    head = ["variant", f"params ({size_key})", "params (total)", "steps", "train s", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    base = rows[0]["params"][size_key]
    for row in rows:
        size = row["params"][size_key]
        cells = [
            row["variant"],
            f"{size:,} ({size / base - 1:+.0%})" if row is not rows[0] else f"{size:,}",
            f"{row['params']['total']:,}",
            str(row["steps"]),
            f"{row['train_seconds']:.0f}",
            *(f"{row['final'][m]:.4f}" for m in metrics),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for task, metrics in (
        ("det", ["train_loss", "ap50", "matched_iou"]),
        ("lm", ["train_loss", "heldout_loss", "pydocs_loss"]),
    ):
        if task not in results:
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
        for ax, metric in zip(axes, metrics):
            for row in results[task]:
                ax.plot(
                    [p["step"] for p in row["curve"]],
                    [p[metric] for p in row["curve"]],
                    marker="o",
                    label=row["variant"],
                )
            ax.set_xlabel("step")
            ax.set_title(metric)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path.with_name(f"{path.stem}-{task}.png"), dpi=100)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["det", "lm", "both"], default="both")
    parser.add_argument("--gpu", action="store_true", help="bigger models and more steps, on CUDA")
    parser.add_argument("--device", default=None, help="override the device (default: cuda with --gpu, else cpu)")
    parser.add_argument("--det-steps", type=int, default=None)
    parser.add_argument("--lm-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads [1 on CPU: steadier on a shared machine]"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_scratch.json"))
    args = parser.parse_args()
    scale = SCALES["gpu" if args.gpu else "cpu"]
    device = torch.device(args.device or ("cuda" if args.gpu else "cpu"))
    torch.use_deterministic_algorithms(True, warn_only=True)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)  # these small ops ran 2-10x slower with 2 threads on a busy 2-core box
    torch.backends.cuda.matmul.allow_tf32 = True
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    results = {"machine": machine, "device": str(device), "scale": "gpu" if args.gpu else "cpu", "seed": args.seed}
    start = time.perf_counter()
    tables = []
    if args.task in ("det", "both"):
        results["det"] = run_det(scale, args.det_steps or scale["det"]["steps"], args.seed, device)
        tables.append(
            ("set prediction (generated rectangles)", table(results["det"], "decoder", ["ap50", "matched_iou"]))
        )
    if args.task in ("lm", "both"):
        results["lm"] = run_lm(scale, args.lm_steps or scale["lm"]["steps"], args.seed, device)
        tables.append(("byte-level language model", table(results["lm"], "stacked", ["heldout_loss", "pydocs_loss"])))
    results["wall_seconds"] = time.perf_counter() - start
    print(f"\n{machine}, {device}; {results['wall_seconds'] / 60:.1f} min in all\n")
    for title, text in tables:
        print(f"### {title}\n\n{text}\n")
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.out)


if __name__ == "__main__":
    main()
