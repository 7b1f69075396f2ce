"""ITK threading for reproducible preprocessing.

ITK's multithreaded Mattes mutual information accumulates its joint histogram in an order that varies from run to
run, and N4's B-spline fit partitions its sums by thread: measured 2026-12-07 on 2 threads, two runs of the same
rigid registration differed by ~1e-6 in the parameters and of a B-spline registration by ~1e-4 in the
coefficients, N4 on 1 vs 2 threads by ~1e-3 of the intensity, and the optimisers amplified these into cached
images differing by up to 1.9 z-units on a brats follow-up.  On one thread every such call is bit-identical.  So
these steps run in :func:`one_itk_thread` whatever the process's setting; resampling, smoothing and demons keep
the process's threads (their images and fields do not depend on the count; the demons' metric in the QC record
differs in the last bits, ~1e-14, as the reproducibility audit of 2026-12-08 found).  Parallel speed comes from patients
(``preprocess_site(workers=...)``: one patient per process).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import SimpleITK as sitk


@contextlib.contextmanager
def itk_threads(n: int) -> Iterator[None]:
    """Run ITK on ``max(1, n)`` threads inside the block (SimpleITK's global default, restored afterwards).  The
    setting is process-wide: ITK work started by other Python threads meanwhile uses it too."""
    old = sitk.ProcessObject_GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(max(1, int(n)))
    try:
        yield
    finally:
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(old)


def one_itk_thread() -> contextlib.AbstractContextManager[None]:
    """:func:`itk_threads` of 1 (a per-filter ``SetNumberOfThreads(1)`` is not enough: the registration metric's
    threader takes the global default)."""
    return itk_threads(1)
