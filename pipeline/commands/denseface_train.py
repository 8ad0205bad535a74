"""Train the `denseface` CNN (DenseNet-BC-100, growth 12) on FER2013 images with FER+ labels.

The MMIN authors' Denseface weights are not public; this writes an equivalent checkpoint for the
`denseface` extractor from the public data: FER2013's fer2013.csv (Kaggle; columns emotion,pixels,
Usage: 48x48 gray faces) and, advised, FER+'s fer2013new.csv (github.com/microsoft/FERPlus; 10
annotators' votes per image over 8 emotions + unknown + not-a-face). Images are upscaled to 64x64
and normalised by mean 131.0754, std 47.858177 as MMIN did. Splits: Training to train,
PublicTest for model selection (best epoch), PrivateTest reported. A GPU is advised (CPU works).

  imer denseface-train --fer2013 fer2013.csv --ferplus fer2013new.csv --out ~/.cache/imer/models/denseface.pt

FER+ labels (--labels): "majority" (default) keeps the images where one emotion has more than
half of the votes, after dropping single-vote outliers (FERPlus's majority mode); "probability"
trains on the vote distribution of the top emotions (FERPlus's probability mode). Images whose
label is unknown or not-a-face, or that FER+ removed (no image name), are dropped.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

FER2013_COLUMNS = ["emotion", "pixels", "Usage"]
FERPLUS_COLUMNS = ["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                   "fear", "contempt", "unknown", "NF"]
SPLITS = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


def add_arguments(p) -> None:
    p.add_argument("--fer2013", required=True, metavar="CSV", help="fer2013.csv (columns emotion,pixels,Usage)")
    p.add_argument("--ferplus", metavar="LABELS", help="FER+ fer2013new.csv (advised; without it: FER2013's 7 labels)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint to write (the extractor's checkpoint=PATH)")
    p.add_argument("--labels", choices=["majority", "probability"], default="majority", help="FER+ label mode")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate, cosine-annealed (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    if args.epochs < 1 or args.batch_size < 1:
        print("imer denseface-train: --epochs and --batch-size must be >= 1", file=sys.stderr)
        return 2
    from extract.denseface import FER2013_CLASSES, FERPLUS_CLASSES
    from pipeline.device import resolve_device

    device = resolve_device(args.device)
    try:
        images, usage, fer_labels = read_fer2013(args.fer2013)
        if args.ferplus:
            targets, keep = ferplus_targets(read_ferplus(args.ferplus, usage), args.labels)
            classes, source = FERPLUS_CLASSES, f"FER+ ({args.labels})"
        else:
            targets = np.eye(len(FER2013_CLASSES), dtype=np.float32)[fer_labels]
            keep, classes, source = np.ones(len(images), bool), FER2013_CLASSES, "FER2013"
    except ValueError as e:
        print(f"imer denseface-train: {e}", file=sys.stderr)
        return 2
    split = np.array([SPLITS[u] for u in usage])
    data = {s: (images[keep & (split == s)], targets[keep & (split == s)]) for s in ("train", "val", "test")}
    if not len(data["train"][0]):
        print(f"imer denseface-train: {args.fer2013}: no usable Training rows", file=sys.stderr)
        return 2
    print(f"denseface-train: {source}, {len(classes)} classes; train {len(data['train'][0])}, "
          f"val {len(data['val'][0])}, test {len(data['test'][0])} images; device {device}", file=sys.stderr)
    model, trained = train(data, len(classes), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           weight_decay=args.weight_decay, seed=args.seed, device=device,
                           progress=not args.no_progress)
    from extract.denseface import MEAN, STD, save_checkpoint

    trained.update(labels=source, fer2013=str(args.fer2013), ferplus=str(args.ferplus) if args.ferplus else None)
    out = save_checkpoint(args.out, model, classes, MEAN, STD, {"depth": 100, "growth": 12}, trained)
    print(f"denseface-train: wrote {out} (best epoch {trained['best_epoch']}, val acc {trained['val_acc']}, "
          f"test acc {trained['test_acc']})", file=sys.stderr)
    return 0


# ---- data --------------------------------------------------------------------------------------

def read_fer2013(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, 64, 64) uint8, usage (N,) str, labels (N,) int) from fer2013.csv."""
    import cv2

    path = Path(path)
    df = _read_csv(path, FER2013_COLUMNS)
    usage = np.array(df["Usage"].str.strip().tolist(), dtype=object)  # plain str: messages show 'Train', not np.str_
    labels = _integers(path, df, ["emotion"])[:, 0]
    images = np.empty((len(df), 64, 64), np.uint8)
    for i, (s, u, y) in enumerate(zip(df["pixels"], usage, labels)):
        where = f"{path}:{i + 2}"  # line numbers count the header
        if u not in SPLITS:
            raise ValueError(f"{where}: Usage {u!r} is not one of {list(SPLITS)}")
        if not 0 <= y <= 6:
            raise ValueError(f"{where}: emotion {y} is not one of FER2013's labels 0..6")
        try:
            px = np.asarray(s.split(), dtype=np.int64)
        except ValueError:
            px = np.zeros(0, np.int64)
        if px.size != 48 * 48 or px.min() < 0 or px.max() > 255:
            raise ValueError(f"{where}: pixels must be 2304 (48x48) space-separated integers 0..255")
        images[i] = cv2.resize(px.astype(np.uint8).reshape(48, 48), (64, 64), interpolation=cv2.INTER_LINEAR)
    return images, usage, labels


def read_ferplus(path, usage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(votes (N, 10): 8 emotions, unknown, NF; has_image (N,) bool) from fer2013new.csv, whose
    rows are fer2013.csv's rows in the same order."""
    path = Path(path)
    df = _read_csv(path, FERPLUS_COLUMNS)
    if len(df) != len(usage):
        raise ValueError(f"{path}: {len(df)} rows but fer2013.csv has {len(usage)}; FER+ labels must be the "
                         "fer2013new.csv that matches that fer2013.csv row for row")
    differ = np.flatnonzero(np.array(df["Usage"].str.strip().tolist(), dtype=object) != usage)
    if len(differ):
        i = int(differ[0])
        raise ValueError(f"{path}:{i + 2}: Usage {df['Usage'].iloc[i]!r} differs from fer2013.csv's {usage[i]!r}; "
                         "the two files are not aligned")
    votes = _integers(path, df, FERPLUS_COLUMNS[2:]).astype(np.float64)
    has_image = df["Image name"].str.strip().ne("").to_numpy()  # FER+ blanks the images it removed
    return votes, has_image


def ferplus_targets(ferplus: tuple[np.ndarray, np.ndarray], mode: str = "majority") -> tuple[np.ndarray, np.ndarray]:
    """(targets (N, 8) float32 distributions over the emotions, keep (N,) bool), after the FERPlus
    reference code: single votes are dropped as outliers; 'majority' = the emotion with more than
    half of the remaining votes; 'probability' = the top emotions (at most 3, ties by column order)
    until 75% of the votes, which must cover more than half. Images won by unknown / not-a-face,
    and images FER+ removed, are dropped."""
    votes, has_image = ferplus
    targets = np.zeros((len(votes), 8), np.float32)
    keep = np.zeros(len(votes), bool)
    for i, row in enumerate(votes):
        v = np.where(row <= 1.0, 0.0, row)
        total = v.sum()
        if not has_image[i] or total <= 0:
            continue
        if mode == "majority":
            k = int(np.argmax(v))
            if k < 8 and v[k] > 0.5 * total:
                targets[i, k], keep[i] = 1.0, True
            continue
        picked = np.zeros(8)
        for k in np.argsort(-v, kind="stable")[:3]:
            if picked.sum() >= 0.75 * total or v[k] <= 0:
                break
            if k >= 8:  # unknown / not-a-face: ends the list (and rejects the image if it leads)
                break
            picked[k] = v[k]
        if picked.sum() > 0.5 * total:
            targets[i], keep[i] = picked / picked.sum(), True
    return targets, keep


def _read_csv(path: Path, columns: list[str]):
    import pandas as pd

    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    if list(df.columns) != columns:
        raise ValueError(f"{path}: columns are {list(df.columns)}, expected {columns}")
    return df


def _integers(path: Path, df, columns: list[str]) -> np.ndarray:
    out = np.empty((len(df), len(columns)), np.int64)
    for j, c in enumerate(columns):
        for i, s in enumerate(df[c]):
            if not s.strip().isdigit():
                raise ValueError(f"{path}:{i + 2}: column {c!r} is {s!r}, expected a non-negative integer")
        out[:, j] = df[c].astype(np.int64)
    return out


# ---- training ----------------------------------------------------------------------------------

def _augment(x, gen):
    """Random flip, rotation (±10°), scale (0.9-1.1) and shift (±10%) of a (B, 1, H, W) batch, on its device."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    r = lambda lo, hi: torch.rand(b, generator=gen, device=x.device) * (hi - lo) + lo  # noqa: E731
    ang, scale = r(-math.pi / 18, math.pi / 18), r(0.9, 1.1)
    flip = torch.where(torch.rand(b, generator=gen, device=x.device) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, r(-0.1, 0.1)], 1),
                         torch.stack([sin * flip, cos, r(-0.1, 0.1)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def train(data: dict, n_classes: int, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
          seed: int, device: str, progress: bool = True):
    """SGD (Nesterov, momentum 0.9) with cosine learning rate, soft-target cross-entropy; mixed
    precision on CUDA. Returns (model with the best validation epoch's weights, summary dict)."""
    import torch
    from tqdm.auto import tqdm

    from extract.denseface import build_densenet, normalise

    if epochs < 1 or batch_size < 1:
        raise ValueError("--epochs and --batch-size must be >= 1")
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    cuda = device.startswith("cuda")
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
    model = build_densenet(n_classes=n_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    xs = {s: torch.from_numpy(x).to(device) for s, (x, _) in data.items()}
    ys = {s: torch.from_numpy(y).to(device) for s, (_, y) in data.items()}
    n = len(xs["train"])
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))

    def prep(xb):
        return normalise(xb)

    def accuracy(split):
        if not len(xs[split]):
            return None
        model.eval()
        right = 0
        with torch.inference_mode(), torch.autocast("cuda", dtype=amp_dtype, enabled=cuda):
            for i in range(0, len(xs[split]), 256):
                _, logits = model(prep(xs[split][i:i + 256]))
                right += (logits.argmax(1) == ys[split][i:i + 256].argmax(1)).sum().item()
        return round(right / len(xs[split]), 4)

    best = (-1.0, 0, None)
    t0 = time.perf_counter()
    for ep in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen, device=device)
        bar = tqdm(range(0, n, batch_size), desc=f"epoch {ep}/{epochs}", unit="batch", disable=not progress,
                   file=sys.stderr)
        for i in bar:
            idx = perm[i:i + batch_size]
            xb = _augment(prep(xs["train"][idx]), gen)
            with torch.autocast("cuda", dtype=amp_dtype, enabled=cuda):
                _, logits = model(xb)
                loss = torch.nn.functional.cross_entropy(logits.float(), ys["train"][idx])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        val = accuracy("val")
        score = val if val is not None else ep  # no validation rows: keep the last epoch
        if score > best[0]:
            best = (score, ep, {k: v.detach().clone() for k, v in model.state_dict().items()})
        print(f"epoch {ep}: loss {loss.item():.4f}, val acc {val}", file=sys.stderr)
    model.load_state_dict(best[2])
    summary = {"epochs": epochs, "best_epoch": best[1], "val_acc": accuracy("val"), "test_acc": accuracy("test"),
               "train_images": n, "seed": seed, "seconds": round(time.perf_counter() - t0, 1)}
    return model.cpu().eval(), summary
