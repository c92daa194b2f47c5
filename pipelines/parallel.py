"""Patch-parallel CLEAR inference: one band of image rows per device, exact (DESIGN.md 1.5).

Every FLUX operation but attention acts on each token alone, so each rank runs the whole transformer on its
own contiguous band of image rows (its slice of ``img_ids`` gives the right RoPE) plus the replicated text
tokens. Only attention communicates, in every layer:

- **halo rows**: an image query sees keys up to :func:`clear_dit.bands.window_reach` rows away, so every rank
  receives those rows' keys/values from the ranks that hold them (point-to-point, ``batch_isend_irecv``).
  Usually that is its two neighbours; a band thinner than the reach also gets rows from ranks further away.
- **text queries** attend to every image key: each rank computes their attention over its own band (rank 0
  adds the text keys, so they count once) with its log-sum-exp, and the ranks merge the partial results
  exactly with two all-reduces (max of the log-sum-exp, then the rescaled sums).
- **pooled tokens** (``d > 1``): each rank pools its band (band heights are multiples of ``d``); the pooled
  keys/values are all-gathered (small: ``1/d^2`` of the band).

The band's image queries then attend to text + pooled keys and their halo-extended band through
:func:`clear_dit.bands.band_attention` (the library's "dense" or "tiled" backend; both compute the band's
queries only). After the last layer the output rows are all-gathered, so every rank takes the same scheduler
step. The text stream is computed on every rank.

Failures: before each transformer call the ranks agree on their inputs (``all_gather_object`` on a CPU
group): a rank whose inputs are bad makes every rank raise with its message, and ranks whose inputs differ
(seed, prompt, size) raise a ``ValueError``. A rank that fails inside the transformer publishes its message
in the launcher's store and tears its group down (its process then exits); the ranks blocked in a collective
with it fail at once and raise :class:`RankFailedError` with that message; collectives otherwise end at the
group's timeout. torchrun / accelerate launch host the store in their agent; with a hand-made launch where
rank 0 hosts it, a failing rank 0 is reported as "rank 0 died". With NCCL, a rank blocked inside a
collective kernel ends at the timeout, or when torchrun stops the group after the failing rank exited.

Launch: ``torchrun --nproc_per_node N -m app.cli generate ... --parallel`` (or ``accelerate launch``), or in
Python :func:`init_parallel` then :func:`run_parallel_pipeline` on every rank. :func:`launch_local` starts
ranks as CPU processes on this machine (tests, benchmarks).
"""

from __future__ import annotations

import datetime
import inspect
import logging
import math
import os
import pickle
import queue
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from clear_dit import CLEARFluxAttnProcessor, pool_tokens, proportional_scale
from clear_dit.bands import attention_with_lse, band_attention, window_reach
from clear_dit.mask import CLEARLayout
from clear_dit.patching import patch_handle, resolve_transformer, set_processors
from clear_dit.processors import CLEARAttnProcessor

logger = logging.getLogger(__name__)

__all__ = [
    "BandParallel",
    "BandPlan",
    "ParallelCLEARFluxAttnProcessor",
    "ParallelOutput",
    "RankFailedError",
    "RankResult",
    "Transfer",
    "init_parallel",
    "launch_local",
    "layer_traffic",
    "run_parallel_pipeline",
    "split_rows",
    "traffic_report",
]

TIMEOUT_ENV = "CLEAR_DIT_PARALLEL_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
_ERROR_KEY = "clear_dit/parallel/error"


class RankFailedError(ConnectionError):
    """Raised on every rank when another rank of the group failed or the group broke down (message included)."""


# ------------------------------------------------------------------------------------------------------ plan


def split_rows(height: int, world_size: int, multiple: int = 1) -> tuple[tuple[int, int], ...]:
    """Contiguous row bands ``[(start, stop)]``, one per rank, as even as possible in units of ``multiple`` rows.

    The first ``units % world_size`` ranks get one unit more (e.g. 8 rows on 3 ranks: 3, 3, 2).
    """
    units = height // multiple
    if height % multiple:
        raise ValueError(
            f"cannot split {height} token rows into bands of a multiple of {multiple} row(s) (the down factor): "
            f"{height} is not divisible by {multiple}"
        )
    if units < world_size:
        raise ValueError(
            f"cannot split {height} token rows into {world_size} bands of a multiple of {multiple} row(s) each: "
            f"use at most {units} ranks or a taller image"
        )
    base, extra = divmod(units, world_size)
    bands, start = [], 0
    for rank in range(world_size):
        stop = start + (base + (rank < extra)) * multiple
        bands.append((start, stop))
        start = stop
    return tuple(bands)


@dataclass(frozen=True)
class Transfer:
    """Rows ``[start, stop)`` of ``src``'s band that ``dst`` needs as halo keys/values."""

    src: int
    dst: int
    start: int
    stop: int


@dataclass(frozen=True)
class BandPlan:
    """Which rows every rank holds and which halo rows move between ranks, for one token grid.

    Args:
        grid: ``(h, w)``, the full image token grid.
        world_size: number of ranks.
        window_size: CLEAR radius ``r``; the halo is :func:`clear_dit.bands.window_reach` rows.
        down_factor: ``d``; bands are multiples of ``d`` rows so that pooling stays inside a band.
    """

    grid: tuple[int, int]
    world_size: int
    window_size: int
    down_factor: int = 1

    def __post_init__(self) -> None:
        self.bands  # noqa: B018  (a split that cannot be made raises here, not at its first use in a run)

    @cached_property
    def bands(self) -> tuple[tuple[int, int], ...]:
        return split_rows(self.grid[0], self.world_size, self.down_factor)

    @cached_property
    def reach(self) -> int:
        return min(window_reach(self.window_size), self.grid[0] - 1)

    def halo(self, rank: int) -> tuple[int, int]:
        """``(lo, hi)``: the rows whose keys rank ``rank`` needs, its band extended by the reach."""
        start, stop = self.bands[rank]
        return max(0, start - self.reach), min(self.grid[0], stop + self.reach)

    @cached_property
    def transfers(self) -> tuple[Transfer, ...]:
        moves = []
        for dst in range(self.world_size):
            (lo, hi), (start, stop) = self.halo(dst), self.bands[dst]
            for src, (s0, s1) in enumerate(self.bands):
                for a, b in ((lo, start), (stop, hi)):  # the halo above and below dst's band
                    if src != dst and max(a, s0) < min(b, s1):
                        moves.append(Transfer(src, dst, max(a, s0), min(b, s1)))
        return tuple(moves)


@lru_cache(maxsize=32)
def _plan(grid: tuple[int, int], world_size: int, window_size: int, down_factor: int) -> BandPlan:
    return BandPlan(grid, world_size, window_size, down_factor)


def _all_reduce_factor(world_size: int) -> float:
    """Bytes a rank sends per byte of an all-reduce: ``2 (N - 1) / N`` (ring reduce-scatter + all-gather)."""
    return 2 * (world_size - 1) / world_size


def layer_traffic(
    plan: BandPlan, text_len: int, heads: int, head_dim: int, element_size: int = 2, batch: int = 1
) -> list[dict[str, float]]:
    """Bytes every rank sends per attention layer, by kind, computed from the layout alone.

    Conventions (the ones the runner counts real tensors with): a point-to-point send counts its size, an
    all-gather ``(N - 1)`` times the (padded) chunk of the rank, an all-reduce ``2 (N - 1) / N`` times its
    size. Halo and pooled keys/values travel in the model's dtype (``element_size`` bytes), the text merge in
    float32. Keys ``"halo"``, ``"pooled"``, ``"text"``, and ``"kv_allgather"``: what all-gathering the bands'
    keys/values (Ring/Ulysses-style context parallelism) would send instead of halo + pooled.
    """
    h, w = plan.grid
    n, d = plan.world_size, plan.down_factor
    token = batch * heads * 2 * head_dim * element_size  # one key + one value
    pooled_chunk = max(b - a for a, b in plan.bands) // d * (w // d) * token if d > 1 else 0
    text = batch * text_len * heads * 4 * (1 + head_dim + 1) * _all_reduce_factor(n) if text_len else 0.0
    rows = []
    for rank, (a, b) in enumerate(plan.bands):
        halo = sum((t.stop - t.start) * w * token for t in plan.transfers if t.src == rank)
        rows.append(
            {
                "halo": float(halo),
                "pooled": float((n - 1) * pooled_chunk),
                "text": text,
                "kv_allgather": float((n - 1) * (b - a) * w * token),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ communication


class _Comm:
    """The collectives of one parallel run, with their byte counts and the failure protocol."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group or dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = dist.get_backend(self.group)
        self.control = self.group if self.backend == "gloo" else _gloo_group(self.group)
        self.store = distributed_c10d._get_default_store()
        self.traffic: Counter[str] = Counter()

    # -- collectives (every failure becomes a RankFailedError naming the failing rank where it is known)
    def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:
            raise self._peer_failure(what, err) from err

    def exchange(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]], kind: str):
        ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(self.group, p), self.group) for p, t in sends]
        ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(self.group, p), self.group) for p, t in recvs]
        if ops:
            self._run(kind, lambda: [work.wait() for work in dist.batch_isend_irecv(ops)])
        self.traffic[kind] += sum(t.numel() * t.element_size() for _, t in sends)

    def all_gather(self, tensor: torch.Tensor, kind: str) -> list[torch.Tensor]:
        """Equal-shaped ``tensor`` of every rank, in rank order."""
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._run(kind, lambda: dist.all_gather(out, tensor.contiguous(), group=self.group))
        self.traffic[kind] += (self.world_size - 1) * tensor.numel() * tensor.element_size()
        return out

    def gather_rows(self, tensor: torch.Tensor, sizes: list[int], kind: str) -> torch.Tensor:
        """Concatenate every rank's ``(batch, sizes[rank], ...)`` along dim 1 (padded to the largest for NCCL/gloo)."""
        padded = tensor.new_zeros(tensor.shape[0], max(sizes), *tensor.shape[2:])
        padded[:, : tensor.shape[1]] = tensor
        return torch.cat([t[:, :size] for t, size in zip(self.all_gather(padded, kind), sizes, strict=True)], dim=1)

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp, kind: str) -> torch.Tensor:
        self._run(kind, lambda: dist.all_reduce(tensor, op=op, group=self.group))
        self.traffic[kind] += _all_reduce_factor(self.world_size) * tensor.numel() * tensor.element_size()
        return tensor

    def merge_partials(self, out: torch.Tensor, lse: torch.Tensor, kind: str) -> torch.Tensor:
        """Exact softmax over the union of every rank's keys from per-rank ``out (B, T, H, D)``, ``lse (B, T, H)``."""
        top = self.all_reduce(lse.clone(), dist.ReduceOp.MAX, kind)
        weight = torch.exp(lse - top)[..., None]
        packed = self.all_reduce(torch.cat([out.float() * weight, weight], dim=-1), dist.ReduceOp.SUM, kind)
        return (packed[..., :-1] / packed[..., -1:]).to(out.dtype)

    # -- failure protocol
    def agree(self, problem: BaseException | None, fingerprint: tuple) -> None:
        """Every rank's ``(problem, fingerprint)``; raise on every rank if one had a problem or inputs differ."""
        mine = (CALL, f"{type(problem).__name__}: {problem}" if problem else None, fingerprint)
        everyone: list[Any] = [None] * self.world_size
        try:
            self._run("control", lambda: dist.all_gather_object(everyone, mine, group=self.control))
        except RankFailedError:  # a peer died before its call (its model failed to load?): as inside a call
            self.teardown()
            raise
        self.traffic["control"] += (self.world_size - 1) * len(pickle.dumps(mine))
        check_in_step(everyone)
        everyone = [message[1:] for message in everyone]
        if problem is not None:  # its own error first: ranks that all refuse an input raise that ValueError
            raise problem
        for rank, (message, _) in enumerate(everyone):
            if message is not None:
                raise RankFailedError(f"rank {rank} failed: {message}")
        reference = everyone[0][1]
        differ = [rank for rank, (_, fp) in enumerate(everyone) if not _same_fingerprint(fp, reference)]
        if differ:
            raise ValueError(
                f"ranks {differ} got other transformer inputs than rank 0 (shapes, latents, timestep or text): "
                "every rank must run the same prompt, size, steps and seed"
            )

    def fail(self, err: BaseException) -> None:
        """This rank failed outside a collective: publish why in the store, then tear the group down."""
        try:
            self.store.set(_ERROR_KEY, f"rank {self.rank} failed: {type(err).__name__}: {err}")
        except Exception:  # the store is gone: the peers will report a broken group instead
            logger.debug("could not publish the failure of rank %d", self.rank, exc_info=True)
        self.teardown()

    def teardown(self) -> None:
        """Destroy the process group after a failure, so that peers blocked in a collective with this rank fail now.

        gloo closes its connections only when the group object is freed (or the process exits), so this object
        drops its references first; a group the caller still holds stays connected until the process ends.
        """
        group, self.group, self.control = self.group, None, None
        _gloo_group.cache_clear()
        try:
            if dist.is_initialized():
                dist.destroy_process_group(None if group == dist.group.WORLD else group)
        except Exception:  # already gone
            logger.debug("could not destroy the process group", exc_info=True)

    def _published_failure(self) -> RankFailedError | None:
        try:
            if self.store.check([_ERROR_KEY]):
                return RankFailedError(self.store.get(_ERROR_KEY).decode())
        except Exception as err:
            return RankFailedError(f"the process group broke down and its store is gone (rank 0 died?): {err}")
        return None

    def _peer_failure(self, what: str, err: BaseException) -> RankFailedError:
        deadline = time.monotonic() + 2.0  # a failing rank publishes before it tears down: a moment is enough
        while time.monotonic() < deadline:
            failure = self._published_failure()
            if failure is not None:
                return failure
            time.sleep(0.05)
        reason = " ".join(str(err).split())[:300]
        return RankFailedError(f"{what} failed on rank {self.rank} (a peer died or timed out): {reason}")


@lru_cache(maxsize=8)
def _gloo_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A CPU (gloo) group over the ranks of an NCCL ``group``, for the small control messages."""
    return dist.new_group(dist.get_process_group_ranks(group), backend="gloo")


def _same_fingerprint(a: tuple, b: tuple) -> bool:
    """Same shapes exactly, same values up to float noise (ranks may run on different GPUs); NaN latents (an fp16
    overflow, say) agree with NaN, else they would be reported as other inputs."""
    if a[0] != b[0]:
        return False
    pairs = zip(a[1], b[1], strict=True)
    return all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-3) or math.isnan(x) and math.isnan(y) for x, y in pairs)


#: Tags of the control messages: a transformer call's agreement, and the end of a run (its traffic).
CALL, DONE = "call", "done"


def check_in_step(messages: list[tuple]) -> None:
    """One-line ``ValueError`` when the ranks' control messages are of different kinds: some ranks finished their
    run while others still call the transformer (a callback interrupted one rank, or the step counts differ)."""
    done = [rank for rank, message in enumerate(messages) if message[0] == DONE]
    if done and len(done) < len(messages):
        raise ValueError(
            f"ranks {done} finished denoising while the others still ran steps: every rank must run the same steps "
            "(a callback interrupted one rank only?)"
        )


def _fingerprint(inputs: dict[str, Any], grid: tuple[int, int]) -> tuple:
    shapes = [tuple(grid)]
    values = []
    for name in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"):
        tensor = inputs.get(name)
        if isinstance(tensor, torch.Tensor):
            shapes.append((name, tuple(tensor.shape)))
            t = tensor.detach().double()
            values += [float(t.sum()), float(t.abs().sum())]
    return tuple(shapes), tuple(values)


# ------------------------------------------------------------------------------------------------------ runner


class ParallelCLEARFluxAttnProcessor(CLEARFluxAttnProcessor):
    """A CLEAR processor that computes its layer's attention for this rank's band (it shares the parameters of
    the processor it replaces, e.g. ``spatial_weight``); installed by :class:`BandParallel`."""

    def __init__(self, source: CLEARFluxAttnProcessor, runner: BandParallel) -> None:
        super().__init__(source.window_size, source.down_factor, source.backend, source.proportional_attention)
        self.spatial_weight = source.spatial_weight
        self._runner = runner

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        grid: tuple[int, int],
        text_position: str = "first",
        reference_grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if text_position != "first" or reference_grid is not None:
            raise ValueError("patch-parallel CLEAR supports FLUX text-to-image layouts (text first, one image grid)")
        return self._runner._band_attention(self, query, key, value, grid)


class BandParallel:
    """Context manager that makes a CLEAR-patched FLUX transformer run band-parallel over a process group.

    Inside the ``with`` block, every call of the transformer (on every rank, with the same inputs) computes
    this rank's band of image rows and returns the full output, gathered from all ranks. ::

        init_parallel()                                  # under torchrun / accelerate launch
        clear_dit.patch(pipe, window_size=16)
        with BandParallel(pipe) as parallel:
            latents = pipe(prompt, output_type="latent", generator=torch.Generator().manual_seed(0)).images
        print(parallel.traffic_per_step())

    Args:
        pipe_or_transformer: a pipeline with a CLEAR-patched ``FluxTransformer2DModel``, or the model.
        group: the process group (default: the world); one rank per band. With NCCL, every rank of the world
            constructs the runner (it creates a gloo group over ``group`` for its control messages).
    """

    def __init__(self, pipe_or_transformer: Any, group: dist.ProcessGroup | None = None) -> None:
        self.transformer = resolve_transformer(pipe_or_transformer)
        if patch_handle(self.transformer) is None:
            raise ValueError(
                "BandParallel needs a CLEAR-patched transformer: call clear_dit.patch or load_weights first"
            )
        if not dist.is_initialized():
            raise ValueError(
                "torch.distributed is not initialised: launch with torchrun or accelerate launch, call init_parallel()"
            )
        self.comm = _Comm(group)
        self.calls = 0
        self.steps = 0  # denoising steps: calls with a new timestep (true CFG makes two calls a step)
        self._last_timestep: Any = None
        self._plan: BandPlan | None = None
        self._saved: tuple[dict, Any] | None = None

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def traffic(self) -> dict[str, float]:
        """Bytes this rank sent so far, by kind (``halo``, ``pooled``, ``text``, ``output``, ``control``)."""
        return dict(self.comm.traffic)

    def traffic_per_call(self) -> dict[str, float]:
        """Bytes this rank sent per transformer call, by kind."""
        return {kind: sent / max(self.calls, 1) for kind, sent in self.comm.traffic.items()}

    def traffic_per_step(self) -> dict[str, float]:
        """Bytes this rank sent per denoising step, by kind (two transformer calls a step with true CFG)."""
        return {kind: sent / max(self.steps, 1) for kind, sent in self.comm.traffic.items()}

    def __enter__(self) -> BandParallel:
        model = self.transformer
        processors = dict(model.attn_processors)
        if not all(isinstance(p, CLEARFluxAttnProcessor) for p in processors.values()):
            if all(isinstance(p, CLEARAttnProcessor) for p in processors.values()):  # patched, but not FLUX
                raise ValueError(f"patch-parallel CLEAR runs FLUX transformers only, not {type(model).__name__}")
            raise ValueError("BandParallel needs CLEAR processors on every attention layer of the transformer")
        instance_forward = model.__dict__.get("forward")  # set by accelerate hooks, if any
        self._saved = (processors, instance_forward)
        self._forward = model.forward
        self._forward_params = list(inspect.signature(model.forward).parameters)
        set_processors(model, {name: ParallelCLEARFluxAttnProcessor(p, self) for name, p in processors.items()})
        model.forward = self._band_forward
        return self

    def __exit__(self, *exc: object) -> None:
        processors, instance_forward = self._saved
        set_processors(self.transformer, processors)
        if instance_forward is None:
            del self.transformer.forward
        else:
            self.transformer.forward = instance_forward

    # -- one transformer call
    def _band_forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = {**dict(zip(self._forward_params, args, strict=False)), **kwargs}
        plan, problem, fingerprint = None, None, ((), ())
        try:
            plan = self._check_call(inputs)
            fingerprint = _fingerprint(inputs, plan.grid)
        except Exception as err:  # reported to every rank by agree()
            problem = err
        self.comm.agree(problem, fingerprint)
        self._plan = plan
        (a, b), w = plan.bands[self.rank], plan.grid[1]
        band = dict(inputs, hidden_states=inputs["hidden_states"][:, a * w : b * w])
        ids = inputs["img_ids"]
        band["img_ids"] = ids[:, a * w : b * w] if ids.dim() == 3 else ids[a * w : b * w]
        try:
            out = self._forward(**band)
            sample = out[0] if isinstance(out, tuple) else out.sample
            full = self.comm.gather_rows(sample, [(stop - start) * w for start, stop in plan.bands], "output")
        except RankFailedError:
            self.comm.teardown()
            raise
        except BaseException as err:
            self.comm.fail(err)
            raise
        self.calls += 1
        timestep = torch.as_tensor(inputs.get("timestep", 0.0)).detach().cpu().clone()
        if self._last_timestep is None or not torch.equal(timestep, self._last_timestep):
            self.steps += 1
        self._last_timestep = timestep
        if isinstance(out, tuple):
            return (full, *out[1:])
        out.sample = full
        return out

    def _check_call(self, inputs: dict[str, Any]) -> BandPlan:
        joint = inputs.get("joint_attention_kwargs") or {}
        grid = joint.get("clear_grid")
        if grid is None:
            raise ValueError("the transformer call carries no CLEAR grid: patch it with clear_dit.patch first")
        if joint.get("clear_reference_grid") is not None:
            raise ValueError("patch-parallel CLEAR does not support reference images (FLUX Kontext) yet")
        for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
            if inputs.get(name) is not None:
                raise ValueError("patch-parallel CLEAR does not support ControlNet residuals yet")
        handle = patch_handle(self.transformer)
        return _plan(tuple(grid), self.world_size, handle.window_size, handle.down_factor)

    # -- one attention layer (called by the processors)
    def _band_attention(
        self,
        proc: ParallelCLEARFluxAttnProcessor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        plan, comm = self._plan, self.comm
        if plan is None or plan.grid != tuple(grid):
            raise ValueError(f"attention called for grid {grid} outside a band-parallel transformer call")
        (a, b), (lo, hi), w = plan.bands[self.rank], plan.halo(self.rank), grid[1]
        t = query.shape[1] - (b - a) * w
        if t < 0:
            raise ValueError(f"sequence of {query.shape[1]} tokens is shorter than the band's {(b - a) * w}")
        d = proc.down_factor
        layout = CLEARLayout(tuple(grid), t, proc.window_size, d)
        scale = proportional_scale(layout.kv_len, query.shape[-1]) if proc.proportional_attention else None

        # halo rows: keys and values of the rows [lo, hi) from the ranks that hold them
        kv = torch.cat([key[:, t:], value[:, t:]], dim=-1)  # (B, band, H, 2D)
        pieces = {a: kv}
        sends, recvs = [], []
        for move in plan.transfers:
            if move.src == self.rank:
                sends.append((move.dst, kv[:, (move.start - a) * w : (move.stop - a) * w].contiguous()))
            elif move.dst == self.rank:
                pieces[move.start] = kv.new_empty(kv.shape[0], (move.stop - move.start) * w, *kv.shape[2:])
                recvs.append((move.src, pieces[move.start]))
        comm.exchange(sends, recvs, "halo")
        ext = torch.cat([pieces[row] for row in sorted(pieces)], dim=1)
        assert ext.shape[1] == (hi - lo) * w

        # global keys of image queries: text, then the pooled tokens of every band
        global_kv = [torch.cat([key[:, :t], value[:, :t]], dim=-1)]
        if d > 1:
            pooled = pool_tokens(kv, (b - a, w), d, proc.spatial_weight)  # pools keys and values alike
            sizes = [(stop - start) // d * (w // d) for start, stop in plan.bands]
            global_kv.append(comm.gather_rows(pooled, sizes, "pooled"))
        global_kv = torch.cat(global_kv, dim=1)
        dim = query.shape[-1]
        keys = torch.cat([global_kv[..., :dim], ext[..., :dim]], dim=1)
        values = torch.cat([global_kv[..., dim:], ext[..., dim:]], dim=1)
        image = band_attention(
            query[:, t:],
            keys,
            values,
            key_grid=(hi - lo, w),
            rows=(a - lo, b - lo),
            num_global=global_kv.shape[1],
            window_size=proc.window_size,
            scale=scale,
            backend=proc.backend,
        )
        if t == 0:
            return image.flatten(2, 3).to(query.dtype)

        # text queries: partial attention over this band's image keys (+ the text keys on rank 0), merged exactly
        first = 0 if self.rank == 0 else t
        out, lse = attention_with_lse(query[:, :t], key[:, first:], value[:, first:], scale)
        text = comm.merge_partials(out, lse, "text")
        return torch.cat([text, image], dim=1).flatten(2, 3).to(query.dtype)


# ---------------------------------------------------------------------------------------------------- pipelines


@dataclass
class ParallelOutput:
    """What :func:`run_parallel_pipeline` returns on every rank.

    Attributes:
        images: the decoded images (``output_type`` of the call) on rank 0, ``None`` on the other ranks; the
            packed latents on every rank for ``output_type="latent"``.
        latents: the final packed latents ``(batch, h*w, channels)``, identical on every rank.
        traffic_per_step: bytes every rank sent per denoising step (two transformer calls with true CFG), by kind,
            in rank order.
        rank, world_size: this rank and the number of ranks.
    """

    images: Any
    latents: torch.Tensor
    traffic_per_step: list[dict[str, float]] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1


def run_parallel_pipeline(
    pipe: Any,
    prompt: str | list[str] | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    output_type: str = "pil",
    group: dist.ProcessGroup | None = None,
    **kwargs: Any,
) -> ParallelOutput:
    """Run a CLEAR-patched ``FluxPipeline`` band-parallel; call it on every rank with the same arguments.

    Every rank denoises (its band of every transformer call, the same scheduler steps); rank 0 decodes the final
    latents with VAE tiling. Pass a seeded CPU ``generator`` so that every rank draws the same noise.

    Args:
        pipe: a ``FluxPipeline`` (or subclass with the same call) whose transformer is CLEAR-patched.
        prompt, kwargs: the pipeline's own arguments (``num_inference_steps``, ``guidance_scale``, ...).
        height, width: image size in pixels (default: the pipeline's).
        output_type: ``"pil"``, ``"np"``, ``"pt"`` (decoded on rank 0) or ``"latent"``.
        group: the process group (default: the world).
    """
    if "return_dict" in kwargs:
        raise ValueError("run_parallel_pipeline returns a ParallelOutput: drop return_dict")
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    with BandParallel(pipe, group) as parallel:  # prompt by name: FLUX Kontext's first parameter is its image
        latents = pipe(prompt=prompt, height=height, width=width, output_type="latent", **kwargs).images
    ends: list[Any] = [None] * parallel.world_size
    dist.all_gather_object(ends, (DONE, parallel.traffic_per_step()), group=parallel.comm.control)
    check_in_step(ends)
    traffic = [message[1] for message in ends]
    result = ParallelOutput(None, latents, traffic, parallel.rank, parallel.world_size)
    if output_type == "latent":
        result.images = latents
    elif parallel.rank == 0:
        result.images = _decode(pipe, latents, height, width, output_type)
    return result


def _decode(pipe: Any, latents: torch.Tensor, height: int, width: int, output_type: str) -> Any:
    """Decode packed FLUX latents as ``FluxPipeline`` does, with VAE tiling (restored afterwards)."""
    vae = pipe.vae
    tiling = getattr(vae, "use_tiling", False)
    vae.enable_tiling()
    try:
        unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
        with torch.no_grad():
            image = vae.decode(unpacked.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)
    finally:
        if not tiling:
            vae.disable_tiling()


def traffic_report(per_rank: list[dict[str, float]], backend: str = "") -> str:
    """One line: bytes sent per denoising step, by rank 0 and by all ranks together, by kind."""
    kinds = sorted({kind for rank in per_rank for kind in rank})
    total = {kind: sum(rank.get(kind, 0.0) for rank in per_rank) for kind in kinds}
    parts = ", ".join(f"{kind} {_mb(total[kind])}" for kind in kinds)
    via = f" over {backend}" if backend else ""
    return (
        f"patch-parallel: {len(per_rank)} ranks{via}; sent per step: rank 0 {_mb(sum(per_rank[0].values()))}, "
        f"all ranks {_mb(sum(total.values()))} ({parts})"
    )


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


# ------------------------------------------------------------------------------------------------------ launch


def _timeout_s(timeout_s: float | None) -> float:
    if timeout_s is not None:
        return float(timeout_s)
    value = os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None


#: What torchrun and accelerate launch set in every process of a distributed launch.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_parallel(backend: str | None = None, timeout_s: float | None = None) -> torch.device:
    """Initialise the default process group from the environment ``torchrun`` / ``accelerate launch`` set.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
        timeout_s: how long a collective (and the start-up rendezvous) may wait before it fails; default
            ``$CLEAR_DIT_PARALLEL_TIMEOUT`` or 600 s.

    Returns:
        This rank's device: ``cuda:LOCAL_RANK`` (made current) with NCCL, else the CPU.
    """
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"patch-parallel needs a distributed launch ({', '.join(missing)} not set): run "
            "'torchrun --nproc_per_node N -m app.cli generate ... --parallel' or 'accelerate launch'"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=_timeout_s(timeout_s))
        dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
    return device


@dataclass
class RankResult:
    """Outcome of one rank of :func:`launch_local`: ``exitcode`` 0 and ``value``, or non-zero and ``error``."""

    rank: int
    exitcode: int | None
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


def _local_rank_main(fn, args, rank, world_size, port, timeout_s, threads, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), TORCHELASTIC_USE_AGENT_STORE="True",  # the parent hosts the store, as torchrun
    )  # fmt: skip
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        init_parallel("gloo", timeout_s)
        value = fn(*args)
    except BaseException as err:  # reported to the parent; the exit code says it failed
        results.put((rank, None, f"{type(err).__name__}: {err}", time.perf_counter() - start))
        results.close()
        results.join_thread()
        os._exit(1)
    # plain pickle: the queue's own pickler would share tensors through file descriptors that die with this process
    results.put((rank, pickle.dumps(value), None, time.perf_counter() - start))
    if dist.is_initialized():
        dist.destroy_process_group()


def launch_local(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout_s: float = 120.0,
    group_timeout_s: float = 60.0,
    threads: int = 1,
) -> list[RankResult]:
    """Run ``fn(*args)`` on ``world_size`` CPU processes of this machine, as ranks of one gloo group.

    ``fn`` must be importable by a fresh interpreter (a module-level function). This process hosts the group's
    store (as torchrun's agent does); each rank initialises the group (:func:`init_parallel`, with
    ``group_timeout_s``), runs ``fn`` with ``threads`` torch threads, and reports its return value or its
    error. Ranks still running after ``timeout_s`` are killed (``exitcode`` -9).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # The store lives here, like torchrun's agent store, so that it outlives any failing rank.
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=timeout_s))
    port = store.port
    procs = [
        ctx.Process(target=_local_rank_main, args=(fn, args, rank, world_size, port, group_timeout_s, threads, results))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outcome: dict[int, RankResult] = {}
    deadline = time.monotonic() + timeout_s
    while len(outcome) < world_size and time.monotonic() < deadline:
        try:
            rank, value, error, seconds = results.get(timeout=0.2)
            outcome[rank] = RankResult(rank, None, pickle.loads(value) if value is not None else None, error, seconds)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    results.close()
    for rank, proc in enumerate(procs):
        outcome.setdefault(rank, RankResult(rank, None, error="no report (killed or crashed)")).exitcode = proc.exitcode
    return [outcome[rank] for rank in range(world_size)]
