"""The fused CLEAR forward kernel in the Triton language (imported only where triton is installed).

The functions here are plain Python; :mod:`clear_dit.backends.triton` wraps them for the compiler or for the
interpreter at launch time. Helper functions reach the kernel as ``tl.constexpr`` arguments instead of
globals, because a kernel wrapped for one mode can only call helpers wrapped for the same mode.

No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations as objects.
"""

import triton.language as tl


def online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, keep, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax (log2 domain): returns the updated ``(m_i, l_i, acc)``.

    q ``(BLOCK_M, BLOCK_D)``, k and v ``(BLOCK_N, BLOCK_D)``, keep ``(BLOCK_M, BLOCK_N)`` bool (read only when
    ``MASKED``). A row with no kept key so far has ``m_i = -inf``; its exp() arguments are taken against 0 so
    that they stay 0 instead of NaN.
    """
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


def clear_forward_kernel(
    Q,
    K,
    V,
    Out,
    query_tiles,
    full_ptr,
    full_tiles,
    partial_ptr,
    partial_tiles,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    heads,
    text_start,
    text_len,
    pooled_start,
    pooled_len,
    window_size,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    KEY_H: tl.constexpr,
    KEY_W: tl.constexpr,
    PRECISION: tl.constexpr,
    IN_WINDOW: tl.constexpr,
    STEP: tl.constexpr,
):
    """One program: one ``TILE_H x TILE_W`` tile of image queries, for one (batch, head).

    Grid ``(num query tiles, batch * heads)``. A tile or key-tile record is 5 int32: sequence index of its
    grid's first token, grid height, grid width, first row, first column (rows/columns in the grid). The
    keys a tile sees, all in one online softmax: the global runs (text keys, then pooled keys), the key tiles
    ``full_tiles[full_ptr[t]:full_ptr[t+1]]`` (inside every window of the tile, all real: no mask), and the
    key tiles ``partial_tiles[partial_ptr[t]:partial_ptr[t+1]]`` (boundary: circle test and grid bounds).
    """
    BLOCK_M: tl.constexpr = TILE_H * TILE_W
    BLOCK_N: tl.constexpr = KEY_H * KEY_W
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    batch = bh // heads
    head = bh % heads
    # int64 bases: batch * stride overflows int32 for long sequences with many heads
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh

    record = query_tiles + tile * 5
    seq0, grid_h, grid_w = tl.load(record), tl.load(record + 1), tl.load(record + 2)
    offs_m = tl.arange(0, BLOCK_M)
    qy = tl.load(record + 3) + offs_m // TILE_W
    qx = tl.load(record + 4) + offs_m % TILE_W
    q_real = (qy < grid_h) & (qx < grid_w)
    q_rows = (seq0 + qy * grid_w + qx).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_real = offs_d < HEAD_DIM  # head_dim padded up to a power of two
    q_mask = q_real[:, None] & d_real[None, :]
    q = tl.load(q_base + q_rows[:, None] * stride_qs + (offs_d * stride_qd)[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    no_mask = tl.full([BLOCK_M, BLOCK_N], True, tl.int1)
    # loop invariants: a key tile's token offsets, and the channel offsets of K and V
    offs_n = tl.arange(0, BLOCK_N)
    tile_dy = offs_n // KEY_W
    tile_dx = offs_n % KEY_W
    k_chan = (offs_d * stride_kd)[None, :]
    v_chan = (offs_d * stride_vd)[None, :]
    d_mask = d_real[None, :]

    # global keys: every image query sees all text keys and all pooled keys (two contiguous runs)
    text_blocks = tl.cdiv(text_len, BLOCK_N)
    for j in range(0, text_blocks + tl.cdiv(pooled_len, BLOCK_N)):
        is_text = j < text_blocks
        start = tl.where(is_text, text_start + j * BLOCK_N, pooled_start + (j - text_blocks) * BLOCK_N)
        stop = tl.where(is_text, text_start + text_len, pooled_start + pooled_len)
        k_real = offs_n < stop - start
        k_rows = (start + offs_n).to(tl.int64)[:, None]
        kv_mask = k_real[:, None] & d_mask
        k = tl.load(k_base + k_rows * stride_ks + k_chan, mask=kv_mask, other=0.0)
        v = tl.load(v_base + k_rows * stride_vs + v_chan, mask=kv_mask, other=0.0)
        m_i, l_i, acc = STEP(q, k, v, m_i, l_i, acc, qk_scale, no_mask & k_real[None, :], True, PRECISION)

    # key tiles inside every window of this query tile: no mask
    for e in range(tl.load(full_ptr + tile), tl.load(full_ptr + tile + 1)):
        key = full_tiles + e * 5
        kw = tl.load(key + 2)
        first = tl.load(key) + tl.load(key + 3) * kw + tl.load(key + 4)  # sequence index of the tile's corner
        k_rows = (first + tile_dy * kw + tile_dx).to(tl.int64)[:, None]
        k = tl.load(k_base + k_rows * stride_ks + k_chan, mask=d_mask, other=0.0)
        v = tl.load(v_base + k_rows * stride_vs + v_chan, mask=d_mask, other=0.0)
        m_i, l_i, acc = STEP(q, k, v, m_i, l_i, acc, qk_scale, no_mask, False, PRECISION)

    # boundary key tiles: the circle test of clear_dit.mask.in_window, and the key grid's bounds
    for e in range(tl.load(partial_ptr + tile), tl.load(partial_ptr + tile + 1)):
        key = partial_tiles + e * 5
        kh, kw = tl.load(key + 1), tl.load(key + 2)
        ky0, kx0 = tl.load(key + 3), tl.load(key + 4)
        k_real = (tile_dy < kh - ky0) & (tile_dx < kw - kx0)
        k_rows = (tl.load(key) + ky0 * kw + kx0 + tile_dy * kw + tile_dx).to(tl.int64)[:, None]
        kv_mask = k_real[:, None] & d_mask
        k = tl.load(k_base + k_rows * stride_ks + k_chan, mask=kv_mask, other=0.0)
        v = tl.load(v_base + k_rows * stride_vs + v_chan, mask=kv_mask, other=0.0)
        # offsets relative to the key tile's corner: (qy - ky0) - tile_dy, the same circle test
        keep = IN_WINDOW((qy - ky0)[:, None] - tile_dy[None, :], (qx - kx0)[:, None] - tile_dx[None, :], window_size)
        m_i, l_i, acc = STEP(q, k, v, m_i, l_i, acc, qk_scale, keep & k_real[None, :], True, PRECISION)

    # padding queries (outside the grid) may have l_i = 0: they are not stored
    out = acc / tl.where(q_real, l_i, 1.0)[:, None]
    tl.store(
        o_base + q_rows[:, None] * stride_os + (offs_d * stride_od)[None, :], out.to(Out.dtype.element_ty), mask=q_mask
    )
