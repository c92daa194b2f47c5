"""``accelerate launch --cpu --num_processes N``: start the N processes that accelerate itself does not.

accelerate (checked up to 1.16) sends ``--cpu`` to its *simple* launcher, which runs the script as ONE process;
it spreads N CPU processes only through ``mpirun`` (``--mpirun_hostfile``, Intel MPI or Open MPI). What that one
process receives is ``ACCELERATE_USE_CPU=True`` and, because N > 1 was asked, ``MASTER_ADDR``/``MASTER_PORT`` but
no rank variables, so it would train alone while the user believes N processes share the work. The command
line spots exactly that situation, reads N from the launching ``accelerate`` command line (its parent
process) with accelerate's own argument parser (and its config file, as accelerate does), and runs itself
again under ``torch.distributed.run`` with N processes (N / ``--num_machines`` on each machine), which join
over gloo (``Accelerator(cpu=True)`` with ``RANK``/``WORLD_SIZE`` set): the same thing ``accelerate launch
--multi_gpu --num_processes N`` or ``torchrun --nproc_per_node N`` do on a machine without GPUs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("clear_dit.cli")

#: Where a distributed launcher puts the world size (torchrun, Intel MPI, Open MPI, MVAPICH).
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
#: How the launching command names accelerate's launch command: `accelerate launch`, the module, the script.
LAUNCH_TOKENS = ("launch", "accelerate.commands.launch")
WORKING_COMMANDS = (
    "accelerate launch --multi_gpu --num_processes N -m app.cli ... (also without GPUs) "
    "or torchrun --nproc_per_node N -m app.cli ..."
)


def alone_under_cpu_launch(environ: Mapping[str, str]) -> bool:
    """True in the single process that ``accelerate launch --cpu --num_processes N>1`` started without mpirun."""
    use_cpu = environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return use_cpu and "MASTER_ADDR" in environ and not any(name in environ for name in WORLD_SIZE_VARIABLES)


@dataclass(frozen=True)
class LaunchLayout:
    """How many processes an ``accelerate launch`` command asked for, in all and on how many machines."""

    num_processes: int | None
    num_machines: int = 1
    machine_rank: int = 0


def launch_layout(launcher_argv: Sequence[str]) -> LaunchLayout | None:
    """The layout of an ``accelerate launch`` command line, else ``None`` (not such a command line).

    Read as accelerate reads it: its flags, else its ``--config_file``, else (without ``--cpu``) accelerate's
    default config file; ``num_processes`` is ``None`` where none of them says.

    Args:
        launcher_argv: the launching process's full argv, e.g. ``["python", "/bin/accelerate", "launch",
            "--cpu", "--num_processes", "2", "-m", "app.cli", ...]`` or ``[..., "-m", "accelerate.commands.launch",
            ...]`` or ``["/bin/accelerate-launch", ...]``.
    """
    from accelerate.commands.config import default_config_file
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    argv = list(launcher_argv)
    starts = [i + 1 for i, token in enumerate(argv) if token in LAUNCH_TOKENS or token.endswith("accelerate-launch")]
    if not starts:
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints its usage before it exits
            args, _ = launch_command_parser().parse_known_args(argv[starts[0] :])
    except SystemExit:  # not a complete launch command line
        return None
    config = None
    if args.config_file is not None or (Path(default_config_file).is_file() and not args.cpu):  # accelerate's rule
        config = load_config_from_file(args.config_file)

    def setting(name: str, default: int | None) -> int | None:
        value = getattr(args, name)
        return value if value is not None else getattr(config, name, default) if config is not None else default

    return LaunchLayout(setting("num_processes", None), setting("num_machines", 1), setting("machine_rank", 0))


def requested_processes(launcher_argv: Sequence[str]) -> int | None:
    """N (on all machines) of an ``accelerate launch`` command line, else ``None``; see :func:`launch_layout`."""
    layout = launch_layout(launcher_argv)
    return None if layout is None else layout.num_processes


def launched_world_size(environ: Mapping[str, str]) -> int | None:
    """How many processes this run will have: ``WORLD_SIZE`` under a distributed launch, N in the lone process
    of ``accelerate launch --cpu --num_processes N`` (which :func:`relaunch_lost_cpu_processes` runs as N), else
    ``None``."""
    if "WORLD_SIZE" in environ:
        return int(environ["WORLD_SIZE"])
    return requested_processes(_parent_argv()) if alone_under_cpu_launch(environ) else None


def _parent_argv() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:  # not Linux, or the parent is gone
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def relaunch_lost_cpu_processes(argv: Sequence[str]) -> int | None:
    """Run ``python -m app.cli ARGV`` as the N processes an ``accelerate launch --cpu`` asked for.

    Returns ``None`` when this process is not the lone process of such a launch (nothing to do), else the
    exit code of the N-process run (this machine's share of them, with ``--num_machines``). Raises
    ``ValueError`` when N > 1 was asked but cannot be read, or does not divide among the machines.
    """
    if not alone_under_cpu_launch(os.environ):
        return None
    layout = launch_layout(_parent_argv())
    if layout is None:  # the variables come from elsewhere (a job script): nothing was asked of us
        logger.warning(
            "ACCELERATE_USE_CPU and MASTER_ADDR are set, but no accelerate launch started this process: "
            "running as one process"
        )
        return None
    n, machines, rank = layout.num_processes, layout.num_machines, layout.machine_rank
    if n is None:
        raise ValueError(
            "accelerate launch --cpu asked for several processes but started one (accelerate spreads CPU "
            f"processes only through mpirun), and its --num_processes could not be read; use {WORKING_COMMANDS}"
        )
    if n <= 1:
        return None
    if machines < 1 or n % machines:
        raise ValueError(
            f"accelerate launch asked for {n} processes on {machines} machines: --num_processes counts the "
            "processes of all machines and must be a multiple of --num_machines"
        )
    if not 0 <= rank < machines:  # torchrun would wait for a rendezvous that never completes
        raise ValueError(f"accelerate launch --machine_rank {rank} is not one of 0..{machines - 1} (--num_machines)")
    per_machine = n // machines
    logger.warning(
        "accelerate launch --cpu started 1 process for --num_processes %d (it needs mpirun for more): "
        "starting %d CPU processes (machine %d of %d) with torch.distributed.run",
        n,
        per_machine,
        rank + 1,
        machines,
    )
    command = [sys.executable, "-m", "app.launch", "--nproc_per_node", str(per_machine)]
    command += ["--nnodes", str(machines), "--node_rank", str(rank)]
    command += ["--master_addr", os.environ["MASTER_ADDR"], "--master_port", os.environ.get("MASTER_PORT", "29500")]
    return subprocess.run([*command, "-m", "app.cli", *argv]).returncode


def torchrun(argv: Sequence[str] | None = None) -> int:
    """``torch.distributed.run`` (torchrun) with ``argv``, whose failed processes end in one line, not a traceback.

    The processes print their own one-line errors; torchrun would add its ChildFailedError traceback after them.
    Returns the first failed process's exit code (1 for a signal), or 0.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode > 0:
            sys.stderr.write(f"error: process {rank} failed with exit code {failure.exitcode} (its error is above)\n")
            return failure.exitcode
        number = -failure.exitcode  # a signal: the process could print nothing
        name = signal.Signals(number).name if number in signal.valid_signals() else "unknown"
        why = "; out of memory?" if number == signal.SIGKILL else ""
        sys.stderr.write(f"error: process {rank} was killed by signal {number} ({name}{why})\n")
        return 1
    return 0


if __name__ == "__main__":  # python -m app.launch TORCHRUN_ARGS: what relaunch_lost_cpu_processes starts
    sys.exit(torchrun())
