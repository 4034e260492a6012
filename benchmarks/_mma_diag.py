"""TEMPORARY diagnostics (to be deleted): time the mma GEMM with parts disabled (FRT_MMA_DIAG)."""
import json, os, sys
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from test_gpu_gemm import RESIDUAL, RMS, GemmLauncher, make_args, problem  # noqa
from flashrt.aot.codegen import KernelSource, build_cubins, kernel_source  # noqa

CONFIGS = [("expert down s8", (50, 1024, 4096, None, RESIDUAL), {"bm": 64, "bn": 64, "split": 8, "stages": 4}),
           ("expert down s1", (50, 1024, 4096, None, RESIDUAL), {"bm": 64, "bn": 64, "split": 1, "stages": 4}),
           ("expert qkv s8", (50, 2560, 1024, RMS, None), {"bm": 64, "bn": 64, "split": 8, "stages": 3}),
           ("expert gu 32x128 s2", (50, 8192, 1024, RMS, None), {"bm": 32, "bn": 128, "split": 2, "stages": 3}),
           ("vit fc2 128x64 s8", (197, 768, 3072, None, RESIDUAL), {"bm": 128, "bn": 64, "split": 8, "stages": 3}),
           ("vit qkv 32x128 s2", (197, 2304, 768, RMS, None), {"bm": 32, "bn": 128, "split": 2, "stages": 3})]


def sources():
    out = []
    for name, (M, N, K, ln, expr), cfg in CONFIGS:
        p = problem(M, N, K, ln=ln, expr=expr, config=cfg)
        for d in range(5):
            src = kernel_source("gemm", p)
            sym = f"{src.symbol}_d{d}"
            text = f"#define FRT_MMA_DIAG {d}\n" + src.text.replace(src.symbol, sym)
            out.append((name, d, p, KernelSource(sym, "gemm", src.params_json, text)))
    return out


if __name__ == "__main__":
    from flashrt.aot.codegen import find_toolchain, compile_kernel
    items = sources()
    if "--compile" in sys.argv:
        cub, res, _ = build_cubins([s for *_, s in items], ["sm_90a"])
        print({s.symbol: res["sm_90a"][s.symbol]["registers"] for *_, s in items})
        sys.exit(0)
    from conftest import GPU_ARCH
    from cuda.bindings import driver as cu
    L = GemmLauncher()
    cub, res, _ = build_cubins([s for *_, s in items], [GPU_ARCH])
    mod = L.check(cu.cuModuleLoadData(cub[GPU_ARCH]), "load")
    rows = []
    from flashrt.kernels import gemm
    for name, d, p, s in items:
        fn = L.check(cu.cuModuleGetFunction(mod, s.symbol.encode()), "fn")
        L.check(cu.cuFuncSetAttribute(fn, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                      gemm.launch_config(p)[2]), "attr")
        t = L.time(fn, p, make_args(p, 0))
        rows.append((name, d, t * 1e6))
        print(f"{name:22s} diag{d} {t*1e6:7.2f} us", flush=True)
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "diag.json"), "w"))
