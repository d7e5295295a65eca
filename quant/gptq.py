"""GPTQ (Frantar et al. 2022) packed into onnxruntime's com.microsoft ``MatMulNBits``.

onnxruntime 1.31.1 ships a "GPTQ" (``neural_compressor/weight_only.py``) that reads the zero
half of the inverse-Hessian factor, so it degenerates to round-to-nearest. This module is an
independent numpy implementation whose output is packed byte for byte as onnxruntime's own
``DefaultWeightOnlyQuantizer`` packs it, so the rewritten graph runs on the stock CPU kernel.

Layouts (K = input features, N = output features, bs = block_size, nb = ceil(K / bs)):
  * ONNX MatMul weight: [K, N]; MatMulNBits stores it transposed, per output column, in
    blocks of bs along K (K padded up to nb * bs).
  * B: uint8 [N, nb, bs * bits / 8]; codes of consecutive k share a byte, lowest bits first
    (4-bit: even k in the low nibble).
  * scales: float32 [N, nb]; zero_points (asymmetric only): uint8 [N, ceil(nb * bits / 8)],
    packed along nb the same way, unused slots set to 2**(bits-1).
  * Asymmetric: range [min(w, 0), max(w, 0)], scale = range / (2**bits - 1),
    zp = roundf(-min / scale) clamped. Symmetric: v = the block value of largest magnitude,
    scale = v / -2**(bits-1) (it can be negative), zp implied 2**(bits-1) and not stored.
  * code = clamp(roundf(w * (1 / scale) + zp), 0, 2**bits - 1) in float32, roundf = half away
    from zero; dequantized weight = (code - zp) * scale.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class BlockQuant:
    """One quantized [K, N] MatMul weight, unpacked (one uint8 code per weight)."""

    codes: np.ndarray  # uint8 [N, K_pad], integer codes in [0, 2**bits)
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, n_blocks]; None for symmetric (implied mid)
    K: int
    N: int
    bits: int
    block_size: int

    @property
    def n_blocks(self) -> int:
        return -(-self.K // self.block_size)

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None


# ----------------------------------------------------------------------------------------------
# Scalar conventions shared by RTN and GPTQ (float32, as onnxruntime's MLAS quantizer computes)


def _check_config(bits: int, block_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"MatMulNBits packing supports bits in {SUPPORTED_BITS}, got {bits}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")


def _as_weight(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Validate the config and return w as float32 [K, N]."""
    _check_config(bits, block_size)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"expected a non-empty 2-D [K, N] weight, got shape {w.shape}")
    return w


def _roundf(x: np.ndarray) -> np.ndarray:
    """C ``roundf`` (half away from zero), exact in float32 (np.round is half to even)."""
    t = np.trunc(x)
    frac = x - t  # exact in floating point, unlike x + 0.5 (0.49999997 + 0.5 rounds to 1)
    return t + np.where(np.abs(frac) >= 0.5, np.sign(x), 0).astype(x.dtype)


def _block_params(wb: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each row of wb (float32 [N, L], one block) -> ([N], [N])."""
    wb = wb.astype(np.float32, copy=False)
    qmax, mid = np.float32(2**bits - 1), np.float32(2 ** (bits - 1))
    mn, mx = wb.min(axis=1), wb.max(axis=1)
    if symmetric:
        # MLAS keeps the sign of the largest-magnitude value, so the scale may be negative.
        peak = np.where(np.abs(mx) > np.abs(mn), mx, mn)
        return (peak / -mid).astype(np.float32), np.full(wb.shape[0], mid, np.float32)
    mn, mx = np.minimum(mn, np.float32(0)), np.maximum(mx, np.float32(0))
    scale = ((mx - mn) / qmax).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp_fp = np.where(scale != 0, np.float32(0) - mn / scale, mn).astype(np.float32)
    zp = np.where(zp_fp < 0, 0, np.where(zp_fp > qmax, qmax, _roundf(zp_fp)))
    return scale, zp.astype(np.float32)


def _quantize_cols(wc: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """Codes of wc (float32 [N, L]) under per-row scale / zp ([N]) -> uint8 [N, L]."""
    with np.errstate(divide="ignore"):
        rs = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    v = wc.astype(np.float32, copy=False) * rs[:, None] + zp[:, None]
    return np.clip(_roundf(v), 0, 2**bits - 1).astype(np.uint8)


def _dequant_cols(codes: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """(code - zp) * scale, the MatMulNBits dequantization, float32 [N, L]."""
    return ((codes.astype(np.float32) - zp[:, None]) * scale[:, None]).astype(np.float32)


def _fill_padding(codes: np.ndarray, K: int, bits: int, block_size: int) -> None:
    """Reproduce what onnxruntime writes past K (codes: [N, K_pad], in place).

    Whole padded bytes are 0. In the byte holding code K-1, MLAS leaves each unused slot with
    the code one byte earlier (a register it does not reset), or 0 when that byte starts one of
    its thread tiles (block_size * 8 / bits rows). The kernel never reads these slots; copying
    them only keeps B byte-identical to onnxruntime's quantizer.
    """
    kpack = 8 // bits
    tile = block_size * kpack
    codes[:, K:] = 0
    for k in range(K, min(-(-K // kpack) * kpack, codes.shape[1])):
        if (k - k % kpack) % tile:
            codes[:, k] = codes[:, k - kpack]


# ----------------------------------------------------------------------------------------------
# Quantizers


def rtn_quantize(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False) -> BlockQuant:
    """Round-to-nearest, bit-identical to onnxruntime's DefaultWeightOnlyQuantizer."""
    w = _as_weight(w, bits, block_size)
    K, N = w.shape
    nb = -(-K // block_size)
    wt = w.T  # [N, K]: one row per output column, blocks run along K
    codes = np.zeros((N, nb * block_size), np.uint8)
    scales = np.zeros((N, nb), np.float32)
    zps = np.zeros((N, nb), np.float32)
    for b in range(nb):
        lo, hi = b * block_size, min((b + 1) * block_size, K)
        scales[:, b], zps[:, b] = _block_params(wt[:, lo:hi], bits, symmetric)
        codes[:, lo:hi] = _quantize_cols(wt[:, lo:hi], scales[:, b], zps[:, b], bits)
    _fill_padding(codes, K, bits, block_size)
    return BlockQuant(codes, scales, None if symmetric else zps.astype(np.uint8), K, N, bits, block_size)


def _inverse_hessian_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, so that H^-1 = U^T U.

    Damping is raised tenfold (up to 4 times) if H is numerically not positive definite.
    """
    K = h.shape[0]
    mean_diag = float(np.mean(np.diag(h))) or 1.0
    for attempt in range(5):
        hd = h + (damp * 10**attempt) * mean_diag * np.eye(K)
        try:
            l_inv = np.linalg.inv(np.linalg.cholesky(hd))  # H = L L^T  ->  H^-1 = L^-T L^-1
            return np.linalg.cholesky(l_inv.T @ l_inv).T
        except np.linalg.LinAlgError:
            continue
    raise ValueError("Hessian is not positive definite even with damping; check calibration data")


def _gptq_lazy_block(W: np.ndarray, U: np.ndarray, i1: int, i2: int, out: dict) -> np.ndarray:
    """Quantize columns [i1, i2) of W ([N, K] float64), updating them in place as GPTQ does.

    Returns the scaled errors Err ([N, i2 - i1]) that the caller spreads over columns >= i2.
    i1 is a multiple of block_size and the lazy block holds whole quant blocks, so a block's
    scale and zero point are taken on weights that already carry every earlier update.
    """
    bits, bs, sym, K = out["bits"], out["block_size"], out["symmetric"], W.shape[1]
    W1 = W[:, i1:i2]  # view: updates land in W
    err = np.zeros_like(W1)
    for i in range(i1, i2):
        j = i - i1
        if i % bs == 0:
            b = i // bs
            blk = W1[:, j : min(i + bs, K) - i1].astype(np.float32)
            out["scales"][:, b], out["zps"][:, b] = _block_params(blk, bits, sym)
        s, z = out["scales"][:, i // bs], out["zps"][:, i // bs]
        q = _quantize_cols(W1[:, j : j + 1].astype(np.float32), s, z, bits)
        out["codes"][:, i] = q[:, 0]
        err[:, j] = (W1[:, j] - _dequant_cols(q, s, z)[:, 0]) / U[i, i]
        W1[:, j:] -= np.outer(err[:, j], U[i, i:i2])  # column j becomes its dequantized value
    return err


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, bits: int = 4, block_size: int = 32,
                  symmetric: bool = False, damp: float = 0.01, lazy_block: int = 128) -> BlockQuant:
    """GPTQ: column by column along K, the error of each quantized column spread over the
    not-yet-quantized ones with the Cholesky factor of the inverse Hessian (H = X^T X over
    calibration rows). Scales/zero points per block are computed (same formula as RTN) on the
    updated weights when the block is reached. Dead inputs (H_ii == 0) handled as in the paper.

    w: [K, N] (ONNX MatMul layout); hessian: [K, K].
    """
    w = _as_weight(w, bits, block_size)
    K, N = w.shape
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (K, K):
        raise ValueError(f"hessian must be [{K}, {K}], got {h.shape}")
    W = w.T.astype(np.float64)  # [N, K], the paper's layout (rows = outputs)
    dead = np.diag(h) == 0  # inputs never active in calibration: weight irrelevant, set to 0
    h[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _inverse_hessian_factor(h, damp)
    nb = -(-K // block_size)
    out = {"bits": bits, "block_size": block_size, "symmetric": symmetric,
           "codes": np.zeros((N, nb * block_size), np.uint8),
           "scales": np.zeros((N, nb), np.float32), "zps": np.zeros((N, nb), np.float32)}
    lb = max(block_size, lazy_block // block_size * block_size)  # whole quant blocks per step
    for i1 in range(0, K, lb):
        i2 = min(i1 + lb, K)
        err = _gptq_lazy_block(W, U, i1, i2, out)
        W[:, i2:] -= err @ U[i1:i2, i2:]  # lazy batch update of the remaining columns
    _fill_padding(out["codes"], K, bits, block_size)
    zps = None if symmetric else out["zps"].astype(np.uint8)
    return BlockQuant(out["codes"], out["scales"], zps, K, N, bits, block_size)


def dequantize(q: BlockQuant) -> np.ndarray:
    """The weight MatMulNBits computes with: float32 [K, N]."""
    mid = 2 ** (q.bits - 1)
    scales = np.repeat(q.scales, q.block_size, axis=1)[:, : q.K]
    zps = mid if q.zero_points is None else np.repeat(q.zero_points, q.block_size, axis=1)[:, : q.K]
    wt = (q.codes[:, : q.K].astype(np.float32) - np.asarray(zps, np.float32)) * scales
    return np.ascontiguousarray(wt.T.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Packing and graph surgery


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., L] (L a multiple of 8 // bits) -> [..., L * bits / 8], low bits first."""
    kpack = 8 // bits
    v = values.astype(np.uint8).reshape(*values.shape[:-1], -1, kpack)
    packed = np.zeros(v.shape[:-1], np.uint8)
    for j in range(kpack):
        packed |= (v[..., j] << (bits * j)).astype(np.uint8)
    return packed


def matmul_nbits_initializers(q: BlockQuant, prefix: str) -> list[onnx.TensorProto]:
    """[B, scales] (+ zero_points if asymmetric) named like onnxruntime's quantizer names them:
    prefix_Q{bits}, prefix_scales, prefix_zero_points."""
    nb, kpack = q.n_blocks, 8 // q.bits
    b = _pack(q.codes, q.bits).reshape(q.N, nb, q.block_size * q.bits // 8)
    tensors = [numpy_helper.from_array(b, f"{prefix}_Q{q.bits}"),
               numpy_helper.from_array(q.scales.astype(np.float32), f"{prefix}_scales")]
    if q.zero_points is not None:
        n_slots = -(-nb // kpack) * kpack
        zp = np.full((q.N, n_slots), 2 ** (q.bits - 1), np.uint8)  # unused slots: mid, as MLAS
        zp[:, :nb] = q.zero_points
        tensors.append(numpy_helper.from_array(_pack(zp, q.bits), f"{prefix}_zero_points"))
    return tensors


def _names_used(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of graph or of its subgraphs (outer-scope reads)."""
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                used |= _names_used(g)
    used.update(o.name for o in graph.output)
    return used


def _find_node(graph: onnx.GraphProto, name: str) -> tuple[int, onnx.NodeProto]:
    for i, node in enumerate(graph.node):
        if node.name == name:
            return i, node
    raise ValueError(f"no node named {name!r} in the main graph")


def _initializer(graph: onnx.GraphProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in graph.initializer if t.name == name), None)


def replace_matmul(model: onnx.ModelProto, node_name: str, q: BlockQuant, accuracy_level: int = 4) -> None:
    """Swap the MatMul named node_name (its weight is an initializer, input 1) for a com.microsoft
    MatMulNBits node named node_name + "_Q{bits}", same input/output names; remove the fp32
    initializer if no other node uses it; add the com.microsoft opset import if missing."""
    graph = model.graph
    idx, node = _find_node(graph, node_name)
    w_init = _initializer(graph, node.input[1]) if node.op_type == "MatMul" else None
    if w_init is None or list(w_init.dims) != [q.K, q.N]:
        raise ValueError(f"{node_name!r} is not a MatMul with a [{q.K}, {q.N}] initializer weight")
    existing = {t.name for t in graph.initializer}
    tensors = matmul_nbits_initializers(q, w_init.name)  # onnxruntime's names
    if any(t.name in existing for t in tensors):  # the same weight quantized for a second node
        for t in tensors:
            t.name = t.name.replace(w_init.name, f"{w_init.name}_{node_name}", 1)
    attrs = {"K": q.K, "N": q.N, "bits": q.bits, "block_size": q.block_size}
    if accuracy_level:  # onnxruntime omits the attribute at 0; some EPs reject it
        attrs["accuracy_level"] = accuracy_level
    new = helper.make_node("MatMulNBits", [node.input[0]] + [t.name for t in tensors],
                           list(node.output), name=f"{node_name}_Q{q.bits}", domain=MS_DOMAIN, **attrs)
    graph.node.remove(node)
    graph.node.insert(idx, new)  # same position keeps the node list topologically sorted
    graph.initializer.extend(tensors)
    if w_init.name not in _names_used(graph):
        graph.initializer.remove(w_init)
        for gi in [i for i in graph.input if i.name == w_init.name]:  # IR < 4 lists them
            graph.input.remove(gi)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


# ----------------------------------------------------------------------------------------------
# Calibration and whole-model driver


def _session(model: onnx.ModelProto, tmp: str):
    """CPU session; models past protobuf's 2 GB limit go through a file with external data."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if model.ByteSize() < 1_800_000_000:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    path = os.path.join(tmp, "calib.onnx")
    onnx.save_model(model, path, save_as_external_data=True, location="calib.onnx.data")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _expose(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Make each tensor in names a graph output (element type from shape inference)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    except Exception:  # inference is only a convenience for the dtype
        types = {}
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            elem = types.get(name) or onnx.TensorProto.FLOAT
            model.graph.output.append(helper.make_tensor_value_info(name, elem, None))


def activation_rows(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]],
                    tensors: Iterable[str]) -> Iterator[dict[str, np.ndarray]]:
    """Per feed, each named tensor as float64 rows [-1, last dim], from onnxruntime
    (CPUExecutionProvider) with the tensors exposed as extra graph outputs (graph inputs are
    taken from the feed). Works on a copy; never modifies `model`."""
    tensors = set(tensors)
    m = copy.deepcopy(model)
    graph_inputs = {i.name for i in m.graph.input}
    fetch = sorted(t for t in tensors if t not in graph_inputs)
    _expose(m, fetch)
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(m, tmp)
        for feed in feeds:
            values = dict(zip(fetch, sess.run(fetch, feed))) if fetch else {}
            values.update({k: v for k, v in feed.items() if k in tensors})
            yield {t: np.asarray(values[t], np.float64).reshape(-1, values[t].shape[-1])
                   for t in tensors}


def collect_hessians(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]],
                     node_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Run the model with each MatMul's activation input (input 0) exposed
    (activation_rows), accumulate H = sum over rows of x x^T (float64, [K, K]) and the row
    count; return H / rows per node. A shared activation (q/k/v) is accumulated once."""
    act = {n: _find_node(model.graph, n)[1].input[0] for n in node_names}
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for values in activation_rows(model, feeds, act.values()):
        for a, x in values.items():
            sums[a] = sums.get(a, 0) + x.T @ x
            rows[a] = rows.get(a, 0) + x.shape[0]
    if not rows:
        raise ValueError("collect_hessians needs at least one feed")
    return {n: sums[a] / rows[a] for n, a in act.items()}


def _quantizable(model: onnx.ModelProto, name: str) -> bool:
    """A MatMul whose input 1 is a 2-D float32 initializer."""
    node = next((n for n in model.graph.node if n.name == name), None)
    if node is None or node.op_type != "MatMul":
        return False
    init = _initializer(model.graph, node.input[1])
    return init is not None and len(init.dims) == 2 and init.data_type == onnx.TensorProto.FLOAT


def gptq_model(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]], node_names: Sequence[str],
               bits: int = 4, block_size: int = 32, symmetric: bool = False, accuracy_level: int = 4,
               damp: float = 0.01) -> dict:
    """collect_hessians, then gptq_quantize + replace_matmul for each named MatMul (only MatMul
    nodes whose input 1 is a 2-D float32 initializer; others are skipped and listed).
    Returns {"quantized": [...], "skipped": [...]}; modifies model in place."""
    _check_config(bits, block_size)
    targets = [n for n in node_names if _quantizable(model, n)]
    skipped = [n for n in node_names if n not in targets]
    hessians = collect_hessians(model, feeds, targets) if targets else {}
    for name in targets:
        node = _find_node(model.graph, name)[1]
        w = numpy_helper.to_array(_initializer(model.graph, node.input[1]))
        q = gptq_quantize(w, hessians[name], bits, block_size, symmetric, damp)
        replace_matmul(model, name, q, accuracy_level)
    return {"quantized": targets, "skipped": skipped}
