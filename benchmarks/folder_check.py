"""How long a start takes to check a large image folder, first start against the next ones.

Run:  python benchmarks/folder_check.py --n=100000 [--root=/tmp/folder_check]

Writes `n` Fashion-MNIST training images (28 px PNGs, cycled) into 10 class folders once,
then times `data.from_folder` in fresh processes: the first with no manifest of checked
files (every file decoded), then twice with it (image_files.CheckedFiles). Prints seconds and
peak memory of each; the manifest goes to a temporary TL_KERAS_CACHE.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
began = time.time()
from tl_keras import data
loaded = time.time()
examples = data.from_folder(sys.argv[1], val_fraction=0.2, seed=0)
print(json.dumps({"images": examples.train_examples + examples.val_examples,
                  "seconds_from_folder": round(time.time() - loaded, 2),
                  "seconds_import": round(loaded - began, 2),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
"""


def write_folder(root, n):
    import numpy as np
    from PIL import Image

    from tl_keras import arrays

    x, y, _, _, _ = arrays.load_builtin("fashion_mnist")
    for c in range(10):
        os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
    for i in range(n):
        j = i % len(x)
        Image.fromarray(np.asarray(x[j]).squeeze()).save(
            os.path.join(root, f"class_{int(y[j])}", f"{i}.png"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "folder_check"))
    args = parser.parse_args()
    marker = os.path.join(args.root, ".written")
    if not os.path.exists(marker) or open(marker).read() != str(args.n):
        write_folder(args.root, args.n)
        open(marker, "w").write(str(args.n))
    env = dict(os.environ, TL_KERAS_CACHE=tempfile.mkdtemp(), TF_CPP_MIN_LOG_LEVEL="3")
    for start in ("first start (no manifest)", "second start", "third start"):
        out = subprocess.run([sys.executable, "-c", CHILD, args.root], env=env,
                             capture_output=True, text=True, check=True).stdout
        print(start, json.loads(out.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
