"""The L2 weight-prefetch plan: which launch streams which later launch's weights into L2 ahead of use.

At batch 1 no kernel keeps the memory system busy from start to end: a GEMV's tail and a decode attention leave
DRAM mostly idle. A host kernel (a family kernels/prefetch.py lists) prefetches the weights of the launches after
it, in launch order, as long as everything from the next launch up to and including the prefetched one fits the
budget (so that the prefetched bytes and those read in between share L2 without evicting each other). A weight
is prefetched by the first host that can take it, unless it is still in L2 from an earlier read."""

from flashrt.aot.views import Buffer, TensorRef
from flashrt.kernels import prefetch

MIN_BYTES = 64 << 10  # smaller weights (norm gammas, biases, scales of small tensors) are not worth an instruction


def _weights(call) -> list[Buffer]:
    seen = {}
    for ref in call.args:
        if ref.buffer.kind == "weight" and ref.buffer.nbytes >= max(MIN_BYTES, 16):
            seen.setdefault(id(ref.buffer), ref.buffer)
    return list(seen.values())


def plan_l2_prefetch(calls: list, budget: int, hosts: tuple[str, ...] = prefetch.FAMILIES) -> None:
    """Adds `l2_next` (bytes per span) and the spans' pointer arguments to host calls (of the families in hosts),
    in place."""
    if budget <= 0:
        return
    weights = [_weights(c) for c in calls]
    before = [0]  # weight bytes read by the launches before each launch
    for ws in weights:
        before.append(before[-1] + sum(b.nbytes for b in ws))
    # launch index at which each weight was last read or will be read from a prefetch: it is still in L2 for a
    # later launch j if at most `budget` weight bytes were read in between (a loop's next step re-reads its
    # weights only after all the others, so they are prefetched again)
    last = {}

    def resident(b: Buffer, j: int) -> bool:
        return id(b) in last and before[j] - before[last[id(b)] + 1] <= budget

    for i, host in enumerate(calls):
        last.update((id(b), max(i, last.get(id(b), i))) for b in weights[i])
        if host.family not in hosts or host.params.get("l2_next"):
            continue
        spans = []
        for j in range(i + 1, len(calls)):
            if before[j + 1] - before[i + 1] > budget:
                break
            for b in weights[j]:
                if not resident(b, j):
                    spans.append(b)
                    last[id(b)] = j
        if spans:
            host.params["l2_next"] = [b.nbytes // 16 * 16 for b in spans]
            host.args += [TensorRef.contiguous_view(b, (b.nelems,)) for b in spans]
            note = (f"prefetches {sum(b.nbytes for b in spans) / 1e6:.1f} MB of later launches' weights into L2 "
                    f"({', '.join(b.name for b in spans)}; budget {budget / (1 << 20):.0f} MiB)")
            host.reason = f"{host.reason}; {note}" if host.reason else note
