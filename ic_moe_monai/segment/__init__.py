"""Batch segmentation of a folder of studies with the bundle: ``python -m ic_moe_monai segment INPUT OUTPUT``.

Cases are found by :func:`ic_moe_monai.io.discover_cases` (image files and DICOM series, recursively). Each case
is loaded after its header passed the size and shape guard (DICOM series by pydicom, in ITK's geometry; ITK is
imported only for NRRD and MHA), preprocessed, segmented and inverted by the bundle runtime
(:class:`~ic_moe_monai.inference.predictor.BundleSegmenter`: the bundle's own ``preprocessing``, ``inferer`` and
weights, on the GPU when there is one), and written in the input's geometry: a NIfTI labelmap and, on request, a DICOM
SEG, label statistics and a preview image. Reading and writing overlap with segmenting: the next case is loaded in a
background thread, and the finished one is written by another.

What protects the data:

- Before the model is loaded, the run is refused (:class:`UsageError`, exit code 2) when an option is wrong, the
  output folder cannot be created or written, the output folder is the input folder, or an output would replace
  an input file (same file, also through symbolic or hard links).
- Outputs are written under a temporary name carrying the run id and renamed, so an interrupted run never leaves a
  partial file; start-up removes only leftovers of runs that are no longer alive on this host.
- Each case is locked while a run loads, segments and writes it: a concurrent run (or another part) skips it as
  ``skipped (another run is writing it)``. A rerun skips finished cases unless ``overwrite``. The run that holds
  the output folder's report lock writes ``report.json``; a run started while another one is writing into the same
  folder writes ``report_<run id>.json`` instead, so no report replaces another.
- A bad case is reported in one line naming the file and the problem, its outputs are removed, and the run goes on;
  an output that cannot be written fails its case only, and a report that cannot be written is said on stderr.

The job is split by concern: :mod:`.job` (find, plan, segment, report), :mod:`.options` (checked options),
:mod:`.locks` (case locks and resume), :mod:`.loader` (background loading), :mod:`.outputs` (writing outputs),
:mod:`.remote` (DICOMweb input), :mod:`.logs` (reader libraries' notes) and :mod:`.report` (the run's report).
"""

from ic_moe_monai.inference.predictor import BundleSegmenter, load_case
from ic_moe_monai.segment.job import segment
from ic_moe_monai.segment.options import FORMATS, UsageError
from ic_moe_monai.segment.report import SKIPPED_BUSY, SKIPPED_EXISTS, SKIPPED_NOTHING, CaseResult, SegmentReport

__all__ = ["FORMATS", "SKIPPED_BUSY", "SKIPPED_EXISTS", "SKIPPED_NOTHING", "BundleSegmenter", "CaseResult",
           "SegmentReport", "UsageError", "load_case", "segment"]  # fmt: skip
