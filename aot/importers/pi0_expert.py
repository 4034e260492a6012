"""The pi0 action expert from a safetensors checkpoint: N flow-matching denoise steps in one graph.

pi0 (Physical Intelligence; the lerobot port's `PI0Policy`, config.json `"type": "pi0"`) encodes images and a
prompt with a PaliGemma prefix, then integrates an action chunk from noise with a Gemma-300M-shaped "action
expert" whose layers attend to the prefix's per-layer K/V cache. This family builds the expert half: the
engine takes the prefix's cache as inputs and returns the action chunk after `--denoise-steps N` Euler steps
(default: the config's num_steps, else 10), all in one launch list.

Inputs (float32): state [1, max_state_dim], noise [1, chunk_size, max_action_dim], prefix_keys and
prefix_values [L, KV, P, head_dim] (the prefix's keys after RoPE and its values, per expert layer; P from
--shapes prefix_keys:LxKVxPxD, every prefix token valid). Output: actions [1, chunk_size, max_action_dim].

What one step computes (lerobot's PI0FlowMatching.denoise_step, time t from 1 down by dt = -1/N):
  suffix = [state_proj(state); action_time_mlp_out(silu(action_time_mlp_in([action_in_proj(x); sinusoid(t)])))]
  Gemma layers over the suffix (RMSNorm 1 + w, no sqrt(hidden) embedding scale, RoPE at positions P, P+1, ...,
  theta 10000), the suffix's keys appended to the prefix's; the state token sees the prefix and itself, the
  action tokens see everything; final norm; v = action_out_proj(last chunk_size rows); x <- x + dt * v.

Step-invariant work is built once, not N times: the state token sees no action token, so its whole pass
through the expert (and its K/V per layer) does not depend on the step, and the action rows attend to
[prefix; state; own] with no mask. The sinusoidal time embedding of each step and its half of
action_time_mlp_in are constants folded at build time.

Config: chunk_size (50), max_state_dim (32), max_action_dim (32), num_steps (10), proj_width (1024), and the
expert's Gemma shape from "gemma_expert_config" (hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps, hidden_activation / hidden_act, rope_theta;
defaults: pi0's 1024, 4096, 18, 8, 1, 256, 1e-6, gelu_pytorch_tanh, 10000). Weights: action_in_proj,
action_out_proj, action_time_mlp_in, action_time_mlp_out, state_proj (weight, bias), and
paligemma_with_expert.gemma_expert.model.{layers.i..., norm}, optionally under "model."."""

import math

import numpy as np

from flashrt.errors import ModelError

EXPERT_DEFAULTS = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 18,
                   "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "rms_norm_eps": 1e-6,
                   "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 10000.0}
EXPERT = "paligemma_with_expert.gemma_expert.model."
MIN_PERIOD, MAX_PERIOD = 4e-3, 4.0  # lerobot's create_sinusoidal_pos_embedding for the flow time


def step_times(steps: int) -> list[np.float32]:
    """The flow times of the N steps, accumulated in float32 as lerobot's sampling loop does (1, 1 + dt, ...)."""
    dt, t, times = np.float32(-1.0 / steps), np.float32(1.0), []
    for _ in range(steps):
        times.append(t)
        t = np.float32(t + dt)
    return times


def time_embedding(t: float, width: int) -> np.ndarray:
    """[1, width]: sin and cos of t at periods from MIN_PERIOD to MAX_PERIOD (float64, then float32)."""
    fraction = np.linspace(0.0, 1.0, width // 2, dtype=np.float64)
    period = MIN_PERIOD * (MAX_PERIOD / MIN_PERIOD) ** fraction
    x = (2 * math.pi / period) * float(t)
    return np.concatenate([np.sin(x), np.cos(x)])[None].astype(np.float32)


def rope(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [len(positions), head_dim] (rotate-half layout, float32 as lerobot's apply_rope)."""
    inv = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))).astype(np.float32)
    freqs = positions.astype(np.float32)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def build_pi0_expert(net, cfg, shapes: dict, steps: int | None) -> int:
    """Add the expert's graph to net (a safetensors_import._Net) from the policy config cfg; returns the number
    of denoise steps built."""
    from flashrt.aot.importers.safetensors_import import Config, _activation

    E = cfg.sub("gemma_expert_config") if cfg.has("gemma_expert_config") else Config({}, cfg.path,
                                                                                        "gemma_expert_config.")
    E.data = {**EXPERT_DEFAULTS, **E.data}
    D, F, L = E.int("hidden_size"), E.int("intermediate_size"), E.int("num_hidden_layers")
    nh, nkv, d = E.int("num_attention_heads"), E.int("num_key_value_heads"), E.int("head_dim")
    eps, theta = E.float("rms_norm_eps"), E.float("rope_theta")
    act = _activation(E, "hidden_activation" if E.has("hidden_activation") else "hidden_act", "gemma")
    H, A, S = cfg.int("chunk_size", 50), cfg.int("max_action_dim", 32), cfg.int("max_state_dim", 32)
    W = cfg.int("proj_width", D)
    steps = steps if steps is not None else cfg.int("num_steps", 10)
    if steps < 1:
        raise ModelError(f"--denoise-steps {steps}: expected at least 1")
    if W != D:
        raise ModelError(f"{cfg.path}: proj_width {W} differs from gemma_expert_config.hidden_size {D}")
    if nh % nkv:
        raise ModelError(f"{cfg.path}: gemma_expert_config.num_attention_heads {nh} is not a multiple of "
                         f"num_key_value_heads {nkv}")
    if W % 2 or d % 2:
        raise ModelError(f"{cfg.path}: proj_width {W} and head_dim {d} must be even (sinusoids, RoPE)")
    unknown = sorted(set(shapes) - {"prefix_keys", "prefix_values", "state", "noise"})
    if unknown:
        raise ModelError(f"--shapes names {unknown}, which are not inputs of the pi0 expert "
                         "(inputs: state, noise, prefix_keys, prefix_values)")
    if "prefix_keys" not in shapes:
        raise ModelError(f"input 'prefix_keys' needs the prefix length (engines are static): give it with "
                         f"--shapes prefix_keys:{L}x{nkv}x816x{d}")
    P = _prefix_len(shapes, (L, nkv, d))
    fixed = {"state": (1, S), "noise": (1, H, A)}
    for name, want in fixed.items():
        if name in shapes and tuple(shapes[name]) != want:
            raise ModelError(f"--shapes {name}:{'x'.join(map(str, shapes[name]))} differs from the config's "
                             f"{'x'.join(map(str, want))}")

    state = net.input("state", "float32", (1, S))
    x = net.input("noise", "float32", (1, H, A))
    pk = net.input("prefix_keys", "float32", (L, nkv, P, d))
    pv = net.input("prefix_values", "float32", (L, nkv, P, d))
    lay = [f"{EXPERT}layers.{i}" for i in range(L)]
    prefix_k = [net.op("Slice", [pk, net.ints([i]), net.ints([i + 1]), net.ints([0])], f"{lay[i]}.prefix_k")
                for i in range(L)]
    prefix_v = [net.op("Slice", [pv, net.ints([i]), net.ints([i + 1]), net.ints([0])], f"{lay[i]}.prefix_v")
                for i in range(L)]

    def rope_consts(first: int, T: int, name: str) -> tuple[str, str]:
        c, s = rope(np.arange(first, first + T), d, theta)
        return (net.const(c.reshape(1, 1, T, d), f"{name}/rope_cos"), net.const(s.reshape(1, 1, T, d),
                                                                               f"{name}/rope_sin"))

    def attend(h: str, T: int, i: int, keys: list[str], values: list[str], given: int, cos: str, sin: str,
               name: str):
        """Gemma self-attention of T rows over keys = [given ones; own]; returns (output [1,T,D], own k, own v)."""
        p = lay[i]
        q = net.rope(net.heads(net.linear(h, f"{p}.self_attn.q_proj", D, nh * d, False), T, nh, d, f"{name}.q"),
                     cos, sin, d, f"{name}.q")
        k = net.rope(net.heads(net.linear(h, f"{p}.self_attn.k_proj", D, nkv * d, False), T, nkv, d, f"{name}.k"),
                     cos, sin, d, f"{name}.k")
        v = net.heads(net.linear(h, f"{p}.self_attn.v_proj", D, nkv * d, False), T, nkv, d, f"{name}.v")
        kk = net.op("Concat", keys + [k], f"{name}.keys", {"axis": 2})
        vv = net.op("Concat", values + [v], f"{name}.values", {"axis": 2})
        ctx = _gqa_attention(net, q, kk, vv, T, given + T, nh, nkv, d, f"{name}.self_attn")
        return net.linear(ctx, f"{p}.self_attn.o_proj", nh * d, D, False), k, v

    def mlp(x: str, i: int, name: str) -> str:
        p = lay[i]
        h = net.rms_norm(x, f"{p}.post_attention_layernorm", D, eps, True)
        g = net.act(net.linear(h, f"{p}.mlp.gate_proj", D, F, False), act, f"{name}.mlp")
        u = net.linear(h, f"{p}.mlp.up_proj", D, F, False)
        m = net.linear(net.op("Mul", [g, u], f"{name}.mlp.gated"), f"{p}.mlp.down_proj", F, D, False)
        return net.op("Add", [x, m], f"{name}.residual2")

    # the state token's pass: once (it sees the prefix and itself only)
    s = net.reshape(net.linear(state, "state_proj", S, W, True), (1, 1, W), "state_token")
    cos, sin = rope_consts(P, 1, "state")
    state_k, state_v = [], []
    for i in range(L):
        h = net.rms_norm(s, f"{lay[i]}.input_layernorm", D, eps, True)
        o, k, v = attend(h, 1, i, [prefix_k[i]], [prefix_v[i]], P, cos, sin, f"state.{i}")
        state_k.append(k)
        state_v.append(v)
        if i < L - 1:  # the last layer's state output feeds nothing the actions read
            s = mlp(net.op("Add", [s, o], f"state.{i}.residual1"), i, f"state.{i}")

    cos, sin = rope_consts(P + 1, H, "actions")
    w_in_action = net.weight("action_time_mlp_in.weight", (W, 2 * W), lambda a: np.ascontiguousarray(a[:, :W].T),
                             ":action:T")
    w_in_time = net.weight("action_time_mlp_in.weight", (W, 2 * W), lambda a: np.ascontiguousarray(a[:, W:].T),
                           ":time:T")
    b_in = net.weight("action_time_mlp_in.bias", (W,))
    times = step_times(steps)
    dt = net.const(np.float32(-1.0 / steps), "dt")
    for n, t in enumerate(times):
        sp = f"step{n}"
        a = net.linear(x, "action_in_proj", A, W, True)
        # the time half of action_time_mlp_in: constants only, folded at build time
        tb = net.op("Add", [net.op("MatMul", [net.const(time_embedding(t, W), f"{sp}/time_emb"), w_in_time],
                                   f"{sp}/time_mlp_in"), b_in], f"{sp}/time_bias")
        a = net.op("Add", [net.op("MatMul", [a, w_in_action], f"{sp}/action_time_mlp_in"), tb], f"{sp}/mlp_in")
        a = net.linear(net.act(a, "silu", f"{sp}/action_time"), "action_time_mlp_out", W, W, True)
        for i in range(L):
            h = net.rms_norm(a, f"{lay[i]}.input_layernorm", D, eps, True)
            o, _, _ = attend(h, H, i, [prefix_k[i], state_k[i]], [prefix_v[i], state_v[i]], P + 1, cos, sin,
                             f"{sp}.{i}")
            a = mlp(net.op("Add", [a, o], f"{sp}.{i}.residual1"), i, f"{sp}.{i}")
        a = net.rms_norm(a, f"{EXPERT}norm", D, eps, True)
        v = net.linear(a, "action_out_proj", W, A, True)
        x = net.op("Add", [x, net.op("Mul", [v, dt], f"{sp}/dt_v")], f"{sp}/euler",
                   out="actions" if n == steps - 1 else None)
    net.outputs = ["actions"]
    return steps


def _prefix_len(shapes: dict, lkd: tuple[int, int, int]) -> int:
    L, kv, d = lkd
    shape = tuple(shapes["prefix_keys"])
    if len(shape) != 4 or (shape[0], shape[1], shape[3]) != lkd or shape[2] < 1:
        raise ModelError(f"--shapes prefix_keys:{'x'.join(map(str, shape))}; expected {L}x{kv}xPx{d} (layers, "
                         "KV heads, prefix tokens, head_dim of the expert)")
    if "prefix_values" in shapes and tuple(shapes["prefix_values"]) != shape:
        raise ModelError(f"--shapes prefix_values:{'x'.join(map(str, shapes['prefix_values']))} differs from "
                         f"prefix_keys:{'x'.join(map(str, shape))}")
    return shape[2]


def _gqa_attention(net, q: str, k: str, v: str, T: int, S: int, nh: int, nkv: int, d: int, name: str) -> str:
    """q [1,H,T,d] over k/v [1,KV,S,d] (no mask) -> [1, T, H*d]; KV heads repeated as transformers' repeat_kv."""
    rep = nh // nkv
    if rep > 1:
        k, v = (net.reshape(net.op("Expand", [net.reshape(y, (1, nkv, 1, S, d), f"{name}/{t}_kv"),
                                             net.ints((1, nkv, rep, S, d), f"{name}/{t}_rep")], f"{name}/{t}_expand"),
                            (1, nh, S, d), f"{name}/{t}_repeat_kv") for y, t in ((k, "k"), (v, "v")))
    s = net.op("MatMul", [q, net.transpose(k, (0, 1, 3, 2), f"{name}/k_transpose")], f"{name}/scores")
    s = net.op("Mul", [s, net.const(d ** -0.5, f"{name}/scale")], f"{name}/scale")
    p = net.op("Softmax", [s], f"{name}/softmax", {"axis": -1})
    ctx = net.transpose(net.op("MatMul", [p, v], f"{name}/context"), (0, 2, 1, 3), f"{name}/merge_heads")
    return net.reshape(ctx, (1, T, nh * d), f"{name}/merge")
