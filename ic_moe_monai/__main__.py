"""``python -m ic_moe_monai``: see :mod:`ic_moe_monai.cli`."""

from ic_moe_monai.cli import main

if __name__ == "__main__":
    main()
