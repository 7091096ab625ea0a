"""Audit a MONAI 3-D classifier on NIfTI volumes, end to end on data this script generates.

1. writes NIfTI volumes (a bright blob on the left or on the right: two classes), in
   ImageFolder layout (``volumes/<class>/case_XXX.nii.gz``) and as a MONAI datalist
   (``datalist.json``), with a few volumes given the wrong label;
2. trains a small 3-D DenseNet121 for a few epochs and saves its weights;
3. audits the folder with the command line a user would run:

       nnsim audit --data volumes/ --model monai:DenseNet121 \\
           --model-kwargs '{"spatial_dims": 3, "in_channels": 1, ...}' --num-classes 2 \\
           --checkpoint weights.pt --out audit/

4. and the datalist through the Python API (``nnsim_hooks.audit(model, dataset)``).

The report shows each volume as its central slice.

    python examples/monai_nifti_audit.py --out /tmp/monai-audit      (a few minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _train import train  # noqa: E402

import nnsim_hooks  # noqa: E402
from nnsim_hooks.cli import commands as cli  # noqa: E402
from nnsim_hooks.integrations import load_dataset, load_model  # noqa: E402
from nnsim_hooks.integrations.synthetic import make_nifti_datalist, make_nifti_folder  # noqa: E402

NETWORK = {"spatial_dims": 3, "in_channels": 1, "init_features": 8, "growth_rate": 4, "block_config": [2, 2]}
SHAPE = (24, 24, 24)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="monai-audit-example", help="working folder (data, weights, audits)")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)

    # 1. volumes in ImageFolder layout, a few moved to the wrong class folder
    folder = os.path.join(args.out, "volumes")
    paths = make_nifti_folder(folder, per_class=args.per_class, shape=SHAPE, classes=("left", "right"))
    planted = []
    for path in paths[: max(2, args.per_class // 10)]:  # the first 'left' volumes go to 'right'
        target = os.path.join(folder, "right", "moved_" + os.path.basename(path))
        shutil.move(path, target)
        planted.append(target)
    print(f"wrote {len(paths)} NIfTI volumes under {folder}; {len(planted)} filed under the wrong class")

    # 2. a small 3-D DenseNet121 trained on them
    loaded = load_model("monai:DenseNet121", model_kwargs=NETWORK, num_classes=2)
    dataset = load_dataset(folder, loaded)
    accuracy = train(loaded.model, dataset, epochs=args.epochs, batch_size=8)
    weights = os.path.join(args.out, "weights.pt")
    torch.save(loaded.model.state_dict(), weights)
    print(f"trained monai:DenseNet121 (3-D): training accuracy {accuracy:.0%}, weights in {weights}")

    # 3. the command line
    out = os.path.join(args.out, "audit-folder")
    code = cli.main(["audit", "--data", folder, "--model", "monai:DenseNet121", "--model-kwargs", json.dumps(NETWORK),
                     "--num-classes", "2", "--checkpoint", weights, "--out", out, "--k", "8", "--no-progress"])
    if code != 0:
        return code
    import pandas as pd

    table = pd.read_csv(os.path.join(out, "table.csv"))
    flagged = {dataset.paths[i] for i in table.index[table["is_label_issue"]]}
    print(f"planted label errors flagged: {sum(p in flagged for p in planted)} of {len(planted)}; "
          f"flags in total: {len(flagged)}")

    # 4. a MONAI datalist (paths relative to the JSON) through the Python API
    datalist = make_nifti_datalist(os.path.join(args.out, "datalist"), n=2 * args.per_class, shape=SHAPE)
    trained = load_model("monai:DenseNet121", model_kwargs=NETWORK, num_classes=2, checkpoint=weights)
    result = nnsim_hooks.audit(trained.model, load_dataset(datalist, trained), k=8, progress=False,
                               out_dir=os.path.join(args.out, "audit-datalist"))
    print(f"datalist audit: {len(result.table)} volumes, {int(result.table['is_label_issue'].sum())} label issues "
          f"flagged; report in {os.path.join(args.out, 'audit-datalist', 'report.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
