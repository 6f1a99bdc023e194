"""Fit a :class:`~hf_ext.simulate.cost_model.CostModel` to measurements of a real transformers model.

What is measured (``transformers`` ``generate``, greedy, DynamicCache, the serving path GPU.md describes):

* prefill points: wall time of ``generate(max_new_tokens=1)`` for ``batch`` prompts of ``tokens`` tokens;
* decode points: per-step time ``(T(n2) - T(n1)) / (n2 - n1)`` of ``generate`` at batch ``B`` and prompt
  (context) ``C`` with ``n1 < n2`` new tokens (``min_new_tokens`` forces the length); a pair with
  ``T(n2) <= T(n1)`` (timing noise) is dropped with a ``RuntimeWarning`` naming it;

then the model ``t = max(floor, a + b*B + c*ctx + p*P + q*A)`` (see :mod:`~hf_ext.simulate.cost_model`) is
fit by least squares on relative errors.  Validation: end-to-end ``generate`` calls at batch/length
configurations NOT in the fit, compared with the simulator's prediction (one prefill iteration + the
closed-form decode span); the mean absolute relative error is the calibration error reported by
``python -m hf_ext bench simulate``.

Shapes: ``tiny`` (hf_ext.testing's 2-layer Llama, CPU), ``small`` (4 layers, hidden 256), ``llama3.1-8b``
(Llama-3.1-8B config, random bf16 weights built from ``LlamaConfig``; nothing is downloaded).

GPU command (the lead runs it; ~2 min on one H100)::

    PYTHONPATH=$PWD:$PWD/kernels python -m hf_ext.simulate.calibrate --device cuda --shape llama3.1-8b

writes ``hf_ext/simulate/calibrations/<gpu-name>-llama3.1-8b.json``.

Example:
    >>> pts = [{"kind": "decode", "batch": b, "ctx": 100, "tokens": 0, "seconds": 0.01 + 1e-4 * b} for b in (1, 8, 32)]
    >>> pts += [{"kind": "prefill", "batch": 1, "ctx": 0, "tokens": t, "seconds": 0.01 + 1e-5 * t} for t in (64, 512)]
    >>> cm = fit(pts)
    >>> bool(abs(cm.decode_time(16, 100) - 0.0116) < 1e-3)
    True
"""

from __future__ import annotations

import argparse
import math
import numbers
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hf_ext.simulate.cost_model import CALIBRATION_DIR, CostModel

SHAPES = ("tiny", "small", "llama3.1-8b")
STATIC_SUFFIX = "-generate-padded"  # calibrations fit to whole padded generate batches (fit_static_batches)

# grids: (prefill (batch, tokens)), (decode batches), (decode contexts), (validation (batch, prompt, new))
_GRIDS: dict[str, dict[str, Any]] = {
    "cpu": {
        "prefill": [(1, 16), (1, 64), (1, 256), (1, 512), (4, 128), (8, 256)],
        "batches": [1, 4, 16, 32],
        "contexts": [32, 256],
        "n1n2": (4, 36),
        "validate": [(2, 48, 24), (6, 160, 24), (12, 96, 32), (24, 64, 16)],
    },
    "cuda": {
        "prefill": [(1, 128), (1, 512), (1, 2048), (1, 8192), (8, 512)],
        "batches": [1, 8, 32, 64],
        "contexts": [256, 1024],
        "n1n2": (4, 16),
        "validate": [(4, 1024, 24), (16, 768, 24), (48, 512, 16)],
    },
}


def model_for_shape(shape: str, device: str, seed: int = 0) -> Any:
    """A random-weight ``LlamaForCausalLM`` of the named shape (fp32 on CPU, bf16 on CUDA)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if shape == "tiny":
        from hf_ext.testing import tiny_llama_config

        cfg = tiny_llama_config()
    elif shape == "small":
        from hf_ext.testing import tiny_llama_config

        cfg = tiny_llama_config(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
        )
    else:
        cfg = LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            bos_token_id=128000,
            eos_token_id=128001,
            pad_token_id=128001,
            tie_word_embeddings=False,
        )
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in bf16 on the GPU (no fp32 copy of 8B weights)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _gen_once(model: Any, batch: int, prompt: int, new: int, device: str) -> float:
    import torch

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(batch * 7919 + prompt)
    ids = torch.randint(3, vocab, (batch, prompt), generator=g).to(device)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
        )
        _sync(device)
        dt = time.perf_counter() - t0
    if out.shape[1] != prompt + new:
        raise RuntimeError(f"generate produced {out.shape[1] - prompt} tokens, expected {new}")
    return dt


def time_jobs(
    model: Any,
    jobs: Sequence[tuple[int, int, int]],
    *,
    reps: int = 3,
    device: str = "cpu",
    progress: bool = False,
    seed: int = 0,
) -> dict[tuple[int, int, int], float]:
    """Fastest-of-``reps`` wall seconds of greedy ``generate`` for each ``(batch, prompt, new)`` job.

    Jobs are timed in interleaved rounds (shuffled each round) so that load from other processes on a
    shared machine hits all of them alike; one warm-up call per job first."""
    _check_reps(reps)
    uniq = list(dict.fromkeys(tuple(j) for j in jobs))
    best = {j: math.inf for j in uniq}
    rng = np.random.default_rng(seed)
    total = len(uniq) * (reps + 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="calibrate", file=sys.stderr)
    for r in range(reps + 1):
        order = [uniq[i] for i in rng.permutation(len(uniq))]
        for j in order:
            t = _gen_once(model, *j, device)
            if r > 0:  # round 0 is the warm-up
                best[j] = min(best[j], t)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return best


def _check_reps(reps: Any) -> None:
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an int >= 1 (timed rounds per job), got {reps!r}")


def time_generate(
    model: Any, batch: int, prompt: int, new: int, *, reps: int = 3, device: str = "cpu"
) -> float:
    """Fastest-of-``reps`` wall seconds of greedy ``generate`` producing exactly ``new`` tokens."""
    return time_jobs(model, [(batch, prompt, new)], reps=reps, device=device)[(batch, prompt, new)]


def _grid_jobs(grid: dict[str, Any]) -> list[tuple[int, int, int]]:
    n1, n2 = grid["n1n2"]
    jobs = [(b, t, 1) for b, t in grid["prefill"]]
    jobs += [(b, c, n) for b in grid["batches"] for c in grid["contexts"] for n in (n1, n2)]
    return jobs


def _points_from(times: dict[tuple[int, int, int], float], grid: dict[str, Any]) -> list[dict[str, Any]]:
    n1, n2 = grid["n1n2"]
    pts: list[dict[str, Any]] = []
    for b, t in grid["prefill"]:
        pts.append(
            {
                "kind": "prefill",
                "batch": b,
                "ctx": 0,
                "tokens": b * t,
                "prompt": t,
                "seconds": times[(b, t, 1)],
            }
        )
    dropped = []
    for b in grid["batches"]:
        for c in grid["contexts"]:
            t1, t2 = times[(b, c, n1)], times[(b, c, n2)]
            if not t2 > t1:  # timing noise: no per-step time can be read off this pair
                dropped.append(f"(batch={b}, prompt={c}): T({n2})={t2:.6g}s <= T({n1})={t1:.6g}s")
                continue
            step = (t2 - t1) / (n2 - n1)
            pts.append(
                {
                    "kind": "decode",
                    "batch": b,
                    "ctx": c + (n1 + n2) / 2,
                    "tokens": 0,
                    "prompt": c,
                    "seconds": step,
                }
            )
    if dropped:
        n_pairs = len(grid["batches"]) * len(grid["contexts"])
        if len(dropped) == n_pairs:
            raise ValueError(
                f"too few decode points to fit: all {n_pairs} decode pairs have T(n2) <= T(n1) "
                f"(timing noise; measure again with more reps): {'; '.join(dropped)}"
            )
        warnings.warn(
            f"dropped {len(dropped)} of {n_pairs} decode pairs whose longer generate was not slower "
            f"(timing noise): {'; '.join(dropped)}",
            RuntimeWarning,
            stacklevel=2,
        )
    return pts


def measure(
    model: Any, device: str = "cpu", grid: dict[str, Any] | None = None, reps: int = 3, progress: bool = False
) -> list[dict[str, Any]]:
    """Prefill and decode points of ``model`` (see the module docstring)."""
    grid = grid or _GRIDS["cuda" if device.startswith("cuda") else "cpu"]
    return _points_from(time_jobs(model, _grid_jobs(grid), reps=reps, device=device, progress=progress), grid)


def _predict(cm: CostModel, p: dict[str, Any]) -> float:
    if p["kind"] == "prefill":
        n = p.get("prompt", p["tokens"] // max(p["batch"], 1))
        return cm.prefill_time(n, batch=p["batch"])
    return cm.decode_time(p["batch"], p["ctx"])


def _lm(resid: Any, z0: np.ndarray, iters: int = 300) -> tuple[np.ndarray, float]:
    """Small Levenberg-Marquardt with a numeric Jacobian (used when scipy is not installed)."""
    z = z0.astype(float).copy()
    r = resid(z)
    cost = float(r @ r)
    lam = 1e-2
    for _ in range(iters):
        eps = 1e-6 * np.maximum(1.0, np.abs(z))
        jac = np.stack([(resid(z + e) - r) / e[i] for i, e in enumerate(np.diag(eps))], axis=1)
        g = jac.T @ r
        h = jac.T @ jac
        step = np.linalg.lstsq(h + lam * (np.diag(np.diag(h)) + np.eye(len(z))), -g, rcond=None)[0]
        z_new = z + step
        r_new = resid(z_new)
        c_new = float(r_new @ r_new)
        if c_new < cost:
            z, r, lam = z_new, r_new, lam / 3
            if cost - c_new < 1e-14 * max(cost, 1e-30):
                cost = c_new
                break
            cost = c_new
        else:
            lam *= 4
            if lam > 1e10:
                break
    return z, cost / 2


def _lsq(resid: Any, n: int, seed: int = 0, loss: str = "linear", f_scale: float = 1.0) -> np.ndarray:
    """Multi-start least squares of ``resid`` over ``n`` parameters; returns them non-negative. ``loss`` /
    ``f_scale`` as in ``scipy.optimize.least_squares`` (a robust loss needs scipy)."""
    rng = np.random.default_rng(seed)
    starts = [np.full(n, 0.5), np.r_[1.0, np.full(n - 1, 0.1)], np.r_[0.0, np.full(n - 1, 0.5)]]
    starts += [rng.uniform(0, 1.5, n) for _ in range(8)]
    try:
        from scipy.optimize import least_squares
    except ImportError:  # the GPU box may lack scipy
        if loss != "linear":
            raise
        least_squares = None
    best_x, best_cost = None, math.inf
    for z0 in starts:
        if least_squares is not None:
            r = least_squares(resid, z0, loss=loss, f_scale=f_scale, max_nfev=3000)
            x, cost = r.x, float(r.cost)
        else:
            x, cost = _lm(resid, z0)
        if cost < best_cost:
            best_x, best_cost = x, cost
    assert best_x is not None
    return np.abs(best_x)


def fit(
    points: Sequence[dict[str, Any]],
    name: str = "fitted",
    source: str = "measured",
    kv_bytes_per_token: float = 0.0,
) -> CostModel:
    """Least-squares fit (relative residuals) of the cost model to prefill/decode ``points``.

    Two stages: decode points give ``decode_floor_s, base_s, per_seq_s, per_ctx_token_s``; prefill points
    then give ``prefill_floor_s, prefill_base_s, per_prefill_token_s, per_prefill_attn_s``."""
    for i, p in enumerate(points):
        if p.get("kind") not in ("decode", "prefill"):
            raise ValueError(f"points[{i}]['kind'] must be 'decode' or 'prefill', got {p!r}")
        t = p.get("seconds")
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"points[{i}]['seconds'] must be a finite time > 0, got {p!r}")
    dec = [p for p in points if p["kind"] == "decode"]
    pre = [p for p in points if p["kind"] == "prefill"]
    if not dec or not pre:
        raise ValueError("fit needs at least one 'decode' and one 'prefill' point")
    yd = np.asarray([p["seconds"] for p in dec])
    yp = np.asarray([p["seconds"] for p in pre])
    sd, sp = float(np.median(yd)), float(np.median(yp))
    bmax = max(p["batch"] for p in dec)
    cmax = max(p["batch"] * p["ctx"] for p in dec)
    tmax = max(p["tokens"] for p in pre)
    amax = max(p["tokens"] * p.get("prompt", p["tokens"]) / 2 for p in pre)
    mag_d = np.asarray([sd, sd, sd / bmax, sd / cmax])
    mag_p = np.asarray([sp, sp, sp / tmax, sp / amax])

    def dec_model(z: np.ndarray) -> CostModel:
        f, a, b, c = np.abs(z) * mag_d
        return CostModel(decode_floor_s=f, base_s=a, per_seq_s=b, per_ctx_token_s=c)

    zd = _lsq(lambda z: np.asarray([_predict(dec_model(z), p) for p in dec]) / yd - 1.0, 4)
    cd = dec_model(zd)

    def full_model(z: np.ndarray) -> CostModel:
        f, ap, p_, q = np.abs(z) * mag_p
        return CostModel(
            decode_floor_s=cd.decode_floor_s,
            base_s=cd.base_s,
            per_seq_s=cd.per_seq_s,
            per_ctx_token_s=cd.per_ctx_token_s,
            prefill_floor_s=f,
            prefill_base_s=ap,
            per_prefill_token_s=p_,
            per_prefill_attn_s=q,
        )

    zp = _lsq(lambda z: np.asarray([_predict(full_model(z), p) for p in pre]) / yp - 1.0, 4)
    cm = full_model(zp)
    cm.name = name
    cm.source = source
    cm.kv_bytes_per_token = float(kv_bytes_per_token)
    rel = np.asarray([_predict(cm, p) / p["seconds"] - 1.0 for p in points])
    cm.extra = {
        "points": list(points),
        "fit_mean_abs_rel_err": float(np.mean(np.abs(rel))),
        "fit_max_abs_rel_err": float(np.max(np.abs(rel))),
    }
    return cm


def predict_generate(cm: CostModel, batch: int, prompt: int, new: int) -> float:
    """Simulator's time for ``generate`` of ``new`` tokens for ``batch`` prompts of ``prompt`` tokens:
    one prefill iteration (it yields the first token) plus ``new - 1`` decode steps."""
    t = cm.prefill_time(prompt, batch=batch)
    return t + cm.decode_span(batch, batch * (prompt + 1), new - 1)


def _static_features(rows: float, width: float, steps: float) -> list[float]:
    """Coefficients of (base, per_seq, per_ctx_token, prefill_base, per_prefill_token, per_prefill_attn) in
    :func:`predict_generate` with zero floors: it is linear in those six parameters."""
    k1 = steps - 1
    return [
        1 + k1,
        k1 * rows,
        rows * (width + 1) * k1 + rows * k1 * (k1 - 1) / 2,
        1.0,
        rows * width,
        rows * width * width / 2,
    ]


def fit_static_batches(
    batches: Sequence[Sequence[float]], name: str = "fitted-generate-padded", source: str = "measured"
) -> CostModel:
    """Cost model fit to whole padded ``generate`` calls, each ``(rows, padded prompt width, steps, seconds)``.

    A padded batch runs one prefill of ``rows x width`` tokens and ``steps - 1`` decode steps of all its rows
    (finished rows are not dropped), so its time is :func:`predict_generate` of ``(rows, width, steps)``. With
    zero floors that is linear in six parameters, fit by non-negative least squares on relative error. Use it
    where the decode steps of wide padded batches cost more than the short fixed-shape points of :func:`measure`
    say (``run_static_generate`` and ``tie_real_cb.py --static-*`` record ``batch_shapes`` in this form).

    Example:
        >>> truth = CostModel(base_s=0.02, per_seq_s=1e-4, per_ctx_token_s=2e-8, per_prefill_token_s=2e-5)
        >>> shapes = [(n, w, k) for n in (8, 40, 90) for w in (200, 1000, 2000) for k in (50, 300)]
        >>> cm = fit_static_batches([(n, w, k, predict_generate(truth, n, w, k)) for n, w, k in shapes])
        >>> round(predict_generate(cm, 60, 700, 400) / predict_generate(truth, 60, 700, 400), 6)
        1.0
    """
    from scipy.optimize import nnls

    rows = [tuple(float(v) for v in b) for b in batches]
    bad = [b for b in rows if len(b) != 4 or min(b[:3]) < 1 or not b[3] > 0 or not all(map(math.isfinite, b))]
    if bad or len(rows) < 6:
        raise ValueError(
            "batches must be at least 6 (rows >= 1, width >= 1, steps >= 1, seconds > 0) entries, got "
            f"{len(rows)}" + (f" with {bad[0]!r}" if bad else "")
        )
    x = np.asarray([_static_features(*b[:3]) for b in rows])
    y = np.asarray([b[3] for b in rows])
    scale = np.maximum(x.max(axis=0), 1e-300)  # columns of one magnitude for the solver
    z, _ = nnls((x / scale) / y[:, None], np.ones(len(y)))
    a, b, c, ap, p, q = (float(v) for v in z / scale)
    cm = CostModel(
        base_s=a,
        per_seq_s=b,
        per_ctx_token_s=c,
        prefill_base_s=ap,
        per_prefill_token_s=p,
        per_prefill_attn_s=q,
        name=name,
        source=source,
    )
    rel = np.asarray([predict_generate(cm, int(r[0]), int(r[1]), int(r[2])) / r[3] - 1 for r in rows])
    cm.extra = {
        "batches": [list(r) for r in rows],
        "fit_mean_abs_rel_err": float(np.abs(rel).mean()),
        "fit_max_abs_rel_err": float(np.abs(rel).max()),
    }
    return cm


def validate(
    model: Any,
    cm: CostModel,
    cases: Sequence[tuple[int, int, int]],
    device: str = "cpu",
    reps: int = 3,
    times: dict[tuple[int, int, int], float] | None = None,
) -> list[dict[str, float]]:
    """Measured vs simulated end-to-end ``generate`` time at ``(batch, prompt, new)`` cases (``times``:
    already measured job times, e.g. from the interleaved calibration rounds)."""
    if times is None:
        times = time_jobs(model, cases, reps=reps, device=device)
    out = []
    for b, p, n in cases:
        meas = times[(b, p, n)]
        sim = predict_generate(cm, b, p, n)
        out.append(
            {
                "batch": b,
                "prompt": p,
                "new": n,
                "measured_s": meas,
                "simulated_s": sim,
                "rel_err": sim / meas - 1.0,
            }
        )
    return out


def calibrate(
    shape: str = "tiny",
    device: str = "cpu",
    reps: int = 3,
    progress: bool = False,
    threads: int | None = 1,
    grid: dict[str, Any] | None = None,
) -> CostModel:
    """Measure ``shape`` on ``device``, fit, validate on held-out configurations; returns the CostModel with
    ``extra["validation"]`` and ``extra["calibration_error"]`` (mean |simulated/measured - 1|).

    Fit points and validation cases are timed in the same interleaved rounds."""
    import os

    import torch

    _check_reps(reps)
    if threads is not None and not device.startswith("cuda"):
        torch.set_num_threads(threads)
    model = model_for_shape(shape, device)
    dev_name = device_slug(device)
    grid = grid or _GRIDS["cuda" if device.startswith("cuda") else "cpu"]
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    times = time_jobs(
        model, _grid_jobs(grid) + list(grid["validate"]), reps=reps, device=device, progress=progress
    )
    pts = _points_from(times, grid)
    cm = fit(
        pts,
        name=f"{dev_name}-{shape}",
        source=f"measured: transformers generate, {device}",
        kv_bytes_per_token=CostModel.kv_bytes_from_config(
            model.config, 2 if device.startswith("cuda") else 4
        ),
    )
    val = validate(model, cm, grid["validate"], device=device, times=times)
    cm.extra["validation"] = val
    cm.extra["calibration_error"] = float(np.mean([abs(v["rel_err"]) for v in val]))
    cm.extra["device"] = dev_name
    cm.extra["shape"] = shape
    cm.extra["versions"] = _versions()
    cm.extra["loadavg_1min_at_start"] = load0
    return cm


def device_slug(device: str) -> str:
    """``nvidia-h100-80gb-hbm3`` style name of the CUDA device, or ``cpu-<machine>``."""
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
    else:
        import platform

        name = f"cpu-{platform.machine()}"
    return name_slug(name)


def name_slug(name: str) -> str:
    """A device name as calibration files spell it: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def _versions() -> str:
    from hf_ext.utils.bench import versions

    return versions()


# ------------------------------------------------------------------------------ GPU.md figures
GPU_MD_POINTS = [
    {"kind": "prefill", "batch": 1, "ctx": 0, "tokens": 512, "prompt": 512, "seconds": 0.0390},
    {"kind": "prefill", "batch": 1, "ctx": 0, "tokens": 2048, "prompt": 2048, "seconds": 0.0668},
    {"kind": "prefill", "batch": 1, "ctx": 0, "tokens": 8192, "prompt": 8192, "seconds": 0.2781},
    {"kind": "decode", "batch": 1, "ctx": 1024, "tokens": 0, "seconds": 0.0472},
    {"kind": "decode", "batch": 8, "ctx": 1024, "tokens": 0, "seconds": 0.0436},
    {"kind": "decode", "batch": 32, "ctx": 1024, "tokens": 0, "seconds": 0.0423},
    {"kind": "decode", "batch": 64, "ctx": 1024, "tokens": 0, "seconds": 0.0679},
]


def fit_gpu_md() -> CostModel:
    """Cost model fit to GPU.md's published serving table (H100, Llama-3.1-8B shape, eager generate).
    NOT measured by this project: a documented starting point until the lead's GPU calibration lands."""
    cm = fit(
        GPU_MD_POINTS,
        name="gpu_md-h100-llama3.1-8b",
        source="published figures from ../shared/design/GPU.md 'Serving reference' (not measured by us)",
        kv_bytes_per_token=2 * 32 * 8 * 128 * 2,
    )
    return cm


# ----------------------------------------------------------------------------------------- CLI
def positive_int(text: str) -> int:
    """argparse ``type`` of an integer >= 1 (``--reps 0`` is an argparse error, not the default)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return v


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m hf_ext.simulate.calibrate", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--shape", default="tiny", choices=SHAPES)
    ap.add_argument(
        "--reps", type=positive_int, default=None, help="timed rounds per point (min); default 3 CPU, 2 CUDA"
    )
    ap.add_argument(
        "--out",
        default=None,
        help="JSON path or directory (default hf_ext/simulate/calibrations/<device>-<shape>.json)",
    )
    ap.add_argument(
        "--from-gpu-md", action="store_true", help="write the GPU.md published-figures fit instead"
    )
    args = ap.parse_args(argv)
    if args.from_gpu_md:
        cm = fit_gpu_md()
    else:
        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                print("calibrate: --device cuda but CUDA is not available", file=sys.stderr)
                return 2
        elif args.device != "cpu":
            print(f"calibrate: --device must be cpu or cuda[:i], got {args.device!r}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        reps = args.reps if args.reps is not None else (2 if args.device.startswith("cuda") else 3)
        cm = calibrate(args.shape, args.device, reps=reps, progress=True)
        cm.extra["seconds"] = time.perf_counter() - t0
    out = Path(args.out) if args.out else CALIBRATION_DIR / f"{cm.name}.json"
    if args.out and (out.is_dir() or args.out.endswith("/")):
        out = out / f"{cm.name}.json"
    cm.save(out)
    print(f"wrote {out}")
    print(
        f"fit mean |rel err| {cm.extra['fit_mean_abs_rel_err']:.3f}; floor decode {cm.decode_floor_s * 1e3:.2f} ms"
    )
    if "calibration_error" in cm.extra:
        print(
            f"validation (held-out generate calls) mean |sim/meas - 1| = {cm.extra['calibration_error']:.3f}"
        )
        for v in cm.extra["validation"]:
            print(
                f"  B={v['batch']:>3} prompt={v['prompt']:>5} new={v['new']:>3}: measured {v['measured_s']:.4f}s "
                f"simulated {v['simulated_s']:.4f}s ({v['rel_err']:+.1%})"
            )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
