"""Accuracy-driven precision planning (--calib with --precision fp8, nvfp4 or auto): which GEMMs to quantize so
that the final outputs keep a target cosine to the float32 model on the calibration inputs.

A unit of decision is one GEMM activation with the GEMMs reading it: quantizing it means the static FP8
activation scale of aot/calibrate.py on their A operand and the weight format the planner would pick
(Partitioner.plan_weight) for their constant weights; keeping it means bf16 for both.
Method (deterministic, first order): run the graph in float32 numpy on the calibration samples; quantize each
unit alone (the exact rounding aot/quantize.py stores) and measure the drop 1 - cosine of the final outputs; sort
by drop and keep the most sensitive units in bf16 until the sum of the quantized ones' drops (an estimate of
1 - cosine) fits the budget 1 - target; then run once with all chosen quantizations; when that misses the
target, bisect on the number of units kept in bf16 (in sensitivity order) for the fewest whose measured cosine
meets it.

The cosine of a set of outputs is the worst, over samples, outputs and rows (vectors along the last axis), of
the per-row cosine: per-token for a transformer's hidden states. bf16 activation rounding is not simulated."""

from dataclasses import dataclass

import numpy as np

from flashrt.aot.importers.onnx_ops import fold
from flashrt.aot.ir import Graph, Node
from flashrt.aot.quantize import quantize_fp8, quantize_nvfp4
from flashrt.errors import BuildError
from flashrt.kernels.quant import dequant_fp8, dequant_nvfp4, fake_quant_act

DEFAULT_MIN_COSINE = {"fp8": 0.999, "nvfp4": 0.99, "auto": 0.99}


@dataclass
class WeightChoice:
    fmt: str | None  # the quantized format, or None: keep the engine's activation type
    reason: str


def default_min_cosine(precision: str) -> float:
    return DEFAULT_MIN_COSINE.get(precision, 0.999)


def fake_quant(w_kn: np.ndarray, fmt: str) -> np.ndarray:
    """A [K, N] weight rounded as the engine stores it in fmt, back in float32."""
    w_nk = np.ascontiguousarray(np.asarray(w_kn, np.float32).T)
    deq = dequant_fp8(*quantize_fp8(w_nk)) if fmt == "fp8" else dequant_nvfp4(*quantize_nvfp4(w_nk))
    return np.ascontiguousarray(deq.T).astype(np.float32)


class Runner:
    """Evaluates the graph on fixed samples against its float32 run. A trial replaces constants (quantized
    weights) and fake-quantizes the activation operand of some GEMMs (scale per activation, as
    aot/calibrate.py inserts it); it re-runs only the nodes from the first one it changes."""

    def __init__(self, graph: Graph, samples: list[dict[str, np.ndarray]]):
        self.g = graph
        self.index = {id(n): i for i, n in enumerate(graph.nodes)}
        self.envs = [self._run(dict(feeds), {}, {}, 0) for feeds in samples]
        self.reference = [[env[o] for o in graph.outputs] for env in self.envs]
        self.first_reader: dict[str, int] = {}
        for i, n in enumerate(graph.nodes):
            for name in n.inputs:
                self.first_reader.setdefault(name, i)

    def _run(self, env: dict, weights: dict[str, np.ndarray], acts: dict[int, np.ndarray], start: int) -> dict:
        g = self.g
        for node in g.nodes[start:]:
            args = [None if not i else weights[i] if i in weights else g.constants[i] if i in g.constants
                    else env[i] for i in node.inputs]
            if id(node) in acts:
                scale = acts[id(node)]
                args[0] = fake_quant_act(args[0], scale).astype(args[0].dtype)
            for name, arr in zip(node.outputs, fold(node, args)):
                if name:
                    env[name] = arr
        return env

    def cosine(self, weights: dict[str, np.ndarray], acts: dict[int, np.ndarray] | None = None) -> float:
        """The worst per-row cosine of the outputs under this trial, vs the float32 run. acts: GEMM node id ->
        the scale of its fake-quantized activation operand."""
        acts = acts or {}
        n = len(self.g.nodes)
        start = min([self.first_reader.get(k, n) for k in weights] + [self.index[a] for a in acts] + [n])
        worst = 1.0
        for env, ref in zip(self.envs, self.reference):
            out = self._run(dict(env), weights, acts, start) if start < n else env
            for o, want in zip(self.g.outputs, ref):
                worst = min(worst, row_cosine(out[o], want))
        return worst


def row_cosine(got: np.ndarray, want: np.ndarray) -> float:
    """min over rows (the last axis; the whole tensor when that axis has one element) of the cosine."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.ndim == 0 or got.shape[-1] == 1:
        got, want = got.reshape(1, -1), want.reshape(1, -1)
    a, b = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    cos = (a * b).sum(-1) / np.maximum(na * nb, 1e-300)
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)  # two zero rows agree
    return float(cos.min()) if cos.size else 1.0


@dataclass(eq=False)
class Unit:
    """What one decision quantizes: the GEMMs reading one activation (its static FP8 scale, None when it has
    none) and those of their weights the planner would quantize (weight -> format)."""
    name: str
    gemms: list[Node]
    scale: np.ndarray | None
    weights: dict[str, str]


def _trial(units: list[Unit], quantized: dict[str, np.ndarray]) -> tuple[dict, dict]:
    weights = {w: quantized[w] for u in units for w in u.weights}
    acts = {id(g): u.scale for u in units if u.scale is not None for g in u.gemms}
    return weights, acts


def plan_units(graph: Graph, samples: list[dict[str, np.ndarray]], units: list[Unit],
               min_cosine: float) -> tuple[dict[str, tuple[bool, str]], dict]:
    """Which units to quantize: unit name -> (quantize?, reason), and a summary {"all_quantized", "planned",
    "kept", "total"} (measured cosines vs the float32 run, units kept in bf16, units)."""
    run = Runner(graph, samples)
    quantized = {w: fake_quant(graph.constants[w], fmt) for u in units for w, fmt in u.weights.items()}
    drops = {u.name: max(1.0 - run.cosine(*_trial([u], quantized)), 0.0) for u in units}
    order = sorted(units, key=lambda u: (-drops[u.name], u.name))  # most sensitive first; names break ties
    budget = 1.0 - min_cosine
    kept, remaining = 0, sum(drops.values())
    while kept < len(order) and remaining > budget:
        remaining -= drops[order[kept].name]
        kept += 1
    all_quantized = run.cosine(*_trial(order, quantized))
    measured = {len(order): 1.0}  # all in bf16: the float32 run itself

    def cosine(k: int) -> float:
        if k not in measured:
            measured[k] = run.cosine(*_trial(order[k:], quantized))
        return measured[k]

    if cosine(kept) < min_cosine:  # the first-order estimate missed: bisect for the fewest bf16 units that verify
        lo, hi = kept, len(order)  # cosine(lo) misses, cosine(hi) meets
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if cosine(mid) >= min_cosine else (mid, hi)
        kept = hi
    planned = cosine(kept)
    n, decisions = len(order), {}
    for i, u in enumerate(order):
        fmts = " + ".join([f"{f} weight" for f in sorted(set(u.weights.values()))]
                          + (["fp8 activation"] if u.scale is not None else []))
        where = f"calibrated sensitivity {drops[u.name]:.1e} (rank {i + 1} of {n})"
        if i < kept:
            decisions[u.name] = (False, f"bf16: {where} exceeds the {fmts} budget (min cosine {min_cosine})")
        else:
            decisions[u.name] = (True, f"{fmts}: {where}; calibrated cosine {planned:.5f} (min {min_cosine})")
    return decisions, {"all_quantized": all_quantized, "planned": planned, "kept": kept, "total": n}


def calibrate_and_plan(graph: Graph, path: str, precision: str, min_cosine: float | None = None,
                       archs: list[str] | None = None) -> dict:
    """--calib with a cosine target: choose per activation (and the GEMM weights reading it) whether to
    quantize; insert the static FP8 activation scales of the chosen ones (aot/calibrate.py) and record the
    weight choices in graph.weight_plan for the partitioner. Returns plan_units' summary."""
    from flashrt.aot.calibrate import CALIB_PRECISIONS, activation_amax, gemm_activations, insert_fake_quant, \
        load_calib
    from flashrt.aot.partition import Partitioner
    from flashrt.errors import ModelError
    from flashrt.kernels.quant import FP8_MAX

    if precision not in CALIB_PRECISIONS:
        raise ModelError(f"--calib gives FP8 activation scales, which need --precision fp8, nvfp4 or auto "
                         f"(got {precision})")
    min_cosine = default_min_cosine(precision) if min_cosine is None else float(min_cosine)
    if not 0 < min_cosine <= 1:
        raise BuildError(f"--min-cosine {min_cosine}: expected a number in (0, 1]")
    samples = load_calib(path, graph)
    targets = gemm_activations(graph)
    amax = activation_amax(graph, samples, set(targets))
    planner = Partitioner(graph, precision, targets=archs)
    units = []
    for value, gemms in targets.items():
        a = amax.get(value, 0.0)
        scale = np.array(np.float32(a / FP8_MAX)) if a > 0 and np.isfinite(a) else None
        weights = {}
        for mm in gemms:
            w = graph.constants[mm.inputs[1]]
            rows = int(np.prod(graph.values[value].shape[:-1]))
            fmt, _ = planner.plan_weight(mm, w.shape[0], w.shape[1], rows)
            if fmt in ("fp8", "nvfp4"):
                weights[mm.inputs[1]] = fmt
        if scale is not None or weights:
            units.append(Unit(value, gemms, scale, weights))
    decisions, summary = plan_units(graph, samples, units, min_cosine)
    plan = {}
    for u in units:
        quantize, reason = decisions[u.name]
        for w, fmt in u.weights.items():
            plan[w] = WeightChoice(fmt if quantize else None, reason)
    graph.weight_plan = plan
    insert_fake_quant(graph, amax, {u.name: u.gemms for u in units if decisions[u.name][0]})
    return summary

