"""The L2 weight-prefetch plan: which launch streams which later launch's weights into L2 ahead of use.

At batch 1 no kernel keeps the memory system busy from start to end: a GEMV's tail and a decode attention leave
DRAM mostly idle. A host kernel (a family kernels/prefetch.py lists) prefetches the weights of the launches after
it, in launch order, as long as everything from the next launch up to and including the prefetched one fits the
budget (so that the prefetched bytes and those read in between share L2 without evicting each other). Every
weight is prefetched once, by the first host that can take it."""

from flashrt.aot.views import Buffer, TensorRef
from flashrt.kernels import prefetch

MIN_BYTES = 64 << 10  # smaller weights (norm gammas, biases, scales of small tensors) are not worth an instruction


def _weights(call) -> list[Buffer]:
    seen = {}
    for ref in call.args:
        if ref.buffer.kind == "weight" and ref.buffer.nbytes >= max(MIN_BYTES, 16):
            seen.setdefault(ref.buffer.name, ref.buffer)
    return list(seen.values())


def plan_l2_prefetch(calls: list, budget: int) -> None:
    """Adds `l2_next` (bytes per span) and the spans' pointer arguments to host calls, in place."""
    if budget <= 0:
        return
    weights = [_weights(c) for c in calls]
    taken = set()  # prefetched by a host, or read by a launch before
    for i, host in enumerate(calls):
        taken.update(b.name for b in weights[i])
        if host.family not in prefetch.FAMILIES or host.params.get("l2_next"):
            continue
        window, spans = 0, []
        for ws in weights[i + 1:]:
            window += sum(b.nbytes for b in ws)
            if window > budget:
                break
            spans += [b for b in ws if b.name not in taken]
            taken.update(b.name for b in ws)
        if spans:
            host.params["l2_next"] = [b.nbytes // 16 * 16 for b in spans]
            host.args += [TensorRef.contiguous_view(b, (b.nelems,)) for b in spans]
            note = (f"prefetches {sum(b.nbytes for b in spans) / 1e6:.1f} MB of later launches' weights into L2 "
                    f"({', '.join(b.name for b in spans)}; budget {budget / 1e6:.0f} MB)")
            host.reason = f"{host.reason}; {note}" if host.reason else note
