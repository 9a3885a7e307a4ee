"""Saving predictions without stalling the device: one background writing thread, and a NIfTI writer that does not
reorder the volume.

- :class:`BackgroundWriter`: runs write jobs in order on one thread, with a bounded queue (memory stays bounded
  when writing is slower than segmenting); the first error is raised in the submitting thread, at the next
  ``submit`` or at ``flush``. Attached to an ignite engine it flushes when the engine completes, so
  ``evaluator.run()`` returns with every file written.
- :class:`BackgroundSaveImaged`: MONAI's ``SaveImaged``, saving in a :class:`BackgroundWriter`; the workflow goes on
  with the next case while this one is written. A subclass of ``SaveImaged``, so tools that drop the bundle's saver
  by type (MONAI Label) still do.
- :class:`NiftiWriter`: MONAI's ``NibabelWriter`` without its two whole-volume reorderings (a C-contiguous copy,
  then NIfTI's Fortran-order write: 0.6–1.3 s instead of 0.08 s for a 512 × 512 × 300 labelmap on a CPU core) when
  no resampling is asked for.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.data import NibabelWriter
from monai.data.utils import to_affine_nd
from monai.transforms import SaveImaged
from monai.utils import convert_data_type, get_equivalent_dtype

__all__ = ["BackgroundSaveImaged", "BackgroundWriter", "NiftiWriter"]

_STOP = object()  # tells the writing thread to end


class BackgroundWriter:
    """Run submitted jobs in order on one background thread, at most ``max_pending`` of them waiting.

    The thread starts with the first job and ends at ``flush`` / ``cancel``, or when it has been idle for
    ``idle_seconds``: a writer nobody flushed does not keep the interpreter from exiting (Python waits for its
    pending jobs, then it stops). After a job fails, the jobs queued behind it are dropped, as a synchronous loop
    would stop at the failure.

    Args:
        max_pending: jobs that may wait in the queue; ``submit`` blocks while it is full.
        idle_seconds: how long the thread waits for a job before it ends on its own.
    """

    def __init__(self, max_pending: int = 2, idle_seconds: float = 2.0) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be ≥ 1, got {max_pending}.")
        self.max_pending = max_pending
        self.idle_seconds = idle_seconds
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._dropping = False

    def submit(self, job: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue ``job(*args, **kwargs)``; blocks while ``max_pending`` jobs wait.

        Raises:
            BaseException: the error of an earlier job (once), before queuing this one.
        """
        self._raise_error()
        with self._lock:  # the worker only takes the lock when the queue is empty: a blocking put cannot deadlock
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="background-writer", daemon=False)
                self._thread.start()
            self._jobs.put((job, args, kwargs))

    def flush(self) -> None:
        """Wait until every submitted job has run.

        Raises:
            BaseException: the first error of a job since the last flush.
        """
        self._jobs.join()
        self._stop_thread()
        self._raise_error()

    def cancel(self) -> None:
        """Drop the jobs still waiting and wait for the one running; its error, if any, is kept for ``flush``."""
        self._dropping = True
        try:
            self._jobs.join()
        finally:
            self._dropping = False
        self._stop_thread()

    def attach(self, engine: Any) -> None:
        """Flush when an ignite engine completes: its ``run()`` returns once everything is written."""
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, lambda _: self.flush())

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is None:
            self.flush()
        else:  # the body failed: its error is what the caller must see; don't write what came after it
            self.cancel()

    def _work(self) -> None:
        while True:
            try:
                item = self._jobs.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            if item is _STOP:
                self._jobs.task_done()
                return
            job, args, kwargs = item
            try:
                if self._error is None and not self._dropping:
                    job(*args, **kwargs)
            except BaseException as err:  # handed to the submitting thread, KeyboardInterrupt included
                self._error = err
            finally:
                self._jobs.task_done()

    def _stop_thread(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._jobs.put(_STOP)
        thread.join()

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error


class BackgroundSaveImaged(SaveImaged):
    """MONAI's ``SaveImaged``, saving in a :class:`BackgroundWriter` while the workflow goes on.

    The items to save are taken out of the data (moved to the CPU if needed) before the job is queued, so the
    rest of the data, such as the image on the GPU, is not kept alive by the queue.

    Args:
        keys: keys of the items to save.
        background: the writer thread (default: one of its own); attach it to the engine (it is an ignite handler)
            so that the run waits for the last files.
        args, kwargs: ``SaveImaged``'s arguments.
    """

    def __init__(self, keys: KeysCollection, *args: Any, background: BackgroundWriter | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(keys, *args, **kwargs)
        self.background = background if background is not None else BackgroundWriter()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        job: dict[Hashable, Any] = {}
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            value = d[key]
            job[key] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
            meta_key = meta_key or (f"{key}_{meta_key_postfix}" if meta_key_postfix is not None else None)
            if meta_key is not None and meta_key in d:
                job[meta_key] = d[meta_key]
        self.background.submit(super().__call__, job)
        return d

    def flush(self) -> None:
        """Wait for the files queued so far (raises a writing error)."""
        self.background.flush()


class NiftiWriter(NibabelWriter):
    """MONAI's ``NibabelWriter``, writing the array in its own memory order when no resampling is asked for.

    ``NibabelWriter`` makes the array C-contiguous and nibabel then writes it in Fortran order: two reorderings of
    the whole volume. A Fortran-ordered array (as the bundle's inferer and loader produce) is written here as it
    lies. The header is the same (sform and qform from the affine, code 1). Use it through ``SaveImage(d)``'s
    ``writer`` argument.
    """

    def set_metadata(self, meta_dict: Mapping | None, resample: bool = True, **options: Any) -> None:
        if resample:
            super().set_metadata(meta_dict, resample=resample, **options)
            return
        _, affine, _ = self.get_meta_info(meta_dict)
        if self.output_dtype is None and hasattr(self.data_obj, "dtype"):
            self.output_dtype = self.data_obj.dtype
        self.affine = affine

    @classmethod
    def create_backend_obj(cls, data_array: Any, affine: Any = None, dtype: DtypeLike = None, **kwargs: Any):
        import nibabel as nib

        # a view in the tensor's own memory order (no reordering copy)
        array = data_array.detach().cpu().numpy() if isinstance(data_array, torch.Tensor) else np.asarray(data_array)
        if dtype is not None:
            array = array.astype(get_equivalent_dtype(dtype, np.ndarray), order="K", copy=False)
        affine = np.eye(4) if affine is None else to_affine_nd(r=3, affine=convert_data_type(affine, np.ndarray)[0])
        return nib.nifti1.Nifti1Image(array, affine, header=kwargs.pop("header", None), extra=kwargs.pop("extra", None),
                                      file_map=kwargs.pop("file_map", None))  # fmt: skip
