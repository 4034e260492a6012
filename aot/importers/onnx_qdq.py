"""Pre-quantized ONNX (QDQ): rewrites the Q/DQ nodes of a loaded ModelProto before the importer reads it.

- DequantizeLinear of a constant weight (float8e4m3fn, per-tensor or per-output-channel scale; FLOAT4E2M1 with
  block_size 16 along K and float block scales, or ModelOpt's NVFP4 pattern: the block scales are themselves
  DequantizeLinear(float8e4m3fn block codes, float32 global)) becomes a float32 initializer holding the
  dequantized values, and the codes and scales are recorded (PrequantTable, keyed by the values' content in the
  engine's [N, K] orientation) so the partitioner stores them bit for bit instead of quantizing again.
- QuantizeLinear of a constant float weight followed by DequantizeLinear is the same as above once quantized.
- QuantizeLinear -> DequantizeLinear of an activation (float8e4m3fn, per-tensor scale, saturating) becomes
  FakeQuantFP8(x, s) = e4m3(x / s) * s: the GEMMs that read it quantize their A operand themselves, exactly;
  elsewhere it is an elementwise op fused into the producing kernel.
- trt::TRT_FP4DynamicQuantize(x, g) -> (E2M1 values, E4M3 block scales), its block scales through
  DequantizeLinear(., g) into the values' blocked DequantizeLinear (ModelOpt's dynamic NVFP4 activations)
  becomes FakeQuantNVFP4(x, g): the GEMMs reading it compute each 16-value block's scale at run time as they
  stage their A operand (kernels/quant.py fake_quant_nvfp4_act).
Semantics follow the ONNX spec (DequantizeLinear-23: y = x * scale, the scale repeated block_size times along
`axis` for blocked quantization, or broadcast along `axis` for a 1-D scale)."""

import numpy as np

from flashrt.aot.quantize import PrequantTable, Prequantized, weight_key
from flashrt.errors import ModelError
from flashrt.kernels.quant import E4M3, NVFP4_BLOCK

DQ_DOMAINS = ("", "ai.onnx", "trt")
FP8, FP4, FLOAT = 17, 23, 1


def _is(node, op: str) -> bool:
    return node.op_type == op and node.domain in DQ_DOMAINS


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Rewriter:
    def __init__(self, model, path: str):
        from onnx import numpy_helper

        self.path, self.g = path, model.graph
        self.np = numpy_helper
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output if o}
        self.users: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.users.setdefault(i, []).append(n)
        self.table = PrequantTable()
        self.dead: set[int] = set()
        self.new_inits: list = []
        self.new_nodes: dict[int, list] = {}

    def name(self, node) -> str:
        return node.name or node.op_type

    def fail(self, node, why: str):
        raise ModelError(f"{self.path}: node '{self.name(node)}' ({node.op_type}): {why}")

    def const(self, value: str):
        """An initializer's array, or None."""
        t = self.inits.get(value)
        return None if t is None else self.np.to_array(t)

    def scale_of(self, node, value: str) -> tuple[np.ndarray, tuple | None]:
        """(the float scale, (block codes uint8, global) when it is a DQ of float8e4m3fn codes by a scalar)."""
        arr = self.const(value)
        if arr is not None:
            return np.asarray(arr, np.float32), None
        inner = self.producer.get(value)
        if inner is not None and _is(inner, "DequantizeLinear"):
            codes, g = self.const(inner.input[0]), self.const(inner.input[1])
            if codes is not None and g is not None and self.inits[inner.input[0]].data_type == FP8 and g.size == 1:
                self._check_zero_point(inner)
                if all(u is node for u in self.users.get(value, [])):
                    self.dead.add(id(inner))
                scale = codes.astype(np.float32) * np.float32(g.reshape(()))
                return scale, (codes.view(np.uint8), float(np.float32(g.reshape(()))))
        self.fail(node, "the scale must be a constant (or a DequantizeLinear of constant float8e4m3fn codes)")

    def _check_zero_point(self, node) -> None:
        if len(node.input) > 2 and node.input[2]:
            zp = self.const(node.input[2])
            if zp is None or np.any(zp.astype(np.float32) != 0):
                self.fail(node, "float8/float4 zero points must be 0")

    def k_axis(self, value: str) -> int | None:
        """Which axis of the 2-D constant `value` its consumers contract over (through Transposes), or None
        when they disagree or are not MatMul/Gemm weights."""
        axes = set()
        for u in self.users.get(value, []):
            if u.op_type == "Transpose" and list(_attr(u, "perm", [1, 0])) == [1, 0]:
                k = self.k_axis(u.output[0])
                axes.add(None if k is None else 1 - k)
            elif u.op_type == "MatMul" and list(u.input).index(value) == 1:
                axes.add(0)
            elif u.op_type == "Gemm" and list(u.input).index(value) == 1:
                axes.add(1 if _attr(u, "transB", 0) else 0)
            else:
                axes.add(None)
        return axes.pop() if len(axes) == 1 else None

    # ---- weights ----------------------------------------------------------------------------------

    def weight_dq(self, node) -> None:
        """DequantizeLinear of a constant: fold it, recording the codes where the engine can keep them."""
        x_name = node.input[0]
        x = self.const(x_name)
        dtype = self.inits[x_name].data_type
        self._check_zero_point(node)
        scale, block_codes = self.scale_of(node, node.input[1])
        axis, block = int(_attr(node, "axis", 1)), int(_attr(node, "block_size", 0))
        xf = np.asarray(x.astype(np.float32))
        axis = axis % max(xf.ndim, 1)
        if block:
            if scale.ndim != xf.ndim or scale.shape[axis] * block < xf.shape[axis]:
                self.fail(node, f"block scale shape {list(scale.shape)} does not fit {list(xf.shape)} "
                                f"with block_size {block} on axis {axis}")
            full = np.repeat(scale, block, axis=axis).take(range(xf.shape[axis]), axis=axis)
        elif scale.size == 1:
            full = scale.reshape(())
        else:
            shape = [1] * xf.ndim
            shape[axis] = scale.size
            full = scale.reshape(shape)
        y = (xf * full).astype(np.float32)
        out = node.output[0]
        self.dead.add(id(node))
        self.new_inits.append(self.np.from_array(y, out))
        k = self.k_axis(out) if xf.ndim == 2 else None
        if k is None:
            return
        nk = (lambda a: a) if k == 1 else (lambda a: np.ascontiguousarray(a.T))
        w_nk = nk(y)
        where = f"node '{self.name(node)}'"
        if dtype == FP8 and not block:
            if scale.size != 1 and axis == k:
                self.table.warnings.append(f"{where}: its fp8 weight scale runs along the input channels (axis "
                                           f"{axis}); flashrt keeps per-output-channel scales, so it is dequantized "
                                           "and the planner decides")
                return
            rows = w_nk.shape[0]
            s = np.broadcast_to(scale.reshape(-1), (rows,)) if scale.size == 1 else scale.reshape(-1)
            self.table.add(w_nk, Prequantized("fp8", nk(x).view(np.uint8).copy(), [np.ascontiguousarray(s)],
                                              self.name(node)))
        elif dtype == FP4 and block == NVFP4_BLOCK and axis == k and w_nk.shape[1] % NVFP4_BLOCK == 0:
            codes = nk(x.view(np.uint8)) & 0xF
            packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
            if block_codes is not None:
                bits, g = nk(block_codes[0]), block_codes[1]
            else:
                found = _as_e4m3_times_global(nk(scale))
                if found is None:
                    self.table.warnings.append(f"{where}: its FLOAT4E2M1 block scales are not E4M3 values times "
                                               "one float32 global scale; dequantized, the planner decides")
                    return
                bits, g = found
            self.table.add(w_nk, Prequantized("nvfp4", packed, [np.ascontiguousarray(bits), g], self.name(node)))
        elif dtype in (FP8, FP4):
            self.table.warnings.append(f"{where}: this {'fp8' if dtype == FP8 else 'fp4'} weight layout (axis "
                                       f"{axis}, block_size {block}) has no engine format; dequantized")

    def weight_q(self, node) -> None:
        """QuantizeLinear of a constant float weight to float8e4m3fn: quantize it here (saturating, ties to
        even), leaving an fp8 initializer for the DequantizeLinear that follows."""
        import ml_dtypes

        x, scale = self.const(node.input[0]), self.const(node.input[1])
        axis = int(_attr(node, "axis", 1)) % max(x.ndim, 1)
        if scale is None or _attr(node, "block_size", 0):
            self.fail(node, "a weight's QuantizeLinear needs a constant per-tensor or per-axis scale")
        shape = [1] * x.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        q = np.clip(x.astype(np.float32) / scale.astype(np.float32).reshape(shape if scale.size > 1 else ()),
                    -448, 448).astype(ml_dtypes.float8_e4m3fn)
        self.dead.add(id(node))
        t = self.np.from_array(q, node.output[0])
        self.inits[node.output[0]] = t
        self.new_inits.append(t)

    # ---- activations ------------------------------------------------------------------------------

    def activation_qdq(self, node) -> None:
        """QuantizeLinear -> DequantizeLinear on a run-time tensor: one FakeQuantFP8 (Identity for more DQs)."""
        from onnx import helper

        scale = self.const(node.input[1])
        zp = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        out_type = int(_attr(node, "output_dtype", 0)) or (self.inits[node.input[2]].data_type if zp is not None
                                                          else 2)
        if out_type != FP8:
            self.fail(node, f"activation quantization to ONNX type {out_type}; flashrt supports float8e4m3fn")
        if scale is None or scale.size != 1:
            self.fail(node, "activation QuantizeLinear needs a constant per-tensor scale")
        if not _attr(node, "saturate", 1):
            self.fail(node, "saturate=0 (overflow to NaN) is not supported; flashrt's FP8 saturates")
        self._check_zero_point(node)
        dqs = self.users.get(node.output[0], [])
        if not dqs or any(not _is(d, "DequantizeLinear") for d in dqs) or node.output[0] in \
                {o.name for o in self.g.output}:
            self.fail(node, "an activation's QuantizeLinear must feed DequantizeLinear nodes only")
        s = np.float32(scale.reshape(()))
        for d in dqs:
            ds = self.const(d.input[1])
            if ds is None or ds.size != 1 or np.float32(ds.reshape(())) != s:
                self.fail(d, "its scale differs from its QuantizeLinear's; flashrt fuses equal-scale pairs")
            self._check_zero_point(d)
        base = self.name(node)
        s_name = f"{base}/fq_scale"
        self.new_inits.append(self.np.from_array(np.array(s, np.float32), s_name))
        nodes = [helper.make_node("FakeQuantFP8", [node.input[0], s_name], [dqs[0].output[0]], name=f"{base}/fp8")]
        for i, d in enumerate(dqs):
            if i:
                nodes.append(helper.make_node("Identity", [dqs[0].output[0]], [d.output[0]], name=f"{base}/dq_{i}"))
            self.dead.add(id(d))
        self.dead.add(id(node))
        self.new_nodes[id(node)] = nodes

    def activation_fp4(self, node) -> None:
        """TRT_FP4DynamicQuantize(x, g) -> DequantizeLinear(block scales, g) -> DequantizeLinear(values, those,
        block_size 16 along the last axis): one FakeQuantNVFP4(x, g)."""
        from onnx import helper

        g = self.const(node.input[1]) if len(node.input) > 1 else None
        if g is None or g.size != 1 or not np.float32(g.reshape(())) > 0:
            self.fail(node, "the global scale must be a positive constant scalar")
        g = np.float32(g.reshape(()))
        if _attr(node, "block_size", 16) != 16 or _attr(node, "scale_type", 17) != FP8 or \
                _attr(node, "axis", -1) not in (-1,):
            self.fail(node, "expected block_size 16 along the last axis (axis -1) with float8e4m3fn block scales")
        values, scales = (list(node.output) + ["", ""])[:2]
        s_users, v_users = self.users.get(scales, []), self.users.get(values, [])
        if len(s_users) != 1 or not _is(s_users[0], "DequantizeLinear") or len(v_users) != 1 \
                or not _is(v_users[0], "DequantizeLinear"):
            self.fail(node, "its values and its block scales must each feed one DequantizeLinear (ModelOpt's "
                            "NVFP4 pattern)")
        s_dq, v_dq = s_users[0], v_users[0]
        s_g = self.const(s_dq.input[1])
        if s_g is None or s_g.size != 1 or np.float32(s_g.reshape(())) != g:
            self.fail(s_dq, "the block scales' DequantizeLinear must use the same constant global scale")
        if v_dq.input[1] != s_dq.output[0] or _attr(v_dq, "block_size", 0) != 16 or _attr(v_dq, "axis", -1) != -1:
            self.fail(v_dq, "expected the values' DequantizeLinear with block_size 16 along axis -1, scaled by the "
                            "dequantized block scales")
        for dq in (s_dq, v_dq):
            self._check_zero_point(dq)
        s_name = f"{self.name(node)}/global_scale"
        self.new_inits.append(self.np.from_array(np.array(g, np.float32), s_name))
        self.new_nodes[id(node)] = [helper.make_node("FakeQuantNVFP4", [node.input[0], s_name], [v_dq.output[0]],
                                                     name=self.name(node))]
        self.dead.update({id(node), id(s_dq), id(v_dq)})

    def run(self) -> PrequantTable:
        for n in list(self.g.node):
            if n.op_type == "TRT_FP4DynamicQuantize":
                self.activation_fp4(n)
        for n in list(self.g.node):
            if _is(n, "QuantizeLinear") and n.input[0] in self.inits:
                self.weight_q(n)
        for n in list(self.g.node):
            if id(n) in self.dead:
                continue
            if _is(n, "DequantizeLinear") and n.input[0] in self.inits:
                if any(u is not n and _is(u, "DequantizeLinear") for u in self.users.get(n.output[0], [])):
                    continue  # a block-scale DQ: handled with the weight DQ that reads it
                self.weight_dq(n)
            elif _is(n, "QuantizeLinear"):
                self.activation_qdq(n)
        for n in list(self.g.node):  # block-scale DQs whose weight DQ was not constant: fold them too
            if id(n) not in self.dead and _is(n, "DequantizeLinear") and n.input[0] in self.inits:
                self.weight_dq(n)
        if not (self.dead or self.new_nodes):
            return self.table
        kept = []
        for n in self.g.node:
            kept += self.new_nodes.get(id(n), [])
            if id(n) not in self.dead:
                kept.append(n)
        del self.g.node[:]
        self.g.node.extend(kept)
        used = {i for n in kept for i in n.input} | {o.name for o in self.g.output}
        new = {t.name for t in self.new_inits}
        inits = [t for t in self.g.initializer if t.name in used and t.name not in new]
        inits += [t for t in self.new_inits if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(inits)
        return self.table


def _as_e4m3_times_global(scale: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Float block scales as (E4M3 codes, float32 global) reproducing them exactly, or None."""
    import ml_dtypes

    scale = np.asarray(scale, np.float32)
    amax = float(np.abs(scale).max())
    if not amax > 0:
        return None
    # the usual globals: none, a power of two that brings the largest scale into range, amax / 448
    for g in (np.float32(1.0), np.float32(2.0 ** np.ceil(np.log2(amax / 448.0))), np.float32(amax / 448.0)):
        bits = np.clip(scale / g, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        if np.array_equal(E4M3[bits] * g, scale):
            return bits, float(g)
    return None


def rewrite_qdq(model, path: str) -> PrequantTable:
    """Rewrite model's Q/DQ nodes in place; the pre-quantized weights and the warnings."""
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "TRT_FP4DynamicQuantize")
               for n in model.graph.node):
        return PrequantTable()
    return _Rewriter(model, path).run()


__all__ = ["rewrite_qdq", "weight_key"]
