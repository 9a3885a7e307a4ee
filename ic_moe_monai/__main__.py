"""Command line: ``python -m ic_moe_monai segment INPUT OUTPUT [options]`` (``--help`` lists them)."""

from __future__ import annotations

import sys

import fire

from ic_moe_monai.segment import segment


def segment_command(input: str, output: str, bundle: str = "bundle", config: str | None = None, device: str = "auto",
                    overwrite: bool = False, batch_size: int = 32, quiet: bool = False) -> None:  # fmt: skip
    """Segment every case under INPUT (NIfTI / NRRD / MHA files, DICOM series, or a tree mixing them) into OUTPUT.

    Writes <case>.nii.gz labelmaps with each input's geometry and report.json. Exit code 0 when every case
    succeeded, 1 when any failed, 2 for usage errors.

    Args:
        input: a file, a DICOM series folder, or a folder tree.
        output: the folder for the labelmaps and report.json.
        bundle: the MONAI bundle folder (configs/inference.json, models/model.pt).
        config: extra config files merged after inference.json, comma-separated (e.g. a profile).
        device: auto (CUDA if available), cpu or cuda:N.
        overwrite: segment cases whose output already exists (otherwise a rerun skips them).
        batch_size: slices per network call.
        quiet: log warnings only.
    """
    try:
        report = segment(input, output, bundle, config, device, overwrite, batch_size, quiet)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(report.exit_code)


def main() -> None:
    fire.Fire({"segment": segment_command})


if __name__ == "__main__":
    main()
