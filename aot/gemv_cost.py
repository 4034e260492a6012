"""The precision planner's time model of a weight-streaming GEMV (M <= 8 rows) per weight format and target.

A GEMV's time is a fixed cost per launch, plus its weight bytes at the streaming rate the kernel reaches, plus
the ALU work of widening quantized values to bf16. The constants are fitted to the H200 (sm_90a) kernel
timings in benchmarks/NOTES.md (v3: qkv, o-proj, gate/up and down GEMVs of the decode workload, each format),
which gave, per MB of bf16-equivalent weights: bf16 0.317 us, fp8 0.287 us, nvfp4 0.262 us, and fixed costs of
2.8 / 2.75 / 3.4 us. Other targets scale the streaming term by their DRAM bandwidth and the decode term by
their SM count; their fixed costs are assumed equal to the H200's (not measured). So on the H200 a decode GEMV
of a few MB is bound by its fixed cost and quantization gains a few percent at most, while on Jetson Thor
(~0.27 TB/s) the bytes dominate and NVFP4 pays."""

from flashrt.aot.targets import sm_number

# DRAM bandwidth (TB/s) and SM count of the GPU each architecture's build is for (aot/targets.py's products).
GPUS = {80: (2.0, 108), 89: (0.864, 142), 90: (4.8, 132), 100: (8.0, 148), 110: (0.273, 20), 120: (1.79, 170)}
H200_SMS = 132
STREAM_EFFICIENCY = 0.66  # bf16 GEMV marginal rate / DRAM bandwidth on the H200 (3.15 of 4.8 TB/s)
BYTES_PER_VALUE = {"bf16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}  # nvfp4: E2M1 + an E4M3 scale per 16 values
FIXED_US = {"bf16": 2.8, "fp8": 2.75, "nvfp4": 3.4}
# widening cost per million values on the H200 (fit minus the streaming term)
DECODE_US_PER_MVALUE = {"bf16": 0.0, "fp8": 0.26, "nvfp4": 0.36}
MIN_GAIN = 0.10  # a quantized weight costs accuracy: take it only for a predicted gain of at least 10%


def _gpu(arch: str) -> tuple[float, int]:
    """(bandwidth, SMs) of arch's GPU, else of the nearest older architecture listed."""
    sm = max(sm_number(arch), min(GPUS))
    return GPUS[max(k for k in GPUS if k <= sm)]


def gemv_us(fmt: str, values: int, arch: str) -> float:
    """Predicted microseconds of one GEMV launch streaming `values` weights in format fmt on arch."""
    bandwidth, sms = _gpu(arch)
    stream = values * BYTES_PER_VALUE[fmt] / (bandwidth * 1e12 * STREAM_EFFICIENCY) * 1e6
    decode = values / 1e6 * DECODE_US_PER_MVALUE[fmt] * H200_SMS / sms
    return FIXED_US[fmt] + stream + decode


def choose_gemv_format(values: int, archs: list[str], allowed: list[str]) -> tuple[str, str]:
    """The weight format (of "bf16" and `allowed`) with the lowest mean predicted time relative to bf16 over
    the targets, if it gains at least MIN_GAIN; and the reason, with the predicted times."""
    archs = archs or ["sm_110a"]
    rel = {f: sum(gemv_us(f, values, a) / gemv_us("bf16", values, a) for a in archs) / len(archs)
           for f in ["bf16", *allowed]}
    best = min(rel, key=rel.get)
    if 1 - rel[best] < MIN_GAIN:
        best = "bf16"
    times = "; ".join(f"{a}: " + ", ".join(f"{f} {gemv_us(f, values, a):.1f}" for f in rel) + " us"
                      for a in sorted(set(archs)))
    gain = f"{(1 - rel[best]) * 100:.0f}% faster than bf16" if best != "bf16" else \
        f"no format is {MIN_GAIN:.0%} faster than bf16"
    return best, f"weight-streaming GEMV, {values * 2 / 1e6:.1f} MB in bf16: {gain} (predicted {times})"
