"""`flashrt verify`: checksums (checked by every load), a cubin for this GPU, and the bundled self-test."""

from dataclasses import dataclass, field

import numpy as np

from flashrt.errors import FlashRTError


@dataclass
class OutputCheck:
    name: str
    rel_l2: float
    max_abs: float
    passed: bool


@dataclass
class VerifyReport:
    sections: int
    device: str
    arch: str | None
    bundled: bool
    max_rel_l2: float = 0.0
    outputs: list[OutputCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.bundled and all(o.passed for o in self.outputs)


def verify(path: str, device: str = "cuda") -> VerifyReport:
    import flashrt

    engine = flashrt.load(path, device=device)  # validates every checksum and picks this GPU's cubin
    report = VerifyReport(len(engine.file.sections), device, getattr(engine, "arch", None), False)
    bundle = engine.file.selftest()
    if bundle is None:
        return report
    meta, inputs, expected = bundle
    report.bundled, report.max_rel_l2 = True, float(meta["max_rel_l2"])
    got = engine.run({k: np.array(v) for k, v in inputs.items()})
    for name, want in expected.items():
        a, b = np.asarray(got[name], np.float64), np.asarray(want, np.float64)
        if a.shape != b.shape:
            raise FlashRTError(f"output '{name}' has shape {a.shape}, the bundle expects {b.shape}")
        denom = np.linalg.norm(b)
        err = float(np.linalg.norm(a - b) / denom) if denom > 0 else float(np.linalg.norm(a - b))
        max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
        ok = bool(np.isfinite(a).all() == np.isfinite(b).all() and err <= report.max_rel_l2)
        report.outputs.append(OutputCheck(name, err, max_abs, ok))
    return report
