"""Prefetch of later launches' constant weights into L2 (kernel param `l2_next`, SPEC 1.9).

At batch 1 each kernel streams its weights and then spends a tail (reductions, atomics, the next launch) and,
for attention, its whole run with the memory system mostly idle. A kernel given `l2_next: [bytes0, ...]` also
takes pointers `l2_next0, ...` to weights that later launches of the list read, and before anything else each
of its blocks issues a bulk L2 prefetch of its share of those spans laid end to end (one thread per block,
fire and forget: cp.async.bulk.prefetch.L2, sm_90+). The kernel's results do not depend on it; the reference
is unchanged. aot/prefetch.py decides which kernel prefetches what."""

FAMILIES = ("gemv", "gemm", "attention")  # the families whose sources take it


def problem(sizes: list[int]) -> str | None:
    """Why span sizes cannot be prefetched as generated (32-bit offsets in l2_prefetch_share), or None."""
    if not all(isinstance(n, int) and n > 0 and n % 16 == 0 for n in sizes):
        return "expected byte counts, each a positive multiple of 16"
    if sum(sizes) >= 1 << 30:
        return "expected under 1 GiB in all"
    return None


def sizes(p: dict) -> list[int]:
    return list(p.get("l2_next") or [])


def arg_spec(p: dict) -> list[tuple[str, str]]:
    return [(f"l2_next{i}", "ptr") for i in range(len(sizes(p)))]


def params(p: dict) -> list[str]:
    return [f"const void* __restrict__ l2_next{i}" for i in range(len(sizes(p)))]


def code(p: dict) -> str:
    """The statement that issues this block's share (empty without `l2_next`)."""
    spans, total = [], sum(sizes(p))
    if why := problem(sizes(p)):
        raise ValueError(f"l2_next = {sizes(p)}: {why}")
    begin = 0
    for i, n in enumerate(sizes(p)):
        spans.append(f"l2_prefetch_share(l2_next{i}, {begin}u, {n}u, {total}u);")
        begin += n
    return " ".join(spans)
