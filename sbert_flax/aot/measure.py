"""Compile the programs for a topology and read what XLA says about them: memory per chip, FLOPs.

Per chip, from `compiled.memory_analysis()` of the SPMD-partitioned program (what one chip runs):
arguments (the state shard and the batch shard), outputs, temporaries, and the outputs that alias
donated arguments (the new train state reuses the old state's buffers). The peak a chip needs is
arguments + outputs - aliased + temporaries, plus what stays resident beside the program (the
optimizer state, while the evaluator runs). The program fits when that is at most the chip's HBM
less a headroom (`DEFAULT_HBM_HEADROOM`): the runtime keeps some HBM for itself. When XLA itself
refuses (it ran out of HBM while scheduling), the program does not fit either, and XLA's message
is kept.

FLOPs: `compiled.cost_analysis()["flops"]` is one chip's program; times the chips it is the
whole step. XLA counts a loop body once, so with `--scan_layers` (a loop over layers) or
cached-mnrl (a loop over mini-batches) the figure undercounts: compare FLOPs without them.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from sbert_flax.aot.compile_targets import (
    Lowering,
    encode_lowerings,
    evaluate_lowerings,
    run_parts,
    train_step_lowering,
)
from sbert_flax.aot.topology import GiB, Topology
from sbert_flax.inference.encoder import DEFAULT_MAX_BATCH_TOKENS
from sbert_flax.models.config import BertConfig, PoolingConfig
from sbert_flax.training.train_config import TrainConfig

# The custom-call target of a Pallas TPU (Mosaic) kernel in compiled HLO: the splash attention
# kernel is the only one the programs contain.
_MOSAIC_CALL = "tpu_custom_call"
_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory|[Oo]ut of memory")
# The share of a chip's HBM not counted as room for the programs. XLA:TPU itself offers 15.75 of
# a v5e's 16 GiB ("exceeds available HBM (15.75G)", 1.6% held by the runtime), and the runtime
# also holds the executables, collective and transfer buffers that `memory_analysis` does not
# show: a program that needs 99% of the nominal HBM does not run.
DEFAULT_HBM_HEADROOM = 0.05


def is_out_of_memory(e: BaseException) -> bool:
    """XLA's refusal to compile for lack of device memory (vs. any other failure)."""
    return bool(_OOM.search(str(e)))


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program on one chip.

    Attributes:
      name: "train_step", "evaluate sts ROWSxLENGTH", "evaluate classify ROWSxLENGTH" or
        "encode ROWSxLENGTH".
      shape: encode and evaluate programs: (rows, length) of the batch.
      arguments, output, alias, temp: bytes per chip (None when XLA refused to compile).
      resident: bytes per chip held beside the program while it runs (the optimizer state, for
        the evaluator), part of `total`.
      flops: the whole program over all chips (XLA's cost analysis), None when refused.
      compile_seconds: wall time of the compile.
      error: XLA's out-of-memory message, when it refused.
      splash: the compiled program runs the Pallas splash attention kernel (a Mosaic custom
        call in its HLO), None when refused.
    """

    name: str
    shape: tuple[int, ...] | None
    arguments: int | None
    output: int | None
    alias: int | None
    temp: int | None
    flops: float | None
    compile_seconds: float
    error: str | None = None
    splash: bool | None = None
    resident: int = 0

    @property
    def total(self) -> int | None:
        if self.error is not None:
            return None
        return (self.arguments + self.output - self.alias  # type: ignore[operator]
                + self.temp + self.resident)

    def fits(self, usable_bytes: int) -> bool:
        """Whether the program fits in `usable_bytes` per chip (`CompileReport.usable_hbm`)."""
        return self.error is None and self.total <= usable_bytes  # type: ignore[operator]

    def bytes_json(self) -> dict[str, int | None]:
        return {"arguments": self.arguments, "output": self.output, "alias": self.alias,
                "temp": self.temp, "resident": self.resident, "total": self.total}


def _flops(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def compile_program(lowering: Lowering, chips: int) -> ProgramReport:
    """Compiles `lowering` and reads its memory and cost analyses.

    Raises:
      Whatever XLA raises that is not an out-of-memory refusal (a bug, not the user's).
    """
    t0 = time.perf_counter()
    try:
        compiled = lowering.lowered.compile()
    except Exception as e:  # noqa: BLE001 -- only XLA's out-of-memory is an answer here
        if not is_out_of_memory(e):
            raise
        secs = time.perf_counter() - t0
        msg = re.sub(r"\s+", " ", str(e)).strip()
        return ProgramReport(lowering.name, lowering.shape, None, None, None, None, None, secs, msg,
                             resident=lowering.resident)
    secs = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    flops = _flops(compiled)
    return ProgramReport(
        lowering.name, lowering.shape, int(mem.argument_size_in_bytes),
        int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes),
        None if flops is None else flops * chips, secs,
        splash=_MOSAIC_CALL in compiled.as_text(), resident=lowering.resident)


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What `sbert-flax compile` found: the train step, the evaluator's programs (when the run
    evaluates) and (with --encode) each encode shape.

    `hbm_headroom`: the share of each chip's HBM left to the runtime; a program fits in the rest
    (`usable_hbm`).
    """

    topology: Topology
    train: ProgramReport
    encode: tuple[ProgramReport, ...] = ()
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    evaluate: tuple[ProgramReport, ...] = ()
    hbm_headroom: float = DEFAULT_HBM_HEADROOM

    def __post_init__(self) -> None:
        if not 0 <= self.hbm_headroom < 1:
            raise ValueError(f"--hbm-headroom {self.hbm_headroom} must be in [0, 1)")

    @property
    def hbm(self) -> int:
        return self.topology.hbm_bytes_per_chip

    @property
    def usable_hbm(self) -> int:
        """Bytes per chip a program may need and still fit: HBM less the headroom."""
        return int(self.hbm * (1 - self.hbm_headroom))

    @property
    def programs(self) -> tuple[ProgramReport, ...]:
        return (self.train, *self.evaluate, *self.encode)

    @property
    def fits(self) -> bool:
        return all(p.fits(self.usable_hbm) for p in self.programs)

    @property
    def compile_seconds(self) -> float:
        return sum(p.compile_seconds for p in self.programs)

    def _shaped_json(self, p: ProgramReport) -> dict[str, Any]:
        return {"name": p.name, "shape": list(p.shape or ()), "bytes_per_chip": p.bytes_json(),
                "fits": p.fits(self.usable_hbm), "flops": p.flops,
                "compile_seconds": round(p.compile_seconds, 2), "splash_attention": p.splash,
                **({"error": p.error} if p.error else {})}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "topology": self.topology.name, "chips": self.topology.chips,
            "device_kind": self.topology.device_kind, "hbm_bytes_per_chip": self.hbm,
            "hbm_headroom": self.hbm_headroom, "usable_hbm_bytes_per_chip": self.usable_hbm,
            "bytes_per_chip": self.train.bytes_json(), "fits": self.fits,
            "train_step_fits": self.train.fits(self.usable_hbm), "flops_per_step": self.train.flops,
            "compile_seconds": round(self.compile_seconds, 2), "settings": self.settings,
            "splash_attention": self.train.splash,
        }
        if self.train.error:
            out["error"] = self.train.error
        if self.evaluate:
            out["evaluate"] = [self._shaped_json(p) for p in self.evaluate]
        if self.encode:
            out["encode"] = [self._shaped_json(p) for p in self.encode]
        return out


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def advice(settings: dict[str, Any], train_fits: bool,
           train: ProgramReport | None = None, *, failing: str = "encode") -> list[str]:
    """What to change so that the step fits, from the run's settings: for activations (remat,
    GradCache) first, unless the state outweighs the temporaries (then fsdp first). When the step
    fits, for the program that does not (`failing`: "evaluate" or "encode")."""
    if train_fits and failing == "evaluate":
        return [f"a smaller --eval_batch_size (now {settings.get('eval_batch_size')}: the "
                "evaluator packs that many rows of --seq_length tokens)",
                "--param-sharding fsdp (the optimizer state stays on the chips while it runs)"]
    if train_fits:
        return ["encode: a smaller --max_batch_tokens (fewer rows per packed batch)"]
    out = []
    fsdp = "--param-sharding fsdp (params and optimizer state split over the chips)"
    state_heavy = (train is not None and train.error is None
                   and train.arguments > train.temp)  # type: ignore[operator]
    if state_heavy and settings.get("param_sharding") != "fsdp":
        out.append(fsdp)
    if settings.get("param_sharding") == "fsdp" and settings.get("windowed_einsum", True):
        out.append("--no_windowed_einsum (XLA then all-gathers fsdp's weights before each matmul "
                   "instead of overlapping them, which holds more activations)")
    if not settings.get("remat"):
        out.append("--remat (recompute each layer's activations in the backward pass; with "
                   "--scan_layers the layer is compiled once)")
    if settings.get("loss") == "mnrl":
        b = int(settings.get("batch_size") or 0)
        mini = max(b // 8, 1)
        out.append(f"--loss cached-mnrl --mini_batch_size {mini} (GradCache: the same loss, "
                   "activations of one mini-batch at a time)")
    elif settings.get("loss") == "cached-mnrl" and settings.get("mini_batch_size"):
        out.append(f"a smaller --mini_batch_size (now {settings['mini_batch_size']})")
    if settings.get("param_sharding") != "fsdp" and not state_heavy:
        out.append(fsdp)
    if settings.get("batch_size"):
        out.append(f"a smaller --batch_size (now {settings['batch_size']})")
    out.append("more chips (a larger --topology)")
    return out


def format_report(report: CompileReport) -> str:
    """The human-readable report (`sbert-flax compile` without --json)."""
    t, s = report.topology, report.settings
    lines = [f"topology {t.name}: {t.chips} x {t.device_kind}, {gib(report.hbm)} HBM per chip, "
             f"{gib(report.usable_hbm)} usable ({report.hbm_headroom:.0%} headroom)",
             f"train step: loss {s.get('loss')}, global batch {s.get('batch_size')}, seq_length "
             f"{s.get('seq_length')}, {'bf16' if s.get('bf16') else 'float32'}, params "
             f"{s.get('param_sharding')}" + (", remat" if s.get("remat") else "")
             + (", scan_layers" if s.get("scan_layers") else "")
             + (f", mini_batch_size {s['mini_batch_size']}" if s.get("mini_batch_size") else "")]

    def describe(p: ProgramReport) -> str:
        if p.error:
            return f"  {p.name}: XLA refused: {p.error} ({p.compile_seconds:.1f} s)"
        flops = "-" if p.flops is None else f"{p.flops:.3e}"
        resident = f", beside {gib(p.resident)} of optimizer state" if p.resident else ""
        return (f"  {p.name}: per chip {gib(p.total)} (arguments {gib(p.arguments)}, output "
                f"{gib(p.output)}, aliased {gib(p.alias)}, temp {gib(p.temp)}{resident}); "
                f"{'fits' if p.fits(report.usable_hbm) else 'DOES NOT FIT'}; FLOPs {flops}; "
                f"attention {'splash' if p.splash else 'XLA'}; compiled in {p.compile_seconds:.1f} s")

    lines += [describe(p) for p in report.programs]
    lines.append(f"{'fits' if report.fits else 'does not fit'} "
                 f"(compiled in {report.compile_seconds:.1f} s)")
    return "\n".join(lines)


def compile_for_topology(cfg: TrainConfig, model: BertConfig, pooling: PoolingConfig,
                         topology: Topology, *, encode: bool = False, negatives: int = 0,
                         max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                         encode_seq_length: int | None = None,
                         hbm_headroom: float = DEFAULT_HBM_HEADROOM) -> CompileReport:
    """Compiles the programs of the run `cfg` for `topology`: its train step, its evaluator's
    programs (when it evaluates) and, with `encode`, every packed encode shape at
    `encode_seq_length` (the model's own max_seq_length: what `encode` and `serve` run at;
    None: `model.max_position_embeddings`). See the module docstring for what is measured.

    Raises:
      ValueError: settings that do not go together (the batch does not split over the chips, ...).
    """
    settings = {"loss": cfg.loss, "batch_size": cfg.batch_size, "seq_length": cfg.seq_length,
                "bf16": cfg.bf16, "param_sharding": cfg.param_sharding, "remat": cfg.remat,
                "scan_layers": cfg.scan_layers, "mini_batch_size": cfg.mini_batch_size,
                "negatives": negatives, "pack": cfg.pack, "windowed_einsum": cfg.windowed_einsum,
                "eval_batch_size": cfg.eval_batch_size or cfg.batch_size}
    encode_seq_length = encode_seq_length or model.max_position_embeddings
    if not 2 <= encode_seq_length <= model.max_position_embeddings:
        raise ValueError(f"--max-seq-length {encode_seq_length} must be in [2, the model's "
                         f"max_position_embeddings ({model.max_position_embeddings})]")
    if encode:
        settings.update(max_batch_tokens=max_batch_tokens, encode_seq_length=encode_seq_length)
    chips = topology.chips
    parts = run_parts(cfg, model, pooling, topology.devices)
    train = compile_program(train_step_lowering(parts, negatives=negatives), chips)
    evaluate = tuple(compile_program(lw, chips) for lw in evaluate_lowerings(parts))
    enc: tuple[ProgramReport, ...] = ()
    if encode:
        enc = tuple(compile_program(lw, chips) for lw in encode_lowerings(
            model, pooling, topology.devices, bf16=cfg.bf16, max_seq_length=encode_seq_length,
            max_batch_tokens=max_batch_tokens))
    return CompileReport(topology, train, enc, settings, evaluate, hbm_headroom)
