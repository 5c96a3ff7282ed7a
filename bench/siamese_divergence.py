"""Step by step: sentence-transformers' SoftmaxLoss (run by its own Trainer, as `fit` runs it)
against sbert-flax's train step, on the same start, the same batches and no dropout.

Both sides start from the same backbone (default m3e-small) and the same classifier weights
(torch's `nn.Linear` init, copied into ours), see the same global batches in the same order (our
`BatchPlan`; torch reads them through a sequential batch sampler) with dropout off, and run
`--steps` updates of the model card's recipe (UER's head [u, v, |u-v|, u*v], mean pooling,
AdamW lr 5e-5, weight decay 0.01, 10% warmup of the whole run's schedule, clipping at 1.0).
Per step the table shows the loss and the pre-clip gradient norm (over every trained param,
classifier included) of each side; at the end, how far our params' change (final - initial) is
from torch's, relative, over the whole model and per tensor (worst). The attention key biases are
reported apart: their gradient is zero but for float noise (softmax ignores a shift common to a
query's scores), and Adam turns noise into full-size steps of random sign on either side.

    python bench/siamese_divergence.py                        # 20 steps, PyTorch's recipe flags
    python bench/siamese_divergence.py --adam-eps 1e-6 --clip all   # sbert-flax's UER defaults

The defaults (`--adam-eps 1e-8 --clip backbone`) are what sentence-transformers does: torch's
AdamW epsilon and HF Trainer's `clip_grad_norm_(model.parameters())`, which leaves the loss's
classifier out of the norm and unclipped (torch_siamese.SoftmaxRecipe steps it so). `run_torch` / `run_flax` / `compare` are what
tests/training/test_siamese_divergence.py runs on a tiny model.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One comparison: the model, data, schedule and the flax side's optimizer flags.

    Attributes:
      model_dir: HF BERT folder both sides start from.
      train_path: UER TSV (text_a, text_b, label).
      pairs: the first `pairs` records form the data set (the schedule's length derives from it).
      steps: updates run (of a schedule over the whole epoch).
      adam_eps: the flax side's AdamW epsilon (torch's default 1e-8; UER's 1e-6).
      clip: "backbone" (sentence-transformers: the classifier outside the norm), "all", "none".
    """

    model_dir: str
    train_path: str
    pairs: int = 8000
    steps: int = 20
    batch_size: int = 32
    seq_length: int = 64
    lr: float = 5e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 7
    num_labels: int = 3
    adam_eps: float = 1e-8
    clip: str = "backbone"
    pack: bool = True

    @property
    def total_steps(self) -> int:
        return -(-self.pairs // self.batch_size)


def open_train(recipe: Recipe):
    """The training file as the trainer reads it (a `TextSource`)."""
    from sbert_flax.training import data

    return data.open_source(recipe.train_path, data.schema_for("softmax"), num_labels=recipe.num_labels)


def batch_order(recipe: Recipe, n: int) -> list[np.ndarray]:
    """The records of each of the first `steps` global batches, as the trainer draws them."""
    from sbert_flax.training.pipeline import BatchPlan, PipelineConfig

    plan = BatchPlan(n, PipelineConfig(global_batch=recipe.batch_size, seq_length=recipe.seq_length,
                                       seed=recipe.seed))
    return [plan.records(k) for k in range(min(recipe.steps, plan.total_steps))]


def run_torch(recipe: Recipe, source, batches: list[np.ndarray]) -> dict:
    """sentence-transformers' SoftmaxLoss (UER head) stepped as its Trainer steps it
    (`torch_siamese.SoftmaxRecipe`) over `batches`, dropout off.

    Returns {"loss", "grad_norm" (pre-clip, all params), "init", "final" (HF name -> numpy,
    backbone and "classifier.weight/bias")}.
    """
    from torch_siamese import SoftmaxRecipe

    ref = SoftmaxRecipe(recipe.model_dir, recipe.num_labels, seq_length=recipe.seq_length, lr=recipe.lr,
                        total_steps=recipe.total_steps, weight_decay=recipe.weight_decay,
                        warmup_ratio=recipe.warmup, max_grad_norm=recipe.max_grad_norm,
                        seed=recipe.seed, dropout=False)
    bert = ref.model[0].auto_model

    def snapshot() -> dict[str, np.ndarray]:
        out = {k: v.detach().float().numpy().copy() for k, v in bert.state_dict().items()}
        out["classifier.weight"] = ref.loss.classifier.weight.detach().numpy().copy()
        out["classifier.bias"] = ref.loss.classifier.bias.detach().numpy().copy()
        return out

    init = snapshot()
    losses, norms = [], []
    for records in batches:
        texts = source.texts(records)
        loss, norm = ref.step(texts["text_a"], texts["text_b"], np.asarray(source.targets[records]))
        losses.append(loss)
        norms.append(norm)
    return {"loss": np.asarray(losses), "grad_norm": np.asarray(norms), "init": init, "final": snapshot()}


def run_flax(recipe: Recipe, source, batches: list[np.ndarray],
             classifier: tuple[np.ndarray, np.ndarray]) -> dict:
    """sbert-flax's train step over the same batches, dropout off, torch's head init.

    Returns {"loss", "grad_norm", "init", "final"} like `run_torch` (HF names)."""
    import jax

    from sbert_flax.checkpoints.pretrained import load_pretrained
    from sbert_flax.checkpoints.weight_maps import flax_to_hf
    from sbert_flax.common import sharding
    from sbert_flax.training import optim
    from sbert_flax.training.losses import make_loss
    from sbert_flax.training.pipeline import BatchBuilder, PipelineConfig
    from sbert_flax.training.state import create_train_state, state_layout
    from sbert_flax.training.step import make_train_step

    pre = load_pretrained(recipe.model_dir, pooling="mean", seq_length=recipe.seq_length)
    cfg = dataclasses.replace(pre.config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    pooling = dataclasses.replace(pre.pooling_config, normalize=False)
    loss = make_loss("softmax", num_labels=recipe.num_labels, pooling=pooling)
    mdef = loss.model_def(cfg, pooling)
    params = loss.initial_params(pre.params, cfg, recipe.seed)
    w, bias = classifier
    params["classifier"] = {"kernel": np.ascontiguousarray(w.T), "bias": bias.copy()}
    tx = optim.make_optimizer(recipe.lr, recipe.total_steps, warmup_ratio=recipe.warmup,
                              weight_decay=recipe.weight_decay, params_for_mask=mdef.abstract_params,
                              max_grad_norm=None if recipe.clip == "none" else recipe.max_grad_norm,
                              adam_eps=recipe.adam_eps, clip_head=recipe.clip == "all")
    mesh = sharding.make_mesh(-1, 1, jax.devices()[:1])
    layout = state_layout(mdef, tx, mesh, sharding.rules_for("replicated"))
    state = create_train_state(params, tx, layout)
    step = make_train_step(mdef.graphdef, loss, tx, layout, seed=recipe.seed)
    builder = BatchBuilder(source, pre.tokenizer, PipelineConfig(
        global_batch=recipe.batch_size, seq_length=recipe.seq_length, shuffle=False,
        joint_length=loss.joint_length, pack=recipe.pack))

    def hf(p) -> dict[str, np.ndarray]:
        host = jax.tree.map(np.asarray, p)
        out = flax_to_hf(host["embedder"]["backbone"], cfg)
        out["classifier.weight"] = host["classifier"]["kernel"].T.copy()
        out["classifier.bias"] = host["classifier"]["bias"].copy()
        return out

    init = hf(params)
    losses, norms = [], []
    for records in batches:
        state, metrics = step(state, sharding.put_batch(builder.build(records), mesh))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return {"loss": np.asarray(losses), "grad_norm": np.asarray(norms), "init": init,
            "final": hf(state.params)}


def compare(t: dict, j: dict) -> dict:
    """Relative differences: per step (loss, grad norm) and of the params' change (final - init),
    over all params but the attention key biases and the worst tensor; also of the final params."""
    keys = sorted(set(t["final"]) & set(j["final"]))
    dt = {k: t["final"][k] - t["init"][k] for k in keys}
    dj = {k: j["final"][k] - t["init"][k] for k in keys}  # both from torch's start

    def rel(ks: list[str]) -> float:
        num = math.sqrt(sum(float(np.sum((dj[k] - dt[k]) ** 2)) for k in ks))
        return num / math.sqrt(sum(float(np.sum(dt[k] ** 2)) for k in ks))

    # An attention key bias adds q . b_k to every score of a query: softmax ignores it, so its
    # gradient is 0 in exact arithmetic and float noise on either side, which Adam scales up to
    # full-size steps of random sign. It is compared on its own.
    noise = [k for k in keys if k.endswith("attention.self.key.bias")]
    signal = [k for k in keys if k not in noise]
    per = {k: float(np.linalg.norm(dj[k] - dt[k]) / max(np.linalg.norm(dt[k]), 1e-30)) for k in signal}
    worst = max(per, key=per.get)
    fin_num = math.sqrt(sum(float(np.sum((j["final"][k] - t["final"][k]) ** 2)) for k in keys))
    fin_den = math.sqrt(sum(float(np.sum(t["final"][k] ** 2)) for k in keys))
    start = max(float(np.max(np.abs(j["init"][k] - t["init"][k]))) for k in keys)
    return {"loss_rel": np.abs(j["loss"] - t["loss"]) / np.abs(t["loss"]),
            "grad_norm_rel": np.abs(j["grad_norm"] - t["grad_norm"]) / t["grad_norm"],
            "update_rel": rel(signal), "update_rel_key_bias": rel(noise) if noise else 0.0,
            "update_rel_all": rel(keys), "worst_tensor": worst, "worst_tensor_rel": per[worst],
            "params_rel": fin_num / fin_den, "start_max_abs": start,
            # torch's BertModel has a pooler that the sentence embedding never uses
            "missing": sorted(k for k in set(t["final"]) ^ set(j["final"]) if not k.startswith("pooler."))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="start model (default: m3e-small)")
    ap.add_argument("--pairs", type=int, default=8000, help="data set size (sets the schedule)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--adam-eps", type=float, default=1e-8)
    ap.add_argument("--clip", choices=["backbone", "all", "none"], default="backbone")
    ap.add_argument("--no-pack", action="store_true", help="flax side pads [a; b] instead of packing")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import torch

    from sbert_flax.common.devdata import data_path, reference_model

    torch.set_num_threads(args.threads)
    recipe = Recipe(model_dir=args.model or reference_model("m3e-small"),
                    train_path=data_path("nli-zh", "train.tsv"), pairs=args.pairs, steps=args.steps,
                    batch_size=args.batch_size, seq_length=args.seq_length, seed=args.seed,
                    adam_eps=args.adam_eps, clip=args.clip, pack=not args.no_pack)
    source = open_train(recipe)
    batches = batch_order(recipe, min(recipe.pairs, len(source)))
    t = run_torch(recipe, source, batches)
    j = run_flax(recipe, source, batches, (t["init"]["classifier.weight"], t["init"]["classifier.bias"]))
    c = compare(t, j)
    print(f"{recipe}\n")
    print("| step | loss torch | loss flax | rel | grad norm torch | grad norm flax | rel |")
    print("|---|---|---|---|---|---|---|")
    for k in range(len(batches)):
        print(f"| {k} | {t['loss'][k]:.6f} | {j['loss'][k]:.6f} | {c['loss_rel'][k]:.1e} | "
              f"{t['grad_norm'][k]:.5f} | {j['grad_norm'][k]:.5f} | {c['grad_norm_rel'][k]:.1e} |")
    print(f"\nstart params max |diff|: {c['start_max_abs']:.1e}; keys on one side only: {c['missing']}")
    print(f"final params, relative: {c['params_rel']:.2e}")
    print(f"params' change (final - initial), relative: {c['update_rel']:.2e} (worst tensor "
          f"{c['worst_tensor']}: {c['worst_tensor_rel']:.2e}); attention key biases (zero gradient "
          f"but for float noise): {c['update_rel_key_bias']:.2e}; all together: {c['update_rel_all']:.2e}")


if __name__ == "__main__":
    main()
