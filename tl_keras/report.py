"""A finished run draws itself: its curves, what its regime did to the network, one page.

    run folder (config.json, metrics.json, history.csv, model.keras)
      -> curves.png    loss and accuracy per epoch, train and validation; the
                       large regimes' phase boundary marked
      -> regime.png    the backbone as its stages (stem .. early, early .. middle,
                       middle .. late, late .. top) and the new head, each
                       coloured removed / frozen / trained, from the real model
      -> report.html   the metrics, these pictures, the evaluation when
                       `tools/evaluate.py` has written RUN/eval/, the resolved
                       config; one self-contained file (images embedded), no network

`train.finetune` writes all three at the end of every run that saves its
model; `tools/evaluate.py` writes report.html again with its results. Every
file is written whole (run_folder.write_atomically). Pictures are
matplotlib's, Agg backend.

Example:
    write_report("runs/small_similar_efficientnet_lite0_...")
"""

import base64
import html
import json
import os

import numpy as np

from tl_keras import backbones, plan as plan_lib, run_folder, tasks

COLOURS = {"trained": "#e8743b", "frozen": "#4a7fb5", "removed": "#d9d9d9",
           "fixed": "#9e9e9e"}
STAGES = ("stem .. early", "early .. middle", "middle .. late", "late .. top")


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_figure(fig, path):
    """Writes `fig` as a PNG at `path`, whole or not at all, and closes it."""
    run_folder.write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    pyplot().close(fig)
    return path


# --- curves.png ------------------------------------------------------------------------

def history_columns(workdir):
    """history.csv as {column: [float or nan per epoch]}, from `run_folder.read_history`
    (nan: not validated that epoch)."""
    rows = run_folder.read_history(workdir, with_epoch=True)
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: [float(row.get(key, "nan")) for row in rows] for key in keys}


def phase_boundary(phases):
    """The epoch after which the backbone unfreezes: the first epoch of a phase that
    trains everything after a head phase (large regimes from pretrained weights), else None."""
    return next((p.first_epoch for p in phases if p.train == "all" and p.first_epoch > 0), None)


def plot_curves(workdir, config, phases=()):
    """`workdir/curves.png`: loss and the task's metric (accuracy) per epoch, the boundary
    between the plan's `phases` marked; returns its path, or None without history."""
    history = history_columns(workdir)
    if not history.get("epoch"):
        return None
    plt = pyplot()
    epochs = np.asarray(history["epoch"]) + 1
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    boundary = phase_boundary(phases)
    task = tasks.get_task(plan_lib.with_defaults(config).task)
    for ax, metric in zip(axes, ("loss", task.metric)):
        for key, label, style in ((metric, "train", "-"), (f"val_{metric}", "validation", "o-")):
            if key in history:
                values = np.asarray(history[key])
                shown = ~np.isnan(values)
                ax.plot(epochs[shown], values[shown], style, label=label, markersize=3)
        if boundary is not None:
            ax.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=1)
            ax.text(boundary + 0.6, ax.get_ylim()[1], "unfrozen", va="top", fontsize=7,
                    color="grey")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(metric)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{config['regime']}, {config['backbone']}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, os.path.join(workdir, "curves.png"))


# --- regime.png ------------------------------------------------------------------------

def stages(model, config):
    """The backbone's stages and the head as drawn: [(name, state, params)].

    State per stage: "removed" (above the cut), "trained" (any weight of it
    trained in the last phase, BatchNorm aside), or "frozen". Stages that end
    inside one layer are drawn as one ("stem .. top" for DINOv2's encoder).
    """
    import keras

    backbone = model.get_layer("backbone")
    layers = backbone.layers  # topological order: a cut backbone is flat
    index = {layer.name: i for i, layer in enumerate(layers)}
    ends = [index.get(name) for name in backbones.stage_ends(config["backbone"])]
    ends.append(len(layers) - 1)
    # A stage that ends inside one layer (a KerasHub transformer's encoder) has no
    # boundary to draw below the cut: it is drawn with the next; the cut's own ends there.
    cut = config.get("cut")
    rank = backbones.CUT_POINTS.index(cut) if cut in backbones.CUT_POINTS else len(STAGES)
    out, start, first = [], 0, None
    for i, (name, end) in enumerate(zip(STAGES, ends)):
        if end is None and i < rank:
            first = first or name.split(" .. ")[0]
            continue
        if end is None and i == rank:
            end = len(layers) - 1
        if first:
            name, first = f"{first} .. {name.split(' .. ')[1]}", None
        if end is None or start > len(layers) - 1:
            out.append((name, "removed", None))
            continue
        end = min(end, len(layers) - 1)
        part = layers[start:end + 1]
        start = end + 1
        trains = any(w.trainable for layer in part for w in layer.weights
                     if not isinstance(layer, keras.layers.BatchNormalization))
        params = sum(int(np.prod(w.shape)) for layer in part for w in layer.weights)
        out.append((name, "trained" if trains else "frozen", params))
    head = model.get_layer("predictions")
    out.append((f"new head\nDense {head.units}", "trained",
                sum(int(np.prod(w.shape)) for w in head.weights)))
    return out


def plot_regime(workdir, model, config, phases=()):
    """`workdir/regime.png`: the network as its stages, coloured by what the regime did
    (`phases`: the plan's, `trainable.Phase`)."""
    plt = pyplot()
    drawn = [("preprocess", "fixed", None)] + stages(model, config)
    fig, ax = plt.subplots(figsize=(10, 2.4), dpi=110)
    for i, (name, state, params) in enumerate(drawn):
        hatch = "//" if state == "removed" else None
        ax.add_patch(plt.Rectangle((i * 1.1, 0), 1, 1, facecolor=COLOURS[state],
                                   edgecolor="black", hatch=hatch, linewidth=0.8))
        text = name + (f"\n{params:,} params" if params else "") + f"\n{state}"
        ax.text(i * 1.1 + 0.5, 0.5, text, ha="center", va="center", fontsize=7,
                color="black" if state in ("removed", "fixed") else "white")
        if i:
            ax.annotate("", (i * 1.1, 0.5), (i * 1.1 - 0.1, 0.5),
                        arrowprops={"arrowstyle": "->", "linewidth": 0.8})
    ax.set_xlim(-0.05, len(drawn) * 1.1)
    ax.set_ylim(-0.05, 1.05)
    ax.axis("off")
    trained = {"head": "the head trains", "finetune": "then everything (BatchNorm frozen)",
               "scratch": "everything trains from random weights"}
    ax.set_title(f"{config['regime']}: cut at {config['cut']!r}, init "
                 f"{config['init']}; "
                 f"{', '.join(trained.get(p.name, p.name) for p in phases)}",
                 fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="black") for c in
               COLOURS.values()]
    ax.legend(handles, list(COLOURS), fontsize=7, loc="upper right",
              bbox_to_anchor=(1.0, -0.02), ncol=4, frameon=False)
    fig.tight_layout()
    return save_figure(fig, os.path.join(workdir, "regime.png"))


# --- report.html -----------------------------------------------------------------------

def image_tag(path, alt):
    """An <img> with the PNG at `path` embedded (no file beside the page needed)."""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def table(rows, header=None):
    """An HTML table of `rows`, each value shown short (`_show`)."""
    head = ("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"
            if header else "")
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_show(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table>{head}{body}</table>"


def _show(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


_STYLE = """
body { font-family: DejaVu Sans, Arial, sans-serif; margin: 2em auto; max-width: 1000px;
       color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.big { font-size: 1.3em; font-weight: bold; }
"""

METRIC_KEYS = ("task", "val_loss", "epochs_run", "train_examples", "val_examples", "num_classes",
               "skipped_files", "trainable_params", "non_trainable_params", "cut_layer",
               "image_size", "phases", "train_path", "class_weight", "wall_seconds")


def summary_html(workdir, metrics):
    """The run at a glance, as HTML: the task's metric (val_accuracy), the metrics, the
    advice, the curves and the regime picture (report.html's top; a notebook shows `Run`
    with it)."""
    name = os.path.basename(os.path.normpath(workdir))
    monitor = tasks.of_run(metrics).monitor
    parts = [f"<h1>{html.escape(name)}</h1>",
             f'<p class="big">{monitor} {metrics[monitor]:.4f}</p>',
             f"<p>{html.escape(str(metrics['regime']))} · "
             f"{html.escape(str(metrics['backbone']))} · weights "
             f"{html.escape(str(metrics['weights']))} · "
             f"{metrics['num_classes']} classes</p>",
             "<h2>Metrics</h2>",
             table([(k, metrics[k]) for k in (monitor, f"best_{monitor}", *METRIC_KEYS)
                    if k in metrics])]
    if "advice" in metrics:
        advice = metrics["advice"]
        parts += ["<h2>Regime advisor</h2>", f"<p>{html.escape(advice['reasons'])}.</p>",
                  table([(cut, *(row.get(k) for k in ("pretrained", "random", "gain")))
                         for cut, row in advice["scores"].items()],
                        ["cut", "LogME", "random init", "gain"])]
        if advice.get("pilots"):
            metric = advice.get("metric", "accuracy")
            parts += [f"<p>Pilot runs: trained on {advice['pilot_images']['train']} sampled "
                      f"images, scored on {advice['pilot_images']['held_out']} held out.</p>",
                      table([(name, row[metric], row["seconds"])
                             for name, row in advice["pilots"].items()],
                            ["pilot", f"held-out {metric}", "seconds"])]
    pictures = [("curves.png", "Training curves"), ("regime.png", "What the regime trained")]
    for file, title in pictures:
        path = os.path.join(workdir, file)
        if os.path.exists(path):
            parts += [f"<h2>{title}</h2>", image_tag(path, title)]
    return "\n".join(parts)


def write_report(workdir):
    """`workdir/report.html` from what the run folder holds; returns its path."""
    config = run_folder.read_json(os.path.join(workdir, "config.json"))
    metrics = run_folder.read_json(os.path.join(workdir, "metrics.json"))
    name = os.path.basename(os.path.normpath(workdir))
    parts = [summary_html(workdir, metrics), *_evaluation(workdir),
             "<h2>Config</h2>", table(sorted(config.items()), ["key", "value"])]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(name)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    path = os.path.join(workdir, "report.html")
    run_folder.write_text(path, page)
    return path


def _evaluation(workdir):
    folder = os.path.join(workdir, "eval")
    path = os.path.join(folder, "eval.json")
    if not os.path.exists(path):
        return ["<h2>Evaluation</h2><p>Not evaluated yet: <code>python tools/evaluate.py "
                f"--workdir={html.escape(workdir)}</code></p>"]
    ev = run_folder.read_json(path)
    if "mAP" in ev:
        return _label_evaluation(ev)
    rows = [("dataset", ev["dataset"]), ("images", ev["images"]),
            ("accuracy", ev["accuracy"]), (f"top-{ev['top_k']} accuracy", ev["top_k_accuracy"]),
            ("expected calibration error", ev["ece"])]
    if "tta" in ev:
        rows += [(f"accuracy with {ev['tta']['kind']} TTA", ev["tta"]["accuracy"]),
                 (f"ECE with {ev['tta']['kind']} TTA", ev["tta"]["ece"])]
    out = ["<h2>Evaluation</h2>", table(rows),
           "<h3>Per class</h3>",
           table([(c, r["precision"], r["recall"], r["f1"], r["support"])
                   for c, r in ev["per_class"].items()],
                  ["class", "precision", "recall", "F1", "images"]),
           "<h3>Most confused</h3>",
           table([(p["true"], p["predicted"], p["count"]) for p in ev["most_confused"]],
                  ["true", "predicted as", "images"])]
    for file, title in (("confusion.png", "Confusion matrix"),
                        ("reliability.png", "Reliability diagram"),
                        ("mistakes.png", "The most confident mistakes")):
        image = os.path.join(folder, file)
        if os.path.exists(image):
            out += [f"<h3>{title}</h3>", image_tag(image, title)]
    return out


def _label_evaluation(ev):
    """A multi-label run's evaluation (evaluate.label_scores)."""
    rows = [("dataset", ev["dataset"]), ("images", ev["images"]),
            (f"mAP ({ev['labels_scored']} labels)", ev["mAP"]),
            ("micro-F1 at 0.5", ev["micro_f1"]), ("macro-F1 at 0.5", ev["macro_f1"]),
            ("micro-F1 at the thresholds", ev["micro_f1_at_thresholds"]),
            ("macro-F1 at the thresholds", ev["macro_f1_at_thresholds"])]
    if "tta" in ev:
        rows += [(f"mAP with {ev['tta']['kind']} TTA", ev["tta"]["mAP"])]
    return ["<h2>Evaluation</h2>", table(rows),
            "<h3>Per label (at its threshold, chosen on validation for the best F1)</h3>",
            table([(c, "-" if r["ap"] is None else r["ap"], r["threshold"], r["precision"],
                    r["recall"], r["f1"], r["support"]) for c, r in ev["per_label"].items()],
                  ["label", "AP", "threshold", "precision", "recall", "F1", "images"])]


def draw_run(workdir, model, config, phases=()):
    """curves.png, regime.png and report.html of a finished run (`config`: its
    config.json; `phases`: its plan's)."""
    plot_curves(workdir, config, phases)
    plot_regime(workdir, model, config, phases)
    return write_report(workdir)
