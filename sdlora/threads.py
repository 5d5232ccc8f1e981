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
back soon: alone ~1.4x, two at once ~2x that (bench/threads.py). On ops of a real model's size
the three cost about the same. Other OpenMP runtimes (libomp on macOS) ignore GOMP_SPINCOUNT and
sleep at once.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

SPIN_COUNT = "1000"  # libgomp's busy-wait before a thread sleeps, in pause instructions (25 ns each here)


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
    """A short OpenMP spin, then sleep; one thread per available core. What the user set is kept.

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
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    os.environ.setdefault("OMP_NUM_THREADS", str(cpu_cores()))
