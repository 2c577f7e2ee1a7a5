"""Paper-figure report of a model: PNG figures and one JSON of the numbers behind them.

Reproduces, on fresh simulated test patterns (:data:`napari_cdinn.nn.evaluate.TEST_SEED`):

* Fig. 2: training curves (train and validation loss, validation phase RMS and IoU) from the
  model card's history;
* Fig. 3: inputs, true and predicted shape and phase, and the iterative (620-iteration
  HIO/ER) results for a few test cases, all aligned to the truth (twin, shift, global phase);
* Fig. 4/5: the chi^2 histogram over the test cases with the 5 best and the 5 worst;
* Fig. 6: mean activation maps of conv layers 2 and 4 of both networks for 3 inputs;
* the twin-image rate (fraction of predictions closer to the twin of the truth).

Uses matplotlib's Agg backend (no display, no Qt).  The iterative results come from a function
the caller passes (:func:`napari_cdinn.pipelines.make_report` passes
:func:`napari_cdinn.retrieval.reconstruct`): this package does not import the retrieval engine.
"""

from __future__ import annotations

import os

import numpy as np

from .. import physics
from ..io import write_json
from ..simulate import simulate
from .evaluate import TEST_SEED, summarise
from .inference import predict

__all__ = ["activation_maps", "make_report"]

#: Encoder indices of conv layers 2 and 4 (paper numbering) in ``Encoder.layers``.
_CONV_LAYERS = {"conv2": 2, "conv4": 7}


def activation_maps(net, inputs):
    """Mean (over channels) ReLU activations of conv layers 2 and 4 for normalised inputs.

    Parameters
    ----------
    net : PaperPair or SharedNet
    inputs : ndarray float32 (n, 32 m, 32 m), normalised amplitudes (``m = net.input_factor``)

    Returns
    -------
    dict ``{network: {layer: ndarray (n, h, w)}}`` with network ``shape``/``phase`` (paper
    pair) or ``shared``.
    """
    import torch

    encoders = {"shape": net.shape.encoder, "phase": net.phase.encoder} if net.arch == "paper" else {"shared": net.encoder}
    from .data import network_input

    x = net.encoder_input(network_input(inputs, None, getattr(net, "mask_channel", False)))
    out = {}
    with torch.inference_mode():
        for name, enc in encoders.items():
            maps, h = {}, x
            for i, layer in enumerate(enc.layers):
                h = layer(h)
                for key, idx in _CONV_LAYERS.items():
                    if i == idx + 1:  # after the ReLU that follows the convolution
                        maps[key] = h.mean(1).float().numpy()
            out[name] = maps
    return out


def _curves(card):
    hist = card.get("history") or []
    quick = [h for h in hist if not h.get("full_validation")]
    return {
        "examples": [h["examples"] for h in quick],
        "train_loss": [h.get("train_loss") for h in quick],
        "val_loss": [h["val_loss"] for h in quick],
        "phase_rms_median": [h["metrics"]["phase_rms_median"] for h in quick],
        "iou_median": [h["metrics"]["iou_median"] for h in quick],
    }


def make_report(out_dir, model=None, count=1000, examples=4, device="cpu", iterations=620, *, reconstruct):
    """Write ``fig2_training.png``, ``fig3_examples.png``, ``fig45_chi2.png``, ``fig6_activations.png``
    and ``report.json`` to ``out_dir``; return the JSON dict.

    ``reconstruct(intensity, iterations=, n_starts=1, device=)`` gives the iterative results of Fig. 3
    (the paper's protocol: one run per pattern; a dict with ``object`` and ``chi2``, as
    :func:`napari_cdinn.retrieval.reconstruct`); call :func:`napari_cdinn.pipelines.make_report`,
    which passes it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import load_model
    from .inference import prepare
    from .models import resolve_model

    os.makedirs(out_dir, exist_ok=True)
    data = simulate(count, seed=TEST_SEED, oversampling=2)
    info = resolve_model(model, data["intensity"].shape)
    path = info.path
    net, card = load_model(path)
    res = predict(data["intensity"], model=info, device=device)
    cmp = physics.compare(res["amplitude"] * np.exp(1j * res["phase"]), data["amplitude"], data["phase"])
    summary = summarise(cmp, res["chi2"])
    order = np.argsort(res["chi2"])
    report = {"model": str(path), "arch": net.arch, "examples_trained": card.get("examples"), "test": summary,
              "twin_rate": summary["twin_rate"], "best5": order[:5].tolist(), "worst5": order[-5:][::-1].tolist(),
              "chi2_best5": res["chi2"][order[:5]].tolist(), "chi2_worst5": res["chi2"][order[-5:][::-1]].tolist()}

    # Fig. 2: training curves
    curves = _curves(card)
    report["curves"] = curves
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    if curves["examples"]:
        ax[0].plot(curves["examples"], curves["train_loss"], label="train")
        ax[0].plot(curves["examples"], curves["val_loss"], label="validation")
        ax[1].plot(curves["examples"], curves["phase_rms_median"], label="phase RMS median (rad)")
        ax[1].plot(curves["examples"], curves["iou_median"], label="support IoU median")
    ax[0].set(xlabel="training examples", ylabel="twin-invariant BCE", title="Fig. 2: loss")
    ax[1].set(xlabel="training examples", title="validation metrics")
    for a in ax:
        a.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig2_training.png"), dpi=100)
    plt.close(fig)

    # Fig. 3: examples with the iterative results
    idx = np.arange(examples)
    it = reconstruct(data["intensity"][idx], iterations=iterations, n_starts=1, device=device)
    it_obj = physics.crop(it["object"], (32, 32))
    it_cmp = physics.compare(it_obj, data["amplitude"][idx], data["phase"][idx])
    report["fig3"] = {"indices": idx.tolist(),
                      "nn_phase_rms": np.asarray(cmp["phase_rms"])[idx].tolist(),
                      "iterative_phase_rms": np.asarray(it_cmp["phase_rms"]).tolist(),
                      "nn_chi2": res["chi2"][idx].tolist(), "iterative_chi2": np.asarray(it["chi2"]).tolist()}
    cols = ["input log10 |F|", "true shape", "NN shape", "iterative shape", "true phase", "NN phase", "iterative phase"]
    fig, axes = plt.subplots(examples, len(cols), figsize=(2 * len(cols), 2 * examples), squeeze=False)
    inputs = prepare(data["intensity"][idx], net.input_transform, net.input_factor)[0]
    for r, i in enumerate(idx):
        nn_al, it_al = cmp["aligned"][i], it_cmp["aligned"][r]
        sup_t = data["amplitude"][i] > physics.SHAPE_THRESHOLD
        panels = [np.log10(inputs[r] + 1e-6), data["amplitude"][i], np.abs(nn_al), np.abs(it_al),
                  np.where(sup_t, data["phase"][i], np.nan),
                  np.where(np.abs(nn_al) > physics.SHAPE_THRESHOLD * np.abs(nn_al).max(), np.angle(nn_al), np.nan),
                  np.where(np.abs(it_al) > physics.SHAPE_THRESHOLD * np.abs(it_al).max(), np.angle(it_al), np.nan)]
        for c, img in enumerate(panels):
            kw = {"vmin": -np.pi, "vmax": np.pi, "cmap": "twilight"} if c >= 4 else {"cmap": "gray"}
            axes[r, c].imshow(img, **kw)
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(cols[c], fontsize=8)
    fig.suptitle("Fig. 3: test cases (aligned to the truth up to twin, shift and global phase)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig3_examples.png"), dpi=100)
    plt.close(fig)

    # Fig. 4/5: chi2 histogram, 5 best and 5 worst
    fig = plt.figure(figsize=(12, 7))
    ax = fig.add_subplot(5, 1, (1, 2))
    ax.hist(np.log10(np.maximum(res["chi2"], 1e-8)), bins=50)
    ax.set(xlabel="log10 chi^2", ylabel="test cases", title=f"Fig. 4: chi^2 of {count} test cases (median "
           f"{summary['chi2_median']:.3g})")
    for k, i in enumerate(list(order[:5]) + list(order[-5:][::-1])):
        a = fig.add_subplot(5, 10, 31 + k)
        a.imshow(np.abs(cmp["aligned"][i]), cmap="gray")
        a.set_title(f"{'best' if k < 5 else 'worst'} {res['chi2'][i]:.2g}", fontsize=7)
        a.axis("off")
        b = fig.add_subplot(5, 10, 41 + k)
        b.imshow(data["amplitude"][i], cmap="gray")
        b.set_title("truth", fontsize=7)
        b.axis("off")
    fig.savefig(os.path.join(out_dir, "fig45_chi2.png"), dpi=100)
    plt.close(fig)

    # Fig. 6: activation maps
    three = prepare(data["intensity"][:3], net.input_transform, net.input_factor)[0]
    maps = activation_maps(net, three)
    rows = [(n, layer) for n in maps for layer in _CONV_LAYERS]
    fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2 * len(rows)), squeeze=False)
    for r, (n, layer) in enumerate(rows):
        for c in range(3):
            axes[r, c].imshow(maps[n][layer][c], cmap="viridis")
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if c == 0:
                axes[r, c].set_ylabel(f"{n} {layer}", fontsize=8)
    fig.suptitle("Fig. 6: mean activations, conv layers 2 and 4")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig6_activations.png"), dpi=100)
    plt.close(fig)

    write_json(os.path.join(out_dir, "report.json"), report)
    return report
