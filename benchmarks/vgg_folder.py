"""The VGG cells set laid out as a user's own folder, to check the folder recipes on real data:
the paper's split (8 labeled images with dot CSVs, 92 unlabeled, 100 test images with dot CSVs).

    python benchmarks/vgg_folder.py --out=/tmp/vgg_folder
    cellcount train --images=/tmp/vgg_folder/train --dots=/tmp/vgg_folder/train_dots \
        --test-images=/tmp/vgg_folder/test --test-dots=/tmp/vgg_folder/test_dots --workdir=...

The images are copied as they are (PNG); each red dot pixel of `<n>dots.png` becomes a row
`y,x` of `<n>cell.csv`.
"""
import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cellcount_jax.data import io, vgg_split  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--vgg", default=os.path.join(ROOT, "..", "shared", "data", "vgg_cells"))
    a = p.parse_args()
    labeled, unlabeled, test = vgg_split()
    for folder, ids, dotted in (("train", labeled, True), ("train", unlabeled, False),
                                ("test", test, True)):
        os.makedirs(os.path.join(a.out, folder), exist_ok=True)
        os.makedirs(os.path.join(a.out, f"{folder}_dots"), exist_ok=True)
        for i in ids:
            name = f"{i + 1:03d}cell"
            shutil.copy(os.path.join(a.vgg, f"{name}.png"), os.path.join(a.out, folder))
            if dotted:
                dots = io.dots_from_red_pixels(os.path.join(a.vgg, f"{i + 1:03d}dots.png"))
                with open(os.path.join(a.out, f"{folder}_dots", f"{name}.csv"), "w") as f:
                    f.write("y,x\n" + "".join(f"{y:g},{x:g}\n" for y, x in dots))
    print(f"{a.out}: train {len(labeled)} dotted + {len(unlabeled)} unlabeled, test {len(test)}")


if __name__ == "__main__":
    main()
