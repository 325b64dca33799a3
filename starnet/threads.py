"""How many CPU threads torch uses for a call, chosen from the cores that are free.

torch's OpenMP threads wait for each other at the end of every parallel step, spinning
while they wait. When another process holds one of the cores, the thread that shares it
falls behind and the others spin: on a 2-core machine with one core busy, two threads
made a 1000 x 1000 call 2-8 times slower than idle, slower than one thread
(docs/scaling.rst). So starnet does not use torch's default (every core) but counts the
cores that this process may run on (``os.sched_getaffinity``) and, over a short window
before a large call, how many of them other processes leave idle (``/proc/stat``), and
uses that many threads. Small calls run on one thread (parallel steps cost more than
they save there). ``threads=`` overrides the choice.
"""

import os
import time
from contextlib import contextmanager

import torch

__all__ = ["available_cores", "free_cores", "choose_threads", "torch_threads"]

#: Pixels (rows x cols x bands) below which a call runs on one thread.
SMALL_CALL = 512 * 512


def available_cores():
    """Number of CPU cores this process may run on.

    Returns
    -------
    int

    Examples
    --------
    >>> from starnet.threads import available_cores
    >>> available_cores() >= 1
    True
    """
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:          # not Linux
        return os.cpu_count() or 1


def _cpu_times():
    """Busy and total jiffies of each CPU, from /proc/stat (None where unreadable)."""
    try:
        with open("/proc/stat") as stat:
            lines = [line.split() for line in stat if line.startswith("cpu")
                     and line[3:4].isdigit()]
    except OSError:
        return None
    times = {}
    for fields in lines:
        values = [int(v) for v in fields[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)     # idle + iowait
        times[int(fields[0][3:])] = (sum(values) - idle, sum(values))
    return times


def _own_ticks():
    """CPU time of this process, all its threads, in /proc/stat's ticks (None where
    unreadable)."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])        # utime, stime
    except (OSError, ValueError, IndexError):
        return None


def free_cores(*, window=0.05):
    """Cores of this process's set that other processes left idle over ``window`` s.

    This process's own work over the window is not counted: its calling thread sleeps,
    and what its other threads did is added back (a numerical library's threads may
    spin for a while after a call: OpenBLAS's, after numpy's linear algebra, held a
    whole core at the start of every epoch of a training script, which then trained on
    one thread of two).

    Parameters
    ----------
    window : float, optional
        Seconds to measure over.

    Returns
    -------
    float or None
        Sum over the cores of their idle fraction; None where ``/proc/stat`` cannot be
        read (not Linux).

    Examples
    --------
    >>> from starnet.threads import available_cores, free_cores
    >>> free = free_cores()
    >>> free is None or 0 <= free <= available_cores() + 0.01
    True
    """
    before, own_before = _cpu_times(), _own_ticks()
    if before is None:
        return None
    time.sleep(window)
    after, own_after = _cpu_times(), _own_ticks()
    try:
        cores = os.sched_getaffinity(0)
    except AttributeError:
        cores = set(before)
    free, totals = 0.0, []
    for core in cores:
        if core not in before or core not in after:
            continue
        busy = after[core][0] - before[core][0]
        total = after[core][1] - before[core][1]
        if total > 0:
            free += 1 - busy / total
            totals.append(total)
    if totals and own_before is not None and own_after is not None:
        free = min(free + (own_after - own_before) / (sum(totals) / len(totals)), len(totals))
    return free


def choose_threads(threads=None, *, n_pixels=None):
    """The number of threads for a call.

    Parameters
    ----------
    threads : int or None
        A number of threads to use as it is (a positive integer), or None to choose:
        one for a call of fewer than `SMALL_CALL` pixels, otherwise the free cores of
        this process's set, rounded, at least one.
    n_pixels : int, optional
        Size of the call (pixels times bands); unknown counts as large.

    Returns
    -------
    int

    Examples
    --------
    >>> from starnet.threads import choose_threads
    >>> choose_threads(3), choose_threads(n_pixels=100 * 100)
    (3, 1)
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        return threads
    if n_pixels is not None and n_pixels < SMALL_CALL:
        return 1
    cores = available_cores()
    free = free_cores()
    if free is None:
        return cores
    return max(1, min(cores, int(free + 0.5)))


@contextmanager
def torch_threads(threads):
    """Run the block with ``threads`` torch threads, then restore the previous number.

    Parameters
    ----------
    threads : int

    Examples
    --------
    >>> import torch
    >>> from starnet.threads import torch_threads
    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     print(torch.get_num_threads())
    1
    >>> torch.get_num_threads() == before
    True
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
