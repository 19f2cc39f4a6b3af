"""``sample:N`` teacher targets whose draws depend only on (seed, token, draw index, that token's logits).

``student.sparse_kd.sample_targets`` draws with ``torch.multinomial`` from one ``torch.Generator``: a token's
draws then depend on every row drawn before it, so on the teacher batch size, on how many ranks share the corpus
and on where a resumed dump restarts. Here draw j of the token at global index t (its position in the corpus) is
the inverse CDF of that row's softmax at a uniform that is a pure hash of (seed, t, j) (``counter_uniforms``:
counter-based, as Random123's Philox or JAX's threefry), so a resumed or re-sharded dump writes the same targets
whenever the teacher gives the same logits for the row. The hash is part of the on-disk format: the store records
the seed, and ``counter_uniforms``' docstring defines it exactly, so a reader can reproduce the uniforms (the draws
too, up to float rounding: another device's softmax / cumsum may move a draw that lands within rounding of a CDF
step). Same output convention as ``sample_targets`` (ids ascending per row, then padding id 0 / count 0).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

_MASK = (1 << 64) - 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_CHUNK_CPU, _CHUNK_OTHER = 1 << 20, 1 << 26  # logits per block of rows in seeded_sample_targets

try:  # the compiled sampler (teacher/_sampler.c, optional: without a C compiler the torch version below runs)
    from ._sampler import openmp as _SAMPLER_OPENMP, sample_rows as _sample_rows
except ImportError:  # pragma: no cover - the torch version is tested on its own (tests/test_token_targets.py)
    _sample_rows, _SAMPLER_OPENMP = None, False


def _mix(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 arrays (wrapping); a bijection of the 64-bit words."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _word(x: np.ndarray) -> np.ndarray:
    """W(x) = mix(x + gamma): splitmix64's first output from state x."""
    return _mix(x + _GAMMA)


def counter_uniforms(seed: int, first_token: int, rows: int, n: int) -> np.ndarray:
    """Uniforms u [rows, n] float64 in [0, 1) for the tokens first_token .. first_token + rows - 1, n draws each.

    With all arithmetic on unsigned 64-bit words, modulo 2^64 (this is the on-disk definition)::

        mix(z) = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
        W(x)   = mix(x + 0x9E3779B97F4A7C15)               # splitmix64's first output from state x
        h(t)   = mix(mix(W(seed mod 2^64)) ^ W(t))         # token key
        u[i, j] = (mix(h(t) ^ W(j)) >> 11) / 2^53,  t = first_token + i

    The three inputs are absorbed in turn, each through W first, so no arithmetic relation between (seed, t, j)
    and (seed', t', j') makes them collide (unlike hash(seed ^ (t * n_max + j))): for a fixed seed, distinct t give
    distinct keys, and for a fixed key, distinct j give distinct words before the last shift; u[i, j] does not
    depend on n (the first n' < n columns are the uniforms for n'), nor on how the tokens are split into calls.
    """
    rows, n, first_token = int(rows), int(n), int(first_token)
    if rows < 0 or n < 0 or first_token < 0 or first_token + rows > 1 << 64:
        raise ValueError(f"rows and n must be >= 0 and tokens in [0, 2^64), got first_token={first_token}, "
                         f"rows={rows}, n={n}")
    s = _mix(_word(np.array([int(seed) & _MASK], dtype=np.uint64)))
    t = np.arange(rows, dtype=np.uint64) + np.uint64(first_token)
    h = _mix(s ^ _word(t))
    x = _mix(h[:, None] ^ _word(np.arange(n, dtype=np.uint64))[None, :])
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _inverse_cdf(p: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Draws [T, n] int64 from the rows of p [T, V] (>= 0, any positive total) at the uniforms u [T, n] in [0, 1).

    The CDF is summed in float64 and u scaled by each row's own total (v = u * total < total exactly, for any
    u <= 1 - 2^-53), so a float32 softmax summing to slightly less or more than 1 needs no special case; the draw
    is the first id whose CDF exceeds v (searchsorted, right side), so an id of probability 0 (a flat CDF step,
    including id 0 at v = 0) is never drawn. The clamp to V - 1 is a guard that the strict v < total makes moot.
    ValueError if a row's total is not finite and > 0 (its softmax had a NaN). ``out``: a float64 [T, V] buffer
    for the CDF (reused across blocks of rows: no new allocation, no page faults).
    """
    cdf = (torch.empty_like(p, dtype=torch.float64) if out is None else out).copy_(p).cumsum_(-1)
    total = cdf[:, -1:]
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise ValueError("teacher_logits has a row with no finite probability (all -inf, or a NaN or +inf logit)")
    v = u.to(dtype=cdf.dtype) * total
    return torch.searchsorted(cdf, v, right=True).clamp_max_(p.shape[-1] - 1)


def _run_length(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws [T, n] -> (ids, counts [T, M]) in sample_targets' layout (the same sort + run-length encoding)."""
    draws = draws.sort(dim=-1).values
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = starts.cumsum(-1) - 1  # [T, n]: which unique id each draw is
    m = int(slot[:, -1].max()) + 1
    ids = torch.zeros(draws.shape[0], m, dtype=torch.long, device=draws.device).scatter_(-1, slot, draws)
    counts = torch.zeros_like(ids).scatter_add_(-1, slot, torch.ones_like(draws))
    return ids, counts


@torch.no_grad()
def seeded_sample_targets(teacher_logits: torch.Tensor, n: int, seed: int, first_token: int,
                          temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample:n`` targets: n i.i.d. draws per row from softmax(teacher_logits / temperature), as ids + counts.

    teacher_logits [T, V], row i being the token at global index first_token + i -> (ids [T, M] int64, counts
    [T, M] int64), exactly as ``sparse_kd.sample_targets`` lays them out: M = the largest number of unique ids in a
    row; each row's ids ascending, then padding (id 0, count 0); counts sum to n per row. Draw j of row i is the
    inverse CDF of the row's softmax at ``counter_uniforms(seed, first_token, T, n)[i, j]``: it depends on nothing
    else, so splitting the rows into calls (with first_token shifted to match) gives the same targets. Vectorised;
    runs on the logits' device (the uniforms are made on the CPU and moved there). ValueError on bad arguments or a
    row with no finite probability (all -inf, or a NaN / +inf logit).
    """
    if not (n >= 1 and float(n).is_integer()) or not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"n must be an integer >= 1 and temperature > 0 and finite, got n={n}, "
                         f"temperature={temperature}")
    if teacher_logits.dim() != 2 or teacher_logits.shape[1] < 1:
        raise ValueError(f"teacher_logits must be [T, V], V >= 1, got shape {tuple(teacher_logits.shape)}")
    if first_token < 0:
        raise ValueError(f"first_token must be >= 0, got {first_token}")
    rows = teacher_logits.shape[0]
    if rows == 0:
        empty = torch.zeros(0, 0, dtype=torch.long, device=teacher_logits.device)
        return empty, empty.clone()
    u = counter_uniforms(seed, first_token, rows, int(n))
    if _sample_rows is not None and teacher_logits.device.type == "cpu" and teacher_logits.dtype != torch.float64:
        return _compiled_draws(teacher_logits, int(n), u, temperature)
    return _torch_draws(teacher_logits, int(n), u, temperature)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """The compiled sampler's threads where it was built without OpenMP, kept for the process: a dump calls it for
    every block of rows, and starting two threads took about 1 ms a call on the 2-core VM (benchmarks/RESULTS.md).
    Keyed by the process id too: a forked child has none of its parent's threads, so it starts its own pool."""
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="pkd-cache-sampler")
    return _POOLS[key]


def _compiled_draws(logits: torch.Tensor, n: int, u: np.ndarray, temperature: float):
    """seeded_sample_targets' draws by teacher/_sampler.c: the same definition, in one pass per row on the CPU,
    the rows split over as many threads as torch's intra-op ones (each row depends on nothing else): torch's own
    OpenMP threads where the module was built with OpenMP, else a pool of Python threads (the C releases the GIL)."""
    z = np.ascontiguousarray(logits.detach().float().numpy())
    u = np.sort(u, axis=1)
    rows, vocab = z.shape
    ids, counts, unique = np.zeros((rows, n), np.int64), np.zeros((rows, n), np.int64), np.zeros(rows, np.int64)

    def part(a: int, b: int, threads: int = 1) -> int:
        return _sample_rows(z[a:b], u[a:b], b - a, vocab, n, 1.0 / temperature, ids[a:b], counts[a:b], unique[a:b],
                            threads)

    threads = max(1, min(torch.get_num_threads(), rows * vocab // _CHUNK_CPU))
    if threads == 1 or _SAMPLER_OPENMP:  # one call: serial, or on torch's own OpenMP threads
        bad = [part(0, rows, threads)]
    else:
        cuts = [rows * i // threads for i in range(threads + 1)]
        bad = list(_pool(threads).map(part, cuts[:-1], cuts[1:]))
    if max(bad) >= 0:
        raise ValueError("teacher_logits has a row with no finite probability (all -inf, or a NaN or +inf logit)")
    m = int(unique.max())
    return torch.from_numpy(np.ascontiguousarray(ids[:, :m])), torch.from_numpy(np.ascontiguousarray(counts[:, :m]))


def _torch_draws(teacher_logits: torch.Tensor, n: int, uniforms: np.ndarray, temperature: float):
    """seeded_sample_targets' draws in torch, on any device: softmax, float64 cumsum, searchsorted, run-length."""
    rows = teacher_logits.shape[0]
    x = teacher_logits if teacher_logits.dtype in (torch.float32, torch.float64) else teacher_logits.float()
    u = torch.from_numpy(uniforms).to(x.device)
    # blocks of rows, each CDF written into the same float64 buffer (bounded memory, and on the CPU no fresh pages
    # to fault in per block); every step is row-wise, so the blocks change nothing in the result
    step = min(rows, max(1, (_CHUNK_CPU if x.device.type == "cpu" else _CHUNK_OTHER) // x.shape[1]))
    buf = torch.empty(step, x.shape[1], dtype=torch.float64, device=x.device)
    draws = []
    for i in range(0, rows, step):
        z = x[i:i + step] if temperature == 1 else x[i:i + step] / temperature
        draws.append(_inverse_cdf(F.softmax(z, dim=-1), u[i:i + step], out=buf[:z.shape[0]]))
    return _run_length(torch.cat(draws))
