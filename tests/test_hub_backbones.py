"""KerasHub backbones (`hub:PRESET`): tiny presets written here with save_to_preset, loaded
through the same code a named preset takes, cut at their published stages, trained in the
regimes with their freezing checked."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, tiny_config

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402

from tl_keras import backbones, data, hub_backbones, model as model_lib, train  # noqa: E402
from tl_keras import pilots as pilots_lib  # noqa: E402

DINO_SIZE = 28  # 2 x 2 patches of 14 px
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="session")
def presets(tmp_path_factory):
    """{"dinov2", "resnet", "vit": folder}: tiny random-weight presets, with an image
    converter (DINOv2's ImageNet mean and std) for DINOv2 only."""
    root = tmp_path_factory.mktemp("presets")
    keras.utils.set_random_seed(0)
    dino = keras_hub.models.DINOV2Backbone(
        patch_size=14, num_layers=4, hidden_dim=16, num_heads=2, intermediate_dim=32,
        image_shape=(DINO_SIZE, DINO_SIZE, 3), position_embedding_shape=(DINO_SIZE, DINO_SIZE, 3))
    dino.save_to_preset(str(root / "dinov2"))
    keras_hub.layers.DINOV2ImageConverter(
        image_size=(DINO_SIZE, DINO_SIZE), scale=list(1 / (255 * STD)),
        offset=list(-MEAN / STD)).save_to_preset(str(root / "dinov2"))
    resnet = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64] * 4,
        stackwise_num_blocks=[1] * 4, stackwise_num_strides=[1, 2, 2, 2],
        block_type="basic_block", image_shape=(32, 32, 3))
    resnet.save_to_preset(str(root / "resnet"))
    keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=4,
                                 num_heads=2, hidden_dim=16, mlp_dim=32
                                 ).save_to_preset(str(root / "vit"))
    return {"dinov2": str(root / "dinov2"), "resnet": str(root / "resnet"),
            "vit": str(root / "vit")}


def test_transformer_cuts_are_its_blocks_at_quarters(presets):
    name = "hub:" + presets["dinov2"]
    entry = backbones.get_backbone(name)
    assert entry.cuts == {"early": "stage1", "middle": "stage2", "late": "stage3",
                          "top": "dinov2_backbone_layernorm"}
    assert entry.image_size == DINO_SIZE and entry.prefix_tokens == 1  # the class token
    # weights=imagenet: the preset's own weights; the cut gives that block's tokens.
    reference = keras_hub.models.Backbone.from_preset(presets["dinov2"])
    x = np.random.default_rng(0).normal(size=(2, DINO_SIZE, DINO_SIZE, 3)).astype("float32")
    for cut, stage in (("middle", "stage2"), ("stage3", "stage3")):
        built = backbones.build_backbone(name, weights="imagenet", cut=cut)
        want = keras.Model(reference.inputs, reference.pyramid_outputs[stage])(x)
        np.testing.assert_allclose(built.model(x), want, atol=1e-5)
    random = backbones.build_backbone(name, weights="none", cut="top")
    assert not np.allclose(random.base.weights[0].numpy(), reference.weights[0].numpy())


def test_cnn_cuts_are_its_pyramid_levels_named_by_layer(presets):
    name = "hub:" + presets["resnet"]
    entry = backbones.get_backbone(name)
    assert entry.cuts == {"early": "stack0_block0_out", "middle": "stack1_block0_out",
                          "late": "stack2_block0_out", "top": "stack3_block0_out"}
    for cut, stride in (("early", 4), ("middle", 8), ("late", 16), ("P5", 32)):
        built = backbones.build_backbone(name, weights="none", image_size=64, cut=cut)
        assert built.model.output.shape[1] == 64 // stride, cut
    with pytest.raises(ValueError, match="unknown cut 'P9'.*nearest layer names: P"):
        backbones.build_backbone(name, weights="none", image_size=64, cut="P9")


def test_a_vit_is_cut_at_its_encoder_blocks_and_its_model_loads_again(presets, tmp_path):
    # ViTBackbone keeps its blocks inside one encoder layer and publishes no stages: they
    # are called one by one as the encoder calls them, the same layers and weights.
    name = "hub:" + presets["vit"]
    entry = backbones.get_backbone(name)
    assert entry.cuts == {"early": "transformer_block_1", "middle": "transformer_block_2",
                          "late": "transformer_block_3", "top": "ln"}
    reference = keras_hub.models.Backbone.from_preset(presets["vit"])
    x = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype("float32")
    top = backbones.build_backbone(name, weights="imagenet", cut="top")
    np.testing.assert_allclose(top.model(x), reference(x), atol=1e-5)
    # KerasHub 0.32 cannot deserialise its ViT layers outside a ViTBackbone; ours loads.
    cut = backbones.build_backbone(name, weights="imagenet", cut="middle")
    model = model_lib.build_classifier(cut.model, name, 3)
    model.save(tmp_path / "vit.keras")
    loaded = model_lib.load_model(str(tmp_path / "vit.keras"))
    np.testing.assert_allclose(loaded(x * 255), model(x * 255), atol=1e-6)


def test_a_transformer_with_its_blocks_as_layers_is_cut_at_them(tmp_path):
    # SigLIP's vision encoder publishes no stages; its blocks are its own layers, and
    # its output is the pooled vector of its attention-pooling head.
    keras_hub.models.SigLIPVisionEncoder(
        patch_size=14, hidden_dim=16, num_layers=4, num_heads=2, intermediate_dim=32,
        image_shape=(DINO_SIZE, DINO_SIZE, 3)).save_to_preset(str(tmp_path / "siglip"))
    name = f"hub:{tmp_path / 'siglip'}"
    entry = backbones.get_backbone(name)
    prefix = "sig_lip_vision_encoder_"  # KerasHub names a preset's layers after the model
    assert entry.cuts == {"early": prefix + "encoder_block_0", "middle": prefix + "encoder_block_1",
                          "late": prefix + "encoder_block_2", "top": prefix + "head"}
    assert entry.prefix_tokens == 0  # no class token: the mean of the patch tokens
    cut = backbones.build_backbone(name, weights="none", cut="middle")
    model = model_lib.build_classifier(cut.model, name, 3)
    assert model.get_layer("feature_norm").input.shape[-1] == 16
    assert "class_token" not in [layer.name for layer in model.layers]


def test_preprocessing_is_the_presets_image_converter(presets):
    x = np.random.default_rng(1).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    kernel, bias = backbones.preprocess_affine("hub:" + presets["dinov2"])
    np.testing.assert_allclose(x @ kernel + bias, (x / 255 - MEAN) / STD, rtol=1e-5, atol=1e-4)
    kernel, bias = backbones.preprocess_affine("hub:" + presets["resnet"])  # no converter
    np.testing.assert_allclose(x @ kernel + bias, x / 255, rtol=1e-5, atol=1e-6)


def test_token_pooling_takes_the_class_token_and_the_patch_mean(presets):
    name = "hub:" + presets["dinov2"]
    cut = backbones.build_backbone(name, weights="imagenet", cut="top")
    x = np.random.default_rng(2).uniform(0, 255, (2, DINO_SIZE, DINO_SIZE, 3)).astype("float32")
    tokens = np.asarray(cut.model(x / 255))  # identity preprocessing below: same input
    for pool, want in (("cls", tokens[:, 0]), ("mean", tokens[:, 1:].mean(1)),
                       ("cls_mean", np.concatenate([tokens[:, 0], tokens[:, 1:].mean(1)], -1))):
        model = model_lib.build_classifier(cut.model, name, 3, token_pool=pool)
        pooled = keras.Model(model.input, model.get_layer("feature_norm").input)
        model.get_layer("preprocess").set_weights([np.eye(3).reshape(1, 1, 3, 3) / 255,
                                                   np.zeros(3)])
        np.testing.assert_allclose(pooled(x), want, atol=1e-5)


def _weights(layer):
    return [w.numpy().copy() for w in layer.weights]


def _run(tmp_path, preset, regime, **overrides):
    config = tiny_config(tmp_path, regime, backbone="hub:" + preset, weights="imagenet",
                         dataset=overrides.pop("dataset"), **overrides)
    return config, train.finetune(config, data.load(config, image_size=config.image_size))


def test_small_similar_on_dinov2_keeps_every_backbone_weight(tmp_path, presets, shared_images):
    before = keras_hub.models.Backbone.from_preset(presets["dinov2"])
    config, metrics = _run(tmp_path, presets["dinov2"], "small_similar", dataset=str(shared_images),
                           image_size=DINO_SIZE, epochs=2)
    assert metrics["cut_layer"] == "dinov2_backbone_layernorm"
    saved = model_lib.load_model(os.path.join(config.workdir, "model.keras"))
    backbone = saved.get_layer("backbone")
    for a, b in zip(before.weights, backbone.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    head = saved.get_layer("predictions").kernel.numpy()
    fresh = train.build(config, 3, 3)[0].get_layer("predictions").kernel.numpy()
    assert not np.allclose(head, fresh)  # the head trained
    assert metrics["val_accuracy"] > 0


def test_large_similar_on_a_hub_cnn_trains_it_with_statistics_frozen(tmp_path, presets,
                                                                     shared_images):
    before = keras_hub.models.Backbone.from_preset(presets["resnet"])
    config, _ = _run(tmp_path, presets["resnet"], "large_similar", dataset=str(shared_images),
                     image_size=32, epochs=2, head_epochs=1)
    saved = model_lib.load_model(os.path.join(config.workdir, "model.keras"))
    backbone = saved.get_layer("backbone")
    bn = backbone.get_layer("stack1_block0_1_bn")
    np.testing.assert_array_equal(bn.moving_mean.numpy(),
                                  before.get_layer("stack1_block0_1_bn").moving_mean.numpy())
    conv = backbone.get_layer("stack1_block0_1_conv").kernel.numpy()
    assert not np.allclose(conv, before.get_layer("stack1_block0_1_conv").kernel.numpy())


def test_bad_presets_and_a_missing_keras_hub_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"could not load KerasHub preset .*nowhere.* takes a "
                                         r"KerasHub preset name"):
        backbones.get_backbone("hub:" + str(tmp_path / "nowhere"))
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # import keras_hub: ImportError
    hub_backbones.entry.cache_clear()
    with pytest.raises(ValueError, match=r"needs KerasHub .*pip install --no-deps"):
        backbones.get_backbone("hub:dinov2_small")


@pytest.mark.slow  # tools/finetune.py in a new process (docs/testing.md)
def test_finetune_tool_on_a_hub_preset(presets, shared_images, tmp_path):
    # The CLI end to end in its own process: flags, the run folder's name, the final line.
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "finetune.py"),
         f"--backbone=hub:{presets['dinov2']}", "--config=configs/smoke.py",
         f"--dataset={shared_images}", f"--workdir={tmp_path / 'run'}", "--image_size=0",
         "--config.verbose=0", "--config.augment=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val_accuracy" in result.stdout
    # The run exports as any run does: the SavedModel's probabilities are the model's.
    import tensorflow as tf

    from tl_keras import export

    version = export.export_run(str(tmp_path / "run"), str(tmp_path / "export"), verbose=False)
    model = model_lib.load_model(str(tmp_path / "run" / "model.keras"))
    x = np.random.default_rng(3).uniform(0, 255, (2, DINO_SIZE, DINO_SIZE, 3)).astype("float32")
    served = tf.saved_model.load(version).signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(served["probabilities"].numpy(), model.predict(x, verbose=0),
                               atol=1e-5)


def test_the_advisor_scores_a_transformers_cuts(presets, shared_images, tmp_path):
    from tl_keras import plan as plan_lib

    config = tiny_config(tmp_path, backbone="hub:" + presets["dinov2"], weights="imagenet",
                         dataset=str(shared_images), image_size=DINO_SIZE)
    plan = plan_lib.resolve(config)
    advice, sample = pilots_lib.advise(plan, data.load(plan.config, image_size=DINO_SIZE),
                                   verbose=0)
    assert set(advice.scores) == {"early", "middle", "late", "top"}
    # Each cut's features: the class token and the patch mean of that block (2 x 16).
    assert sample.features["pretrained/early"].shape[1] == 2 * 16
    assert not np.allclose(sample.features["pretrained/early"], sample.features["pretrained/late"])


@pytest.mark.parametrize("cut, drawn_names, states", [
    ("top", ["stem .. top"], ["frozen"]),
    ("middle", ["stem .. middle", "middle .. late", "late .. top"],
     ["frozen", "removed", "removed"]),
])
def test_the_regime_picture_draws_a_transformers_encoder_as_one_stage(presets, tmp_path, cut,
                                                                     drawn_names, states):
    # DINOv2's blocks live inside one encoder layer: its stages were drawn as "removed".
    from tl_keras import plan as plan_lib, report, trainable

    config = tiny_config(tmp_path, "small_similar" if cut == "top" else "small_different",
                         backbone="hub:" + presets["dinov2"], weights="none", cut=cut,
                         image_size=DINO_SIZE)
    plan = plan_lib.resolve(config)
    model, _ = train.build(plan, 3, 3)
    for phase in plan.phases:
        trainable.apply_phase(model, phase)
    drawn = report.stages(model, plan.to_dict())[:-1]
    assert [name for name, _, _ in drawn] == drawn_names
    assert [state for _, state, _ in drawn] == states
    kept = sum(params for _, state, params in drawn if state != "removed")
    assert kept == sum(int(np.prod(w.shape)) for w in model.get_layer("backbone").weights)
