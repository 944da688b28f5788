"""`medlego train`: one SVD-LoRA adapter (A, E, B on Q and V of every block) plus a task head.

The base stays frozen. Loss = task loss (cross-entropy, or BCE for multi-label) + λ·Σ(‖BᵀB−I‖² +
‖AAᵀ−I‖²). Paper defaults: r = 4, lr 3e-4, AdamW, 100 epochs, validation every epoch, the best
validation checkpoint (accuracy; mean AUC for multi-label) is kept and only it is tested.

Determinism and resume: the data order of epoch e depends only on (seed, e), and nothing else
draws random numbers during training, so a run resumed from the checkpoint of epoch e ends with
exactly the result of an uninterrupted run. The checkpoint is one safetensors file (tensors +
JSON state in its header), written atomically after every epoch: never a pickle.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medlego.runtime.adapter import Adapter, Head, Preprocess, TaskSpec, atomic_write, save_adapter, serialize_safetensors, utc_now
from medlego.runtime.adapter import _TASK_NAME  # the file format's rule for task names, not a copy of it
from medlego.runtime.base import BaseModel
from medlego.runtime.errors import BadInputError
from medlego.runtime.lora import TrainableSVDLoRA
from medlego.runtime.model import AdaptedViT, label_probabilities

from .datasets import Dataset, normalise
from .metrics import metrics_for


@dataclass
class TrainConfig:
    task: str
    epochs: int = 100
    batch_size: int = 32
    lr: float = 3e-4
    rank: int = 4
    seed: int = 0
    ortho_weight: float = 0.1
    weight_decay: float = 0.01
    schedule: str = "constant"  # or "cosine"
    warmup_steps: int = 0
    device: str = "cpu"
    max_train: int | None = None  # use only the first N training images (fast runs)
    eval_batch_size: int = 128
    progress: bool = True
    stop_after_epoch: int | None = None  # end the process after this epoch (tests of resume)


@dataclass
class TrainResult:
    adapter: Adapter
    best_epoch: int
    val: dict
    test: dict
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None


def _seeded_head(dim: int, classes: int, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed + 7919)
    head = nn.Linear(dim, classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, dim, generator=g) * 0.02)
        head.bias.zero_()
    return head


class _Trainer:
    def __init__(self, base: BaseModel, data: Dataset, cfg: TrainConfig, init: tuple[Adapter, dict] | None):
        self.base, self.data, self.cfg = base, data, cfg
        self.device = torch.device(cfg.device)
        self.model = AdaptedViT(base)
        self.model.vit.to(self.device)
        if init is not None:
            self.lora = TrainableSVDLoRA.from_adapter(init[0])
        else:
            self.lora = TrainableSVDLoRA(base.depth, base.embed_dim, cfg.rank,
                                         generator=torch.Generator().manual_seed(cfg.seed))
        self.head = _seeded_head(base.embed_dim, data.num_classes, cfg.seed)
        self.lora.to(self.device)
        self.head.to(self.device)
        self.params = list(self.lora.parameters()) + list(self.head.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        train = data.split("train")
        self.n_train = min(len(train), cfg.max_train or len(train))
        self.steps_per_epoch = max(1, math.ceil(self.n_train / cfg.batch_size))
        total = self.steps_per_epoch * cfg.epochs
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: self._lr_factor(s, total))
        self.pp = base.preprocess

    def _lr_factor(self, step: int, total: int) -> float:
        if step < self.cfg.warmup_steps:
            return (step + 1) / self.cfg.warmup_steps
        if self.cfg.schedule == "cosine":
            done = (step - self.cfg.warmup_steps) / max(1, total - self.cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return 1.0

    def loss(self, logits, y):
        task = F.binary_cross_entropy_with_logits(logits, y) if self.data.multilabel else F.cross_entropy(logits, y)
        return task, task + self.cfg.ortho_weight * self.lora.orthogonality_penalty()

    def forward(self, images):
        x = normalise(images.to(self.device), self.pp)
        use_amp = self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            feats = self.model.features(x, self.lora)
        return self.head(feats.float())

    def train_epoch(self, epoch: int) -> dict:
        from tqdm import tqdm

        split = self.data.split("train")
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
        order = torch.randperm(self.n_train, generator=g)
        self.lora.train()
        total, count, t0 = 0.0, 0, time.perf_counter()
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="step",
                   disable=None if self.cfg.progress else True, leave=False)  # None: off when not a terminal
        for s in bar:
            idx = order[s * self.cfg.batch_size:(s + 1) * self.cfg.batch_size]
            logits = self.forward(split.images[idx])
            task_loss, loss = self.loss(logits, split.labels[idx].to(self.device))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            total += float(task_loss.detach()) * len(idx)
            count += len(idx)
            bar.set_postfix(loss=f"{total / count:.4f}", img_s=f"{count / (time.perf_counter() - t0):.0f}")
        return {"train_loss": total / max(1, count), "seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self, split_name: str) -> dict:
        split = self.data.split(split_name)
        probs = []
        for i in range(0, len(split), self.cfg.eval_batch_size):
            logits = self.forward(split.images[i:i + self.cfg.eval_batch_size])
            probs.append(label_probabilities(logits, self.data.multilabel))
        return metrics_for(torch.cat(probs).cpu(), split.labels, self.data.multilabel)

    def key_metric(self, m: dict) -> float:
        v = m["auc"] if self.data.multilabel else m["accuracy"]
        return -1.0 if math.isnan(v) else v

    # -- checkpoint ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {"lora.A": self.lora.A, "lora.E": self.lora.E, "lora.B": self.lora.B,
             "lora.ranks": self.lora.ranks.float(), "head.weight": self.head.weight, "head.bias": self.head.bias}
        for i, p in enumerate(self.params):
            st = self.opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    t[f"opt.{i}.{k}"] = st[k]
        return {k: v.detach().cpu().float().contiguous() for k, v in t.items()}

    def save_checkpoint(self, path: Path, epoch: int, best: dict, history: list[dict]) -> None:
        tensors = self.state_tensors()
        tensors.update({f"best.{k}": v for k, v in best["tensors"].items()})
        steps = {str(i): float(self.opt.state[p]["step"]) for i, p in enumerate(self.params) if "step" in self.opt.state.get(p, {})}
        meta = {"epoch": str(epoch), "best_epoch": str(best["epoch"]), "best_metric": repr(best["metric"]),
                "best_val": json.dumps(best["val"]), "history": json.dumps(history), "opt_steps": json.dumps(steps),
                "sched": json.dumps(self.sched.state_dict()), "config": json.dumps(asdict(self.cfg), sort_keys=True)}
        atomic_write(path, serialize_safetensors(tensors, meta))

    def load_checkpoint(self, path: Path) -> tuple[int, dict, list[dict]]:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        saved = json.loads(meta["config"])
        mine = asdict(self.cfg)
        for k in ("task", "epochs", "batch_size", "lr", "rank", "seed", "ortho_weight", "weight_decay", "schedule",
                  "warmup_steps", "max_train"):
            if saved.get(k) != mine.get(k):
                raise BadInputError(f"cannot resume: checkpoint was made with {k}={saved.get(k)!r}, this run has {mine.get(k)!r}")
        with torch.no_grad():
            self.lora.A.copy_(t["lora.A"])
            self.lora.E.copy_(t["lora.E"])
            self.lora.B.copy_(t["lora.B"])
            self.lora.ranks.copy_(t["lora.ranks"].long())
            self.head.weight.copy_(t["head.weight"])
            self.head.bias.copy_(t["head.bias"])
        steps = json.loads(meta["opt_steps"])
        for i, p in enumerate(self.params):
            if str(i) in steps:
                self.opt.state[p] = {"step": torch.tensor(steps[str(i)]),
                                     "exp_avg": t[f"opt.{i}.exp_avg"].to(p), "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"].to(p)}
        self.sched.load_state_dict(json.loads(meta["sched"]))
        best = {"epoch": int(meta["best_epoch"]), "metric": float(meta["best_metric"]), "val": json.loads(meta["best_val"]),
                "tensors": {k[5:]: v for k, v in t.items() if k.startswith("best.")}}
        return int(meta["epoch"]), best, json.loads(meta["history"])

    def load_best(self, best: dict) -> None:
        with torch.no_grad():
            self.lora.A.copy_(best["tensors"]["lora.A"])
            self.lora.E.copy_(best["tensors"]["lora.E"])
            self.lora.B.copy_(best["tensors"]["lora.B"])
            self.head.weight.copy_(best["tensors"]["head.weight"])
            self.head.bias.copy_(best["tensors"]["head.bias"])


def train_adapter(base: BaseModel, data: Dataset, cfg: TrainConfig, *, init: tuple[Adapter, dict] | None = None,
                  workdir: str | Path | None = None, resume: bool = False, log=print) -> TrainResult:
    """Train; ``init`` = (adapter, source info) to start from an adapter's A, E, B instead of E = 0."""
    # Some CPU backward kernels (attention) reduce across threads in varying order; deterministic
    # algorithms make a seeded run, and a resumed one, bit-identical.
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(cfg.device == "cpu" or previous, warn_only=True)
    try:
        return _train(base, data, cfg, init, workdir, resume, log)
    finally:
        torch.use_deterministic_algorithms(previous)


def check_task(name: str, labels: tuple[str, ...] | list[str] | None = None, multilabel: bool = False) -> None:
    """The task name and labels an adapter file will accept (runtime/adapter.py's rules), checked
    before training so that a run never ends in an adapter that cannot be loaded."""
    if not _TASK_NAME.match(name):
        raise BadInputError(f"task name {name!r} must be letters, digits, '_' or '-' (it names tensors in the file)")
    if labels is None:
        return
    if any(not label.strip() for label in labels):
        raise BadInputError(f"task '{name}': a label is empty ({', '.join(map(repr, labels))})")
    twice = sorted({label for label in labels if list(labels).count(label) > 1})
    if twice:
        raise BadInputError(f"task '{name}': label(s) {', '.join(twice)} given more than once")
    if not multilabel and len(labels) < 2:
        raise BadInputError(f"task '{name}': a single-label task needs at least 2 labels")


def _check_inputs(base, data, cfg, init) -> None:
    """Everything a run needs, checked before any training (a bad flag never costs an epoch)."""
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.rank < 1:
        raise BadInputError("epochs, batch size and rank must be >= 1 and lr > 0")
    check_task(cfg.task, data.labels, data.multilabel)
    for s in ("train", "val", "test"):
        data.split(s)  # each split must exist and be non-empty, before any training
    if init is not None:
        ad = init[0]
        if ad.base.fingerprint != base.fingerprint:
            raise BadInputError(f"--init-adapter was made for another base ({ad.base.model}, {ad.base.fingerprint[:12]}…)")
        same = [t for t in ad.tasks if t.name == cfg.task]
        if same and same[0].num_classes != data.num_classes:
            raise BadInputError(f"--init-adapter's task '{cfg.task}' has {same[0].num_classes} classes, "
                                f"the dataset has {data.num_classes}")


def _train(base, data, cfg, init, workdir, resume, log) -> TrainResult:
    _check_inputs(base, data, cfg, init)
    torch.manual_seed(cfg.seed)
    tr = _Trainer(base, data, cfg, init)
    work = Path(workdir) if workdir else None
    ckpt = work / "checkpoint.safetensors" if work else None
    start, history, resumed = 0, [], None
    best = {"epoch": -1, "metric": -math.inf, "val": {}, "tensors": {}}
    if resume:
        if ckpt is None or not ckpt.exists():
            raise BadInputError(f"--resume: no checkpoint in {work}")
        start, best, history = tr.load_checkpoint(ckpt)
        resumed = start
        log(f"resumed after epoch {start} (best so far: epoch {best['epoch'] + 1})")
    if work:
        work.mkdir(parents=True, exist_ok=True)
    for epoch in range(start, cfg.epochs):
        stats = tr.train_epoch(epoch)
        val = tr.evaluate("val")
        rec = {"epoch": epoch + 1, **stats, "val_accuracy": val["accuracy"], "val_auc": val["auc"]}
        history.append(rec)
        if tr.key_metric(val) > best["metric"]:
            best = {"epoch": epoch, "metric": tr.key_metric(val), "val": val,
                    "tensors": {k: v for k, v in tr.state_tensors().items() if not k.startswith("opt.")}}
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {stats['train_loss']:.4f}, val acc {val['accuracy']:.4f}, "
            f"val auc {val['auc']:.4f} ({stats['seconds']:.1f}s)")
        if work and ckpt is not None:
            with open(work / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            tr.save_checkpoint(ckpt, epoch + 1, best, history)
        if cfg.stop_after_epoch is not None and epoch + 1 >= cfg.stop_after_epoch and epoch + 1 < cfg.epochs:
            raise SystemExit(75)  # simulated interruption (tests of --resume)
    tr.load_best(best)
    test = tr.evaluate("test")
    adapter = _trained_adapter(base, data, cfg, init, tr, best, test, resumed)
    return TrainResult(adapter, best["epoch"] + 1, best["val"], test, history, resumed)


def _trained_adapter(base, data, cfg, init, tr: _Trainer, best: dict, test: dict, resumed: int | None) -> Adapter:
    """The adapter of the best epoch (loaded into `tr`), with how it was made as its provenance."""
    q, v = tr.lora.factors()
    task = TaskSpec(cfg.task, data.labels, data.multilabel)
    head = Head(tr.head.weight.detach().cpu().clone(), tr.head.bias.detach().cpu().clone())
    provenance = {
        "kind": "trained",
        "dataset": {"name": data.name, "source": data.source, "sha256": data.fingerprint, "splits": data.sizes(),
                    "input_size": data.input_size},
        "hyperparameters": {k: v for k, v in asdict(cfg).items() if k not in ("progress", "stop_after_epoch")},
        "best_epoch": best["epoch"] + 1,
        "val": {k: best["val"][k] for k in ("accuracy", "auc")},
        "test": {k: test[k] for k in ("accuracy", "auc")},
        "seed": cfg.seed,
        "init": ({"adapter": init[1].get("name") or init[1].get("path"), "sha256": init[1].get("sha256"),
                  "version": init[1].get("version")} if init else "fresh"),
        "resumed_from_epoch": resumed,
    }
    pp = Preprocess(base.input_size, base.preprocess.mean, base.preprocess.std, 3)
    return Adapter(base=base.spec, tasks=(task,), preprocess=pp, q=q, v=v, heads={cfg.task: head},
                   provenance=provenance, created=utc_now())


def write_outputs(result: TrainResult, out: str | Path, workdir: Path | None) -> str:
    """The adapter file, and beside it the metrics log and the training curves (PNG)."""
    sha = save_adapter(result.adapter, out)
    out = Path(out)
    log = out.with_suffix(".metrics.jsonl")
    log.write_text("".join(json.dumps(r) + "\n" for r in result.history))
    from .plots import plot_curves

    plot_curves(result.history, out.with_suffix(".curves.png"), title=str(result.adapter.tasks[0].name))
    return sha
