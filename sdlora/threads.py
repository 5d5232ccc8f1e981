"""CPU threads for our commands, tests and benchmarks; free of torch, because it must run before torch.

torch's CPU wheel (Linux) runs its parallel ops on GNU OpenMP (its bundled libgomp), which reads its
settings from the environment once, when `import torch` loads it. By default a libgomp thread that
waits (at the barrier that ends each parallel op, or for the next one) spins for GOMP_SPINCOUNT
iterations, about 3 ms, before it sleeps; OMP_WAIT_POLICY=ACTIVE spins for minutes. Alone on its
cores that is fast. When a second busy process shares the cores, a thread often waits for a partner
that is descheduled, and spins away the time slice that partner needs: on 2 cores two `sdlora train`
runs took each step 10-100x longer instead of about 2x (bench/threads.py). PASSIVE waiting sleeps at
once and gives the core back.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path


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
    """Passive OpenMP waiting, one thread per available core; whatever the user already set is kept.

    Call it before anything imports torch: later the OpenMP runtime has read its settings and this
    only reaches child processes.
    """
    if "torch" in sys.modules:
        warnings.warn("sdlora.threads.use_cpu_policy() was called after torch was imported: "
                      "OMP_WAIT_POLICY and OMP_NUM_THREADS only reach child processes", stacklevel=2)
    # GOMP_SPINCOUNT overrides the spinning that OMP_WAIT_POLICY implies; a user who set it chose.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("OMP_NUM_THREADS", str(cpu_cores()))
