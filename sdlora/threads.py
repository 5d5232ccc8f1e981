"""CPU threads for our commands, tests and benchmarks; free of torch, because it must run before torch.

torch's CPU wheel (Linux) runs its parallel ops on GNU OpenMP (its bundled libgomp), which reads its
settings from the environment once, when `import torch` loads it. By default a libgomp thread that
waits (at the barrier that ends each parallel op, or for the next op) spins 300,000 pause
instructions, ~7 ms here, before it sleeps; OMP_WAIT_POLICY=ACTIVE spins for minutes. When another
busy process shares the cores, a thread often waits for a partner that is descheduled and spins away
the time slice that partner needs: two toy trainings at once on 2 cores took from 4x to 170x longer
per step than one alone, where 2x is fair.

OMP_WAIT_POLICY=PASSIVE (sleep at once) shares fairly, but then every op has to wake its threads,
which costs tens of microseconds on a virtual machine: the toy training alone took ~2.5x longer per
step. A spin of 1000 pauses (25 us here) rides over most gaps between ops and still hands the core
back soon, but alone it costs up to 2.4x per step on the tiny demo model. So the spin is chosen at
start (`use_cpu_policy`): long when the process has its cores to itself, short when it will share
them (bench/threads.py, docs/benchmarks.md). On ops of a real model's size the policies cost about
the same. Other OpenMP runtimes (libomp on macOS) ignore GOMP_SPINCOUNT and
sleep at once.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

SHARED_SPIN = "1000"  # cores shared: 1000 pauses (25 us here) before a waiting thread sleeps
ALONE_SPIN = "300000"  # cores to ourselves: libgomp's own default, ~7 ms, over every gap between ops


def other_busy_commands() -> int:
    """Other processes of sdlora that keep cores busy (train, generate, toy, bench; the studio server
    itself idles), read from /proc; 0 where there is no /proc."""
    me, count = os.getpid(), 0
    for entry in Path("/proc").glob("[0-9]*"):
        if int(entry.name) in (me, os.getppid()):
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        text = b" ".join(words)
        if (b"sdlora" in text and b"studio" not in text and b"pytest" not in text
                and any(word in (b"train", b"generate", b"toy") for word in words)):
            count += 1
    return count


def runnable_others() -> int:
    """Threads ready to run on this machine now, ourselves not counted (/proc/loadavg's 4th field)."""
    try:
        running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
    except (OSError, IndexError):
        return 0
    return max(0, int(running) - 1)


def cores_shared(cores: int) -> bool:
    """Whether this process will share its cores: another busy sdlora command runs, or more threads are
    ready to run than there are cores besides ours."""
    return other_busy_commands() > 0 or runnable_others() >= cores


def cpu_cores() -> int:
    """Physical cores this process may run on: its affinity (taskset, cpusets), hyperthreads counted once.

    That is what torch picks by default (MKL's count); we set it explicitly so that the OpenMP runtime,
    MKL and any child process (accelerate, notebooks) all use the same count.
    """
    if not hasattr(os, "sched_getaffinity"):  # macOS, Windows: no affinity to read
        return os.cpu_count() or 1
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:  # no sysfs (some containers): count logical CPUs
            return len(cpus)
    return len(cores)


def use_cpu_policy() -> None:
    """OpenMP's wait chosen from the situation at start, one thread per available core; what the user
    set is kept. Alone on its cores, a waiting thread spins ~7 ms before it sleeps (libgomp's default,
    the fastest alone); when it will share them (see `cores_shared`), 25 us, so it hands the core back.

    Call it before anything imports torch: later the OpenMP runtime has read its settings and this
    only reaches child processes.
    """
    if "torch" in sys.modules:
        warnings.warn("sdlora.threads.use_cpu_policy() was called after torch was imported: "
                      "the OpenMP settings only reach child processes", stacklevel=2)
    # Either one is the user's choice of wait policy: in libgomp GOMP_SPINCOUNT overrides the spin that
    # OMP_WAIT_POLICY implies, and ours would override their OMP_WAIT_POLICY=ACTIVE.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["GOMP_SPINCOUNT"] = SHARED_SPIN if cores_shared(cpu_cores()) else ALONE_SPIN
    os.environ.setdefault("OMP_NUM_THREADS", str(cpu_cores()))
