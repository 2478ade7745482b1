"""Per-trial resources: the GPU-memory estimate behind `gpus_per_trial: auto`, and failure policy.

Ray's GPU fractions are scheduling only; they do not fence memory. So `auto` sizes each trial's
fraction from an estimate of what it will hold on the device:

    footprint = CUDA context                       (per process; every trial is a process)
              + features  rows x fp bytes (uint8) + rows x descriptors x 4 + labels/mask x 8
              + weights x 16 bytes                  (fp32 weights, grads, AdamW's two moments)
              + activations  batch x (inputs + 4 x sum(hidden)) x 4 bytes, for the train batch
                             and the (larger, forward-only) evaluation batch
    fraction  = footprint x safety / GPU memory, rounded up to a multiple of 1/20, at most 1

A trial that still runs out of GPU memory is retried with twice its share (`next_gpu_share`).
Failures are classified so that only retryable ones (out of GPU memory, lost node or worker)
are retried; a diverged trial or a code error fails at once and the search goes on.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

CUDA_CONTEXT_BYTES = 500 * 2**20  # a CUDA context plus PyTorch's kernels, per process
SAFETY = 1.3  # allocator fragmentation and cuBLAS workspaces
EVAL_BATCH = 4096  # rows per evaluation batch (forward only)
STEP = 1 / 20  # GPU fractions are rounded up to multiples of this

GPU_OOM, NODE_LOST, DIVERGED, CODE_ERROR = "gpu_oom", "node_lost", "diverged", "code_error"
RETRYABLE = frozenset({GPU_OOM, NODE_LOST})


@dataclass(frozen=True)
class TrialShape:
    """What determines a trial's device memory."""

    n_rows: int
    fp_bytes_per_row: int  # uint8 fingerprint columns
    n_descriptors: int
    n_tasks: int
    hidden: tuple[int, ...]
    batch_size: int
    members: int = 1  # networks trained at once on the shared data (a k-fold trial's k folds)

    @property
    def n_inputs(self) -> int:
        return self.fp_bytes_per_row + self.n_descriptors

    @property
    def n_weights(self) -> int:
        sizes = [self.n_inputs, *self.hidden, self.n_tasks]
        return sum(a * b + b for a, b in itertools.pairwise(sizes))


def estimate_trial_bytes(shape: TrialShape) -> int:
    """Bytes one trial holds on its GPU at peak (see the module docstring)."""
    data = shape.n_rows * (shape.fp_bytes_per_row + 4 * shape.n_descriptors + 8 * shape.n_tasks)
    weights = 16 * shape.n_weights * shape.members
    per_row = 4 * (shape.n_inputs + 4 * sum(shape.hidden) + 2 * shape.n_tasks)
    activations = per_row * (shape.batch_size + EVAL_BATCH) * shape.members
    return int(CUDA_CONTEXT_BYTES + data + weights + activations)


def gpu_fraction(shape: TrialShape, gpu_memory_bytes: int) -> float:
    """The share of one GPU to ask Ray for, from the estimate; never 0, at most 1."""
    if gpu_memory_bytes <= 0:
        raise ValueError(f"gpu_memory_bytes must be > 0, got {gpu_memory_bytes}")
    need = estimate_trial_bytes(shape) * SAFETY / gpu_memory_bytes
    return min(1.0, max(STEP, round(math.ceil(need / STEP - 1e-9) * STEP, 4)))


def next_gpu_share(current: float) -> float:
    """The share for a retry after running out of GPU memory: double it, capped at one GPU."""
    return min(1.0, max(STEP, round(round(current * 2 / STEP) * STEP, 4)))


def classify_failure(error_text: str) -> str:
    """Name a trial failure from its error text: gpu_oom, node_lost, diverged or code_error."""
    text = error_text or ""
    # Ray's memory monitor kills a worker for host RAM with its own OutOfMemoryError: not a GPU.
    host_oom = ("ray.exceptions.OutOfMemoryError", "Task was killed", "running low on memory")
    if not any(s in text for s in host_oom) and (
        "OutOfMemoryError" in text or "CUDA out of memory" in text
    ):
        return GPU_OOM
    lost = (
        "NodeDiedError",
        "ActorDiedError",
        "WorkerCrashedError",
        "RayActorError",
        "ActorUnavailableError",
        *host_oom,
        "The actor died",
        "is temporarily unavailable",  # ActorUnavailableError's message, without its class name
        "RPC error: Socket closed",
        "node died",
        "SYSTEM_ERROR",
    )
    if any(s in text for s in lost):
        return NODE_LOST
    if "TrainingDiverged" in text or "non-finite" in text:
        return DIVERGED
    return CODE_ERROR


def last_error(trial: object) -> str:
    """The text of a Ray trial's latest failure (its driver-side error file holds them all)."""
    text = ""
    path = getattr(trial, "error_file", None)
    if path:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
    if not text:
        text = trial.get_error() or ""  # type: ignore[attr-defined]
    marker = text.rfind("Failure # ")
    return text[marker:] if marker >= 0 else text


def is_retryable(kind: str) -> bool:
    return kind in RETRYABLE


def local_request_problem(
    cpus_per_trial: float,
    gpus_per_trial: float | str,
    num_cpus: int | None,
    num_gpus: int | None,
    visible_gpus: int,
    cpu_count: int,
) -> str | None:
    """Why a local Ray could never start one trial, or None when it can.

    A local job knows its machine before Ray starts; without this check an impossible request
    leaves every trial PENDING for ever. `num_cpus`/`num_gpus` are the local Ray's (None: the
    machine's `cpu_count` and `visible_gpus`).
    """
    cpus = num_cpus if num_cpus is not None else cpu_count
    gpus = num_gpus if num_gpus is not None else visible_gpus
    wants_gpu = gpus_per_trial == "auto" or float(gpus_per_trial) > 0
    if cpus_per_trial > cpus:
        return (
            f"resources.cpus_per_trial is {cpus_per_trial:g} but this local Ray has {cpus} "
            f"CPUs: no trial could ever start. Use --cpus-per-trial {cpus} or less"
        )
    if wants_gpu and gpus == 0:
        return (
            f"resources.gpus_per_trial is {gpus_per_trial} but this machine has 0 GPUs visible "
            f"(ray.num_gpus {num_gpus}): no trial could ever start. Use --gpus-per-trial 0 to "
            "train on the CPU, or --num-gpus N for N logical GPUs (Ray schedules them; trials "
            "then still train on the CPU)"
        )
    return None
