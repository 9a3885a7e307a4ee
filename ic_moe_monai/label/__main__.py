"""``python -m ic_moe_monai.label [DIR]``: write the IC-MoE MONAI Label app folder (default ``apps/ic_moe``)."""

import sys

from ic_moe_monai.label import make_app_folder

print(make_app_folder(sys.argv[1] if len(sys.argv) > 1 else "apps/ic_moe"))
