import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from starnet import threads


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or threads._cpu_times() is None,
                    reason="needs Linux CPU affinity and /proc/stat")
def test_a_busy_core_is_not_counted_free():
    """A process spinning on one core of this process's set makes that core busy in the
    measurement, and the free count falls below the number of cores."""
    core = sorted(os.sched_getaffinity(0))[0]
    hog = subprocess.Popen([sys.executable, "-c", "import os\n"
                            f"os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    try:
        time.sleep(0.3)
        before = threads._cpu_times()
        time.sleep(0.3)
        after = threads._cpu_times()
        busy = (after[core][0] - before[core][0]) / (after[core][1] - before[core][1])
        assert busy > 0.4
        assert threads.free_cores(window=0.3) < threads.available_cores() - 0.4
    finally:
        hog.kill()
        hog.wait()


@pytest.mark.skipif(threads._cpu_times() is None or threads._own_ticks() is None,
                    reason="needs /proc/stat and /proc/self/stat")
def test_own_threads_are_not_counted_busy():
    """A thread of this process that keeps a core busy while the caller measures (as a
    numerical library's worker threads spin after a call) leaves that core free for the
    caller's own work: only other processes count."""
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        time.sleep(0.1)
        assert threads._own_ticks() > 0
        assert threads.free_cores(window=0.3) > threads.available_cores() - 0.4
    finally:
        stop.set()
        spinner.join()


def test_choose_threads():
    assert threads.choose_threads(2) == 2
    assert threads.choose_threads(n_pixels=2 * 100 * 100) == 1
    assert 1 <= threads.choose_threads(n_pixels=2 * 2000 * 2000) <= threads.available_cores()
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be a positive integer or None"):
            threads.choose_threads(bad)


def test_torch_threads_restores_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with threads.torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError
    assert torch.get_num_threads() == before


def test_deblender_calls_run_on_the_threads_asked_and_restore_them(monkeypatch):
    """Each call runs under the number of threads it is given (or chooses) and leaves
    torch's setting as it found it; the catalog does not depend on it."""
    import numpy as np
    from starnet import StarNetDeblender, simulate_starfield
    deblender = StarNetDeblender.pretrained("sdss-m2")
    image, _ = simulate_starfield((24, 24), psf=deblender.psfs,
                                  background=deblender.background, seed=3)
    seen = []
    original = threads.torch_threads

    def spy(n):
        seen.append(n)
        return original(n)

    import starnet.deblender
    monkeypatch.setattr(starnet.deblender, "torch_threads", spy)
    before = torch.get_num_threads()
    one = deblender(image, background="given", threads=1, progress=False)
    two = deblender(image, background="given", threads=2, progress=False)
    deblender.sample(image, n_samples=2, seed=0, background="given", threads=1, progress=False)
    deblender.count_posterior(image, background="given", progress=False)   # small: one
    assert seen == [1, 2, 1, 1]
    assert torch.get_num_threads() == before
    np.testing.assert_allclose(np.asarray(one["x_fit"]), np.asarray(two["x_fit"]), atol=1e-4)
