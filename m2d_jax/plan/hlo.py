"""Per-device costs of a compiled program read from its optimised HLO text, with loop trip counts.

XLA's ``cost_analysis`` counts a ``while`` body once; the scanned decoder (layers), gradient accumulation
(micro-batches) and the chunked loss are all ``while`` loops, so it under-counts by their trip counts. Here every
computation's cost is summed over what it calls — a fusion once, a ``while`` body ``trip`` times, where ``trip`` is
XLA's ``known_trip_count`` or else read from the loop condition (``counter < N``, the counter starting at 0 and
stepping by what the body adds to it: XLA unrolls its windowed-einsum loops on TPU, + 2 per body); a loop
whose count is not found counts once and is listed in ``unknown_trip_loops``:

- ``matmul_flops``: 2 x output elements x contracted size of every ``dot`` / ``convolution`` / ``ragged-dot`` and
  of the TPU grouped-matmul kernel ``ragged_dot`` lowers to;
- ``collective_bytes``: bytes each device sends or receives in all-gather (output), reduce-scatter (input),
  all-reduce (2 x buffer), all-to-all and collective-permute (buffer);
- ``hbm_bytes``: operands read plus outputs written by every top-level (unfused) instruction — an ESTIMATE of HBM
  traffic (operands kept in on-chip memory are counted too). A dynamic slice reads only its slice and a dynamic
  update slice writes its update in place (also as what a fusion does to one of its parameters: the scanned layers
  read their layer of the stacked weights and write their layer of the stacked residuals and gradients; a slice in a
  fusion nested in the fusion counts the same).

A Pallas TPU kernel is a ``tpu_custom_call``: the grouped-matmul kernel is counted from its shapes, as above. The
splash-attention kernels (``m2d_jax.models.splash``) carry no cost estimate in their backend config and are counted
ANALYTICALLY from their q / k / v operands and block sizes (``splash_costs``), as causal: the tiles of the lower
triangle that the kernel visits, each computed whole (a sliding window visits fewer: an upper bound there).
"""

from __future__ import annotations

import math
import re

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1, "bf16": 2, "f16": 2, "s16": 2,
             "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8}
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\) -> .* \{$")
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy-done", "all-gather-done",
         "all-reduce-done", "collective-permute-done", "async-done", "after-all", "partition-id", "replica-id",
         "opt-barrier", "while", "conditional", "call"}
_COLLECTIVES = {"all-gather": "all_gather", "all-gather-start": "all_gather", "reduce-scatter": "reduce_scatter",
                "all-reduce": "all_reduce", "all-reduce-start": "all_reduce", "all-to-all": "all_to_all",
                "ragged-all-to-all": "all_to_all", "collective-permute": "permute",
                "collective-permute-start": "permute"}


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(type_text)
            if d in _ITEMSIZE]


def _nbytes(type_text: str) -> int:
    return sum(_ITEMSIZE[d] * math.prod(shape) for d, shape in _arrays(type_text))


def _logical_lines(text: str) -> list[str]:
    """The HLO text's lines with every instruction on one line (a kernel's metadata attribute may span several)."""
    lines: list[str] = []
    for line in text.splitlines():
        continued = lines and lines[-1].startswith("  ") and line and not line.startswith("  ") and line != "}" \
            and not _HEADER.match(line)
        if continued:
            lines[-1] += line
        else:
            lines.append(line)
    return lines


def _parse(text: str) -> tuple[dict, str | None]:
    """{computation: [(name, type, opcode, operands, attributes)]} (the root instruction last) and the entry
    computation's name."""
    computations, entry, current, root = {}, None, None, None
    for line in _logical_lines(text):
        header = _HEADER.match(line)
        if header:
            current, root = header.group(2), None
            computations[current] = []
            entry = current if header.group(1) else entry
            continue
        if line == "}" and current is not None:  # the root instruction last
            instrs = computations[current]
            instrs.sort(key=lambda instr: instr[0] == root)
            continue
        if current is None or " = " not in line or not line.startswith("  "):
            continue
        if line.startswith("  ROOT "):
            root = line.strip().removeprefix("ROOT ").split(" = ", 1)[0].lstrip("%")
        name, rest = line.strip().removeprefix("ROOT ").split(" = ", 1)
        end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
        type_text, rest = rest[:end], rest[end:].lstrip()
        paren = rest.find("(")
        if paren < 0:
            continue
        opcode = rest[:paren]
        close = _balanced(rest, paren)
        operands = re.sub(r"/\*.*?\*/", "", rest[paren + 1:close - 1])  # drop /*index=5*/ comments
        computations[current].append((name.lstrip("%"), type_text, opcode, operands, rest[close:]))
    return computations, entry


def _operand_names(operands: str) -> list[str]:
    return [o.strip().lstrip("%") for o in operands.split(",") if o.strip()]


def _hbm_bytes(opcode: str, type_text: str, operands: str, attrs: str, types: dict, computations: dict) -> int:
    """Bytes an unfused instruction reads and writes: every operand and the output, except that a dynamic slice
    reads its slice and a dynamic update slice reads and writes its update in place — also when a fusion does
    either to one of its parameters (a parameter used only as the sliced operand of dynamic slices counts their
    slices; a parameter that the root, or an element of a root tuple, updates in place counts nothing, and that
    output counts its update)."""
    names = _operand_names(operands)
    operand_bytes = [_nbytes(types.get(n, "")) for n in names]
    if opcode == "dynamic-slice":
        return 2 * _nbytes(type_text) + sum(operand_bytes[1:])
    if opcode == "dynamic-update-slice":
        return 2 * operand_bytes[1] + sum(operand_bytes[2:])
    callee = re.search(r"calls=%([^\s,]+)", attrs) if opcode == "fusion" else None
    body = computations.get(callee.group(1), []) if callee else []
    if not body:
        return _nbytes(type_text) + sum(operand_bytes)
    local = {name: t for name, t, *_ in body}
    params = {name: int(ops) for name, _, op, ops, _ in body if op == "parameter"}
    uses: dict[str, list] = {name: [] for name in params}
    for name, t, op, ops, _ in body:
        for position, operand in enumerate(_operand_names(ops)):
            if operand in uses:
                uses[operand].append((op, position, t))
    by_name = {name: (t, op, ops) for name, t, op, ops, _ in body}
    root_name, root_type, root_op, root_ops, _ = body[-1]
    outputs = ([(root_name, root_type, root_op, root_ops)] if root_op != "tuple" else
               [(n, *by_name[n]) for n in _operand_names(root_ops) if n in by_name])
    written, in_place = 0, set()
    for _, t, op, ops in outputs:
        targets = _operand_names(ops)
        if op == "dynamic-update-slice" and targets[0] in params and len(uses[targets[0]]) == 1:
            in_place.add(targets[0])
            written += _nbytes(local.get(targets[1], ""))
        else:
            written += _nbytes(t)
    read = 0
    for name, index in params.items():
        if name in in_place:
            continue
        sliced = _sliced_read(body, name, computations)
        read += sliced if sliced is not None else operand_bytes[index] if index < len(operand_bytes) else 0
    return written + read


def _sliced_read(body: list, param: str, computations: dict, depth: int = 0) -> int | None:
    """Bytes a fusion ``body`` reads of its parameter ``param`` when every use dynamic-slices it — directly, or as
    a parameter of a nested fusion that does — else None (read whole)."""
    uses = [(op, position, t, attrs) for _, t, op, ops, attrs in body
            for position, operand in enumerate(_operand_names(ops)) if operand == param]
    if not uses:
        return None
    total = 0
    for op, position, t, attrs in uses:
        if op == "dynamic-slice" and position == 0:
            total += _nbytes(t)
            continue
        callee = re.search(r"calls=%([^\s,]+)", attrs) if op == "fusion" and depth < 4 else None
        inner = computations.get(callee.group(1), []) if callee else []
        inner_param = next((n for n, _, o, ops, _ in inner if o == "parameter" and ops.strip() == str(position)), None)
        part = _sliced_read(inner, inner_param, computations, depth + 1) if inner_param else None
        if part is None:
            return None
        total += part
    return total


def _taps(out_size: int, in_size: int, window: int, stride: int, pad_low: int, lhs_dilate: int,
          rhs_dilate: int) -> int:
    """Window taps over all output positions of one spatial dimension that land on a real (not padding, not
    dilation-hole) input element."""
    count = 0
    for o in range(out_size):
        for k in range(window):
            p = o * stride + k * rhs_dilate - pad_low
            count += p >= 0 and p % lhs_dilate == 0 and p // lhs_dilate < in_size
    return count


def _convolution_flops(out: tuple, lhs: tuple, rhs: tuple, attrs: str) -> float:
    """2 x multiply-adds of a convolution, counting only the window taps on real input: XLA writes batched and
    grouped matmuls as convolutions whose batch / head dimension is a spatial one with a padded or dilated window
    (e.g. window = batch with lhs_dilate = batch: one tap per output position)."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not labels:
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    spatial = sorted({c for c in rhs_labels if c.isdigit()})
    fields = dict(re.findall(r"(size|stride|pad|lhs_dilate|rhs_dilate)=([0-9x_]+)", attrs.split("dim_labels")[0]))

    def per_dim(key, default):
        return [v for v in fields[key].split("x")] if key in fields else [default] * len(spatial)

    sizes, strides = per_dim("size", "1"), per_dim("stride", "1")
    pads, lhs_dil, rhs_dil = per_dim("pad", "0_0"), per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
    taps = 1
    for i, dim in enumerate(spatial):
        taps *= _taps(out[out_labels.index(dim)], lhs[lhs_labels.index(dim)], int(sizes[i]), int(strides[i]),
                      int(pads[i].split("_")[0]), int(lhs_dil[i]), int(rhs_dil[i]))
    out_spatial = math.prod(out[out_labels.index(d)] for d in spatial)
    return 2.0 * math.prod(out) / max(out_spatial, 1) * taps * rhs[rhs_labels.index("i")]


_SPLASH = re.compile(r"splash_mha_(fwd|dq|dkv)")
# per score element and head: fwd QK^T, PV; dq QK^T, dO V^T, dS K; dkv QK^T, dO V^T, P^T dO, dS^T Q (x2 mul-add)
_SPLASH_MATMULS = {"fwd": (1, 1), "dq": (2, 1), "dkv": (2, 2)}  # (times head_dim of q / k, times head_dim of v)
_SPLASH_BLOCKS = {"fwd": ("block_q", "block_kv"), "dq": ("block_q_dq", "block_kv_dq"),
                  "dkv": ("block_q_dkv", "block_kv_dkv")}


def causal_blocks(q_len: int, kv_len: int, block_q: int, block_kv: int) -> int:
    """[block_q, block_kv] tiles of a causal [q_len, kv_len] mask holding a visible element (key <= query)."""
    nk = kv_len // block_kv
    return sum(min(nk, ((i + 1) * block_q - 1) // block_kv + 1) for i in range(q_len // block_q))


def splash_costs(name: str, operand_types: list[str], output_type: str, attrs: str) -> tuple[float, float] | None:
    """(matmul FLOPs, HBM bytes) of one splash-attention kernel call (fwd, dq or dkv; q [..., H, T, D],
    k [..., KV, S, D], v [..., KV, S, Dv] are its first three floating-point operands, the leading dimensions the
    examples of a vmapped call), or None if ``name`` is not one.

    ANALYTIC, causal: the kernel visits the [bq, bkv] tiles with a visible element (``causal_blocks``, block sizes
    from its metadata) and computes each whole, 2 x (D or Dv) FLOPs per score element and matmul (fwd 2, dq 3, dkv
    4). HBM: every operand and output once, plus what the kernel streams again per visited tile and query head —
    k / v blocks in the forward and dq kernels, q / dO blocks in the dkv kernel (k / v per query head there)."""
    match = _SPLASH.search(name) or _SPLASH.search(attrs.split("backend_config", 1)[0])
    if match is None:
        return None
    phase = match.group(1)
    floats = [a for t in operand_types for a in _arrays(t)[:1] if a[0] in ("bf16", "f16", "f32")]
    if len(floats) < 3 or any(len(shape) < 3 for _, shape in floats[:3]):
        return None
    (qd, q_shape), (_, k_shape), (vd, v_shape) = floats[:3]
    examples = math.prod(q_shape[:-3])  # a batched (vmapped) kernel call: leading example dimensions
    h, t, d = q_shape[-3:]
    s, dv = k_shape[-2], v_shape[-1]
    sizes = {key: int(value) for key, value in re.findall(r'\\"(block_\w+)\\": (\d+)', attrs)}
    bq, bkv = (sizes.get(key, 128) for key in _SPLASH_BLOCKS[phase])
    bq, bkv = min(bq, t), min(bkv, s)
    visited = causal_blocks(t, s, bq, bkv)
    times_d, times_dv = _SPLASH_MATMULS[phase]
    flops = 2.0 * examples * h * visited * bq * bkv * (times_d * d + times_dv * dv)
    once = sum(_nbytes(t_) for t_ in operand_types) + _nbytes(output_type)
    h *= examples
    q_isz, v_isz = _ITEMSIZE[qd], _ITEMSIZE[vd]
    if phase == "dkv":
        streamed = h * visited * bq * (d * q_isz + dv * v_isz) + h * s * (d * q_isz + dv * v_isz)
    else:
        streamed = h * visited * bkv * (d * q_isz + dv * v_isz)
    return flops, float(once + streamed)


def _counter_step(counter: str, condition: list, body: list) -> int:
    """What the loop body adds to the counter that the condition compares: 1, unless the body's root tuple sets that
    element to itself + a constant (XLA's windowed-einsum loops on TPU are unrolled: + 2 per body)."""
    index = next((re.search(r"index=(\d+)", a) for n, _, op, _, a in condition
                  if n == counter and op == "get-tuple-element"), None)
    if index is None or not body or body[-1][2] != "tuple":
        return 1
    elements = _operand_names(body[-1][3])
    i = int(index.group(1))
    by_name = {n: (op, ops, a) for n, _, op, ops, a in body}
    op, ops, _ = by_name.get(elements[i], (None, "", "")) if i < len(elements) else (None, "", "")
    if op != "add":
        return 1
    steps = [int(by_name[o][1]) for o in _operand_names(ops) if by_name.get(o, ("",))[0] == "constant"
             and re.fullmatch(r"\d+", by_name[o][1].strip())]
    counters = [o for o in _operand_names(ops) if by_name.get(o, ("",))[0] == "get-tuple-element"
                and f"index={i}" in by_name[o][2]]
    return steps[0] if len(steps) == 1 and counters and steps[0] > 0 else 1


def _trip_count(attrs: str, condition: list, computations: dict, body: list = ()) -> int | None:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
    if known:
        return int(known.group(1))
    constants = {name: int(m.group(1)) for name, _, op, operands, _ in condition if op == "constant"
                 for m in [re.fullmatch(r"(-?\d+)", operands.strip())] if m}

    def less_than(op, attrs):
        if op == "compare":
            return "direction=LT" in attrs
        callee = re.search(r"calls=%([^\s,]+)", attrs) if op == "fusion" else None
        return bool(callee) and any(o == "compare" and "direction=LT" in a
                                    for _, _, o, _, a in computations.get(callee.group(1), []))

    for _, _, op, operands, attrs in condition:
        if less_than(op, attrs):
            names = _operand_names(operands)
            for operand in names:
                value = constants.get(operand)
                if value is not None:
                    counter = next((n for n in names if n != operand), "")
                    return -(-value // _counter_step(counter, condition, list(body)))
    return None


def program_costs(text: str) -> dict:
    """``matmul_flops``, ``collective_bytes`` (by kind and total), ``hbm_bytes`` of one device's program, with loop
    trip counts (see the module docstring); ``loops``: the trip count of every ``while`` found."""
    computations, entry = _parse(text)
    types = {name: t for instrs in computations.values() for name, t, *_ in instrs}
    memo: dict[str, dict] = {}
    loops, unknown = [], []

    def add(total, part, times=1):
        for key in ("matmul_flops", "hbm_bytes"):
            total[key] += times * part[key]
        for kind, n in part["collective_bytes"].items():
            total["collective_bytes"][kind] = total["collective_bytes"].get(kind, 0) + times * n

    def matmul(opcode, type_text, operands, attrs) -> float:
        out = _arrays(type_text)
        names = [o.strip().lstrip("%") for o in operands.split(",")]
        if not out or len(names) < 2 or names[0] not in types or names[1] not in types:
            return 0.0
        out_elems = math.prod(out[0][1])
        lhs, rhs = _arrays(types[names[0]]), _arrays(types[names[1]])
        if not lhs or not rhs:
            return 0.0
        if opcode == "custom-call":  # a grouped-matmul kernel: lhs [M, K] rows each times one group's [K, N]
            k = next((shape[1] for _, shape in (a for n in names for a in _arrays(types.get(n, ""))[:1])
                      if len(shape) == 2 and shape[0] == out[0][1][0]), 0)
            return 2.0 * out_elems * k
        if opcode == "convolution":
            return _convolution_flops(out[0][1], lhs[0][1], rhs[0][1], attrs)
        dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
        contracted = math.prod(lhs[0][1][int(d)] for d in dims.group(1).split(",") if d) if dims else lhs[0][1][-1]
        return 2.0 * out_elems * contracted

    def cost(name: str, top_level: bool) -> dict:
        key = f"{name}:{top_level}"
        if key in memo:
            return memo[key]
        total = {"matmul_flops": 0.0, "hbm_bytes": 0.0, "collective_bytes": {}}
        for instr, type_text, opcode, operands, attrs in computations.get(name, []):
            splash = (splash_costs(instr, [types.get(n, "") for n in _operand_names(operands)], type_text, attrs)
                      if opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in attrs else None)
            if splash is not None:
                total["matmul_flops"] += splash[0]
                if top_level:
                    total["hbm_bytes"] += splash[1]
            elif opcode in ("dot", "convolution", "ragged-dot") or (opcode == "custom-call" and instr.startswith(
                    "ragged-dot") and "metadata" not in instr):
                total["matmul_flops"] += matmul(opcode, type_text, operands, attrs)
            if opcode in _COLLECTIVES:
                nbytes = (_nbytes(type_text) if opcode != "reduce-scatter" else
                          sum(_nbytes(types.get(o.strip().lstrip("%"), "")) for o in operands.split(",")))
                kind = _COLLECTIVES[opcode]
                nbytes = nbytes // 2 if opcode.endswith("-start") else nbytes  # (input, output) tuples
                total["collective_bytes"][kind] = total["collective_bytes"].get(kind, 0) + (
                    2 * nbytes if kind == "all_reduce" else nbytes)
            if top_level and opcode not in _FREE and splash is None:
                total["hbm_bytes"] += _hbm_bytes(opcode, type_text, operands, attrs, types, computations)
            if opcode == "while":
                body = re.search(r"body=%([^\s,]+)", attrs).group(1)
                condition = re.search(r"condition=%([^\s,]+)", attrs).group(1)
                trip = _trip_count(attrs, computations.get(condition, []), computations, computations.get(body, []))
                loops.append({"body": body, "trip_count": trip})
                if trip is None:
                    unknown.append(body)
                add(total, cost(body, True), trip or 1)
            else:
                for callee in re.findall(r"(?:calls|to_apply|branch_computations=\{)=?%([^\s,}]+)", attrs):
                    if opcode in ("reduce", "reduce-window", "scatter", "sort", "select-and-scatter", "map",
                                  "all-reduce", "reduce-scatter", "all-reduce-start"):
                        continue  # scalar reducers
                    add(total, cost(callee, opcode in ("call", "conditional")))
        memo[key] = total
        return total

    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    result = cost(entry, True)
    result["collective_bytes"]["total"] = sum(result["collective_bytes"].values())
    return {**result, "loops": loops, "unknown_trip_loops": unknown}
